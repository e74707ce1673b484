"""NormalizeScale, CosineClassifier and NormSoftmaxLoss vs dense formulas, F.cross_entropy, PML; gradients, edges."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from ..helpers import assert_row_normalised_losses_match


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ----------------------------------------------------------------------------------------------------
# NormalizeScale
# ----------------------------------------------------------------------------------------------------

@given(b=st.integers(1, 9), d=st.integers(1, 7), scale=st.sampled_from([0.5, 1.0, 20.0, 64.0]),
       magnitude=st.sampled_from([1e-6, 1.0, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_normalize_scale_output_norms_equal_scale(b, d, scale, magnitude, seed):
    x = _randn(torch.Generator().manual_seed(seed), b, d, scale=magnitude)
    out = MF.normalize_scale(x, scale)
    torch.testing.assert_close(out.norm(dim=1), torch.full((b,), scale, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out, reference.normalize_scale(x, scale), rtol=1e-13, atol=0)


def test_normalize_scale_gradient_matches_dense_formula_including_near_zero_rows():
    # rows: ordinary, tiny but above eps, below eps, exactly zero
    g = torch.Generator().manual_seed(1)
    x = torch.cat([_randn(g, 3, 5), _randn(g, 1, 5, scale=1e-9), _randn(g, 1, 5, scale=1e-14),
                   torch.zeros(1, 5, dtype=torch.float64)])
    upstream = _randn(g, 6, 5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (MF.normalize_scale(x1, 3.0) * upstream).sum().backward()
    (reference.normalize_scale(x2, 3.0) * upstream).sum().backward()
    assert torch.isfinite(x1.grad).all()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=0)
    # closed form: s (I − x̂x̂ᵀ) g / ‖x‖ above eps, s g / eps below it
    norm = x.norm(dim=1, keepdim=True)
    unit = x / norm.clamp_min(1e-12)
    above = 3.0 * (upstream - unit * (unit * upstream).sum(1, keepdim=True)) / norm.clamp_min(1e-12)
    below = 3.0 * upstream / 1e-12
    s_closed = torch.where(norm >= 1e-12, above, below)
    torch.testing.assert_close(x1.grad, s_closed, rtol=1e-9, atol=0)
    assert torch.equal(MF.normalize_scale(x, 3.0)[5], torch.zeros(5, dtype=torch.float64))


def test_normalize_scale_module_fixed_and_learnable():
    x = torch.randn(6, 4, dtype=torch.float64)
    fixed = ml.NormalizeScale(scale=5.0)
    assert len(list(fixed.parameters())) == 0 and fixed.scale == 5.0 and "scale=5.0" in repr(fixed)
    torch.testing.assert_close(fixed(x), MF.normalize_scale(x, 5.0))
    learn = ml.NormalizeScale(scale=5.0, learnable=True).double()
    assert [n for n, _ in learn.named_parameters()] == ["log_scale"]
    torch.testing.assert_close(learn.log_scale.detach(), torch.tensor(math.log(5.0), dtype=torch.float64))
    out = learn(x)
    torch.testing.assert_close(out.norm(dim=1), torch.full((6,), 5.0, dtype=torch.float64))
    out.pow(2).sum().backward()          # = B·s², so d/d(log s) = 2·B·s²
    torch.testing.assert_close(learn.log_scale.grad, torch.tensor(2 * 6 * 25.0, dtype=torch.float64))
    with torch.no_grad():                # any log-scale is a positive scale
        learn.log_scale.fill_(-3.0)
    assert float(learn.scale.detach()) > 0 and "learnable" in repr(learn)


def test_normalize_scale_gradcheck_fixed_and_learnable():
    g = torch.Generator().manual_seed(2)
    x = _randn(g, 5, 4).requires_grad_()
    log_s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, l_: MF.normalize_scale(x_, l_.exp()), (x, log_s))
    assert torch.autograd.gradcheck(lambda x_: MF.normalize_scale(x_, 20.0), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_normalize_scale_keeps_dtype_and_autocast(dtype):
    x = torch.randn(8, 16).to(dtype).requires_grad_()
    out = MF.normalize_scale(x, 4.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().norm(dim=1), torch.full((8,), 4.0), rtol=1e-2, atol=0)
    out.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = MF.normalize_scale(torch.randn(8, 16), 4.0)
    assert auto.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# CosineClassifier / cosine_logits
# ----------------------------------------------------------------------------------------------------

@given(b=st.integers(1, 8), d=st.integers(1, 6), c=st.integers(1, 9), scale=st.sampled_from([1.0, 16.0]),
       margin=st.sampled_from([0.0, 0.35]), with_labels=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_cosine_logits_equal_dense_formula(b, d, c, scale, margin, with_labels, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = _randn(g, b, d), _randn(g, c, d)
    y = torch.randint(0, c, (b,), generator=g) if with_labels else None
    got = MF.cosine_logits(x, w, y, scale=scale, margin=margin)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    if y is not None:
        cos = cos - margin * F.one_hot(y, c).double()
    torch.testing.assert_close(got, scale * cos, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, reference.cosine_logits(x, w, y, scale=scale, margin=margin), rtol=1e-12,
                               atol=1e-12)


def test_cosine_classifier_margin_only_on_target_and_only_with_labels():
    clf = ml.CosineClassifier(6, 5, scale=10.0, margin=0.3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 1])
    plain, with_margin = clf(x), clf(x, y)
    diff = plain - with_margin
    expected = torch.zeros_like(diff)
    expected[torch.arange(4), y] = 3.0   # s·m
    torch.testing.assert_close(diff, expected, rtol=0, atol=1e-12)


def test_cosine_classifier_init_shape_and_no_weight_mutation():
    torch.manual_seed(3)
    clf = ml.CosineClassifier(256, 40)
    assert clf.weight.shape == (40, 256) and clf.weight.dtype == torch.float32
    bound = 1 / math.sqrt(256)
    assert clf.weight.abs().max() <= bound and clf.weight.abs().max() > 0.9 * bound
    before, version, ptr = clf.weight.detach().clone(), clf.weight._version, clf.weight.data_ptr()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        clf(torch.randn(3, 256).to(dtype), torch.tensor([0, 1, 2])).sum().backward()
    assert clf.weight.dtype == torch.float32 and clf.weight.data_ptr() == ptr
    assert clf.weight._version == version and torch.equal(clf.weight.detach(), before)
    assert clf.weight.grad.dtype == torch.float32


def test_cosine_classifier_learnable_scale_and_gradcheck():
    clf = ml.CosineClassifier(4, 3, scale=8.0, learnable_scale=True, margin=0.2).double()
    assert {n for n, _ in clf.named_parameters()} == {"weight", "log_scale"}
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 0])
    clf(x, y).logsumexp(1).sum().backward()
    assert clf.log_scale.grad is not None and clf.log_scale.grad != 0
    w = clf.weight.detach().clone().requires_grad_()
    log_s = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_, l_: MF.cosine_logits(x_, w_, y, scale=l_.exp(), margin=0.2),
                                    (x, w, log_s))


# ----------------------------------------------------------------------------------------------------
# NormSoftmaxLoss
# ----------------------------------------------------------------------------------------------------

def _dense_ce(x, y, w, temperature, reduction):
    """F.cross_entropy on dense cosine logits: the acceptance baseline."""
    return F.cross_entropy(reference.cosine_logits(x, w, scale=1.0 / temperature), y, reduction=reduction)


def assert_matches_cross_entropy(x, y, w, temperature, class_chunk, reduction, seed=0, rtol=1e-10, atol=1e-12):
    """Loss and both gradients equal F.cross_entropy's (see the helper for how)."""
    assert_row_normalised_losses_match(
        lambda x_, w_: MF.norm_softmax_loss(x_, y, w_, temperature=temperature, class_chunk=class_chunk,
                                            reduction=reduction),
        lambda x_, w_: _dense_ce(x_, y, w_, temperature, reduction), x, w, seed=seed, rtol=rtol, atol=atol)


@pytest.mark.parametrize("class_chunk", [1, 3, 4, 12, 50, None])   # C = 12: divides, does not, one, >C
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_norm_softmax_equals_cross_entropy_for_dividing_and_non_dividing_chunks(class_chunk, reduction):
    g = torch.Generator().manual_seed(4)
    x, w = _randn(g, 9, 5), _randn(g, 12, 5)
    y = torch.randint(0, 12, (9,), generator=g)
    assert_matches_cross_entropy(x, y, w, 0.05, class_chunk, reduction)


@given(b=st.integers(1, 10), d=st.integers(1, 6), c=st.integers(1, 20), chunk=st.integers(1, 8),
       temperature=st.sampled_from([0.01, 0.05, 1.0]), magnitude=st.sampled_from([1e-3, 1.0, 100.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31 - 1))
def test_norm_softmax_streamed_matches_cross_entropy_fp64(b, d, c, chunk, temperature, magnitude, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = _randn(g, b, d, scale=magnitude), _randn(g, c, d)
    y = torch.randint(0, c, (b,), generator=g)
    assert_matches_cross_entropy(x, y, w, temperature, chunk, reduction, seed=seed)


def test_norm_softmax_reference_agrees_with_cross_entropy():
    g = torch.Generator().manual_seed(5)
    x, w, y = _randn(g, 7, 4), _randn(g, 11, 4), torch.randint(0, 11, (7,), generator=g)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(reference.norm_softmax_loss(x, y, w, 0.1, reduction),
                                   _dense_ce(x, y, w, 0.1, reduction), rtol=1e-13, atol=1e-13)


def test_norm_softmax_small_temperature_is_stable():
    # s = 1000: a fixed shift would under/overflow; the online logsumexp keeps the loss exact
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(16, 8, generator=g), torch.randn(300, 8, generator=g)
    y = torch.randint(0, 300, (16,), generator=g)
    got = MF.norm_softmax_loss(x, y, w, temperature=1e-3, class_chunk=37)
    want = _dense_ce(x.double(), y, w.double(), 1e-3, "mean")
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("class_chunk", [None, 2, 5])
def test_norm_softmax_gradcheck(class_chunk):
    g = torch.Generator().manual_seed(7)
    x, w = _randn(g, 4, 3).requires_grad_(), _randn(g, 5, 3).requires_grad_()
    y = torch.tensor([0, 4, 2, 4])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda x_, w_: MF.norm_softmax_loss(x_, y, w_, temperature=0.5, class_chunk=class_chunk,
                                                reduction=reduction), (x, w))


@pytest.mark.parametrize("class_chunk", [None, 3])
def test_norm_softmax_zero_rows_give_finite_gradients_that_match(class_chunk):
    g = torch.Generator().manual_seed(8)
    x, w = _randn(g, 5, 4), _randn(g, 7, 4)
    x[1] = 0.0
    w[2] = 0.0
    w[5] *= 1e-14
    y = torch.tensor([2, 1, 5, 0, 2])
    assert_matches_cross_entropy(x, y, w, 0.5, class_chunk, "mean", rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("where", ["embeddings", "weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("class_chunk", [None, 4])
def test_norm_softmax_nonfinite_propagates(where, bad, class_chunk):
    x, w = torch.randn(6, 4), torch.randn(10, 4)
    (x if where == "embeddings" else w)[2, 1] = bad
    x.requires_grad_()
    loss = MF.norm_softmax_loss(x, torch.arange(6), w, class_chunk=class_chunk)
    assert torch.isnan(loss)
    loss.backward()  # no crash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("class_chunk", [None, 16])
def test_norm_softmax_dtypes(dtype, class_chunk):
    x32, w32 = torch.randn(32, 8), torch.randn(50, 8)
    y = torch.randint(0, 50, (32,))
    x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
    loss = MF.norm_softmax_loss(x, y, w, class_chunk=class_chunk)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _dense_ce(x.detach().to(loss.dtype), y, w.detach().to(loss.dtype), 0.05, "mean")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("class_chunk", [None, 16])
def test_norm_softmax_autocast_does_not_lower_precision(class_chunk):
    x, w, y = torch.randn(32, 8, requires_grad=True), torch.randn(50, 8), torch.randint(0, 50, (32,))
    plain = MF.norm_softmax_loss(x, y, w, class_chunk=class_chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = MF.norm_softmax_loss(x, y, w, class_chunk=class_chunk)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_norm_softmax_only_the_needed_gradient():
    x, w, y = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4), torch.randint(0, 9, (6,))
    MF.norm_softmax_loss(x, y, w, class_chunk=4).backward()
    assert x.grad is not None and w.grad is None
    x2, w2 = torch.randn(6, 4), torch.randn(9, 4, requires_grad=True)
    MF.norm_softmax_loss(x2, y, w2, class_chunk=4).backward()
    with torch.no_grad():
        assert MF.norm_softmax_loss(x2, y, w2, class_chunk=4).requires_grad is False
    assert w2.grad is not None


def test_norm_softmax_module_and_functional_agree():
    torch.manual_seed(9)
    streamed = ml.NormSoftmaxLoss(8, 30, temperature=0.1, class_chunk=7)
    dense = ml.NormSoftmaxLoss(8, 30, temperature=0.1)
    dense.load_state_dict(streamed.state_dict())
    assert [n for n, _ in streamed.named_parameters()] == ["weight"] and streamed.weight.shape == (30, 8)
    assert streamed.weight.abs().max() <= 1 / math.sqrt(8)
    assert "class_chunk=7" in repr(streamed) and "temperature=0.1" in repr(streamed)
    x, y = torch.randn(12, 8), torch.randint(0, 30, (12,))
    torch.testing.assert_close(streamed(x, y), dense(x, y))
    torch.testing.assert_close(streamed(x, y), MF.norm_softmax_loss(x, y, streamed.weight, temperature=0.1))
    torch.testing.assert_close(streamed.get_logits(x), MF.cosine_logits(x, streamed.weight, scale=10.0))
    per_row = ml.NormSoftmaxLoss(8, 30, reduction="none")(x, y)
    assert per_row.shape == (12,)


def test_norm_softmax_pml_parity():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(10)
    theirs = pml_losses.NormalizedSoftmaxLoss(num_classes=40, embedding_size=16, temperature=0.05)
    ours = ml.NormSoftmaxLoss(16, 40, temperature=0.05, class_chunk=9)
    with torch.no_grad():
        ours.weight.copy_(theirs.W.T)
    x0, y = torch.randn(32, 16), torch.randint(0, 40, (32,))
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    lt, lo = theirs(x1, y), ours(x2, y)
    lt.backward()
    lo.backward()
    assert abs(lt.item() - lo.item()) < 1e-5
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.W.grad.T, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------

X, W = torch.randn(6, 4), torch.randn(5, 4)
Y = torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("call, exc, name", [
    (lambda: MF.normalize_scale(torch.randn(4), 2.0), ValueError, "x"),
    (lambda: MF.normalize_scale(X, 0.0), ValueError, "scale"),
    (lambda: MF.normalize_scale(X, -1.0), ValueError, "scale"),
    (lambda: MF.normalize_scale(X, torch.ones(2)), ValueError, "scale"),
    (lambda: MF.normalize_scale(X, "20"), TypeError, "scale"),
    (lambda: MF.normalize_scale(X, 2.0, eps=0.0), ValueError, "eps"),
    (lambda: MF.cosine_logits(X, torch.randn(5, 3)), ValueError, "embeddings"),
    (lambda: MF.cosine_logits(X, W.int()), TypeError, "weight"),
    (lambda: MF.cosine_logits(X, W, Y + 1), ValueError, "labels"),
    (lambda: MF.cosine_logits(X, W, Y, margin=-0.1), ValueError, "margin"),
    (lambda: MF.cosine_logits(X, W, Y[:3]), ValueError, "labels"),
    (lambda: MF.norm_softmax_loss(X, Y, torch.randn(5, 7)), ValueError, "embeddings"),
    (lambda: MF.norm_softmax_loss(X, Y - 1, W), ValueError, "labels"),
    (lambda: MF.norm_softmax_loss(X, Y + 1, W), ValueError, "labels"),
    (lambda: MF.norm_softmax_loss(X, Y.float(), W), TypeError, "labels"),
    (lambda: MF.norm_softmax_loss(X, Y, W, temperature=0.0), ValueError, "temperature"),
    (lambda: MF.norm_softmax_loss(X, Y, W, temperature=-0.05), ValueError, "temperature"),
    (lambda: MF.norm_softmax_loss(X, Y, W, class_chunk=0), ValueError, "class_chunk"),
    (lambda: MF.norm_softmax_loss(X, Y, W, class_chunk=2.5), TypeError, "class_chunk"),
    (lambda: MF.norm_softmax_loss(X, Y, W, reduction="mean_nonzero"), ValueError, "reduction"),
    (lambda: MF.norm_softmax_loss(X, Y, W.to("meta")), ValueError, "weight"),
    (lambda: ml.NormalizeScale(scale=0), ValueError, "scale"),
    (lambda: ml.NormalizeScale(learnable="yes"), TypeError, "learnable"),
    (lambda: ml.NormalizeScale(eps=-1.0), ValueError, "eps"),
    (lambda: ml.CosineClassifier(0, 3), ValueError, "in_features"),
    (lambda: ml.CosineClassifier(4, 3, margin=-1), ValueError, "margin"),
    (lambda: ml.CosineClassifier(4, 3)(torch.randn(2, 5)), ValueError, "embeddings"),
    (lambda: ml.CosineClassifier(4, 3)(torch.randn(2, 4), torch.tensor([0, 3])), ValueError, "labels"),
    (lambda: ml.NormSoftmaxLoss(4, 0), ValueError, "num_classes"),
    (lambda: ml.NormSoftmaxLoss(4, 3, temperature=0), ValueError, "temperature"),
    (lambda: ml.NormSoftmaxLoss(4, 3, class_chunk=-2), ValueError, "class_chunk"),
    (lambda: ml.NormSoftmaxLoss(4, 3)(torch.randn(2, 6), torch.tensor([0, 1])), ValueError, "embeddings"),
    (lambda: ml.NormSoftmaxLoss(4, 3)(torch.randn(2, 4), torch.tensor([0, 3])), ValueError, "labels"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()


def test_in_features_mismatch_message_names_both_sides():
    with pytest.raises(ValueError, match=r"`embeddings` has 6 features but `weight` has in_features=4"):
        ml.NormSoftmaxLoss(4, 3)(torch.randn(2, 6), torch.tensor([0, 1]))
