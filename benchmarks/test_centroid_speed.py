"""pytest-benchmark suite for CentroidTripletLoss: metricloss vs a naive dense torch version (time only;
memory is measured per subprocess by ``benchmarks/centroid.py``).

    pytest benchmarks/test_centroid_speed.py --benchmark-only --benchmark-group-by=param:n

C=1000 classes (random unit centroids), D=128, fp32, 2 threads, forward+backward w.r.t. the embeddings.
pytorch-metric-learning 2.9.0 has no centroid triplet loss (PML.md), so there is no PML column.
"""

import pytest
import torch

from benchmarks.centroid import case

pytest.importorskip("pytest_benchmark")


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("n", [1024, 4096, 16384])
@pytest.mark.parametrize("method", ["metricloss", "naive"])
def test_centroid_forward_backward(benchmark, method, n):
    step = case(method, n, scheme="random")
    step()  # warm-up: thread pools, allocator
    benchmark.pedantic(step, rounds=5, iterations=1)
