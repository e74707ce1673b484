"""Regression tests of the adversarial review (label dtypes, duplicate ties, rounding residue, dtype mixes,
host syncs, autograd transforms, second derivatives, tracing) for the triplet family."""

import collections

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import mining as mining_ops
from metricloss.ops.labels import ClassIndex

from ..helpers import pk_labels

MININGS = ["batch_hard", "batch_all", "semi_hard"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]


# ---------------------------------------------------------------------------------------------------
# labels of mixed integer dtypes: compared in the promoted dtype, never narrowed
# ---------------------------------------------------------------------------------------------------

def test_issue_example_mixed_label_dtypes():
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tensor([256, 256, 7, 7])
    bank = torch.tensor([0, 0, 0, 7, 7, 7], dtype=torch.uint8)
    pos, neg = MF.mine_batch_hard(x, y, ref, bank)
    assert pos[:2].tolist() == [-1, -1]  # 256 is no uint8 0
    want = MF.mine_batch_hard(x, y, ref, bank.long())
    assert torch.equal(pos, want[0]) and torch.equal(neg, want[1])
    for mining in MININGS:
        torch.testing.assert_close(MF.triplet_loss(x, y, ref, bank, mining=mining),
                                   MF.triplet_loss(x, y, ref, bank.long(), mining=mining))
        torch.testing.assert_close(MF.triplet_loss(x, y, ref, bank, mining=mining),
                                   reference.triplet_loss(x, y, ref, bank, mining=mining))


@pytest.mark.parametrize("anchor_dtype, ref_dtype, anchor_value, ref_value", [
    (torch.int64, torch.uint8, 256, 0),
    (torch.int64, torch.int32, 2**32 + 7, 7),
    (torch.int32, torch.int64, 7, 2**32 + 7),
    (torch.uint8, torch.int8, 200, -56),
    (torch.int16, torch.uint8, -1, 255),
])
def test_class_index_never_narrows(anchor_dtype, ref_dtype, anchor_value, ref_value):
    index = ClassIndex(torch.tensor([ref_value, ref_value, 3], dtype=ref_dtype))
    cls = index.anchor_classes(torch.tensor([anchor_value, 3], dtype=anchor_dtype))
    assert cls.count.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------
# exact duplicate rows: first index on ties
# ---------------------------------------------------------------------------------------------------

def test_issue_example_duplicate_rows_first_index():
    x = torch.tensor([[0.6886021190728905, 4.823413471993842e-05], [-0.2907250950176982, 0.956716254417461],
                      [0.1301015376200409, -0.0246971295782155], [1.4562692861258149, 0.4414618926439666],
                      [1.4562692861258149, 0.4414618926439666]], dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 0, 0])
    got = MF.mine_batch_hard(x, y, distance="squared_euclidean")
    assert got[0].tolist() == [-1, 3, 3, 1, 1]
    want = reference.mine_batch_hard(x, y, distance="squared_euclidean")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 40), d=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), distance=st.sampled_from(DISTANCES),
       chunk=st.sampled_from([None, 300]))
def test_mine_batch_hard_duplicates_tie_to_the_first_copy(seed, n, d, dtype, distance, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    src = torch.randint(0, n, (n // 2,), generator=g)
    dst = torch.randint(0, n, (n // 2,), generator=g)
    x[dst] = x[src]  # many exact duplicates, across and within classes
    y = torch.randint(0, 3, (n,), generator=g)
    got = MF.mine_batch_hard(x, y, distance=distance, chunk_bytes=chunk)
    want = reference.mine_batch_hard(x, y, distance=distance)
    d = reference.pairwise_distance(x.double(), distance=distance)
    for mine, ref_mine in zip(got, want):
        assert torch.equal(mine < 0, ref_mine < 0)
        for i in (mine != ref_mine).nonzero().flatten().tolist():
            # a different choice is only allowed between distinct rows at (nearly) the same distance;
            # between identical rows the first copy must win
            assert not torch.equal(x[mine[i]], x[ref_mine[i]])
            assert abs(d[i, mine[i]] - d[i, ref_mine[i]]) <= 1e-4 * (1 + d[i].abs().max())


# ---------------------------------------------------------------------------------------------------
# mean_nonzero does not count rounding residue
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("chunk", [None, 200])
def test_mean_nonzero_ignores_rounding_residue(mining, distance, chunk):
    # margin 0 with duplicates across classes: hinges exactly at 0 must count as zero
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = pk_labels(6, 4, g)
    for i in range(0, 24, 3):  # copy rows into other classes
        j = (i + 5) % 24
        x[j] = x[i]
    got = MF.triplet_loss_terms(x, y, mining=mining, distance=distance, margin=0.0, chunk_bytes=chunk)
    want = reference.triplet_loss_terms(x, y, mining=mining, distance=distance, margin=0.0)
    assert int(got.num_nonzero) == int(want.num_nonzero)
    torch.testing.assert_close(got.reduce("mean_nonzero"), want.reduce("mean_nonzero"), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# embeddings and reference embeddings of different float dtypes: promoted to the common dtype
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_mixed_float_dtypes_promote(mining, distance):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=g).requires_grad_()
    r = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_()
    y, ry = pk_labels(4, 3, g), torch.randint(0, 4, (9,), generator=g)
    loss = MF.triplet_loss(x, y, r, ry, mining=mining, distance=distance)
    assert loss.dtype == torch.float64
    want = MF.triplet_loss(x.detach().double(), y, r.detach(), ry, mining=mining, distance=distance)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(loss, reference.triplet_loss(x, y, r, ry, mining=mining, distance=distance))
    loss.backward()
    assert x.grad.dtype == torch.float32 and r.grad.dtype == torch.float64
    for backend in ("torch", "reference"):
        got = MF.mine_batch_hard(x, y, r.half().float().double(), ry, distance=distance, backend=backend)
        ref_idx = MF.mine_batch_hard(x.detach().double(), y, r.half().float().double(), ry, distance=distance)
        assert torch.equal(got[0], ref_idx[0]) and torch.equal(got[1], ref_idx[1])
    d = MF.pairwise_distance(x, r, distance=distance)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, reference.pairwise_distance(x.double(), r, distance=distance))


# ---------------------------------------------------------------------------------------------------
# METRICLOSS_CHUNK_BYTES
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["64MB", "1.5e6", "-3", "0"])
def test_chunk_bytes_env_var_errors_name_the_variable(monkeypatch, value):
    monkeypatch.setenv("METRICLOSS_CHUNK_BYTES", value)
    with pytest.raises(ValueError, match="METRICLOSS_CHUNK_BYTES"):
        MF.triplet_loss(torch.randn(8, 3), torch.arange(4).repeat(2), mining="batch_all")


def test_chunk_bytes_env_var_is_used(monkeypatch):
    monkeypatch.setenv("METRICLOSS_CHUNK_BYTES", "4096")
    assert mining_ops.default_chunk_bytes() == 4096


# ---------------------------------------------------------------------------------------------------
# host syncs do not grow with the number of chunks
# ---------------------------------------------------------------------------------------------------

_SYNCING = {"item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "tolist", "unique", "_unique2",
            "unique_consecutive"}


class _CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _syncs(fn):
    with _CountSyncs() as counter:
        fn()
    return counter.calls


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mining", MININGS)
def test_syncs_do_not_grow_with_the_number_of_chunks(mining, reduction, normalize):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(96, 32, generator=g)
    x0[5] *= 1000.0  # an outlier row: judged by its own norms, it flags nothing extra
    y = pk_labels(24, 4, g)
    w = torch.rand(96, generator=g)

    def run(chunk_bytes):
        def step():
            x = x0.clone().requires_grad_()
            loss = MF.triplet_loss(x, y, mining=mining, reduction=reduction, normalize=normalize,
                                   chunk_bytes=chunk_bytes)
            (loss * w).sum().backward() if reduction == "none" else loss.backward()
        return step

    # one row per chunk vs one chunk (100 kB: too small for batch-hard's dense one-block path)
    many, one = _syncs(run(1)), _syncs(run(100_000))
    assert many == one
    assert sum(one.values()) <= 6
    if mining == "batch_hard":
        # the dense one-block path (a large budget): no more than the chunked one; on CPU only the
        # no-valid-triplet check's reads (an accelerator does those on its first call only)
        dense = _syncs(run(1 << 30))
        assert sum(dense.values()) < sum(one.values())


# ---------------------------------------------------------------------------------------------------
# autograd transforms, second derivatives, tracing
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mining", MININGS)
def test_torch_func_grad(mining, normalize):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.arange(4).repeat(4)
    grad = torch.func.grad(lambda t: MF.triplet_loss(t, y, mining=mining, normalize=normalize))(x)
    xx = x.clone().requires_grad_()
    MF.triplet_loss(xx, y, mining=mining, normalize=normalize).backward()
    torch.testing.assert_close(grad, xx.grad)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_block_losses_refuse_second_derivatives_clearly(mining, normalize, reduction):
    x = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    loss = MF.triplet_loss(x, torch.arange(4).repeat(4), mining=mining, normalize=normalize, reduction=reduction)
    (gx,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(gx.norm(), x)
    # a first derivative with create_graph=True alone still works
    loss2 = MF.triplet_loss(x, torch.arange(4).repeat(4), mining=mining, normalize=normalize)
    (gx2,) = torch.autograd.grad(loss2, x, create_graph=True)
    torch.testing.assert_close(gx2.detach(), torch.autograd.grad(loss2, x)[0])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [0.2, "soft"])
def test_batch_hard_gradgradcheck(distance, margin, normalize):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    fn = lambda t: MF.triplet_loss(t, y, mining="batch_hard", distance=distance, margin=margin,  # noqa: E731
                                   normalize=normalize)
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_trace_is_refused():
    x, y = torch.randn(8, 4), torch.arange(4).repeat(2)
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(ml.BatchHardTripletLoss(), (x, y))


@pytest.mark.parametrize("mining", MININGS)
def test_compiled_training_step_equals_eager(mining):
    # torch.compile with graph breaks (the widest class sizes the member table: a host read; see the
    # notes on compile); aot_eager exercises dynamo and the autograd Function without a C++ toolchain
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(32, 8, generator=g), torch.arange(8).repeat(4)
    criterion = ml.TripletLoss(mining=mining)
    torch._dynamo.reset()
    step = torch.compile(lambda x, labels: criterion(x, labels), backend="aot_eager")
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    compiled = step(x1, y)
    compiled.backward()
    eager = criterion(x2, y)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------------------------------------------
# what does not depend on chunk_bytes (the claims of the determinism notes)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mining", MININGS)
def test_what_is_invariant_across_chunk_bytes(mining, dtype):
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(96, 16, generator=g, dtype=dtype)
    y = pk_labels(24, 4, g)
    w = torch.rand(96, generator=g, dtype=dtype)
    results = []
    for chunk_bytes in (1, 5000, 1 << 30):
        x = x0.clone().requires_grad_()
        per_anchor = MF.triplet_loss(x, y, mining=mining, reduction="none", chunk_bytes=chunk_bytes)
        (per_anchor * w).sum().backward()
        results.append((per_anchor.detach(), x.grad))
    again = x0.clone().requires_grad_()
    (MF.triplet_loss(again, y, mining=mining, reduction="none", chunk_bytes=5000) * w).sum().backward()
    # run to run: bitwise
    assert torch.equal(again.grad, results[1][1])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for per_anchor, grad in results[1:]:
        if mining == "batch_all":  # sums of Gram-block values: rounding depends on the block's shape
            torch.testing.assert_close(per_anchor, results[0][0], **tol)
        else:  # same selections, losses recomputed from the rows: bitwise
            assert torch.equal(per_anchor, results[0][0])
        # accumulated over chunks, in an order that depends on them: the rounding is relative to the
        # largest entry (|grad| up to ~40 here, with reduction="none"), not to each entry
        grad_tol = dict(tol, atol=tol["atol"] * max(1.0, float(results[0][1].abs().max())))
        torch.testing.assert_close(grad, results[0][1], **grad_tol)
    if mining != "batch_all":
        idx = [MF.mine_batch_hard(x0, y, chunk_bytes=c) for c in (1, 5000, 1 << 30)]
        assert all(torch.equal(i[0], idx[0][0]) and torch.equal(i[1], idx[0][1]) for i in idx)
