"""pytest-benchmark suites: `pytest benchmarks --benchmark-only --benchmark-group-by=group`.

Two threads, as every figure in this project; inputs are built outside the timed call.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield
