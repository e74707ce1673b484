"""CentralizedRankingLoss (DGCRL), forward+backward: class-streamed vs unchunked vs the dense reference.

    pytest benchmarks/bench_centralized.py --benchmark-only --benchmark-group-by=group [--bench-memory]

fp32, 2 threads, labels uniform over the classes, default hyper-parameters (margin 0.2, scale 1,
``decorrelation="auto"``: the orthogonality penalty when D < C); gradients w.r.t. the embeddings and the
(C, D) class weights (reset to None before every step, as ``optimizer.zero_grad()`` does). Methods of
:func:`case`:

* ``streamed``: ``ml.CentralizedRankingLoss(D, C, class_chunk=k)``, k = ``4_000_000 // B`` by default
  (the NormSoftmax guidance: a (B, k) block of about 4M entries); no (B, C) tensor;
* ``unchunked``: the same module with ``class_chunk=None`` (one (B, C) block);
* ``reference``: :func:`metricloss.reference.centralized_ranking_loss` on the same weight (explicit
  (B, C, D) differences: small sizes only).

pytorch-metric-learning 2.9.0 has no DGCRL. Time and peak memory, one subprocess per point:
``python benchmarks/report.py --only dgcrl``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

if __package__ in (None, ""):  # imported by path: make `benchmarks` and `metricloss` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASE = "benchmarks.bench_centralized:case"
BLOCK_ENTRIES = 4_000_000


def default_chunk(b: int) -> int:
    """class_chunk giving a (B, chunk) block of about 4M entries."""
    return max(1, BLOCK_ENTRIES // b)


def case(method: str, b: int, d: int, c: int, chunk: Optional[int] = None) -> Callable[[], None]:
    """Harness case: one forward+backward of DGCRL (see the module docstring for ``method``)."""
    import torch

    import metricloss as ml
    from metricloss import reference

    torch.manual_seed(0)  # the module's weight init
    g = torch.Generator().manual_seed(0)
    emb0 = torch.randn(b, d, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    if method not in ("streamed", "unchunked", "reference"):
        raise ValueError(method)
    class_chunk = (chunk or default_chunk(b)) if method == "streamed" else None
    module = ml.CentralizedRankingLoss(d, c, class_chunk=class_chunk)
    if method == "reference":
        def loss_fn(e, y):
            return reference.centralized_ranking_loss(e, y, module.weight)
    else:
        loss_fn = module

    def step() -> None:
        module.weight.grad = None
        emb = emb0.clone().requires_grad_()
        loss_fn(emb, labels).backward()

    return step


try:
    import pytest
except ImportError:  # pragma: no cover - harness children do not need pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("method", ["streamed", "unchunked", "reference"])
    def test_dgcrl_small(run_case, method):
        """Small enough for the reference's (B, C, D) differences (131 MiB each)."""
        run_case(CASE, {"method": method, "b": 256, "d": 128, "c": 1000}, group="dgcrl B=256 D=128 C=1000",
                 rounds=5)

    @pytest.mark.parametrize("method", ["streamed", "unchunked"])
    def test_dgcrl_large(run_case, method):
        run_case(CASE, {"method": method, "b": 1024, "d": 512, "c": 10000},
                 group="dgcrl B=1024 D=512 C=10000")
