"""The anchors' own rows in a reference set (``ref_self_index``) and the unreduced loss terms (``LossTerms``)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops.reduction import LossTerms

from ..helpers import label_pattern, pk_labels, tie_free_case

MININGS = ["batch_hard", "batch_all", "semi_hard"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]


@st.composite
def memory_cases(draw):
    """A batch and a memory bank that holds some of the batch's rows (at random places) and other rows."""
    n = draw(st.integers(1, 14))
    d = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = label_pattern(draw(st.sampled_from(["random", "pk2", "pk3", "singletons"])), n, g, num_classes=4)
    extra = draw(st.integers(0, 8))
    held = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    rows = torch.cat([x[held], torch.randn(extra, d, generator=g, dtype=torch.float64)])
    row_labels = torch.cat([y[held], torch.randint(0, 4, (extra,), generator=g)])
    if rows.shape[0] == 0:
        rows, row_labels = torch.randn(1, d, generator=g, dtype=torch.float64), torch.tensor([0])
    perm = torch.randperm(rows.shape[0], generator=g)
    bank, bank_labels = rows[perm], row_labels[perm]
    where = torch.empty_like(perm)
    where[perm] = torch.arange(perm.numel())
    self_index = torch.full((n,), -1, dtype=torch.int64)
    self_index[held] = where[:int(held.sum())]
    if draw(st.booleans()) and held.any():
        # an own row whose stored label differs (a stale bank entry): still excluded, by index
        i = int(held.nonzero()[0])
        bank_labels[self_index[i]] = bank_labels[self_index[i]] + 1
    kwargs = dict(margin=draw(st.sampled_from([0.2, 1.0, "soft"])), normalize=draw(st.booleans()),
                  chunk_bytes=draw(st.sampled_from([None, 64, 2000])))
    return x, y, bank, bank_labels, self_index, kwargs


@pytest.mark.parametrize("mining", MININGS)
@given(case=memory_cases(), distance=st.sampled_from(DISTANCES), reduction=st.sampled_from(REDUCTIONS))
def test_self_index_matches_reference_fp64(mining, case, distance, reduction):
    x, y, bank, bank_labels, self_index, kwargs = case
    kwargs = dict(kwargs, mining=mining, distance=distance)
    xs, bs = x.clone().requires_grad_(), bank.clone().requires_grad_()
    xr, br = x.clone().requires_grad_(), bank.clone().requires_grad_()
    got = MF.triplet_loss(xs, y, bs, bank_labels, ref_self_index=self_index, reduction=reduction, **kwargs)
    kwargs.pop("chunk_bytes")
    want = reference.triplet_loss(xr, y, br, bank_labels, ref_self_index=self_index, reduction=reduction, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if mining == "semi_hard":
        return  # semi-hard gradients at random inputs can sit on selection ties; values are compared above
    w = torch.rand(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bs.grad, br.grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_as_its_own_reference_equals_the_plain_loss(mining, distance, reduction):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = pk_labels(10, 3, g)
    kw = dict(mining=mining, distance=distance, reduction=reduction, margin=0.3, chunk_bytes=3000)
    x_plain = x0.clone().requires_grad_()
    plain = MF.triplet_loss(x_plain, y, **kw)
    w = torch.rand(plain.shape, generator=g, dtype=plain.dtype)
    (plain * w).sum().backward()
    # 1. the same object as reference: detected, no ref_self_index needed (labels: the same or a copy)
    for labels_ref in (y, y.clone()):
        x_same = x0.clone().requires_grad_()
        same = MF.triplet_loss(x_same, y, x_same, labels_ref, **kw)
        torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-12)
        (same * w).sum().backward()
        torch.testing.assert_close(x_same.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    # 2. a permuted copy with the permutation as ref_self_index: gradients reach both sides
    perm = torch.randperm(30, generator=g)
    inv = torch.argsort(perm)
    x_a, bank = x0.clone().requires_grad_(), x0[perm].clone().requires_grad_()
    permuted = MF.triplet_loss(x_a, y, bank, y[perm], ref_self_index=inv, **kw)
    torch.testing.assert_close(permuted, plain, rtol=1e-12, atol=1e-12)
    (permuted * w).sum().backward()
    torch.testing.assert_close(x_a.grad + bank.grad[inv], x_plain.grad, rtol=1e-10, atol=1e-12)
    # 3. the batch as a reference set without saying so is a different loss (self is a positive at 0)
    if mining != "batch_hard" and reduction == "sum":
        unsaid = dict(kw, margin=2.0)  # every term with self as a positive at distance 0 is active
        assert MF.triplet_loss(x0, y, x0.clone(), y, **unsaid) > MF.triplet_loss(x0, y, **unsaid) + 1e-3


def test_issue_example_batch_all_self_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), pk_labels(8, 4, g)
    for mining in ("batch_all", "semi_hard"):
        plain = MF.triplet_loss(x, y, mining=mining, margin=1.0)
        torch.testing.assert_close(MF.triplet_loss(x, y, x, y, mining=mining, margin=1.0), plain)
        torch.testing.assert_close(MF.triplet_loss(x, y, x.clone(), y.clone(), mining=mining, margin=1.0,
                                                   ref_self_index=torch.arange(32)), plain)


def _pml_semi_hard_triplets(x, y, margin):
    """TF-Addons semi-hard triplets (a, p, n*) of the batch as its own reference, by brute force."""
    d = reference.pairwise_distance(x.detach().double(), normalize=True)
    a_idx, p_idx, n_idx = [], [], []
    n = len(y)
    for a in range(n):
        negs = [q for q in range(n) if y[q] != y[a]]
        for p in range(n):
            if p == a or y[p] != y[a] or not negs:
                continue
            farther = [q for q in negs if d[a, q] > d[a, p]]
            q = min(farther, key=lambda j: (d[a, j].item(), j)) if farther else \
                max(negs, key=lambda j: (d[a, j].item(), -j))
            a_idx.append(a), p_idx.append(p), n_idx.append(q)
    return tuple(torch.tensor(v) for v in (a_idx, p_idx, n_idx))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_self_reference_equals_pml_ref_emb(mining, seed):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    pml = pml_losses.TripletMarginLoss(margin=0.2)
    if mining == "batch_all":
        theirs = pml(x1, y, ref_emb=x1, ref_labels=y)  # PML drops self-pairs since ref_labels is labels
    else:
        theirs = pml(x1, y, _pml_semi_hard_triplets(x0, y, 0.2), ref_emb=x1, ref_labels=y)
    ours = MF.triplet_loss(x2, y, x2, y, mining=mining, margin=0.2, reduction="mean_nonzero")
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("mining", MININGS)
def test_mine_batch_hard_and_losses_with_self_index_against_reference(mining):
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), pk_labels(4, 3, g)
    bank = torch.cat([torch.randn(5, 3, generator=g, dtype=torch.float64), x[:6]])
    bank_labels = torch.cat([torch.randint(0, 4, (5,), generator=g), y[:6]])
    own = torch.cat([torch.arange(5, 11), torch.full((6,), -1)])
    got = MF.mine_batch_hard(x, y, bank, bank_labels, ref_self_index=own)
    want = reference.mine_batch_hard(x, y, bank, bank_labels, ref_self_index=own)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not (got[0][:6] == own[:6]).any() and not (got[1][:6] == own[:6]).any()
    for backend in ("torch", "reference"):
        loss = MF.triplet_loss(x, y, bank, bank_labels, mining=mining, ref_self_index=own, backend=backend)
        torch.testing.assert_close(loss, reference.triplet_loss(x, y, bank, bank_labels, mining=mining,
                                                                ref_self_index=own))


@pytest.mark.parametrize("bad, error, match", [
    (torch.arange(5), ValueError, r"shape \(6,\)"),
    (torch.arange(6).float(), TypeError, "integer dtype"),
    (torch.zeros(6, dtype=torch.bool), TypeError, "integer dtype"),
    ([0, 1, 2, 3, 4, 5], TypeError, "torch.Tensor"),
    (torch.tensor([0, 1, 2, 3, 4, 9]), ValueError, r"\[0, 9\) or -1"),
    (torch.tensor([0, 1, 2, 3, 4, -2]), ValueError, r"got values in \[-2, 4\]"),
])
def test_self_index_is_validated(bad, error, match):
    x, y = torch.randn(6, 3), torch.arange(3).repeat(2)
    r, ry = torch.randn(9, 3), torch.arange(3).repeat(3)
    with pytest.raises(error, match=match):
        MF.triplet_loss(x, y, r, ry, ref_self_index=bad)
    with pytest.raises(error, match="ref_self_index"):
        MF.mine_batch_hard(x, y, r, ry, ref_self_index=bad)
    with pytest.raises(error, match="ref_self_index"):
        ml.TripletLoss(mining="batch_all")(x, y, r, ry, ref_self_index=bad)


def test_self_index_without_reference_set_is_an_error():
    with pytest.raises(ValueError, match="ref_self_index.*without"):
        MF.triplet_loss(torch.randn(4, 2), torch.arange(4), ref_self_index=torch.arange(4))


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_loss_terms_reduce_like_the_loss(mining, distance):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), pk_labels(5, 4, g)
    r, ry = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 6, (9,), generator=g)
    for args in ((x, y), (x, y, r, ry)):
        terms = MF.triplet_loss_terms(*args, mining=mining, distance=distance, margin=0.1)
        assert isinstance(terms, LossTerms) and terms.per_anchor.shape == (20,)
        assert terms.num_terms.dtype == torch.int64 and terms.num_terms.shape == ()
        for reduction in REDUCTIONS:
            want = MF.triplet_loss(*args, mining=mining, distance=distance, margin=0.1, reduction=reduction)
            torch.testing.assert_close(terms.reduce(reduction), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms.per_anchor.sum() / terms.num_terms,
                                   MF.triplet_loss(*args, mining=mining, distance=distance, margin=0.1))
        ref_terms = reference.triplet_loss_terms(*args, mining=mining, distance=distance, margin=0.1)
        assert int(ref_terms.num_terms) == int(terms.num_terms)
        assert int(ref_terms.num_nonzero) == int(terms.num_nonzero)


@pytest.mark.parametrize("mining", MININGS)
def test_loss_terms_reduced_across_shards_equal_the_global_loss(mining):
    # Two "ranks", each with half of the batch, mined against the gathered global batch (own rows by index):
    # sums and counts added up, then divided, give the loss of the whole batch; gradients too.
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 0, 2])
    x0, _ = tie_free_case(12, 3, y, 0.2, seed=3)
    x_full = x0.clone().requires_grad_()
    want = MF.triplet_loss(x_full, y, mining=mining, margin=0.2, reduction="mean_nonzero")
    want.backward()
    x_glob = x0.clone().requires_grad_()
    pieces = [ml.TripletLoss(mining=mining, margin=0.2).loss_terms(x_glob[s:s + 6], y[s:s + 6], x_glob, y,
                                                                   ref_self_index=torch.arange(s, s + 6))
              for s in (0, 6)]
    total = sum(p.per_anchor.sum() for p in pieces)
    got = total / sum(p.num_nonzero for p in pieces).clamp_min(1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    torch.testing.assert_close(x_glob.grad, x_full.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("margin", [0.2, "soft"])
def test_loss_terms_gradcheck_with_self_index(mining, margin):
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    ry = torch.tensor([0, 1, 2, 3, 1, 2])
    x, r = tie_free_case(8, 3, y, margin if margin != "soft" else 0.0, seed=11, ref=(6, ry))
    x.requires_grad_()
    r.requires_grad_()
    own = torch.tensor([-1, 2, -1, 4, -1, -1, 5, -1])

    def fn(x_, r_):
        terms = MF.triplet_loss_terms(x_, y, r_, ry, mining=mining, margin=margin, ref_self_index=own)
        # a non-uniform upstream gradient (per-anchor weights) and a uniform one (a count)
        weights = torch.linspace(0.5, 2.0, 8, dtype=x_.dtype)
        return (terms.per_anchor * weights).sum(), terms.per_anchor.sum() / terms.num_terms.clamp_min(1)

    assert torch.autograd.gradcheck(fn, (x, r), eps=1e-6, atol=1e-6)


def test_module_loss_terms_ignore_the_module_reduction():
    x, y = torch.randn(16, 4), torch.arange(4).repeat(4)
    module = ml.BatchAllTripletLoss(reduction="sum")
    terms = module.loss_terms(x, y)
    torch.testing.assert_close(terms.reduce("sum"), module(x, y))
    torch.testing.assert_close(terms.reduce("mean"), MF.triplet_loss(x, y, mining="batch_all"))
