"""pytest-benchmark suites: ``pytest benchmarks --benchmark-only --benchmark-group-by=group``.

Every suite (``benchmarks/bench_<family>.py``) times harness cases (``case(**params) -> step``, the same
functions :mod:`benchmarks.harness` and ``benchmarks/report.py`` run in subprocesses) through the
:func:`run_case` fixture: the inputs are built outside the timed call, ``step()`` (one forward+backward)
is timed, two threads, as every figure in this project.

``--bench-memory`` also runs each case once in a fresh subprocess (:func:`benchmarks.harness.measure`)
and records its peak extra memory: in the JSON's ``extra_info["peak_extra_mib"]`` and in a table printed
at the end of the session. Off by default (it roughly doubles the run time).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import torch

from benchmarks.harness import load_case, measure

_PEAKS: List[Tuple[str, str, str]] = []  # (group, test id, peak extra MiB or the error)


def pytest_addoption(parser):
    parser.addoption("--bench-memory", action="store_true", default=False,
                     help="metricloss benchmarks: also measure each case's peak extra memory in a fresh "
                          "subprocess (benchmarks/harness.py)")


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def run_case(benchmark, request):
    """``run_case(case, params, group=..., rounds=3)``: time ``load_case(case)(**params)``.

    One untimed warm-up round, then ``rounds`` timed rounds of one call each. ``params`` go to
    ``extra_info`` so the JSON output says what was measured.
    """

    def run(case: str, params: Dict[str, Any], *, group: str, rounds: int = 3) -> None:
        benchmark.group = group
        benchmark.extra_info.update(params)
        if request.config.getoption("--bench-memory"):
            # before building the in-process inputs, so the two never hold memory at the same time
            res = measure(case, params, repeats=1, warmup=0)
            peak = res.get("peak_extra_mib", res.get("error", "?"))
            benchmark.extra_info["peak_extra_mib"] = peak
            _PEAKS.append((group, request.node.name, f"{peak:.0f}" if isinstance(peak, float) else str(peak)))
        step = load_case(case)(**params)
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

    return run


def pytest_terminal_summary(terminalreporter):
    if not _PEAKS:
        return
    terminalreporter.section("peak extra memory (MiB, one run per case in a fresh subprocess)")
    for group, name, peak in sorted(_PEAKS):
        terminalreporter.write_line(f"{group:<48} {name:<56} {peak:>8}")
