"""SVMax: mean_singular_value vs numpy.linalg.svd in fp64 (values and gradients), bounds, routes, edges."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF

METHODS = ("gram", "svd")


def _shape(relation: str, small: int, extra: int):
    # b < d ("wide"), b = d ("square"), b > d ("tall")
    if relation == "wide":
        return small, small + extra
    if relation == "tall":
        return small + extra, small
    return small, small


def _numpy_value_and_grad(x: np.ndarray, normalize: bool):
    """s_μ and d s_μ / dx by numpy.linalg.svd in fp64 (the gradient of Σσ/r w.r.t. E is U·Vᵀ / r)."""
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    e = x / norms if normalize else x
    u, s, vt = np.linalg.svd(e, full_matrices=False)
    r = min(e.shape)
    g_e = u @ vt / r
    if normalize:  # through n = x / ‖x‖: (I − n nᵀ) g / ‖x‖ per row
        g = (g_e - e * (g_e * e).sum(1, keepdims=True)) / norms
    else:
        g = g_e
    return s.mean(), g


@given(relation=st.sampled_from(["wide", "square", "tall"]), small=st.integers(1, 9), extra=st.integers(1, 9),
       normalize=st.booleans(), method=st.sampled_from(METHODS), seed=st.integers(0, 2**31 - 1))
def test_value_and_gradient_match_numpy_svd_fp64(relation, small, extra, normalize, method, seed):
    b, d = _shape(relation, small, extra)
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_value, ref_grad = _numpy_value_and_grad(x.numpy(), normalize)
    xg = x.clone().requires_grad_()
    value = MF.mean_singular_value(xg, normalize=normalize, method=method)
    value.backward()
    assert value.dtype == torch.float64 and value.shape == ()
    np.testing.assert_allclose(value.item(), ref_value, rtol=1e-12, atol=1e-13)
    # the Gram route's gradient error grows like eps·κ²; random Gaussian batches stay far below 1e-7
    np.testing.assert_allclose(xg.grad.numpy(), ref_grad, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b, d", [(3, 5), (4, 4), (7, 3)])
def test_gradcheck(method, b, d):
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: MF.mean_singular_value(t, method=method), (x,))


# ----------------------------------------------------------------------------------------------------
# bounds
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, d", [(1, 1), (1, 5), (3, 8), (6, 6), (9, 4), (144, 128), (40, 7)])
def test_bounds_formula_both_regimes(b, d):
    lower, upper = MF.svmax_bounds(b, d)
    r = min(b, d)
    assert lower == pytest.approx(math.sqrt(b) / r, rel=1e-15) and upper == pytest.approx(math.sqrt(b / r), rel=1e-15)
    if b > d:  # the authors' code: lower sqrt(b)/d, upper sqrt(b*d/max(b, d))*sqrt(b)/d
        assert lower == pytest.approx(math.sqrt(b) / d) and upper == pytest.approx(math.sqrt(b * d / b) * math.sqrt(b) / d)
    else:
        assert lower == pytest.approx(1 / math.sqrt(b)) and upper == pytest.approx(1.0)
    assert ml.SVMaxRegularizer.bounds(b, d) == (lower, upper)
    assert lower <= upper


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b, d", [(1, 4), (3, 8), (6, 6), (9, 4), (64, 16)])
def test_collapsed_rows_attain_the_lower_bound(method, b, d):
    g = torch.Generator().manual_seed(b * 100 + d)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    scales = torch.rand(b, 1, generator=g, dtype=torch.float64) + 0.5  # normalisation removes the scale
    x = scales * direction
    lower, _ = MF.svmax_bounds(b, d)
    torch.testing.assert_close(MF.mean_singular_value(x, method=method), torch.tensor(lower, dtype=torch.float64),
                               rtol=1e-7 if method == "gram" else 1e-12, atol=0)


def _harmonic_frame(b: int, d: int) -> torch.Tensor:
    """b > d unit rows with EᵀE = (b/d)·I (d even): sqrt(2/d)·[cos(2πjt/b), sin(2πjt/b)], j = 1..d/2."""
    t = torch.arange(b, dtype=torch.float64)[:, None]
    j = torch.arange(1, d // 2 + 1, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * j * t / b
    return math.sqrt(2.0 / d) * torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("b, d", [(1, 4), (3, 8), (6, 6), (9, 4), (10, 6), (64, 16)])
def test_spread_rows_attain_the_upper_bound(method, b, d):
    if b <= d:  # orthonormal rows
        q, _ = torch.linalg.qr(torch.randn(d, b, dtype=torch.float64, generator=torch.Generator().manual_seed(b)))
        e = q.T
    else:  # a tight frame of unit rows
        e = _harmonic_frame(b, d)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(b, dtype=torch.float64))
        torch.testing.assert_close(e.T @ e, (b / d) * torch.eye(d, dtype=torch.float64))
    _, upper = MF.svmax_bounds(b, d)
    torch.testing.assert_close(MF.mean_singular_value(e, method=method), torch.tensor(upper, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@given(b=st.integers(1, 20), d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_random_batches_lie_within_the_bounds(b, d, seed):
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lower, upper = MF.svmax_bounds(b, d)
    for method in METHODS:
        s = MF.mean_singular_value(x, method=method).item()
        assert lower - 1e-12 <= s <= upper + 1e-12


# ----------------------------------------------------------------------------------------------------
# routes, dtypes, edge cases
# ----------------------------------------------------------------------------------------------------

def test_routes_agree_in_fp32_and_auto_is_gram():
    x = torch.randn(300, 48)
    ref = MF.mean_singular_value(x.double(), method="svd")
    for method in ("auto", "gram", "svd"):
        value = MF.mean_singular_value(x, method=method)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), ref, rtol=2e-6, atol=0)
    assert torch.equal(MF.mean_singular_value(x, method="auto"), MF.mean_singular_value(x, method="gram"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32_and_return_grads_in_their_dtype(dtype):
    x = torch.randn(40, 12).to(dtype).requires_grad_()
    value = MF.mean_singular_value(x)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, MF.mean_singular_value(x.detach().float()), rtol=0, atol=0)
    value.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_autocast_region_does_not_lower_the_precision():
    x = torch.randn(50, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = MF.mean_singular_value(x)
    assert value.dtype == torch.float32 and torch.equal(value, MF.mean_singular_value(x))


@pytest.mark.parametrize("b, d", [(12, 4), (3, 7)])
def test_gram_gradient_at_a_collapsed_batch_is_the_finite_rank_one_subgradient(b, d):
    v = torch.randn(d, dtype=torch.float32)
    v = v / v.norm()
    e = v.repeat(b, 1).requires_grad_()
    MF.mean_singular_value(e, normalize=False, method="gram").backward()
    # σ_1 = √b with u = 1/√b, so the subgradient without null-space part is u vᵀ / r on every row
    expected = (v / (math.sqrt(b) * min(b, d))).repeat(b, 1)
    torch.testing.assert_close(e.grad, expected, rtol=1e-5, atol=1e-7)
    x = e.detach().clone().requires_grad_()
    MF.mean_singular_value(x, method="svd").backward()
    assert torch.isfinite(x.grad).all()


def test_zero_rows_are_allowed_and_nonfinite_input_gives_nan():
    x = torch.randn(6, 4)
    x[2] = 0.0
    xg = x.clone().requires_grad_()
    value = MF.mean_singular_value(xg)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(xg.grad).all()
    for bad in (float("nan"), float("inf")):
        y = torch.randn(6, 4)
        y[1, 3] = bad
        for method in METHODS:
            assert torch.isnan(MF.mean_singular_value(y, method=method))


def test_regularizer_is_minus_weight_times_s_mu():
    x = torch.randn(32, 8, dtype=torch.float64)
    for weight in (0.0, 0.3, 1.0, 5.0):
        reg = ml.SVMaxRegularizer(weight=weight)
        assert torch.equal(reg(x), -weight * MF.mean_singular_value(x))
        assert torch.equal(MF.svmax_regularizer(x, weight=weight), reg(x))
    raw = ml.SVMaxRegularizer(weight=2.0, normalize=False, method="svd")
    assert torch.equal(raw(x), -2.0 * MF.mean_singular_value(x, normalize=False, method="svd"))
    assert "weight=2.0" in repr(raw) and "method='svd'" in repr(raw)
    assert ml.SVMaxRegularizer().weight == 1.0 and len(list(ml.SVMaxRegularizer().parameters())) == 0


def test_regularizer_gradient_step_raises_s_mu_of_a_nearly_collapsed_batch():
    x = (torch.randn(1, 16) + 0.05 * torch.randn(64, 16)).requires_grad_()
    before = MF.mean_singular_value(x).item()
    ml.SVMaxRegularizer()(x).backward()
    with torch.no_grad():
        x -= 0.5 * x.grad / x.grad.norm()
    assert MF.mean_singular_value(x).item() > before


def test_bad_arguments_raise_before_any_work():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="embeddings"):
        MF.mean_singular_value(x.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        MF.mean_singular_value(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        MF.mean_singular_value(torch.randn(4))
    with pytest.raises(ValueError, match="empty"):
        MF.mean_singular_value(torch.randn(0, 3))
    with pytest.raises(ValueError, match="method"):
        MF.mean_singular_value(x, method="eig")
    with pytest.raises(TypeError, match="normalize"):
        MF.mean_singular_value(x, normalize=1)
    with pytest.raises(ValueError, match="weight"):
        ml.SVMaxRegularizer(weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        MF.svmax_regularizer(x, weight=float("inf"))
    with pytest.raises(ValueError, match="method"):
        ml.SVMaxRegularizer(method="qr")
    with pytest.raises(TypeError, match="normalize"):
        ml.SVMaxRegularizer(normalize="yes")
    with pytest.raises(ValueError, match="`b`"):
        MF.svmax_bounds(0, 3)
    with pytest.raises(TypeError, match="`d`"):
        MF.svmax_bounds(3, 2.0)
