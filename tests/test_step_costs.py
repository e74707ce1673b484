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

from benchmarks.step_costs import count_step, triton_rows_available, workloads  # noqa: E402

SIZES = (64, 256, 1024)

# name -> {N: (ops, syncs)}: the most each step may cost
BUDGETS = {
    "batch-hard": {64: (93, 0), 256: (93, 0), 1024: (93, 0)},
    "SCT (module, monitor on)": {64: (117, 0), 256: (117, 0), 1024: (117, 0)},
    "EPHN (module, monitor on)": {64: (100, 0), 256: (100, 0), 1024: (100, 0)},
    "batch-all (mean_nonzero)": {64: (205, 2), 256: (205, 2), 1024: (205, 2)},
    "semi-hard": {64: (246, 2), 256: (246, 2), 1024: (246, 2)},
    "batch-hard, CrossBatchMemory (memory 2N)": {64: (114, 0), 256: (114, 0), 1024: (114, 0)},
    "NormSoftmax": {64: (53, 0), 256: (53, 0), 1024: (53, 0)},
    "NormSoftmax streamed (4 class chunks)": {64: (217, 0), 256: (217, 0), 1024: (217, 0)},
    "cosine classifier + cross-entropy": {64: (49, 0), 256: (49, 0), 1024: (49, 0)},
    "centroid bound": {64: (95, 1), 256: (95, 1), 1024: (95, 1)},
    "DGCRL": {64: (137, 0), 256: (137, 0), 1024: (167, 0)},
    "SVMax": {64: (58, 0), 256: (58, 0), 1024: (58, 0)},
    "two-head (CE + semi-hard)": {64: (250, 2), 256: (250, 2), 1024: (250, 2)},
    "WARP sampled, (N, 1000)": {64: (105, 0), 256: (105, 0), 1024: (105, 0)},
    "batch-hard, Triton miner": {64: (65, 0), 256: (65, 0), 1024: (65, 0)},
    "WARP sampled, Triton kernel, (N, 1000)": {64: (10, 0), 256: (10, 0), 1024: (10, 0)},
    "WARP exact, (N, 1000)": {64: (68, 0), 256: (68, 0), 1024: (68, 0)},
    "cross-entropy, (N, 1000) (for scale)": {64: (6, 0), 256: (6, 0), 1024: (6, 0)},
}


TRITON_ROWS = {name for name in BUDGETS if "Triton" in name}


def test_every_workload_has_a_budget():
    # the Triton rows are counted where the interpreter runs them (the test suite sets TRITON_INTERPRET=1)
    expected = set(BUDGETS) if triton_rows_available() else set(BUDGETS) - TRITON_ROWS
    assert set(workloads(64)) == expected


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(BUDGETS))
def test_step_within_budget(name, n):
    if name in TRITON_ROWS and not triton_rows_available():
        pytest.skip("Triton (with TRITON_INTERPRET=1) is not available")
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
