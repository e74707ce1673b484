"""CentralizedRankingLoss (DGCRL reconstruction) vs its dense reference; decorrelation, gradients, edges."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import centralized as centralized_ops
from ..helpers import assert_row_normalised_losses_match

REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]


def assert_matches_reference(x, y, w, kwargs, seed=0, rtol=1e-9, atol=1e-10):
    """Loss and gradients (embeddings, weight) equal the reference's (see the helper for how)."""
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "class_chunk"}
    assert_row_normalised_losses_match(lambda x_, w_: MF.centralized_ranking_loss(x_, y, w_, **kwargs),
                                       lambda x_, w_: reference.centralized_ranking_loss(x_, y, w_, **ref_kwargs),
                                       x, w, seed=seed, rtol=rtol, atol=atol)


@st.composite
def ranking_cases(draw):
    b, d, c = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    if draw(st.booleans()) and b > 1:
        x[1] = x[0]   # duplicate rows
        y[1] = y[0]
    modes = ["auto", "penalty", "none"] + (["qr"] if d >= c else [])
    kwargs = dict(margin=draw(st.sampled_from([0.0, 0.2, 1.0])), scale=draw(st.sampled_from([0.5, 1.0, 3.0])),
                  decorrelation=draw(st.sampled_from(modes)),
                  decorrelation_weight=draw(st.sampled_from([0.0, 1.0, 2.5])),
                  reduction=draw(st.sampled_from(REDUCTIONS)), class_chunk=draw(st.sampled_from([None, 1, 2, 5])))
    return x, y, w, kwargs


@given(case=ranking_cases())
def test_matches_reference_fp64(case):
    x, y, w, kwargs = case
    assert_matches_reference(x, y, w, kwargs, rtol=1e-8)


@pytest.mark.parametrize("decorrelation", ["qr", "penalty", "none"])
@pytest.mark.parametrize("class_chunk", [None, 1, 3, 4, 6])     # C = 6: dividing, non-dividing, one chunk
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_sizes_match_reference(decorrelation, class_chunk, reduction):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (10,), generator=g)
    assert_matches_reference(x, y, w, dict(margin=0.7, scale=1.5, decorrelation=decorrelation,
                                           reduction=reduction, class_chunk=class_chunk))


def _kink_free_case(b, d, c, margin, scale, decorrelation, gap=1e-3):
    """fp64 inputs whose hinge arguments all stay more than ``gap`` away from 0 (for finite differences)."""
    for seed in range(500):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        w = torch.randn(c, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, c, (b,), generator=g)
        mode = centralized_ops.resolve_decorrelation(decorrelation, d, c)
        centres = centralized_ops.class_centres(w, scale, mode)
        feats = reference.normalize_scale(x, scale)
        dist = torch.cdist(feats, centres) ** 2
        arg = margin + dist.gather(1, y[:, None]) - dist
        arg[torch.arange(b), y] = 1.0
        if (arg.abs() > gap).all():
            return x, y, w
    raise RuntimeError("no kink-free case")


@pytest.mark.parametrize("decorrelation, d", [("qr", 6), ("penalty", 3), ("none", 3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(decorrelation, d, reduction):
    x, y, w = _kink_free_case(5, d, 4, margin=0.5, scale=1.2, decorrelation=decorrelation)
    x.requires_grad_()
    w.requires_grad_()

    def fn(x_, w_):
        return tuple(MF.centralized_ranking_loss(x_, y, w_, margin=0.5, scale=1.2, decorrelation=decorrelation,
                                                 reduction=reduction, class_chunk=chunk) for chunk in (None, 3))

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6)


def test_hand_computed_example():
    # x = (1, 0) of class 1; centres (1, 0), (0, 1), (−1, 0); s = 1, m = 0.5:
    # d_own = 2; rival 0: [0.5 + 2 − 0]_+ = 2.5; rival 2: [0.5 + 2 − 4]_+ = 0
    x = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([1])
    kw = dict(margin=0.5, scale=1.0, decorrelation="none")
    assert MF.centralized_ranking_loss(x, y, w, reduction="sum", **kw).item() == pytest.approx(2.5)
    assert MF.centralized_ranking_loss(x, y, w, reduction="mean", **kw).item() == pytest.approx(1.25)
    assert MF.centralized_ranking_loss(x, y, w, reduction="mean_nonzero", **kw).item() == pytest.approx(2.5)
    assert MF.centralized_ranking_loss(x, y, w, reduction="none", class_chunk=1, **kw).tolist() == pytest.approx([2.5])


def test_qr_centres_are_the_gram_schmidt_rows():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    q = centralized_ops.gram_schmidt_rows(w)
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q, reference.gram_schmidt_loop(w), rtol=0, atol=1e-12)
    # Gram-Schmidt keeps the first direction and the flag of each successive span
    torch.testing.assert_close(q[0], w[0] / w[0].norm())
    assert (torch.linalg.vecdot(q, w) > 0).all()
    loss = ml.CentralizedRankingLoss(7, 5, scale=2.0).double()
    assert loss.decorrelation == "auto"
    torch.testing.assert_close(loss.centres(), 2.0 * reference.gram_schmidt_loop(loss.weight.detach()))


@pytest.mark.parametrize("c, d", [(4, 6), (9, 3)])   # the C×C and the D×D paths
def test_orthogonality_penalty_equals_literal_mean(c, d):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    w[1] *= 1e-14   # a row below eps: its diagonal entry is not 1
    unit = reference.normalize_scale(w, 1.0)
    literal = ((unit @ unit.T - torch.eye(c, dtype=torch.float64)) ** 2).mean()
    torch.testing.assert_close(centralized_ops.orthogonality_penalty(w), literal, rtol=1e-12, atol=1e-14)


def test_streamed_penalty_chunks_and_gradcheck():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_literal = w.detach().clone().requires_grad_()
    upstream = 1.7
    # 4·D·8 bytes per row: a 100-byte budget gives one row per chunk
    (upstream * centralized_ops.orthogonality_penalty(w, chunk_bytes=100)).backward()
    unit = reference.normalize_scale(w_literal, 1.0)
    (upstream * ((unit @ unit.T - torch.eye(11, dtype=torch.float64)) ** 2).mean()).backward()
    torch.testing.assert_close(w.grad, w_literal.grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda w_: centralized_ops.orthogonality_penalty(w_, chunk_bytes=200), (w,))


def test_auto_decorrelation_picks_qr_or_penalty():
    assert centralized_ops.resolve_decorrelation("auto", 8, 8) == "qr"
    assert centralized_ops.resolve_decorrelation("auto", 8, 9) == "penalty"
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    auto = MF.centralized_ranking_loss(x, y, w)
    torch.testing.assert_close(auto, MF.centralized_ranking_loss(x, y, w, decorrelation="penalty"))
    none = MF.centralized_ranking_loss(x, y, w, decorrelation="none")
    torch.testing.assert_close(auto - none, centralized_ops.orthogonality_penalty(w))


def test_none_reduction_and_penalty_add_up_to_sum():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    kw = dict(decorrelation="penalty", decorrelation_weight=0.3, class_chunk=2)
    per_row = MF.centralized_ranking_loss(x, y, w, reduction="none", **kw)
    assert per_row.shape == (7,)
    torch.testing.assert_close(per_row.sum(), MF.centralized_ranking_loss(x, y, w, reduction="sum", **kw))


def test_scale_and_margin_are_tied():
    # ranking part: loss(s, m) = s² · loss(1, m / s²) (the penalty does not depend on s)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (8,), generator=g)
    big = MF.centralized_ranking_loss(x, y, w, margin=0.8, scale=4.0, reduction="sum", decorrelation="none")
    unit = MF.centralized_ranking_loss(x, y, w, margin=0.8 / 16, scale=1.0, reduction="sum",
                                       decorrelation="none")
    torch.testing.assert_close(big, 16 * unit)


def test_single_class_gives_connected_zero():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)
    for reduction in REDUCTIONS:
        x.grad = w.grad = None
        loss = MF.centralized_ranking_loss(x, torch.zeros(4, dtype=torch.int64), w, reduction=reduction)
        assert loss.requires_grad and torch.equal(loss.detach(), torch.zeros_like(loss))
        loss.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("class_chunk", [None, 2])
def test_zero_rows_give_finite_gradients_that_match(class_chunk):
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    x[2] = 0.0
    w[3] = 0.0
    y = torch.tensor([0, 3, 1, 5, 3])
    kw = dict(margin=0.3, decorrelation="none", reduction="sum", class_chunk=class_chunk)
    assert_matches_reference(x, y, w, kw)
    xs = x.clone().requires_grad_()
    MF.centralized_ranking_loss(xs, y, w, **kw).backward()
    assert torch.isfinite(xs.grad).all()


@pytest.mark.parametrize("where", ["embeddings", "weight"])
@pytest.mark.parametrize("decorrelation", ["qr", "penalty"])
@pytest.mark.parametrize("class_chunk", [None, 3])
def test_nonfinite_propagates(where, decorrelation, class_chunk):
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    (x if where == "embeddings" else w)[2, 1] = float("nan")
    x.requires_grad_()
    loss = MF.centralized_ranking_loss(x, torch.tensor([0, 1, 2, 3, 4, 0]), w, decorrelation=decorrelation,
                                       class_chunk=class_chunk)
    assert torch.isnan(loss)
    loss.backward()
    x2 = torch.randn(6, 8)
    x2[0, 0] = float("inf")
    assert torch.isnan(MF.centralized_ranking_loss(x2, torch.arange(6) % 5, torch.randn(5, 8),
                                                   decorrelation=decorrelation, class_chunk=class_chunk))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("decorrelation", ["qr", "penalty"])
def test_dtypes(dtype, decorrelation):
    x32, w32 = torch.randn(16, 8), torch.randn(6, 8)
    y = torch.randint(0, 6, (16,))
    x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
    loss = MF.centralized_ranking_loss(x, y, w, decorrelation=decorrelation, class_chunk=4)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = reference.centralized_ranking_loss(x.detach().to(loss.dtype), y, w.detach().to(loss.dtype),
                                              decorrelation=decorrelation)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = MF.centralized_ranking_loss(x32, y, w32, decorrelation=decorrelation)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, MF.centralized_ranking_loss(x32, y, w32, decorrelation=decorrelation))


def test_module_and_functional_agree():
    torch.manual_seed(8)
    module = ml.CentralizedRankingLoss(8, 20, margin=0.3, scale=2.0, decorrelation="penalty",
                                       decorrelation_weight=0.5, reduction="sum", class_chunk=6)
    assert [n for n, _ in module.named_parameters()] == ["weight"] and module.weight.shape == (20, 8)
    assert module.weight.abs().max() <= 1 / math.sqrt(8)
    for text in ("margin=0.3", "decorrelation='penalty'", "class_chunk=6", "reduction='sum'"):
        assert text in repr(module)
    x, y = torch.randn(12, 8), torch.randint(0, 20, (12,))
    torch.testing.assert_close(module(x, y), MF.centralized_ranking_loss(
        x, y, module.weight, margin=0.3, scale=2.0, decorrelation="penalty", decorrelation_weight=0.5,
        reduction="sum"))
    module(x, y).backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    torch.testing.assert_close(module.centres().norm(dim=1), torch.full((20,), 2.0))
    defaults = ml.CentralizedRankingLoss(4, 3)
    assert (defaults.margin, defaults.scale, defaults.decorrelation, defaults.reduction) == (0.2, 1.0, "auto", "mean")


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

X, W = torch.randn(6, 4), torch.randn(5, 4)
Y = torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("call, exc, name", [
    (lambda: MF.centralized_ranking_loss(X, Y, torch.randn(5, 3)), ValueError, "embeddings"),
    (lambda: MF.centralized_ranking_loss(X, Y + 1, W), ValueError, "labels"),
    (lambda: MF.centralized_ranking_loss(X, Y - 1, W), ValueError, "labels"),
    (lambda: MF.centralized_ranking_loss(X, Y[:4], W), ValueError, "labels"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, margin=-0.2), ValueError, "margin"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, margin="soft"), ValueError, "margin"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, scale=0.0), ValueError, "scale"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, decorrelation="gram"), ValueError, "decorrelation"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, decorrelation="qr"), ValueError, "decorrelation"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, decorrelation_weight=-1.0), ValueError, "decorrelation_weight"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, reduction="avg"), ValueError, "reduction"),
    (lambda: MF.centralized_ranking_loss(X, Y, W, class_chunk=0), ValueError, "class_chunk"),
    (lambda: MF.centralized_ranking_loss(X, Y, [[1.0]]), TypeError, "weight"),
    (lambda: ml.CentralizedRankingLoss(4, 5, decorrelation="qr"), ValueError, "decorrelation"),
    (lambda: ml.CentralizedRankingLoss(4, 5, decorrelation="pca"), ValueError, "decorrelation"),
    (lambda: ml.CentralizedRankingLoss(0, 5), ValueError, "in_features"),
    (lambda: ml.CentralizedRankingLoss(4, 5, scale=-1.0), ValueError, "scale"),
    (lambda: ml.CentralizedRankingLoss(4, 5, class_chunk=0), ValueError, "class_chunk"),
    (lambda: ml.CentralizedRankingLoss(4, 5)(torch.randn(3, 6), torch.tensor([0, 1, 2])), ValueError, "embeddings"),
    (lambda: ml.CentralizedRankingLoss(4, 5)(torch.randn(3, 4), torch.tensor([0, 1, 5])), ValueError, "labels"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()


def test_unknown_decorrelation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'auto', 'qr', 'penalty', 'none'"):
        MF.centralized_ranking_loss(X, Y, W, decorrelation="gs")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_through_a_retained_graph_twice_gives_the_same_gradient(reduction):
    # the first backward hands out the gradient computed in forward; the second one recomputes it
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = MF.centralized_ranking_loss(x, torch.tensor([0, 1, 2, 3, 0]), w, reduction=reduction, class_chunk=3)
    first = torch.autograd.grad(2.5 * loss.sum(), (x, w), retain_graph=True)
    second = torch.autograd.grad(2.5 * loss.sum(), (x, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", ["zero_row", "repeated_row"])
def test_qr_with_dependent_weight_rows_raises_instead_of_nan_gradients(bad):
    # Issue 18.9: an all-zero weight row gave a finite loss (0.2307) and a NaN weight.grad, silently.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    y = torch.arange(8) % 4
    w = torch.randn(4, 6, generator=g)
    if bad == "zero_row":
        w[2] = 0.0
    else:
        w[3] = w[1]
    w.requires_grad_()
    with pytest.raises(ValueError, match="`weight` has linearly dependent rows"):
        MF.centralized_ranking_loss(x, y, w, decorrelation="qr")
    module = ml.CentralizedRankingLoss(6, 4, decorrelation="auto")
    with torch.no_grad():
        module.weight.copy_(w)
    with pytest.raises(ValueError, match="decorrelation='penalty'"):
        module(x, y)
    # the penalty form has a finite gradient on the same weight
    loss = MF.centralized_ranking_loss(x, y, w, decorrelation="penalty")
    loss.backward()
    assert torch.isfinite(w.grad).all()


def test_qr_independent_rows_are_not_flagged():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-6, 1.0, 1e6):
        w = torch.randn(5, 5, generator=g, dtype=torch.float64) * scale
        _, dependent = centralized_ops._gram_schmidt(w)
        assert not dependent
