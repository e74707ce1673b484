"""CentroidTripletLoss and its functional twin: dense reference, gradients, buffers, edges, bad input."""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import _backend, reference
from metricloss.ops import centroid as centroid_ops

REDUCTIONS = ["mean", "sum", "none"]


def assert_matches_reference(x, y, centroids, kwargs, atol=1e-9, upstream_seed=0):
    """Loss and gradients (w.r.t. the embeddings, and the centroids when they are a tensor) equal the
    dense reference; a non-uniform upstream gradient weighs the rows of reduction="none" differently."""
    inputs = [x.detach().clone().requires_grad_()]
    if isinstance(centroids, torch.Tensor):
        inputs.append(centroids.detach().clone().requires_grad_())
    c = inputs[1] if len(inputs) == 2 else centroids
    got = MF.centroid_triplet_loss(inputs[0], y, c, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "reduction")}
    want = reference.centroid_triplet_loss(inputs[0], y, c, **ref_kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)
    w = torch.rand(got.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=got.dtype)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_want = torch.autograd.grad((want * w).sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=atol)


@st.composite
def centroid_cases(draw):
    b = draw(st.integers(1, 20))
    d = draw(st.integers(1, 8))
    num = draw(st.integers(2, 9))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["tensor", "onehot"])) if d >= num else "tensor"
    if kind == "onehot":
        c, c_dense = "onehot", torch.eye(num, d, dtype=torch.float64)
    else:
        scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
        c = c_dense = torch.randn(num, d, generator=g, dtype=torch.float64) * scale
    x = torch.randn(b, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    y = torch.randint(0, num, (b,), generator=g)
    # rows exactly on their own centroid (the attractor), exactly on or near another class's centroid
    on_centroid = draw(st.sampled_from(["none", "own", "other", "both", "near"]))
    if on_centroid in ("own", "both"):
        x[0] = c_dense[y[0]]
    if on_centroid in ("other", "both", "near") and b > 1:
        x[-1] = c_dense[(y[-1] + 1) % num]
    if on_centroid == "near":
        x[-1] += 1e-3 * torch.randn(d, generator=g, dtype=torch.float64)
    if draw(st.booleans()) and b > 2:
        x[1] = x[2]  # duplicate rows
    kwargs = dict(reduction=draw(st.sampled_from(REDUCTIONS)),
                  chunk_bytes=draw(st.sampled_from([None, 16, 200, 4000])))
    if kind == "onehot" or draw(st.booleans()):
        kwargs["num_classes"] = num
    return x, y, c, kwargs


@given(case=centroid_cases())
def test_matches_reference_fp64(case):
    x, y, c, kwargs = case
    assert_matches_reference(x, y, c, kwargs)


def test_medium_case_with_many_tiles_matches_reference():
    # 300 classes, tiny tiles: many class chunks and row tiles, rows on own and other centroids.
    g = torch.Generator().manual_seed(1)
    c = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 300, (30,), generator=g)
    x = torch.randn(30, 16, generator=g, dtype=torch.float64)
    x[:5] = c[y[:5]]
    x[5:10] = c[(y[5:10] + 7) % 300]
    for chunk_bytes in (None, 2000, 20000):
        assert_matches_reference(x, y, c, dict(reduction="none", chunk_bytes=chunk_bytes))
    xo = torch.randn(40, 300, generator=g, dtype=torch.float64)
    yo = torch.randint(0, 300, (40,), generator=g)
    assert_matches_reference(xo, yo, "onehot", dict(num_classes=300, reduction="mean", chunk_bytes=3000))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["tensor", "onehot"])
def test_gradcheck(kind, reduction):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    if kind == "onehot":
        def fn(x_):
            return MF.centroid_triplet_loss(x_, y, "onehot", num_classes=5, reduction=reduction,
                                            chunk_bytes=40)

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    else:
        c = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
        def fn2(x_, c_):
            return MF.centroid_triplet_loss(x_, y, c_, reduction=reduction, chunk_bytes=40)

        assert torch.autograd.gradcheck(fn2, (x, c), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3), (5, 12), (64, 64)])
def test_onehot_and_explicit_eye_give_the_same_loss(shape, dtype):
    num, d = shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, d, generator=g).to(dtype)
    y = torch.randint(0, num, (50,), generator=g)
    x[:5] = torch.eye(num, d)[y[:5]].to(dtype)  # on their own one-hot centroid
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = MF.centroid_triplet_loss(xa, y, "onehot", num_classes=num, reduction="none")
    b = MF.centroid_triplet_loss(xb, y, torch.eye(num, d, dtype=dtype), reduction="none")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, **tol)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def test_row_on_its_onehot_centroid_is_the_local_minimum():
    # ℓ = 0 − (C − 1)·√2 / (3(C − 1)) = −√2/3, and the gradient there is the other centroids' pull only.
    num, d = 6, 8
    y = torch.arange(num)
    x = torch.eye(num, d, dtype=torch.float64).requires_grad_()
    loss = MF.centroid_triplet_loss(x, y, "onehot", num_classes=num, reduction="none")
    torch.testing.assert_close(loss.detach(), torch.full((num,), -math.sqrt(2) / 3, dtype=torch.float64))
    loss.sum().backward()
    dense = reference.centroid_triplet_loss(x, y, "onehot", num_classes=num, reduction="sum")
    (want,) = torch.autograd.grad(dense, x)
    torch.testing.assert_close(x.grad, want)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["tensor", "onehot"])
def test_fp32_rows_near_another_centroid_are_exact(kind):
    # Rows 1e-4 from a foreign centroid at norm ~30 (tensor) or 1 (one-hot): the Gram expansion loses these
    # distances to cancellation in fp32, and the GEMM form of the gradient (s·x − Σ w·c) loses their
    # directions; refined tiles and exact near pairs match fp64 on the same fp32 inputs.
    g = torch.Generator().manual_seed(3)
    num, d = 20, 32
    dense = torch.eye(num, d) if kind == "onehot" else torch.randn(num, d, generator=g) * 30
    y = torch.randint(0, num, (64,), generator=g)
    x = dense[(y + 1) % num] + 1e-4 * torch.randn(64, d, generator=g)
    x32 = x.clone().requires_grad_()
    c32 = "onehot" if kind == "onehot" else dense.clone().requires_grad_()
    got = MF.centroid_triplet_loss(x32, y, c32, num_classes=num, reduction="none")
    x64, c64 = x.double().requires_grad_(), dense.double().requires_grad_()
    want = reference.centroid_triplet_loss(x64, y, c64, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    upstream = torch.rand(64, generator=g)
    (got * upstream).sum().backward()
    (want * upstream.double()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    if kind == "tensor":
        torch.testing.assert_close(c32.grad.double(), c64.grad, rtol=1e-4, atol=1e-4)


def test_reductions_agree():
    x, y = torch.randn(30, 8, dtype=torch.float64), torch.randint(0, 5, (30,))
    c = torch.randn(5, 8, dtype=torch.float64)
    per_row = MF.centroid_triplet_loss(x, y, c, reduction="none")
    assert per_row.shape == (30,)
    torch.testing.assert_close(MF.centroid_triplet_loss(x, y, c, reduction="sum"), per_row.sum())
    torch.testing.assert_close(MF.centroid_triplet_loss(x, y, c), per_row.mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme", ["onehot", "kmeans"])
def test_dtypes(scheme, dtype):
    module = ml.CentroidTripletLoss(10, 16, centroids=scheme)
    x = torch.randn(32, 16).to(dtype).requires_grad_()
    y = torch.randint(0, 10, (32,))
    loss = module(x, y)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = reference.centroid_triplet_loss(x.detach().to(loss.dtype), y, module.centroids)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_autocast_does_not_lower_precision():
    module = ml.CentroidTripletLoss(10, 16, centroids="kmeans")
    x, y = torch.randn(32, 16, requires_grad=True), torch.randint(0, 10, (32,))
    plain = module(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = module(x, y)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


@pytest.mark.parametrize("where", ["embeddings", "centroids"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_propagates(bad, where):
    x, c = torch.randn(16, 8), torch.randn(4, 8)
    (x if where == "embeddings" else c)[2, 1] = bad
    x.requires_grad_()
    loss = MF.centroid_triplet_loss(x, torch.randint(0, 4, (16,)), c)
    assert torch.isnan(loss)
    loss.backward()  # no crash


def test_centroid_gradient_flows_only_when_asked():
    x = torch.randn(12, 4, requires_grad=True)
    c = torch.randn(3, 4, requires_grad=True)
    MF.centroid_triplet_loss(x, torch.arange(3).repeat(4), c).backward()
    assert x.grad.abs().sum() > 0 and c.grad.abs().sum() > 0
    module = ml.CentroidTripletLoss(3, 4, centroids=c)
    x.grad = None
    module(x, torch.arange(3).repeat(4)).backward()
    assert not module.centroids.requires_grad and module.centroids.grad is None and x.grad.abs().sum() > 0


def test_no_grad_forward_equals_grad_forward():
    x, y, c = torch.randn(20, 6), torch.randint(0, 4, (20,)), torch.randn(4, 6)
    with torch.no_grad():
        a = MF.centroid_triplet_loss(x, y, c, reduction="none")
    b = MF.centroid_triplet_loss(x.requires_grad_(), y, c, reduction="none")
    torch.testing.assert_close(a, b.detach())


# ----------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["onehot", "kmeans", "tensor"])
def test_module_and_functional_agree(scheme):
    g = torch.Generator().manual_seed(5)
    given_c = torch.randn(6, 10, generator=g)
    module = ml.CentroidTripletLoss(6, 10, centroids=given_c if scheme == "tensor" else scheme,
                                    reduction="sum")
    x, y = torch.randn(25, 10, generator=g), torch.randint(0, 6, (25,), generator=g)
    c = "onehot" if scheme == "onehot" else module.centroids
    got = module(x, y)
    torch.testing.assert_close(got, MF.centroid_triplet_loss(x, y, c, num_classes=6, reduction="sum"))
    torch.testing.assert_close(got, reference.centroid_triplet_loss(x, y, module.centroids, reduction="sum"))
    assert f"centroids={scheme!r}" in repr(module) and "num_classes=6" in repr(module)


def test_centroids_are_a_buffer_saved_and_moved():
    module = ml.CentroidTripletLoss(5, 8, centroids="kmeans", seed=3)
    assert len(list(module.parameters())) == 0
    assert list(module.state_dict()) == ["centroids"] and module.centroids.shape == (5, 8)
    assert not module.centroids.requires_grad
    moved = module.to(torch.float64)
    assert moved.centroids.dtype == torch.float64
    fresh = ml.CentroidTripletLoss(5, 8, centroids="kmeans", seed=4).to(torch.float64)
    assert not torch.equal(fresh.centroids, module.centroids)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.centroids, module.centroids)
    onehot = ml.CentroidTripletLoss(5, 8)
    assert torch.equal(onehot.centroids, torch.eye(5, 8))


def test_module_copies_a_given_tensor():
    c = torch.randn(4, 6)
    module = ml.CentroidTripletLoss(4, 6, centroids=c)
    c.add_(1.0)
    assert not torch.equal(module.centroids, c)


def test_kmeans_module_is_deterministic_for_a_seed():
    a = ml.CentroidTripletLoss(12, 16, centroids="kmeans", seed=7)
    b = ml.CentroidTripletLoss(12, 16, centroids="kmeans", seed=7)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.centroids, centroid_ops.kmeans_sphere_centroids(12, 16, seed=7))


def test_kmeans_works_when_embedding_dim_is_below_num_classes():
    module = ml.CentroidTripletLoss(50, 8, centroids="kmeans")
    x, y = torch.randn(40, 8, requires_grad=True), torch.randint(0, 50, (40,))
    loss = module(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------

def test_reference_backend_agrees_with_torch():
    x, y, c = torch.randn(20, 6), torch.randint(0, 4, (20,)), torch.randn(4, 6)
    torch.testing.assert_close(MF.centroid_triplet_loss(x, y, c, backend="reference"),
                               MF.centroid_triplet_loss(x, y, c, backend="torch"))
    torch.testing.assert_close(MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, backend="reference"),
                               MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, backend="torch"))


def test_triton_request_falls_back_loudly(monkeypatch):
    # one-hot centroids have no Triton kernel (no GEMM); tensor centroids do (tests/kernels)
    monkeypatch.setattr(_backend, "_warned", set())
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    with pytest.warns(UserWarning, match="centroid_triplet_loss: backend='triton'"):
        got = MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, backend="triton")
    torch.testing.assert_close(got, MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, backend="torch"))


# ----------------------------------------------------------------------------------------------------
# bad input: TypeError/ValueError naming the argument, before any work
# ----------------------------------------------------------------------------------------------------

X = torch.randn(6, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])
CEN = torch.randn(3, 4)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: MF.centroid_triplet_loss(X, torch.tensor([0, 1, 2, 3, 0, 1]), CEN), ValueError, "labels"),
    (lambda: MF.centroid_triplet_loss(X, torch.tensor([0, -1, 2, 0, 1, 2]), CEN), ValueError, "labels"),
    (lambda: MF.centroid_triplet_loss(X, Y.float(), CEN), TypeError, "labels"),
    (lambda: MF.centroid_triplet_loss(X, Y[:5], CEN), ValueError, "labels"),
    (lambda: MF.centroid_triplet_loss(X.int(), Y, CEN), TypeError, "embeddings"),
    (lambda: MF.centroid_triplet_loss(torch.randn(0, 4), Y[:0], CEN), ValueError, "embeddings"),
    (lambda: MF.centroid_triplet_loss(X, Y, torch.randn(3, 5)), ValueError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, torch.randn(3)), ValueError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, torch.ones(3, 4, dtype=torch.int64)), TypeError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, [[0.0] * 4] * 3), TypeError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y * 0, torch.randn(1, 4)), ValueError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, "kmeans"), ValueError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, "onehot"), ValueError, "num_classes"),
    (lambda: MF.centroid_triplet_loss(X, Y, "onehot", num_classes=1), ValueError, "num_classes"),
    (lambda: MF.centroid_triplet_loss(X, Y, "onehot", num_classes=5), ValueError, "centroids"),
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, num_classes=4), ValueError, "num_classes"),
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, num_classes=3.0), TypeError, "num_classes"),  # issue 18.10
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, num_classes=True), TypeError, "num_classes"),
    (lambda: MF.centroid_triplet_loss(X, Y, "onehot", num_classes=4.0), TypeError, "num_classes"),
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, reduction="mean_nonzero"), ValueError, "reduction"),
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, backend="gpu"), ValueError, "backend"),
    (lambda: MF.centroid_triplet_loss(X, Y, CEN, chunk_bytes=0), ValueError, "chunk_bytes"),
    (lambda: MF.centroid_triplet_loss(X, Y, torch.empty(3, 4, device="meta")), ValueError, "centroids"),
    (lambda: ml.CentroidTripletLoss(1, 4), ValueError, "num_classes"),
    (lambda: ml.CentroidTripletLoss(2.0, 4), TypeError, "num_classes"),
    (lambda: ml.CentroidTripletLoss(3, 0), ValueError, "embedding_dim"),
    (lambda: ml.CentroidTripletLoss(10, 4), ValueError, "centroids"),
    (lambda: ml.CentroidTripletLoss(3, 4, centroids="random"), ValueError, "centroids"),
    (lambda: ml.CentroidTripletLoss(3, 4, centroids=torch.randn(3, 5)), ValueError, "centroids"),
    (lambda: ml.CentroidTripletLoss(3, 4, centroids=torch.ones(3, 4).long()), TypeError, "centroids"),
    (lambda: ml.CentroidTripletLoss(3, 4, reduction="mean_nonzero"), ValueError, "reduction"),
    (lambda: ml.CentroidTripletLoss(3, 4, backend="cuda"), ValueError, "backend"),
    (lambda: ml.CentroidTripletLoss(3, 4, seed=-1), ValueError, "seed"),
    (lambda: ml.CentroidTripletLoss(3, 4, seed=0.5), TypeError, "seed"),
    (lambda: ml.CentroidTripletLoss(3, 4, chunk_bytes=-5), ValueError, "chunk_bytes"),
    (lambda: ml.CentroidTripletLoss(3, 4)(torch.randn(6, 5), Y), ValueError, "embeddings"),
    (lambda: ml.CentroidTripletLoss(3, 4, "kmeans")(torch.randn(6, 5), Y), ValueError, "embeddings"),
    (lambda: ml.CentroidTripletLoss(3, 4)(X, torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, "labels"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()


def test_onehot_with_too_few_dimensions_suggests_kmeans():
    with pytest.raises(ValueError, match="centroids='kmeans'"):
        ml.CentroidTripletLoss(10, 4)
    with pytest.raises(ValueError, match="centroids='kmeans'"):
        MF.centroid_triplet_loss(X, Y, "onehot", num_classes=5)


def test_onehot_module_uses_its_centroids_buffer():
    # Issue 18.13: loading other centroids into a one-hot module changed nothing, and .double() stayed fp32.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g)
    y = torch.arange(10) % 4
    module = ml.CentroidTripletLoss(4, 6)
    onehot = module(x, y)
    torch.testing.assert_close(onehot, MF.centroid_triplet_loss(x, y, "onehot", num_classes=4))
    other = torch.randn(4, 6, generator=g)
    module.load_state_dict({"centroids": other})
    torch.testing.assert_close(module(x, y), MF.centroid_triplet_loss(x, y, other))
    assert not torch.allclose(module(x, y), onehot)
    with torch.no_grad():
        module.centroids.copy_(torch.eye(4, 6))        # back to the identity: the closed form again
    torch.testing.assert_close(module(x, y), onehot)
    with torch.no_grad():
        module.centroids[0, 0] = 2.0                   # an in-place edit is seen too
    torch.testing.assert_close(module(x, y), MF.centroid_triplet_loss(x, y, module.centroids))
    fresh = ml.CentroidTripletLoss(4, 6).double()
    out = fresh(x, y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, MF.centroid_triplet_loss(x.double(), y, "onehot", num_classes=4))


def test_strided_labels_raise_no_warning_from_the_library():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.int64, torch.int32, torch.uint8):
            y = (torch.arange(48) % 4).to(dtype)[::4]
            assert not y.is_contiguous()
            for module in (ml.CentroidTripletLoss(4, 8), ml.CentroidTripletLoss(4, 8, centroids="kmeans")):
                module(x, y).backward()
            MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, backend="reference").backward()
            MF.centroid_triplet_loss(x, y, torch.randn(4, 8, generator=g), backend="torch").backward()
