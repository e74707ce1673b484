"""Triplet losses, forward+backward: metricloss (chunked torch) vs the dense torch reference vs PML.

    pytest benchmarks/bench_triplet.py --benchmark-only --benchmark-group-by=group [--bench-memory]

D=128, fp32, N/4 classes × 4 samples, margin 0.2, ``reduction="mean_nonzero"`` (PML's AvgNonZero), the
cases of :func:`benchmarks.memory_triplet.case`:

* ``metricloss``: ``ml.TripletLoss(mining=..., backend="torch")``;
* ``dense``: :func:`metricloss.reference.triplet_loss` ((N, N, D) differences, (N, N, N) cubes); skipped
  where it would need more than ``DENSE_MAX_GIB`` (see :func:`~benchmarks.memory_triplet.dense_gib`);
* ``pml``: ``TripletMarginLoss`` + ``BatchHardMiner`` (batch-hard, the same loss), no miner (batch-all,
  the same loss), ``TripletMarginMiner(type_of_triplets="semihard")`` (semi-hard: PML's semi-hard is a
  different loss, timing only); skipped when pytorch-metric-learning is not installed;
* ``matmul``: one bare N×N×D ``x @ x.T`` (no grad), the floor batch-hard mining is measured against.

Time and peak memory over a grid of N, one subprocess per point: ``python benchmarks/report.py``.
"""

import importlib.util

import pytest

from .memory_triplet import DENSE_MAX_GIB, dense_gib

CASE = "benchmarks.memory_triplet:case"
SIZES = {"batch_hard": (1024, 4096), "batch_all": (256, 1024), "semi_hard": (256, 1024)}
IMPLS = ("metricloss", "dense", "pml")
HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None

CASES = [(mining, n, impl) for mining, sizes in SIZES.items() for n in sizes for impl in IMPLS]


def group(mining: str, n: int) -> str:
    return f"triplet {mining} N={n} D=128"


@pytest.mark.parametrize("mining, n, impl", CASES, ids=[f"{m}-N{n}-{i}" for m, n, i in CASES])
def test_triplet_forward_backward(run_case, mining, n, impl):
    if impl == "dense" and dense_gib(mining, n) > DENSE_MAX_GIB:
        pytest.skip(f"the dense reference would need ~{dense_gib(mining, n):.0f} GiB at N={n}")
    if impl == "pml" and not HAVE_PML:
        pytest.skip("pytorch-metric-learning is not installed")
    run_case(CASE, {"method": impl, "mining": mining, "n": n}, group=group(mining, n))


@pytest.mark.parametrize("n", SIZES["batch_hard"])
def test_matmul_floor(run_case, n):
    """One bare N×N×D matmul: the floor batch-hard mining is measured against."""
    run_case(CASE, {"method": "matmul", "mining": "-", "n": n}, group=group("batch_hard", n), rounds=5)
