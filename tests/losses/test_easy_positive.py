"""Batch-hard with an easy positive and the SCT / EPHN loss forms (:class:`metricloss.SCTLoss`,
:class:`metricloss.EPHNLoss`, ``TripletLoss(positive=..., loss=...)``).

This file owns its references: the authors' two losses ported line by line from their public code
(``littleredxh/HardNegative``, ``_code/Loss.py``, ``SCTLoss.forward``; ``littleredxh/EasyPositiveHardNegative``,
``_code/Loss.py``, ``EPHNLoss.forward``), dense and in fp64, with only the printing and logging removed and the
one documented deviation (SCT drops an anchor whose hardest negative has S > 0.9999, where their code tests
S < 1, which fp32 rounding decides for an exact duplicate). Every path (the one-block dense miner, the chunked
engine, the package's dense reference backend) must agree with them.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import mining as mining_ops
from metricloss.ops.triplet import TripletForm

from ..helpers import duplicate_rows, label_pattern, pk_labels

# a budget small enough that the chunked engine runs several chunks and the dense one-block path is off
SMALL_CHUNKS = 2_000


# ----------------------------------------------------------------------------------------------------
# the authors' code, ported (fp64, the batch as its own reference set)
# ----------------------------------------------------------------------------------------------------

def _mat(lvec):
    n = lvec.size(0)
    mask = lvec.repeat(n, 1)
    same = mask == mask.t()
    return same.clone().fill_diagonal_(0), ~same


def authors_sct(fvec, lvec, lam=1.0, thr=0.8, temp=0.1, dup=0.9999):
    """HardNegative/_code/Loss.py, SCTLoss.forward with method='sct' (lines 38-119)."""
    n = lvec.size(0)
    fvec_norm = F.normalize(fvec, p=2, dim=1)
    same, diff = _mat(lvec.view(-1))
    cos_sim = fvec_norm.mm(fvec_norm.t())
    cos_sim.fill_diagonal_(-1)                                   # fun_CosSim, norm=1
    d_p = cos_sim.clone().detach()
    d_p[diff] = -1
    d_p[d_p > dup] = -1
    v_pos, i_pos = d_p.max(1)
    mask_pos_valid = (v_pos > -1) & (v_pos < 1)
    pos = cos_sim[torch.arange(0, n), i_pos]
    d_n = cos_sim.clone().detach()
    d_n[same] = -1
    v_neg, i_neg = d_n.max(1)
    mask_neg_valid = (v_neg > -1) & (v_neg <= dup)               # theirs: (V_neg < 1); see the module docstring
    neg = cos_sim[torch.arange(0, n), i_neg]
    mask_valid = mask_pos_valid & mask_neg_valid
    hard = ((neg > pos) | (neg > thr)) & mask_valid
    easy = ((neg < pos) & (neg < thr)) & mask_valid
    triplet_val = torch.stack([pos, neg], 1)
    loss_hard = neg[hard].sum()
    loss_easy = -F.log_softmax(triplet_val[easy, :] / temp, dim=1)[:, 0].sum()
    n_hard, n_easy = hard.double().sum(), easy.double().sum()
    if torch.isnan(loss_hard) or n_hard == 0:
        loss_hard, n_hard = 0, 0
    if torch.isnan(loss_easy) or n_easy == 0:
        loss_easy, n_easy = 0, 0
    total = n_easy + n_hard
    if total == 0:
        total = 1
    hn_ratio = (neg > pos)[mask_valid].double().mean()
    return (loss_easy + lam * loss_hard) / total, hn_ratio


def authors_ephn(fvec, lvec, sigma=0.1, dup=0.9999):
    """EasyPositiveHardNegative/_code/Loss.py, EPHNLoss.forward with semi=False (lines 32-76)."""
    n = lvec.size(0)
    fvec_norm = F.normalize(fvec, p=2, dim=1)
    same, diff = _mat(lvec.view(-1))
    dist = fvec_norm.mm(fvec_norm.t())
    dist[torch.eye(n).bool()] = -1                               # distMC, norm=1
    d_p = dist.clone().detach()
    d_p[diff] = -1
    d_p[d_p > dup] = -1
    v_pos, i_pos = d_p.max(1)
    keep_pos = v_pos > 0
    pos = dist[torch.arange(0, n), i_pos]
    d_n = dist.clone().detach()
    d_n[same] = -1
    v_neg, i_neg = d_n.max(1)
    keep_neg = v_neg > 0
    neg = dist[torch.arange(0, n), i_neg]
    t = torch.stack([pos, neg], 1)
    keep = keep_pos & keep_neg
    prob = -F.log_softmax(t / sigma, dim=1)[:, 0]
    return prob[keep].mean()


def _pk_batch(p=8, k=4, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = pk_labels(p, k, g)
    centres = torch.randn(p, d, generator=g, dtype=dtype)
    x = centres[y] * 0.8 + torch.randn(p * k, d, generator=g, dtype=dtype)
    return x, y


PATHS = [dict(), dict(chunk_bytes=SMALL_CHUNKS), dict(backend="reference")]


@pytest.mark.parametrize("path", PATHS, ids=["dense", "chunked", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_sct_equals_the_authors_code(path, seed):
    x, y = _pk_batch(seed=seed)
    want, hn_ratio = authors_sct(x, y)
    xg = x.clone().requires_grad_()
    crit = ml.SCTLoss(**path)
    got = crit(xg, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    xw = x.clone().requires_grad_()
    authors_sct(xw, y)[0].backward()
    got.backward()
    torch.testing.assert_close(xg.grad, xw.grad, rtol=1e-10, atol=1e-12)
    if path.get("backend") != "reference":
        assert crit.last_stats.as_dict()["hard_negative_ratio"] == pytest.approx(float(hn_ratio), abs=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=["dense", "chunked", "reference"])
@pytest.mark.parametrize("seed", range(4))
def test_ephn_equals_the_authors_code(path, seed):
    x, y = _pk_batch(p=4, k=8, seed=seed)
    want = authors_ephn(x, y)
    xg = x.clone().requires_grad_()
    got = ml.EPHNLoss(**path)(xg, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    xw = x.clone().requires_grad_()
    authors_ephn(xw, y).backward()
    got.backward()
    torch.testing.assert_close(xg.grad, xw.grad, rtol=1e-10, atol=1e-12)


def test_sct_parameters_reach_the_loss():
    x, y = _pk_batch(seed=5)
    for lam, thr, temp in [(0.5, 0.8, 0.1), (1.0, 0.3, 0.1), (2.0, 0.8, 0.05)]:
        want = authors_sct(x, y, lam=lam, thr=thr, temp=temp)[0]
        got = ml.SCTLoss(hard_weight=lam, hard_threshold=thr, temperature=temp)(x, y)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_easy_positive_skips_near_duplicates_and_hard_positive_does_not():
    # anchor 0 has a near-duplicate positive (row 1) and a distinct one (row 2)
    x = torch.tensor([[1.0, 0.0], [1.0, 1e-5], [0.6, 0.8], [-1.0, 0.1], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    a = F.normalize(x, dim=1)
    pos_e, _ = mining_ops.batch_hard_indices_dense(a, a, y, y, True, "cosine", positive="easiest",
                                                   dup_key=mining_ops.duplicate_key("cosine", 0.9999))
    pos_none, _ = mining_ops.batch_hard_indices_dense(a, a, y, y, True, "cosine", positive="easiest", dup_key=None)
    pos_h, _ = mining_ops.batch_hard_indices_dense(a, a, y, y, True, "cosine")
    assert pos_e[0] == 2 and pos_none[0] == 1 and pos_h[0] == 2
    # row 1's near-duplicate (row 0) is skipped too; row 2's most similar positive is row 1 (0.6 + 8e-6 > 0.6)
    assert pos_e[1] == 2 and pos_e[2] == 1
    # an anchor whose only positive is a near-duplicate has none
    y2 = torch.tensor([0, 0, 1, 2, 2])
    pos_2, _ = mining_ops.batch_hard_indices_dense(a, a, y2, y2, True, "cosine", positive="easiest",
                                                   dup_key=mining_ops.duplicate_key("cosine", 0.9999))
    assert pos_2[0] == -1 and pos_2[1] == -1 and pos_2[3] == 4


# ----------------------------------------------------------------------------------------------------
# every path against the package's dense reference (hypothesis)
# ----------------------------------------------------------------------------------------------------

FORMS = [
    TripletForm(positive="easiest"),
    TripletForm(positive="easiest", loss="nca"),
    TripletForm(positive="easiest", loss="nca", min_similarity=0.0),
    TripletForm(positive="easiest", loss="sct"),
    TripletForm(positive="hardest", loss="nca"),
    TripletForm(positive="hardest", loss="sct", hard_threshold=0.5, hard_weight=0.5),
    TripletForm(positive="easiest", duplicate_similarity=None),
]


@st.composite
def cases(draw):
    n = draw(st.integers(2, 24))
    d = draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x = duplicate_rows(x, g, count=max(1, n // 3))
    y = label_pattern(draw(st.sampled_from(["random", "pk2", "pk3", "singletons"])), n, g, num_classes=4)
    form = draw(st.sampled_from(FORMS))
    distance = "cosine" if form.loss != "triplet" else draw(st.sampled_from(["euclidean", "squared_euclidean",
                                                                              "cosine"]))
    ref = draw(st.sampled_from(["self", "bank", "bank_with_own_rows"]))
    if ref == "self":
        bank = own = None
        bank_labels = None
    else:
        m = draw(st.integers(1, 16))
        bank = torch.randn(m, d, generator=g, dtype=torch.float64)
        bank_labels = torch.randint(0, 4, (m,), generator=g)
        own = None
        if ref == "bank_with_own_rows":
            bank = torch.cat([bank, x[: n // 2]])
            bank_labels = torch.cat([bank_labels, y[: n // 2]])
            own = torch.full((n,), -1, dtype=torch.int64)
            own[: n // 2] = torch.arange(m, m + n // 2)
    reduction = draw(st.sampled_from(["mean", "mean_nonzero", "sum", "none"]))
    margin = draw(st.sampled_from([0.0, 0.2, "soft"]))
    return x, y, bank, bank_labels, own, form, distance, reduction, margin


def _kwargs(form):
    return dict(positive=form.positive, loss=form.loss, temperature=form.temperature,
                hard_threshold=form.hard_threshold, hard_weight=form.hard_weight,
                duplicate_similarity=form.duplicate_similarity, min_similarity=form.min_similarity)


@settings(max_examples=80, deadline=None)
@given(cases())
def test_every_path_matches_the_dense_reference(case):
    x, y, bank, bank_labels, own, form, distance, reduction, margin = case
    refs = () if bank is None else (bank, bank_labels)
    want = reference.triplet_loss(x, y, *refs, margin=margin, distance=distance, reduction=reduction,
                                  ref_self_index=own, form=form)
    for path in (dict(), dict(chunk_bytes=SMALL_CHUNKS)):
        got = MF.triplet_loss(x, y, *refs, margin=margin, distance=distance, reduction=reduction,
                              ref_self_index=own, **_kwargs(form), **path)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        terms = MF.triplet_loss_terms(x, y, *refs, margin=margin, distance=distance, ref_self_index=own,
                                      **_kwargs(form), **path)
        want_terms = reference.triplet_loss_terms(x, y, *refs, margin=margin, distance=distance,
                                                  ref_self_index=own, form=form)
        assert int(terms.num_terms) == int(want_terms.num_terms)
        assert int(terms.num_nonzero) == int(want_terms.num_nonzero)


@settings(max_examples=30, deadline=None)
@given(cases())
def test_dense_and_chunked_miners_select_the_same_rows(case):
    x, y, bank, bank_labels, own, form, distance, _, _ = case
    a = F.normalize(x, dim=1)
    r = a if bank is None else F.normalize(bank, dim=1)
    lr = y if bank is None else bank_labels
    dup = mining_ops.duplicate_key(distance, form.duplicate_similarity) if form.positive == "easiest" else None
    dense = mining_ops.batch_hard_indices_dense(a, r, y, lr, bank is None, distance, own, form.positive, dup)
    index = mining_ops.ClassIndex(lr)
    cls = index.anchor_classes(y, bank is None, own)
    chunked = mining_ops.batch_hard_indices(a, r, index, cls, bank is None, distance, SMALL_CHUNKS // 10, own,
                                            form.positive, dup)
    assert torch.equal(dense[0], chunked[0]) and torch.equal(dense[1], chunked[1])


@pytest.mark.parametrize("form", FORMS[:6], ids=lambda f: f"{f.positive}-{f.loss}")
def test_gradcheck(form):
    x, y = _pk_batch(p=3, k=3, d=4, seed=1)
    distance = "cosine" if form.loss != "triplet" else "euclidean"
    bank = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bank_labels = torch.tensor([0, 1, 2, 0, 1])
    args = dict(distance=distance, margin=0.2, **_kwargs(form))
    torch.autograd.gradcheck(lambda e: MF.triplet_loss(e, y, **args), (x.clone().requires_grad_(),))
    torch.autograd.gradcheck(lambda e, b: MF.triplet_loss(e, y, b, bank_labels, reduction="sum", **args),
                             (x.clone().requires_grad_(), bank.clone().requires_grad_()))
    torch.autograd.gradgradcheck(lambda e: MF.triplet_loss(e, y, **args), (x.clone().requires_grad_(),))


def test_a_batch_without_valid_triplets_is_a_connected_zero():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for crit in (ml.SCTLoss(), ml.EPHNLoss(), ml.TripletLoss(positive="easiest")):
        out = crit(x, torch.arange(4))  # singletons: no positive
        assert out.item() == 0.0
        out.backward()
        assert x.grad is not None and not x.grad.any()


def test_nan_input_gives_nan():
    x, y = _pk_batch()
    x[3, 0] = float("nan")
    assert torch.isnan(ml.SCTLoss()(x, y)) and torch.isnan(ml.EPHNLoss()(x, y))


def test_fp32_input_matches_fp64_reference():
    x, y = _pk_batch(seed=3)
    want = authors_sct(x, y)[0]
    got = ml.SCTLoss()(x.float(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_triton_mines_the_hardest_positive_only_and_falls_back_loudly(monkeypatch):
    from metricloss._backend import _warned

    _warned.clear()
    assert mining_ops.triton_or_torch_for_positive("triton", "hardest", "triton", "op") == "triton"
    assert mining_ops.triton_or_torch_for_positive("triton", "easiest", "auto", "op") == "torch"
    with pytest.warns(UserWarning, match="hardest positive only"):
        assert mining_ops.triton_or_torch_for_positive("triton", "easiest", "triton", "op") == "torch"


def test_cross_batch_memory_equals_the_loss_over_the_bank():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g))
               for _ in range(3)]
    mem = ml.CrossBatchMemory(ml.SCTLoss(), 6, 48, dtype=torch.float64)
    for x, y in batches:
        got = mem(x, y)
    # the last call mined the batch against the memory (the three batches), its own slots 24..35 excluded
    bank = torch.cat([b[0] for b in batches])
    bank_labels = torch.cat([b[1] for b in batches])
    x, y = batches[-1]
    want = ml.SCTLoss()(x, y, bank, bank_labels, ref_self_index=torch.arange(24, 36))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.item() != 0.0


# ----------------------------------------------------------------------------------------------------
# options and errors
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, err, match", [
    (dict(loss="sct"), ValueError, "distance='cosine'"),
    (dict(loss="nca", distance="euclidean"), ValueError, "distance='cosine'"),
    (dict(positive="easiest", mining="batch_all"), ValueError, "mining='batch_hard'"),
    (dict(loss="sct", distance="cosine", mining="semi_hard"), ValueError, "mining='batch_hard'"),
    (dict(positive="easiest", normalize=False), ValueError, "unit rows"),
    (dict(positive="middle"), ValueError, "positive"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(loss="nca", distance="cosine", temperature=0.0), ValueError, "temperature"),
    (dict(loss="sct", distance="cosine", hard_threshold=1.5), ValueError, "hard_threshold"),
    (dict(loss="sct", distance="cosine", hard_weight=-1.0), ValueError, "hard_weight"),
    (dict(positive="easiest", duplicate_similarity="high"), TypeError, "duplicate_similarity"),
    (dict(monitor="yes"), TypeError, "monitor"),
])
def test_bad_options(kwargs, err, match):
    with pytest.raises(err, match=match):
        ml.TripletLoss(**kwargs)
    if "monitor" not in kwargs:
        with pytest.raises(err, match=match):
            MF.triplet_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), **kwargs)


def test_easy_positive_on_unnormalised_euclidean_without_the_duplicate_rule():
    x, y = _pk_batch(seed=2)
    got = ml.TripletLoss(positive="easiest", normalize=False, duplicate_similarity=None)(x, y)
    want = reference.triplet_loss(x, y, normalize=False, form=TripletForm(positive="easiest",
                                                                          duplicate_similarity=None))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_presets_are_the_general_module():
    x, y = _pk_batch(seed=4)
    assert ml.SCTLoss()(x, y) == ml.TripletLoss(positive="easiest", loss="sct", distance="cosine")(x, y)
    assert ml.EPHNLoss()(x, y) == ml.TripletLoss(positive="easiest", loss="nca", distance="cosine",
                                                 min_similarity=0.0)(x, y)
    assert "loss='sct'" in repr(ml.SCTLoss()) and "positive='easiest'" in repr(ml.EPHNLoss())
    assert ml.SCTLoss().collapse_value is None
    assert ml.EPHNLoss().collapse_value == pytest.approx(math.log(2))
    assert ml.TripletLoss(margin=0.3).collapse_value == 0.3


@pytest.mark.parametrize("kwargs, ref", [
    (dict(positive="easiest", loss="sct", distance="cosine"), "bank_with_own_rows"),
    (dict(positive="easiest", loss="nca", distance="cosine", min_similarity=0.0, reduction="none"), "self"),
    (dict(positive="easiest", margin=0.2), "bank_with_own_rows")], ids=["sct", "ephn", "easy-hinge"])
def test_fullgraph_compile_equals_eager(kwargs, ref):
    """The one-block path of the new forms compiles as one graph (no host read, no data-dependent shape)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.arange(32) // 4
    bank = bank_labels = own = None
    if ref != "self":
        bank = torch.cat([torch.randn(10, 8, generator=g, dtype=torch.float64), x[:16]])
        bank_labels = torch.cat([torch.randint(0, 8, (10,), generator=g), y[:16]])
        own = torch.cat([torch.arange(10, 26), torch.full((16,), -1)])

    def fn(t, b):
        out = MF.triplet_loss(t, y, b, bank_labels, backend="torch", ref_self_index=own, **kwargs)
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
