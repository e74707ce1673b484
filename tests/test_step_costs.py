"""What a training step costs a GPU, held to a budget: dispatched ops (kernel launches) and host syncs per
forward + backward of every loss, at N = 64, 256 and 1024.

Counted on CPU on the code path CUDA takes (``benchmarks/step_costs.py``: ``METRICLOSS_NATIVE=0``, the
accelerator's rules for value checks). The counts are exact and machine-independent, so a change that adds
a launch or a sync fails here; a change that removes some should lower the budget with it. The budgets are
the counts of the current code; the table in docs/benchmarks.md is this file's, printed by
``python benchmarks/step_costs.py``.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_costs import count_step, workloads  # noqa: E402

SIZES = (64, 256, 1024)

# name -> {N: (ops, syncs)}: the most each step may cost
BUDGETS = {
    "batch-hard": {64: (91, 0), 256: (91, 0), 1024: (91, 0)},
    "SCT (module, monitor on)": {64: (115, 0), 256: (115, 0), 1024: (115, 0)},
    "EPHN (module, monitor on)": {64: (98, 0), 256: (98, 0), 1024: (98, 0)},
    "batch-all (mean_nonzero)": {64: (197, 4), 256: (197, 4), 1024: (197, 4)},
    "semi-hard": {64: (238, 4), 256: (238, 4), 1024: (238, 4)},
    "batch-hard, CrossBatchMemory (memory 2N)": {64: (112, 0), 256: (112, 0), 1024: (112, 0)},
    "NormSoftmax": {64: (54, 0), 256: (54, 0), 1024: (54, 0)},
    "NormSoftmax streamed (4 class chunks)": {64: (218, 0), 256: (218, 0), 1024: (218, 0)},
    "cosine classifier + cross-entropy": {64: (49, 0), 256: (49, 0), 1024: (49, 0)},
    "centroid bound": {64: (96, 1), 256: (96, 1), 1024: (96, 1)},
    "DGCRL": {64: (138, 0), 256: (138, 0), 1024: (168, 0)},
    "SVMax": {64: (58, 0), 256: (58, 0), 1024: (58, 0)},
    "two-head (CE + semi-hard)": {64: (243, 4), 256: (243, 4), 1024: (243, 4)},
    "WARP sampled, (N, 1000)": {64: (123, 6), 256: (123, 6), 1024: (158, 10)},
    "WARP exact, (N, 1000)": {64: (69, 0), 256: (69, 0), 1024: (69, 0)},
    "cross-entropy, (N, 1000) (for scale)": {64: (6, 0), 256: (6, 0), 1024: (6, 0)},
}


def test_every_workload_has_a_budget():
    assert set(workloads(64)) == set(BUDGETS)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(BUDGETS))
def test_step_within_budget(name, n):
    ops, syncs = count_step(workloads(n)[name])
    max_ops, max_syncs = BUDGETS[name][n]
    assert syncs <= max_syncs, f"{name} at N={n}: {syncs} host syncs, budget {max_syncs}"
    assert ops <= max_ops, f"{name} at N={n}: {ops} dispatched ops, budget {max_ops}"


def test_the_counter_sees_a_launch_and_a_sync():
    # the counter itself: one extra op and one host read in a step are counted
    import torch

    base = lambda: torch.ones(3, requires_grad=True).sum()  # noqa: E731

    def extra():
        t = torch.ones(3, requires_grad=True)
        out = (t * 2).sum()
        bool(out > 0)
        return out

    (ops0, syncs0), (ops1, syncs1) = count_step(base), count_step(extra)
    assert syncs1 == syncs0 + 1 and ops1 > ops0
