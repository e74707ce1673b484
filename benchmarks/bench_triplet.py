"""Triplet losses, forward+backward: metricloss (chunked torch) vs the dense torch reference vs PML.

Run: ``pytest benchmarks/bench_triplet.py --benchmark-only --benchmark-group-by=group``.
Peak memory is measured per process by ``benchmarks/memory_triplet.py`` and ``benchmarks/report.py``.
"""

import pytest
import torch

import metricloss as ml
from metricloss import reference

from .memory_triplet import make_inputs

MARGIN = 0.2


def _pml(mining):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    loss_fn = losses.TripletMarginLoss(margin=MARGIN)
    if mining == "batch_hard":
        miner = miners.BatchHardMiner()
        return lambda e, y: loss_fn(e, y, miner(e, y))
    if mining == "semi_hard":
        miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")
        return lambda e, y: loss_fn(e, y, miner(e, y))
    return lambda e, y: loss_fn(e, y)


def _impl(name, mining):
    # PML's reducer is AvgNonZero; compare like with like (semi-hard: PML's miner keeps only the
    # semi-hard triplets, so its loss differs; the timing is still the cost of PML's path)
    if name == "metricloss":
        return ml.TripletLoss(margin=MARGIN, mining=mining, reduction="mean_nonzero", backend="torch")
    if name == "dense":
        return lambda e, y: reference.triplet_loss(e, y, margin=MARGIN, mining=mining, reduction="mean_nonzero")
    return _pml(mining)


CASES = [(mining, n, impl)
         for mining, sizes in (("batch_hard", (1024, 4096)), ("batch_all", (256, 1024)), ("semi_hard", (256, 1024)))
         for n in sizes for impl in ("metricloss", "dense", "pml")]


@pytest.mark.parametrize("mining, n, impl", CASES, ids=[f"{m}-N{n}-{i}" for m, n, i in CASES])
def test_triplet_forward_backward(benchmark, mining, n, impl):
    if impl == "dense" and mining != "batch_hard" and n > 512:
        pytest.skip("the dense reference's N×N×N cube is the point being avoided")
    emb0, labels = make_inputs(n)
    fn = _impl(impl, mining)
    benchmark.group = f"triplet {mining} N={n} D=128"

    def step():
        emb = emb0.clone().requires_grad_()
        fn(emb, labels).backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("n", [1024, 4096])
def test_matmul_floor(benchmark, n):
    """One bare N×N×D matmul: the floor batch-hard mining is measured against."""
    emb0, _ = make_inputs(n)
    x = torch.nn.functional.normalize(emb0, dim=1)
    benchmark.group = f"triplet batch_hard N={n} D=128"
    benchmark.pedantic(lambda: x @ x.T, rounds=5, warmup_rounds=1)
