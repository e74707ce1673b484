"""Second derivatives and functorch for WARP, the cosine losses, DGCRL and the centroid bound (issue 18.2, 18.12).

Every loss either has a correct double backward (``gradgradcheck`` passes) or raises a clear
``RuntimeError`` naming it when a gradient is differentiated again; none returns a silently wrong or None
second derivative. Every custom ``autograd.Function`` is in the ``setup_context`` form, so
``torch.func.grad`` gives the autograd gradient.
"""

import pytest
import torch

import metricloss.functional as MF
from metricloss import reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _inputs(b=6, d=5, c=4, seed=0):
    g = _gen(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.arange(b) % c
    return x, w, y


# ---------------------------------------------------------------------------------------------------
# losses with a correct double backward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_exact_warp_gradgradcheck(kind, reduction):
    # ∂ℓ/∂s is piecewise constant, so the second derivative is 0; backward is linear in the upstream grad
    g = _gen(1)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (5,), generator=g) if kind == "single" else torch.rand(5, 7, generator=g) < 0.4
    fn = lambda s: MF.warp_loss(s, labels, mode="exact", reduction=reduction, margin=0.7)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (s,))
    # and the Hessian-vector product is the reference's (zero)
    (gs,) = torch.autograd.grad(fn(s).sum(), s, create_graph=True)
    (hv,) = torch.autograd.grad((gs * torch.randn(5, 7, generator=g, dtype=torch.float64)).sum(), s,
                                allow_unused=True, materialize_grads=True)
    assert torch.equal(hv, torch.zeros_like(hv))


def test_sampled_warp_gradgradcheck_with_fixed_draws():
    s = torch.randn(5, 7, generator=_gen(2), dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (5,), generator=_gen(3))
    fn = lambda s: MF.warp_loss(s, labels, generator=_gen(4))  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (s,))


def test_dense_norm_softmax_and_cosine_logits_gradgradcheck():
    x, w, y = _inputs()
    x.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: MF.norm_softmax_loss(x, y, w, temperature=0.5), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: MF.cosine_logits(x, w, y, scale=2.0, margin=0.1), (x, w))


def test_centroid_reference_backend_gradgradcheck():
    x, c, y = _inputs()
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: MF.centroid_triplet_loss(x, y, c, backend="reference"), (x,))


# ---------------------------------------------------------------------------------------------------
# losses that refuse a second derivative, clearly
# ---------------------------------------------------------------------------------------------------

def _refusing_cases():
    x, w, y = _inputs()
    wide = torch.randn(9, 5, generator=_gen(5), dtype=torch.float64)   # C > D: streamed penalty
    y_wide = torch.arange(6) % 9
    return {
        "norm_softmax_streamed": (lambda x, w: MF.norm_softmax_loss(x, y, w, class_chunk=3),
                                  (x, w), "norm_softmax_loss"),
        "dgcrl_qr": (lambda x, w: MF.centralized_ranking_loss(x, y, w, decorrelation="qr", margin=2.0),
                     (x, w), "centralized_ranking_loss"),
        "dgcrl_penalty_chunked": (lambda x, w: MF.centralized_ranking_loss(x, y_wide, w, margin=2.0,
                                                                            decorrelation="penalty",
                                                                            class_chunk=2),
                                  (x, wide), "centralized_ranking_loss"),
        "dgcrl_none": (lambda x, w: MF.centralized_ranking_loss(x, y, w, decorrelation="none", margin=2.0,
                                                                reduction="none").sum(),
                       (x, w), "centralized_ranking_loss"),
        "centroid_tensor": (lambda x, c: MF.centroid_triplet_loss(x, y, c), (x, w), "centroid_triplet_loss"),
        "centroid_onehot": (lambda x: MF.centroid_triplet_loss(x, y, "onehot", num_classes=4), (x,),
                            "centroid_triplet_loss"),
    }


@pytest.mark.parametrize("case", list(_refusing_cases()))
def test_second_derivative_raises_clearly(case):
    fn, inputs, name = _refusing_cases()[case]
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    grads = torch.autograd.grad(fn(*inputs), inputs, create_graph=True)
    # every cross term, e.g. d(∂L/∂x)/dW (DGCRL used to return None for it), raises naming the loss
    for g in grads:
        for t in inputs:
            with pytest.raises(RuntimeError, match=f"{name}.* is not twice differentiable"):
                torch.autograd.grad(g.square().sum(), t, retain_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", list(_refusing_cases()))
def test_first_derivative_unchanged_under_create_graph(case):
    fn, inputs, _ = _refusing_cases()[case]
    a = tuple(t.detach().clone().requires_grad_() for t in inputs)
    b = tuple(t.detach().clone().requires_grad_() for t in inputs)
    plain = torch.autograd.grad(fn(*a), a)
    linked = torch.autograd.grad(fn(*b), b, create_graph=True)
    for p, q in zip(plain, linked):
        torch.testing.assert_close(q.detach(), p, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# torch.func.grad (setup_context form)
# ---------------------------------------------------------------------------------------------------

def _func_grad_cases():
    x, w, y = _inputs()
    s = torch.randn(6, 7, generator=_gen(6), dtype=torch.float64)
    ys = torch.randint(0, 7, (6,), generator=_gen(7))
    multi = torch.rand(6, 7, generator=_gen(8)) < 0.4
    wide = torch.randn(9, 5, generator=_gen(5), dtype=torch.float64)
    y_wide = torch.arange(6) % 9
    return {
        "warp_exact": (lambda s: MF.warp_loss(s, ys, mode="exact"), (s,)),
        "warp_exact_multi_none": (lambda s: MF.warp_loss(s, multi, mode="exact", reduction="none").sum(), (s,)),
        "warp_sampled": (lambda s: MF.warp_loss(s, ys, generator=_gen(9)), (s,)),
        "norm_softmax_streamed": (lambda x, w: MF.norm_softmax_loss(x, y, w, class_chunk=3), (x, w)),
        "norm_softmax_streamed_none": (lambda x, w: MF.norm_softmax_loss(x, y, w, class_chunk=3,
                                                                         reduction="none").sum(), (x, w)),
        "dgcrl_qr": (lambda x, w: MF.centralized_ranking_loss(x, y, w, decorrelation="qr", margin=2.0), (x, w)),
        "dgcrl_penalty_chunked": (lambda x, w: MF.centralized_ranking_loss(x, y_wide, w, margin=2.0,
                                                                            reduction="mean_nonzero",
                                                                            class_chunk=2), (x, wide)),
        "dgcrl_none": (lambda x, w: MF.centralized_ranking_loss(x, y, w, reduction="none", margin=2.0,
                                                                class_chunk=3).sum(), (x, w)),
        "centroid_tensor": (lambda x, c: MF.centroid_triplet_loss(x, y, c), (x, w)),
        "centroid_onehot": (lambda x: MF.centroid_triplet_loss(x, y, "onehot", num_classes=4, reduction="sum"),
                            (x,)),
    }


@pytest.mark.parametrize("case", list(_func_grad_cases()))
def test_func_grad_matches_autograd(case):
    fn, inputs = _func_grad_cases()[case]
    argnums = tuple(range(len(inputs)))
    got = torch.func.grad(fn, argnums=argnums)(*inputs)
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)
    want = torch.autograd.grad(fn(*leaves), leaves)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_func_grad_of_exact_warp_matches_the_reference():
    s = torch.randn(6, 7, generator=_gen(10), dtype=torch.float64)
    y = torch.randint(0, 7, (6,), generator=_gen(11))
    got = torch.func.grad(lambda s: MF.warp_loss(s, y, mode="exact"))(s)
    leaf = s.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.warp_loss(leaf, y), leaf)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# a kept loss holds no buffers after backward (issue 18.11)
# ---------------------------------------------------------------------------------------------------

def _custom_nodes(loss):
    """The custom-Function nodes (their ctx) of a loss's graph."""
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


def _holds_tensor(value):
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return hasattr(value, "__dict__") and any(isinstance(v, torch.Tensor) for v in vars(value).values())


@pytest.mark.parametrize("case", ["warp_exact", "warp_exact_multi_none", "norm_softmax_streamed",
                                  "dgcrl_qr", "dgcrl_penalty_chunked", "dgcrl_none", "centroid_tensor",
                                  "centroid_onehot"])
def test_kept_loss_holds_no_buffers_after_backward(case):
    fn, inputs = _func_grad_cases()[case]
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)
    loss = fn(*leaves)
    nodes = _custom_nodes(loss)
    assert nodes
    loss.backward()
    for node in nodes:
        # what backward needed was saved with save_for_backward, which backward released ...
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            node.saved_tensors
        # ... and nothing tensor-valued (scratch blocks, plans, precomputed gradients) sits on the ctx
        assert not any(_holds_tensor(v) for v in vars(node).values()), vars(node)


@pytest.mark.parametrize("case", ["norm_softmax_streamed", "dgcrl_qr", "centroid_tensor", "centroid_onehot"])
def test_nested_func_grad_raises_clearly(case):
    # grad(grad(f)) used to return zeros (centroid) or a partial second derivative (NormSoftmax) silently
    fn, inputs, name = _refusing_cases()[case]
    first = lambda x: torch.func.grad(lambda x: fn(x, *inputs[1:]))(x).square().sum()  # noqa: E731
    with pytest.raises(RuntimeError, match=f"{name}.* is not twice differentiable"):
        torch.func.grad(first)(inputs[0])


def test_nested_func_grad_of_exact_warp_is_its_zero_hessian():
    s = torch.randn(5, 7, generator=_gen(12), dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=_gen(13))
    inner = lambda s: torch.func.grad(lambda s: MF.warp_loss(s, y, mode="exact"))(s)  # noqa: E731
    outer = torch.func.grad(lambda s: (inner(s) * torch.arange(35.0, dtype=s.dtype).view(5, 7)).sum())(s)
    assert torch.equal(outer, torch.zeros_like(outer))


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_vmap_is_not_supported_as_documented(mining):
    """``BlockTripletLoss`` documents ``torch.func.grad`` as working and ``vmap`` (and what is built on it) as
    raising: both halves hold."""
    x = torch.randn(40, 8, dtype=torch.float64)
    y = torch.arange(10).repeat_interleave(4)

    def f(e):
        return MF.triplet_loss(e, y, mining=mining)

    torch.testing.assert_close(torch.func.grad(f)(x), torch.autograd.grad(f(x.requires_grad_()), x)[0])
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(f)(x.detach().unsqueeze(0).repeat(2, 1, 1))
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.jacfwd(f)(x.detach())
