"""Batch-hard's one-block path (small batches: :func:`metricloss.ops.mining.batch_hard_dense` and
:class:`metricloss.ops.triplet.BatchHardPairTerms`) against the chunked engine it replaces there.

The dense miner uses the chunked engine's GEMM, canonical columns and tie rules, so with the whole batch in
one chunk both select the same rows: the indices are equal, and so are the losses (the same pair
distances) and, for the hinge, the gradients (autograd's roundings, written out). Checked on random data,
on duplicated rows, on integer-valued (exactly tied) data, with reference sets and own rows, for every
distance, margin, reduction and dtype.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import mining as mining_ops
from metricloss.ops.distance import canonical_columns, canonical_columns_dense, prepare_embeddings

from ..helpers import duplicate_rows, label_pattern

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]

# A budget that keeps the chunked engine at one chunk for these sizes but is below the dense path's need
# (batch_hard_fits_one_block), so the two paths see the same GEMM.
CHUNKED_ONE_CHUNK = 20_000


@st.composite
def batches(draw):
    n = draw(st.integers(2, 30))
    d = draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "integers", "duplicates", "zeros"]))
    if kind == "integers":
        x = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    else:
        x = torch.randn(n, d, generator=g, dtype=dtype)
    if kind == "duplicates":
        x = duplicate_rows(x, g, count=max(1, n // 3))
    if kind == "zeros":
        x[torch.rand(n, generator=g) < 0.3] = 0.0
    y = label_pattern(draw(st.sampled_from(["random", "pk2", "pk3", "singletons"])), n, g, num_classes=4)
    ref = draw(st.sampled_from(["self", "bank", "bank_with_own_rows"]))
    if ref == "self":
        return x, y, None, None, None
    m = draw(st.integers(1, 20))
    bank = torch.randn(m, d, generator=g, dtype=dtype)
    bank_labels = torch.randint(0, 4, (m,), generator=g)
    if ref == "bank":
        return x, y, bank, bank_labels, None
    bank = torch.cat([bank, x[: n // 2]])
    bank_labels = torch.cat([bank_labels, y[: n // 2]])
    own = torch.full((n,), -1, dtype=torch.int64)
    own[: n // 2] = torch.arange(m, m + n // 2)
    return x, y, bank, bank_labels, own


def _run(case, chunk_bytes, grads=True, **kwargs):
    x, y, bank, bank_labels, own = case
    xs = x.clone().requires_grad_()
    bs = None if bank is None else bank.clone().requires_grad_()
    loss = MF.triplet_loss(xs, y, bs, bank_labels, mining="batch_hard", backend="torch", chunk_bytes=chunk_bytes,
                           ref_self_index=own, **kwargs)
    if not grads:
        return loss, None, None
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    (loss * weight).sum().backward()
    return loss.detach(), xs.grad, None if bs is None else bs.grad


@settings(max_examples=150, deadline=None)
@given(case=batches(), distance=st.sampled_from(DISTANCES), reduction=st.sampled_from(REDUCTIONS),
       margin=st.sampled_from([0.0, 0.2, "soft"]), normalize=st.booleans())
def test_dense_path_equals_the_chunked_engine(case, distance, reduction, margin, normalize):
    x, y, bank, bank_labels, own = case
    assert mining_ops.batch_hard_fits_one_block(x.shape[0], x.shape[0] if bank is None else bank.shape[0],
                                                x.element_size(), None)
    kwargs = dict(distance=distance, reduction=reduction, margin=margin, normalize=normalize)
    dense = _run(case, None, **kwargs)
    chunked = _run(case, CHUNKED_ONE_CHUNK, **kwargs)
    assert torch.equal(dense[0], chunked[0]), (dense[0], chunked[0])
    for got, want in zip(dense[1:], chunked[1:]):
        if want is None:
            assert got is None
        elif margin == "soft":  # sigmoid(z) against softplus's own backward: rounding apart
            torch.testing.assert_close(got, want, rtol=1e-12 if x.dtype == torch.float64 else 1e-5, atol=1e-12)
        else:
            assert torch.equal(got, want), (got - want).abs().max()
    # and the dense reference, within rounding
    xr = x.clone().requires_grad_()
    br = None if bank is None else bank.clone().requires_grad_()
    want = reference.triplet_loss(xr, y, br, bank_labels, mining="batch_hard", ref_self_index=own, **kwargs)
    tol = 1e-9 if x.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(dense[0], want.detach(), rtol=tol, atol=tol)


@settings(max_examples=100, deadline=None)
@given(case=batches(), distance=st.sampled_from(DISTANCES))
def test_dense_indices_equal_the_chunked_miner(case, distance):
    x, y, bank, bank_labels, own = case
    a = prepare_embeddings(x, distance, normalize=False)  # as the miner prepares them (cosine: unit rows)
    r = a if bank is None else prepare_embeddings(bank, distance, normalize=False)
    lr = y if bank is None else bank_labels
    dense = mining_ops.batch_hard_indices_dense(a, r, y, lr, bank is None, distance, own)
    if bank is None:
        chunked = MF.mine_batch_hard(x, y, distance=distance, backend="torch", chunk_bytes=CHUNKED_ONE_CHUNK)
    else:
        chunked = MF.mine_batch_hard(x, y, bank, bank_labels, distance=distance, backend="torch",
                                     chunk_bytes=CHUNKED_ONE_CHUNK, ref_self_index=own)
    assert torch.equal(dense[0], chunked[0]) and torch.equal(dense[1], chunked[1])


def test_canonical_columns_dense_equals_the_sorting_one():
    g = torch.Generator().manual_seed(0)
    x = duplicate_rows(torch.randn(50, 6, generator=g), g, count=12)
    x[3] = -0.0  # −0.0 and +0.0 rows are one row
    x[7] = 0.0
    x[9, 2] = float("nan")  # NaN rows are never duplicates
    x[11] = x[9]
    want = canonical_columns(x)
    assert want is not None
    assert torch.equal(canonical_columns_dense(x), want)
    distinct = torch.randn(20, 6, generator=g)
    assert canonical_columns(distinct) is None
    assert torch.equal(canonical_columns_dense(distinct), torch.arange(20))


def test_a_hash_collision_only_costs_the_canonical_column(monkeypatch):
    # every row hashing alike: each row's candidate is row 0, kept only where the rows are equal
    from metricloss.ops import distance as distance_ops

    monkeypatch.setattr(distance_ops, "_hash_coefficients", lambda dim, device: torch.zeros(dim, dtype=torch.int64))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]])
    assert canonical_columns_dense(x).tolist() == [0, 1, 0, 3]  # row 3's copy (row 1) is missed, documented


@pytest.mark.parametrize("distance", DISTANCES)
def test_the_dense_path_serves_small_batches_and_the_chunked_engine_large_ones(distance, monkeypatch):
    served = []
    real_dense, real_chunked = mining_ops.batch_hard_dense, mining_ops.batch_hard_indices
    from metricloss.ops import triplet as triplet_ops

    monkeypatch.setattr(triplet_ops, "batch_hard_dense", lambda *a, **k: served.append("dense") or real_dense(*a, **k))
    monkeypatch.setattr(triplet_ops, "batch_hard_indices",
                        lambda *a, **k: served.append("chunked") or real_chunked(*a, **k))
    x, y = torch.randn(64, 8), torch.arange(64) // 4
    MF.triplet_loss(x, y, distance=distance, backend="torch")
    MF.triplet_loss(x, y, distance=distance, backend="torch", chunk_bytes=10_000)
    assert served == ["dense", "chunked"]
    # the heuristic: N·M·16 bytes plus the (M, M) duplicate test within the budget
    assert mining_ops.batch_hard_fits_one_block(1400, 1400, 4, None)
    assert not mining_ops.batch_hard_fits_one_block(2048, 2048, 4, None)
    assert mining_ops.batch_hard_fits_one_block(2048, 2048, 4, 128 << 20)
    # on CPU (host reads free, the chunked engine faster on large blocks) at most 256 x 256 cells
    assert mining_ops.batch_hard_fits_one_block(256, 256, 4, None, cpu=True)
    assert not mining_ops.batch_hard_fits_one_block(512, 512, 4, None, cpu=True)


def test_cpu_keeps_the_chunked_engine_for_large_blocks_and_an_accelerator_does_not(monkeypatch):
    from metricloss import _checks
    from metricloss.ops import triplet as triplet_ops

    served = []
    real = mining_ops.batch_hard_dense
    monkeypatch.setattr(triplet_ops, "batch_hard_dense", lambda *a, **k: served.append("dense") or real(*a, **k))
    x, y = torch.randn(512, 8), torch.arange(512) // 4
    want = MF.triplet_loss(x, y, backend="torch")
    assert served == []
    with _checks.accelerator_rules():
        got = MF.triplet_loss(x, y, backend="torch")
    assert served == ["dense"]
    assert torch.equal(got, want)


# each distance with both margins, both reductions and both reference kinds, in 6 compiles (about 1 s each)
@pytest.mark.parametrize("distance, margin, reduction, ref", [
    ("euclidean", 0.2, "mean", "self"), ("euclidean", "soft", "none", "bank_with_own_rows"),
    ("squared_euclidean", 0.2, "none", "self"), ("squared_euclidean", "soft", "mean", "bank_with_own_rows"),
    ("cosine", 0.2, "mean", "bank_with_own_rows"), ("cosine", "soft", "none", "self")])
def test_fullgraph_compile_equals_eager(distance, margin, reduction, ref):
    """No host read and no data-dependent shape: the one-block path compiles as one graph (aot_eager: Dynamo
    and AOTAutograd without a C++ compiler), with the eager loss and gradients."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.arange(32) // 4
    bank, bank_labels, own = None, None, None
    if ref != "self":
        bank = torch.cat([torch.randn(10, 8, generator=g, dtype=torch.float64), x[:16]])
        bank_labels = torch.cat([torch.randint(0, 8, (10,), generator=g), y[:16]])
        own = torch.cat([torch.arange(10, 26), torch.full((16,), -1)])

    def fn(t, b):
        out = MF.triplet_loss(t, y, b, bank_labels, mining="batch_hard", backend="torch", distance=distance,
                              margin=margin, reduction=reduction, ref_self_index=own)
        return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = [(x.clone().requires_grad_(), None if bank is None else bank.clone().requires_grad_()) for _ in range(2)]
    want, got = fn(*inputs[0]), compiled(*inputs[1])
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inputs[1][0].grad, inputs[0][0].grad, rtol=1e-12, atol=1e-12)
    if bank is not None:
        torch.testing.assert_close(inputs[1][1].grad, inputs[0][1].grad, rtol=1e-12, atol=1e-12)
