"""WARPLoss: exact mode vs the dense reference, sampled-mode assembly and gradients, determinism, edges,
bad input. The sampler's law (acceptance (a)-(c)) is tested in tests/ops/test_warp.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import warp as warp_ops

REDUCTIONS = ["mean", "sum", "none"]


def constant_weight(k: torch.Tensor) -> torch.Tensor:
    return torch.full(k.shape, 0.75, dtype=torch.float64)


def linear_weight(k: torch.Tensor) -> torch.Tensor:
    return 1.0 + k.to(torch.float64)


RANK_WEIGHTS = ["harmonic", "log", constant_weight, linear_weight]


def make_labels(kind: str, b: int, c: int, g: torch.Generator) -> torch.Tensor:
    if kind == "single":
        return torch.randint(0, c, (b,), generator=g)
    density = {"sparse": 0.2, "dense": 0.7}[kind]
    labels = torch.rand(b, c, generator=g) < density
    if b > 1:
        labels[0] = False          # a row without a positive
        labels[-1] = True          # a row without a negative
    return labels


@st.composite
def warp_cases(draw):
    b = draw(st.integers(1, 10))
    c = draw(st.integers(2, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(b, c, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    if draw(st.booleans()):
        scores = scores.round(decimals=1)  # exact ties and hinges exactly at 0 (strictness)
    kind = draw(st.sampled_from(["single", "sparse", "dense"]))
    labels = make_labels(kind, b, c, g)
    if kind != "single" and draw(st.booleans()):
        labels = labels.to(draw(st.sampled_from([torch.float32, torch.float64, torch.int64])))
    kwargs = dict(margin=draw(st.sampled_from([0.0, 0.5, 1.0, 2.5])),
                  rank_weight=draw(st.sampled_from(RANK_WEIGHTS)),
                  reduction=draw(st.sampled_from(REDUCTIONS)))
    chunk_bytes = draw(st.sampled_from([None, 1, 100, 4000]))
    return scores, labels, kwargs, chunk_bytes


def exact(scores, labels, chunk_bytes=None, **kwargs):
    """Exact WARP through the op (to vary the chunk budget) or the functional (default budget)."""
    if chunk_bytes is None:
        return MF.warp_loss(scores, labels, mode="exact", **kwargs)
    return warp_ops.warp_loss_op(scores, labels, kwargs["margin"], None, "exact", kwargs["rank_weight"],
                                 kwargs["reduction"], None, chunk_bytes)


@given(case=warp_cases())
def test_exact_matches_reference_fp64(case):
    scores, labels, kwargs, chunk_bytes = case
    x1 = scores.clone().requires_grad_()
    x2 = scores.clone().requires_grad_()
    got = exact(x1, labels, chunk_bytes, **kwargs)
    want = reference.warp_loss(x2, labels, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    (g1,) = torch.autograd.grad((got * upstream).sum(), x1)
    (g2,) = torch.autograd.grad((want * upstream).sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def tie_free_scores(b: int, c: int, margin: float, seed: int, gap: float = 1e-3) -> torch.Tensor:
    """fp64 scores whose hinges s_j + m − s_p are all at least ``gap`` away from 0 (no kink)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        s = torch.randn(b, c, generator=g, dtype=torch.float64)
        z = s[:, None, :] + (margin - s)[:, :, None]
        if (z.abs() > gap).all():
            return s
    raise RuntimeError("no tie-free case")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_gradcheck_exact(kind, reduction):
    s = tie_free_scores(5, 6, 0.7, seed=3).requires_grad_()
    labels = torch.tensor([0, 5, 2, 2, 3]) if kind == "single" else torch.tensor(
        [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1]],
        dtype=torch.bool)

    def fn(x):
        return MF.warp_loss(x, labels, margin=0.7, mode="exact", reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_gradcheck_sampled_with_fixed_draws(kind):
    s = tie_free_scores(6, 7, 1.0, seed=5).requires_grad_()
    labels = torch.tensor([0, 6, 2, 2, 3, 1]) if kind == "single" else (
        torch.rand(6, 7, generator=torch.Generator().manual_seed(2)) < 0.4)

    def fn(x):
        return MF.warp_loss(x, labels, generator=torch.Generator().manual_seed(11), reduction="none")

    assert fn(s).abs().sum() > 0
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def sampled_by_hand(scores, labels, margin, max_trials, rank_weight, reduction, seed):
    """The sampled loss rebuilt from the sampler's (trials, chosen) with the same generator state."""
    b, c = scores.shape
    ex = warp_ops.WarpExamples(labels, c)
    s = scores.detach()
    trials, chosen = warp_ops.sample_violators(s, ex, margin, max_trials, torch.Generator().manual_seed(seed), None)
    per_row = [scores[i, 0] * 0 for i in range(b)]   # zeros connected to the graph
    weight_fn = rank_weight if callable(rank_weight) else None
    for e in range(ex.num_examples):
        n = int(trials[e])
        if n == 0:
            continue
        i, p, j = int(ex.rows[e]), int(ex.cols[e]), int(chosen[e])
        assert not bool(labels[i, j] if labels.dim() == 2 else labels[i] == j)   # a negative
        assert float(s[i, j] + (margin - s[i, p])) > 0                           # a violator
        num_neg = int(ex.num_neg[i])
        k = num_neg // n
        if weight_fn is not None:
            w = float(weight_fn(torch.tensor([k]))[0])
        elif rank_weight == "harmonic":
            w = sum(1.0 / q for q in range(1, k + 1))
        else:
            w = min(math.log(max(k, 1)), 10.0)
        per_row[i] = per_row[i] + w * (scores[i, j] + (margin - scores[i, p]))
    per_row = torch.stack(per_row)
    return {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / b}[reduction]


@given(case=warp_cases(), max_trials=st.sampled_from([None, 1, 2, 5, 40]), seed=st.integers(0, 1000))
def test_sampled_loss_and_gradient_follow_the_draws(case, max_trials, seed):
    # Whatever is drawn: each found example contributes L(⌊|𝒩|/N⌋)·(s_n + m − s_p), gradients reach only
    # s_p and s_n, and the chosen label is a negative that violates.
    scores, labels, kwargs, _ = case
    x1 = scores.clone().requires_grad_()
    x2 = scores.clone().requires_grad_()
    got = MF.warp_loss(x1, labels, max_trials=max_trials, generator=torch.Generator().manual_seed(seed), **kwargs)
    want = sampled_by_hand(x2, labels, max_trials=max_trials, seed=seed, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    (g1,) = torch.autograd.grad((got * upstream).sum(), x1)
    (g2,) = torch.autograd.grad((want * upstream).sum(), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_sampled_never_exceeds_what_exact_allows():
    # A row with no violator contributes 0 in both modes; with violators the sampled row is positive
    # whenever one was found.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 12, (300,), generator=g)
    s[torch.arange(300), y] += torch.linspace(-2, 6, 300, dtype=torch.float64)  # some rows well ranked
    ex = MF.warp_loss(s, y, mode="exact", reduction="none")
    sa = MF.warp_loss(s, y, reduction="none", generator=g)
    assert ((ex == 0) <= (sa == 0)).all()
    assert (ex == 0).any() and (ex > 0).any()


def test_harmonic_and_log_weights_guard_off_by_ones():
    k = torch.tensor([0, 1, 2, 3, 4, 10])
    harmonic = warp_ops.rank_weights(k, "harmonic", torch.float64, 10)
    want = [0.0, 1.0, 1.5, 11 / 6, 25 / 12, sum(1 / j for j in range(1, 11))]   # L(k) = Σ_{j≤k} 1/j, L(0)=0
    torch.testing.assert_close(harmonic, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    big = torch.tensor([0, 1, 2, 100, 22026, 22027, 10**9])
    log = warp_ops.rank_weights(big, "log", torch.float64, 10**9)
    assert log[0] == 0 and log[1] == 0 and torch.isfinite(log).all()               # ⌊·⌋ = 0 guarded
    assert log[2] == pytest.approx(math.log(2)) and log[3] == pytest.approx(math.log(100))
    assert log[4] < 10 and log[5] == 10 and log[6] == 10                           # clipped at 10 (e^10 ≈ 22026.5)


def test_rank_estimate_is_floor_division():
    num_neg = torch.tensor([9, 9, 9, 9, 5, 5])
    trials = torch.tensor([1, 2, 4, 10, 3, 0])
    assert warp_ops.rank_estimate(num_neg, trials).tolist() == [9, 4, 2, 0, 1, 0]


def test_rank_estimate_reaches_the_weight_through_the_loss():
    # weight = the rank itself: with the same draws, loss / hinge is ⌊|𝒩|/N⌋, an integer
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2000, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (2000,), generator=g)
    per_row = MF.warp_loss(s, y, rank_weight=lambda k: k.to(torch.float64), reduction="none", max_trials=9,
                           generator=torch.Generator().manual_seed(7))
    hinge = MF.warp_loss(s, y, rank_weight=lambda k: torch.ones_like(k), reduction="none", max_trials=9,
                         generator=torch.Generator().manual_seed(7))
    found = hinge > 0
    rank = per_row[found] / hinge[found]
    torch.testing.assert_close(rank, rank.round(), rtol=0, atol=1e-9)
    ranks = set(rank.round().long().tolist())
    assert ranks <= {9, 4, 3, 2, 1} and {9, 4, 3}.issubset(ranks)   # ⌊9/N⌋ for N = 1..9, never 4.5


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_positive_is_never_a_violator_and_the_test_is_strict(mode):
    # margin 1, positive 1.0: a negative at 0.0 has hinge exactly 0 (not a violator); the positive's own
    # "hinge" m > 0 must not count. The loss is 0 and no draw picks anything.
    s = torch.tensor([[1.0, 0.0, -3.0, 0.0], [0.5, -0.5, -0.5, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 3])
    loss = MF.warp_loss(s, y, mode=mode, reduction="none", generator=torch.Generator().manual_seed(0))
    assert loss.tolist() == [0.0, 0.0]
    multi = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    loss = MF.warp_loss(s, multi, mode=mode, reduction="none", generator=torch.Generator().manual_seed(0))
    # row 1: positives {0, 3}; negatives -0.5, -0.5 vs s_p = 0.5 -> hinge exactly 0; vs 2.0 -> negative
    assert loss.tolist() == [0.0, 0.0]


def test_exact_single_positive_formula_by_hand():
    # row: s = [2.0, 2.5, 1.5, 0.0, 3.0], y = 0, m = 1: hinges of negatives 1.5, 0.5, -1.0, 2.0 -> r = 3,
    # Σ hinge = 4.0, L(3) = 11/6 -> ℓ = 11/6 · 4/3.
    s = torch.tensor([[2.0, 2.5, 1.5, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = MF.warp_loss(s, torch.tensor([0]), mode="exact")
    assert loss.item() == pytest.approx(11 / 6 * 4 / 3)
    loss.backward()
    w = 11 / 18
    torch.testing.assert_close(s.grad, torch.tensor([[-11 / 6, w, w, 0.0, w]], dtype=torch.float64))


def test_multi_label_rows_without_positive_or_negative_contribute_zero():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float32)
    for mode in ("sampled", "exact"):
        s.grad = None
        per_row = MF.warp_loss(s, labels, margin=10.0, mode=mode, reduction="none")
        assert per_row[0] == 0 and per_row[1] == 0 and per_row[2] > 0
        per_row.sum().backward()
        assert (s.grad[:2] == 0).all() and (s.grad[2] != 0).any()
        mean = MF.warp_loss(s, labels, margin=10.0, mode=mode, reduction="mean",
                            generator=torch.Generator().manual_seed(0))
        summed = MF.warp_loss(s, labels, margin=10.0, mode=mode, reduction="sum",
                              generator=torch.Generator().manual_seed(0))
        assert mean.item() == pytest.approx(summed.item() / 3)   # "mean" divides by B


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_none_is_per_row_and_sums_to_sum(kind, mode):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(20, 8, generator=g, dtype=torch.float64)
    labels = make_labels("single" if kind == "single" else "sparse", 20, 8, g)
    per_row = MF.warp_loss(s, labels, mode=mode, reduction="none", generator=torch.Generator().manual_seed(1))
    total = MF.warp_loss(s, labels, mode=mode, reduction="sum", generator=torch.Generator().manual_seed(1))
    assert per_row.shape == (20,)
    torch.testing.assert_close(per_row.sum(), total)


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_same_generator_state_same_loss_and_gradients(mode):
    g = torch.Generator().manual_seed(9)
    s0 = torch.randn(64, 30, generator=g)
    y = torch.randint(0, 30, (64,), generator=g)
    results = []
    for _ in range(2):
        s = s0.clone().requires_grad_()
        loss = ml.WARPLoss(mode=mode, generator=torch.Generator().manual_seed(123))(s, y)
        loss.backward()
        results.append((loss.detach(), s.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # the global generator: the same seed gives the same draws
    torch.manual_seed(5)
    a = MF.warp_loss(s0, y, mode=mode, reduction="none")
    torch.manual_seed(5)
    b = MF.warp_loss(s0, y, mode=mode, reduction="none")
    assert torch.equal(a, b)
    if mode == "sampled":
        seeded = [MF.warp_loss(s0, y, reduction="none", generator=torch.Generator().manual_seed(seed))
                  for seed in (123, 124)]
        assert not torch.equal(seeded[0], seeded[1])


def test_module_generator_advances_between_calls():
    s = torch.randn(64, 30)
    y = torch.randint(0, 30, (64,))
    criterion = ml.WARPLoss(generator=torch.Generator().manual_seed(0), reduction="none")
    first, second = criterion(s, y), criterion(s, y)
    assert not torch.equal(first, second)
    replay = ml.WARPLoss(generator=torch.Generator().manual_seed(0), reduction="none")
    assert torch.equal(replay(s, y), first)


def test_module_and_functional_agree():
    s = torch.randn(16, 12)
    y = torch.randint(0, 12, (16,))
    for kwargs in (dict(mode="exact", rank_weight="log", margin=0.5, reduction="sum"),
                   dict(mode="sampled", rank_weight=constant_weight, max_trials=4, reduction="none")):
        module = ml.WARPLoss(generator=torch.Generator().manual_seed(2), **kwargs)
        functional = MF.warp_loss(s, y, generator=torch.Generator().manual_seed(2), **kwargs)
        torch.testing.assert_close(module(s, y), functional)
    module = ml.WARPLoss(rank_weight=constant_weight)
    assert "constant_weight" in repr(module) and "max_trials=None" in repr(module)
    assert len(list(module.parameters())) == 0
    default = ml.WARPLoss()
    assert (default.margin, default.max_trials, default.mode, default.rank_weight, default.reduction) == (
        1.0, None, "sampled", "harmonic", "mean")


@pytest.mark.parametrize("mode", ["sampled", "exact"])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_no_violator_gives_connected_zero(mode, kind):
    s = torch.zeros(4, 6)
    s[:, 0] = 5.0
    labels = torch.zeros(4, dtype=torch.int64) if kind == "single" else torch.nn.functional.one_hot(
        torch.zeros(4, dtype=torch.int64), 6).bool()
    s.requires_grad_()
    for reduction in REDUCTIONS:
        s.grad = None
        loss = MF.warp_loss(s, labels, mode=mode, reduction=reduction)
        assert loss.requires_grad and torch.equal(loss.detach(), torch.zeros_like(loss))
        loss.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["sampled", "exact"])
@pytest.mark.parametrize("where", ["positive", "negative"])
def test_nonfinite_scores_propagate(mode, bad, where):
    s = torch.randn(8, 5)
    y = torch.arange(8) % 5
    s[3, 1 if where == "negative" else 3] = bad
    s.requires_grad_()
    loss = MF.warp_loss(s, y, mode=mode)
    assert torch.isnan(loss)
    loss.backward()  # no crash
    multi = MF.warp_loss(s.detach(), torch.rand(8, 5) < 0.5, mode=mode, reduction="none")
    assert torch.isnan(multi).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_dtypes(mode, dtype):
    g = torch.Generator().manual_seed(0)
    s32 = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    s = s32.to(dtype).requires_grad_()
    loss = MF.warp_loss(s, y, mode=mode, generator=torch.Generator().manual_seed(1))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the same draws on the exactly upcast scores give the same loss
    want = MF.warp_loss(s.detach().to(loss.dtype), y, mode=mode, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_autocast_does_not_lower_precision(mode):
    s = torch.randn(32, 10, requires_grad=True)
    y = torch.randint(0, 10, (32,))
    plain = MF.warp_loss(s, y, mode=mode, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = MF.warp_loss(s, y, mode=mode, generator=torch.Generator().manual_seed(1))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_exact_with_many_chunks_and_non_contiguous_scores():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(40, 33, generator=g, dtype=torch.float64).T.contiguous().T[:, :30]   # strided view
    assert not s.is_contiguous()
    labels = torch.rand(40, 30, generator=g) < 0.3
    for lab in (labels, torch.randint(0, 30, (40,), generator=g)):
        x1, x2 = s.clone().requires_grad_(), s.detach().clone().requires_grad_()
        got = warp_ops.warp_loss_op(s, lab, 1.0, None, "exact", "harmonic", "none", None, chunk_bytes=300)
        want = reference.warp_loss(s, lab, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for reduction in ("mean", "none"):
            a = warp_ops.warp_loss_op(x1, lab, 1.0, None, "exact", "harmonic", reduction, None, chunk_bytes=300)
            b = reference.warp_loss(x2, lab, reduction=reduction)
            (ga,) = torch.autograd.grad(a.sum(), x1)
            (gb,) = torch.autograd.grad(b.sum(), x2)
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_sampled_memory_budget_does_not_change_the_assembly():
    # One trial per block (tiny budget) and the default budget both give losses consistent with their draws.
    g = torch.Generator().manual_seed(8)
    s = torch.randn(50, 40, generator=g, dtype=torch.float64)
    labels = torch.rand(50, 40, generator=g) < 0.2
    for chunk_bytes in (1, None):
        loss = warp_ops.warp_loss_op(s, labels, 1.0, None, "sampled", "harmonic", "none",
                                     torch.Generator().manual_seed(0), chunk_bytes)
        exact_rows = MF.warp_loss(s, labels, mode="exact", reduction="none")
        assert ((exact_rows == 0) <= (loss == 0)).all() and (loss > 0).any()


def test_callable_rank_weight_must_keep_the_shape():
    s, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="`rank_weight`"):
        MF.warp_loss(s, y, rank_weight=lambda k: 1.0)
    with pytest.raises(ValueError, match="`rank_weight`"):
        MF.warp_loss(s, y, rank_weight=lambda k: k[:1].double(), mode="exact")


# ----------------------------------------------------------------------------------------------------
# bad input (*Design › Bad input*): every message names the argument
# ----------------------------------------------------------------------------------------------------

S = torch.randn(4, 5)
Y = torch.tensor([0, 1, 2, 4])

BAD_CALLS = [
    (TypeError, "`scores`", dict(scores=[[1.0, 2.0]])),
    (TypeError, "`scores`", dict(scores=torch.ones(4, 5, dtype=torch.int64))),
    (ValueError, "`scores`", dict(scores=torch.randn(20))),
    (ValueError, "`scores`", dict(scores=torch.randn(0, 5), labels=torch.zeros(0, dtype=torch.int64))),
    (ValueError, "`scores`", dict(scores=torch.randn(4, 1), labels=torch.zeros(4, dtype=torch.int64))),
    (ValueError, "`labels`", dict(labels=torch.tensor([0, 1, 2, 5]))),
    (ValueError, "`labels`", dict(labels=torch.tensor([0, -1, 2, 3]))),
    (ValueError, "`labels`", dict(labels=torch.tensor([0, 1, 2]))),
    (TypeError, "`labels`", dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0]))),
    (TypeError, "`labels`", dict(labels=[0, 1, 2, 3])),
    (ValueError, "`labels`", dict(labels=torch.zeros(4, 5, 1))),
    (ValueError, "`labels`", dict(labels=torch.zeros(4, 6, dtype=torch.bool))),
    (ValueError, "`labels`", dict(labels=torch.full((4, 5), 0.5))),
    (ValueError, "`labels`", dict(labels=torch.full((4, 5), 2, dtype=torch.int64))),
    (ValueError, "`labels`", dict(labels=torch.full((4, 5), float("nan")))),
    (ValueError, "`margin`", dict(margin=-0.1)),
    (ValueError, "`margin`", dict(margin="soft")),
    (ValueError, "`margin`", dict(margin=float("nan"))),
    (ValueError, "`max_trials`", dict(max_trials=0)),
    (TypeError, "`max_trials`", dict(max_trials=2.5)),
    (ValueError, "`mode`", dict(mode="approx")),
    (ValueError, "`rank_weight`", dict(rank_weight="linear")),
    (TypeError, "`rank_weight`", dict(rank_weight=3)),
    (ValueError, "`reduction`", dict(reduction="mean_nonzero")),
    (TypeError, "`generator`", dict(generator=0)),
]


@pytest.mark.parametrize("error, name, override", BAD_CALLS)
def test_bad_input_names_the_argument(error, name, override):
    kwargs = dict(scores=S, labels=Y)
    kwargs.update(override)
    scores, labels = kwargs.pop("scores"), kwargs.pop("labels")
    with pytest.raises(error, match=name):
        MF.warp_loss(scores, labels, **kwargs)
    if set(kwargs) and not {"generator"} & set(kwargs):
        with pytest.raises(error, match=name):
            ml.WARPLoss(**kwargs)


def test_valid_option_lists_are_in_the_messages():
    with pytest.raises(ValueError, match="'sampled', 'exact'"):
        ml.WARPLoss(mode="fast")
    with pytest.raises(ValueError, match="'harmonic', 'log' or a callable"):
        ml.WARPLoss(rank_weight="auc")
    with pytest.raises(ValueError, match="'mean', 'sum', 'none'"):
        ml.WARPLoss(reduction="avg")
    with pytest.raises(TypeError, match="`generator`"):
        ml.WARPLoss(generator="cpu")


def test_multi_hot_labels_accept_bool_float_and_int():
    s = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    want = MF.warp_loss(s, mask, mode="exact")
    for dtype in (torch.float32, torch.float16, torch.int64, torch.uint8):
        torch.testing.assert_close(MF.warp_loss(s, mask.to(dtype), mode="exact"), want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_backward_twice_and_with_a_scaled_upstream(reduction):
    # The gradient computed in forward is handed over as is when grad_out == 1: a retained second
    # backward must see it unchanged, and any other upstream gradient scales it.
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,))
    loss = MF.warp_loss(s, y, mode="exact", reduction=reduction)
    (once,) = torch.autograd.grad(loss, s, retain_graph=True)
    (again,) = torch.autograd.grad(loss, s, retain_graph=True)
    (scaled,) = torch.autograd.grad(loss * 3.0, s)
    want = torch.autograd.grad(reference.warp_loss(s, y, reduction=reduction), s)[0]
    torch.testing.assert_close(once, want)
    torch.testing.assert_close(again, want)
    torch.testing.assert_close(scaled, 3 * want)
    loss = MF.warp_loss(s, y, mode="exact", reduction=reduction)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["single", "sparse"])
@pytest.mark.parametrize("chunk_bytes", [None, 200])
def test_exact_on_transposed_scores_every_dtype_and_label_kind(dtype, kind, chunk_bytes):
    # Issue 18.7: scores = (a @ b.T).T is a dense transposed view; a chunk holding every row kept its
    # strides in the scratch buffers and crashed on the flat view (fp16, multi-hot and integer labels alike).
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 4, generator=g), torch.randn(6, 4, generator=g)
    scores = (a @ b.T).T.to(dtype)
    assert not scores.is_contiguous()
    labels = make_labels(kind, 6, 9, g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for reduction in ("mean", "none"):
        x1 = scores.detach().requires_grad_()
        x2 = scores.detach().contiguous().requires_grad_()
        got = warp_ops.warp_loss_op(x1, labels, 0.5, None, "exact", "harmonic", reduction, None, chunk_bytes)
        want = reference.warp_loss(x2, labels, margin=0.5, reduction=reduction)
        torch.testing.assert_close(got, want.to(got.dtype), **tol)
        (ga,) = torch.autograd.grad(got.sum(), x1)
        (gb,) = torch.autograd.grad(want.sum(), x2)
        torch.testing.assert_close(ga, gb, **tol)
        # the module takes the same path
        loss = ml.WARPLoss(mode="exact", margin=0.5, reduction=reduction)(scores, labels)
        torch.testing.assert_close(loss, want.to(loss.dtype), **tol)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sampled_fullgraph_compile_single_labels(reduction, path, monkeypatch):
    """With one label per row both samplers are free of host reads and data-dependent shapes (the native one
    has a fake kernel; the torch one, the path CUDA takes, draws the loop's outcome from its law): sampled
    WARP compiles as one graph (aot_eager: the eager RNG, so the same draws) with the eager loss and
    gradient. (Dynamo takes no explicit torch.Generator: the global generator draws.)"""
    from metricloss.ops import native

    if path == "torch":
        monkeypatch.setenv("METRICLOSS_NATIVE", "0")
    elif not native.native_enabled(torch.empty(0), "warp"):
        pytest.skip("the native WARP sampler is not available")
    g = torch.Generator().manual_seed(3)
    s, y = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randint(0, 12, (16,), generator=g)

    def fn(x):
        out = MF.warp_loss(x, y, reduction=reduction)
        return (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    torch.manual_seed(5)
    want = fn(a)
    torch.manual_seed(5)
    got = compiled(b)
    want.backward()
    got.backward()
    assert want.item() != 0.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
