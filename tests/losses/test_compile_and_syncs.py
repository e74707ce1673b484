"""torch.compile, host syncs and chunk-size invariance of WARP, the cosine losses, DGCRL and the centroid bound.

* ``torch.compile(fullgraph=True)`` captures every loss whose control flow does not depend on tensor
  values (issue 12.9); the compiled loss and gradients equal the eager ones. WARP's sampled mode and
  multi-hot labels are data-dependent by nature (the number of trials, the number of examples): their
  graph breaks are counted and pinned.
* The number of synchronising calls of one loss call (forward and backward) does not depend on the number
  of chunks (``class_chunk``, ``chunk_bytes``).
* What the chunking changes: the losses and gradients agree across chunk sizes within rounding (the
  tolerances below), and some are bitwise invariant (see :func:`test_invariance_across_chunks`).
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import metricloss as ml
import metricloss.functional as MF

# aot_eager exercises Dynamo capture and AOTAutograd (forward and backward graphs) without a C++ compiler
BACKEND = "aot_eager"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _data(b=12, d=16, c=10, seed=0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    return x, y, w


def _fullgraph_cases():
    x, y, w = _data()
    wide_x, wide_y, wide_w = _data(d=6, c=10, seed=1)       # C > D: DGCRL's penalty, streamed
    s = torch.randn(12, 10, generator=_gen(2))
    c = torch.randn(10, 16, generator=_gen(3))
    return {
        "norm_softmax_dense": (lambda x, w: MF.norm_softmax_loss(x, y, w), (x, w)),
        "norm_softmax_streamed": (lambda x, w: MF.norm_softmax_loss(x, y, w, class_chunk=3), (x, w)),
        "cosine_logits_ce": (lambda x, w: torch.nn.functional.cross_entropy(
            MF.cosine_logits(x, w, y, scale=10.0, margin=0.2), y), (x, w)),
        "normalize_scale": (lambda x: MF.normalize_scale(x, 4.0).square().sum(), (x,)),
        "dgcrl_qr": (lambda x, w: MF.centralized_ranking_loss(x, y, w, decorrelation="qr", class_chunk=4), (x, w)),
        "dgcrl_penalty_streamed": (lambda x, w: MF.centralized_ranking_loss(wide_x, wide_y, w, class_chunk=3,
                                                                             reduction="mean_nonzero") + 0 * x.sum(),
                                   (wide_x, wide_w)),
        "dgcrl_none": (lambda x, w: MF.centralized_ranking_loss(x, y, w, decorrelation="none",
                                                                reduction="none").sum(), (x, w)),
        "warp_exact": (lambda s: MF.warp_loss(s, y, mode="exact"), (s,)),
        "warp_exact_none": (lambda s: MF.warp_loss(s, y, mode="exact", reduction="none").sum(), (s,)),
        "centroid_tensor": (lambda x, c: MF.centroid_triplet_loss(x, y, c, chunk_bytes=400), (x, c)),
        "centroid_onehot": (lambda x: MF.centroid_triplet_loss(x, y, "onehot", num_classes=10), (x,)),
    }


@pytest.mark.parametrize("case", list(_fullgraph_cases()))
def test_fullgraph_compile_equals_eager(case):
    fn, inputs = _fullgraph_cases()[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)
    eager_in = tuple(t.clone().requires_grad_() for t in inputs)
    comp_in = tuple(t.clone().requires_grad_() for t in inputs)
    want = fn(*eager_in)
    got = compiled(*comp_in)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for p, q in zip(torch.autograd.grad(got, comp_in), torch.autograd.grad(want, eager_in)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0


def test_compiled_modules_in_a_training_step():
    # The modules (parameters, buffers, learnable scale) compile with fullgraph=True as well.
    x, y, _ = _data()
    modules = [ml.NormSoftmaxLoss(16, 10, class_chunk=4), ml.CentralizedRankingLoss(16, 10, class_chunk=4),
               ml.CentroidTripletLoss(10, 16), ml.CentroidTripletLoss(10, 16, centroids="kmeans")]
    for module in modules:
        torch._dynamo.reset()
        eager_x, comp_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = module(eager_x, y)
        want.backward()
        eager_grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        got = torch.compile(module, fullgraph=True, backend=BACKEND)(comp_x, y)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(comp_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
        for p, q in zip(module.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, q, rtol=1e-5, atol=1e-6)
    classifier = ml.CosineClassifier(16, 10, learnable_scale=True, margin=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.nn.functional.cross_entropy(classifier(x, y), y), fullgraph=True,
                             backend=BACKEND)
    torch.testing.assert_close(compiled(x), torch.nn.functional.cross_entropy(classifier(x, y), y))


def test_compiled_label_range_check_still_fires():
    x, y, w = _data()
    compiled = torch.compile(lambda x, y: MF.norm_softmax_loss(x, y, w), fullgraph=True, backend=BACKEND)
    compiled(x, y)
    with pytest.raises(RuntimeError, match=r"`labels` must lie in \[0, 10\)"):
        compiled(x, torch.full_like(y, 10))


def test_data_dependent_warp_modes_have_pinned_graph_breaks():
    # The torch sampler draws until each example finds a violator (a data-dependent number of blocks), an
    # explicit torch.Generator is an argument Dynamo cannot take, and multi-hot labels have a data-dependent
    # number of examples: these cannot be one graph. They still compile (with breaks) and give the eager
    # loss. (One label per row on CPU with the global generator is one graph: test_warp.py.)
    s = torch.randn(12, 10, generator=_gen(2))
    y = torch.randint(0, 10, (12,), generator=_gen(4))
    multi = torch.rand(12, 10, generator=_gen(5)) < 0.3
    MF.warp_loss(s, y)  # loads the native sampler eagerly (a traced call uses what is loaded, builds nothing)
    for make in (lambda: (lambda s, _g=_gen(6): MF.warp_loss(s, y, generator=_g)),
                 lambda: (lambda s: MF.warp_loss(s, multi)),
                 lambda: (lambda s: MF.warp_loss(s, multi, mode="exact"))):
        torch._dynamo.reset()
        assert torch._dynamo.explain(make())(s).graph_break_count > 0
        torch._dynamo.reset()
        torch.manual_seed(0)
        got = torch.compile(make(), backend=BACKEND)(s)
        torch.manual_seed(0)
        torch.testing.assert_close(got, make()(s))


# ---------------------------------------------------------------------------------------------------
# host syncs
# ---------------------------------------------------------------------------------------------------

class _SyncCounter(TorchDispatchMode):
    """Counts the ops that read device values on the host: scalar reads (``item``, ``bool``, ``int``,
    ``float``), ``nonzero`` and boolean-mask indexing, ``masked_select``; ``tolist`` is patched (it does
    not dispatch)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            self.count += 1
        elif func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.count += 1
        elif func is torch.ops.aten.index_put_.default and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.count += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs():
    counter = _SyncCounter()
    original = torch.Tensor.tolist

    def tolist(self):
        counter.count += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = original


def _syncs(call):
    with count_syncs() as counter:
        call().backward()
    return counter.count


def _chunked_calls():
    g = _gen(7)
    x = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (40,), generator=g)
    w = torch.randn(30, 16, generator=g, requires_grad=True)
    wide_w = torch.randn(30, 8, generator=g, requires_grad=True)
    x8 = torch.randn(40, 8, generator=g, requires_grad=True)
    s = torch.randn(40, 30, generator=g, requires_grad=True)
    multi = torch.rand(40, 30, generator=g) < 0.2
    c = torch.randn(30, 16, generator=g, requires_grad=True)
    near = c.detach()[y] + 1e-4 * torch.randn(40, 16, generator=g)   # rows near their own centroid
    x_near = near.clone().requires_grad_()
    return {
        "norm_softmax": lambda k: MF.norm_softmax_loss(x, y, w, class_chunk=k),
        "dgcrl_qr": lambda k: MF.centralized_ranking_loss(x, y % 12, w[:12], decorrelation="qr", class_chunk=k),
        "dgcrl_penalty": lambda k: MF.centralized_ranking_loss(x8, y, wide_w, class_chunk=k),
        "warp_sampled": lambda k: _warp(s, y, "sampled", k),
        "warp_sampled_multi": lambda k: _warp(s, multi, "sampled", k),
        "warp_sampled_capped": lambda k: _warp(s, multi, "sampled", k, max_trials=3000),
        "warp_exact": lambda k: _warp(s, y, "exact", k),
        "warp_exact_multi": lambda k: _warp(s, multi, "exact", k),
        "warp_exact_multi_none": lambda k: _warp(s, multi, "exact", k, reduction="none").sum(),
        "centroid_tensor": lambda k: MF.centroid_triplet_loss(x, y, c, chunk_bytes=k * 64),
        "centroid_near_own": lambda k: MF.centroid_triplet_loss(x_near, y, c, chunk_bytes=k * 64),
        "centroid_onehot": lambda k: MF.centroid_triplet_loss(x, y % 16, "onehot", num_classes=16,
                                                              chunk_bytes=k * 64),
    }


def _warp(s, labels, mode, k, reduction="mean", max_trials=None):
    from metricloss.ops import warp as warp_ops

    return warp_ops.warp_loss_op(s, labels, 1.0, max_trials, mode, "harmonic", reduction, _gen(8),
                                 chunk_bytes=k * 200)


@pytest.mark.parametrize("case", list(_chunked_calls()))
def test_host_syncs_do_not_grow_with_the_number_of_chunks(case):
    call = _chunked_calls()[case]
    few, many = _syncs(lambda: call(1000)), _syncs(lambda: call(1))
    assert few == many, (few, many)
    # sampled WARP reads one flag per block of trials (O(log trials) blocks, by the schedule); the rest
    # read at most a few values per call
    assert many <= (16 if "sampled" in case else 4)


# ---------------------------------------------------------------------------------------------------
# what the chunking changes (issue 12.10)
# ---------------------------------------------------------------------------------------------------

def _value_and_grads(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out.detach(),) + torch.autograd.grad(out.sum(), leaves)


def _chunk_families(dtype):
    g = _gen(11)
    b, d, c = 48, 24, 150
    x = torch.randn(b, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    w_qr = torch.randn(20, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    s = torch.randn(b, c, generator=g, dtype=dtype)
    multi = torch.rand(b, c, generator=g) < 0.05
    cen = torch.randn(c, d, generator=g, dtype=dtype)
    warp = lambda labels, mode, red: (  # noqa: E731
        lambda s, k: _warp_op(s, labels, mode, red, k))
    return {
        # bitwise: every row is computed alone (exact WARP) / the same draws in the same order (sampled, CPU)
        "warp_exact": (warp(y, "exact", "mean"), (s,), [None, 4000, 300, 1], True),
        "warp_exact_multi": (warp(multi, "exact", "none"), (s,), [None, 4000, 300, 1], True),
        "warp_sampled": (warp(y, "sampled", "mean"), (s,), [None, 4000, 300, 1], True),
        "warp_sampled_multi": (warp(multi, "sampled", "sum"), (s,), [None, 4000, 300, 1], True),
        # within rounding: sums over class chunks change their order
        "norm_softmax": (lambda x, w, k: MF.norm_softmax_loss(x, y, w, class_chunk=k), (x, w),
                         [None, 150, 64, 7], False),
        "dgcrl_penalty": (lambda x, w, k: MF.centralized_ranking_loss(x, y, w, class_chunk=k), (x, w),
                          [None, 150, 64, 7], False),
        "dgcrl_qr": (lambda x, w, k: MF.centralized_ranking_loss(x, y % 20, w, decorrelation="qr",
                                                                 class_chunk=k), (x, w_qr), [None, 20, 3], False),
        "centroid": (lambda x, c, k: MF.centroid_triplet_loss(x, y, c, chunk_bytes=k), (x, cen),
                     [None, 100_000, 3000, 64], False),
        "centroid_onehot": (lambda x, k: MF.centroid_triplet_loss(x, y % d, "onehot", num_classes=d,
                                                                  chunk_bytes=k), (x,), [None, 3000, 64], False),
    }


def _warp_op(s, labels, mode, reduction, chunk_bytes):
    from metricloss.ops import warp as warp_ops

    return warp_ops.warp_loss_op(s, labels, 1.0, None, mode, "harmonic", reduction, _gen(12), chunk_bytes)


CHUNK_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", list(_chunk_families(torch.float64)))
def test_invariance_across_chunks(family, dtype):
    fn, inputs, chunks, bitwise = _chunk_families(dtype)[family]
    first = _value_and_grads(lambda *a: fn(*a, chunks[0]), inputs)
    # run to run: bitwise, whatever the loss
    again = _value_and_grads(lambda *a: fn(*a, chunks[0]), inputs)
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    for k in chunks[1:]:
        other = _value_and_grads(lambda *a: fn(*a, k), inputs)
        for p, q in zip(other, first):
            if bitwise:
                assert torch.equal(p, q), (family, k)
            else:
                torch.testing.assert_close(p, q, **CHUNK_TOLERANCE[dtype])
