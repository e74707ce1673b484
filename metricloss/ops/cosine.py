"""Cosine normalize-scale ops: the N-S layer, cosine logits, and NormSoftmax streamed over classes.

Notation: x (B, D) features, W (C, D) class weights (one row per class), y (B,) labels, s > 0 a scale.
Rows are normalised with the eps placement of ``F.normalize``: x̂ = x / max(‖x‖, eps). A row whose norm
is below eps is divided by eps (a zero row stays zero) and the gradient there is s/eps times the
upstream gradient: large but finite (see *Methods › Cosine classifiers* in the docs: "zero feature rows must give a finite gradient").

* :func:`normalize_scale`: the N-S layer of DGCRL, s·x̂ (Zheng et al., AAAI 2019).
* :func:`cosine_logits`: s·x̂·Ŵᵀ, minus s·m on the target column (CosFace) — a dense (B, C) output.
* :class:`StreamedNormSoftmax`: cross-entropy on s·x̂·Ŵᵀ (NormSoftmax, Zhai & Wu 2019) streamed over
  class chunks with an online logsumexp, so no (B, C) tensor exists in forward or backward.

Class weights are normalised chunk by chunk (:func:`unit_rows`) and their gradient is mapped back through
the normalisation by :func:`normalize_backward`, so the streamed ops never hold a normalised (C, D) copy
of W either; the only (C, D) tensor they create is W's gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from .autograd import not_twice_differentiable
from .distance import accumulation_dtype

__all__ = [
    "NORM_EPS",
    "CE_REDUCTIONS",
    "normalize_scale",
    "unit_rows",
    "normalize_backward",
    "block_view",
    "cosine_logits",
    "StreamedNormSoftmax",
    "norm_softmax_op",
]

NORM_EPS = 1e-12  # F.normalize's default: x / max(‖x‖, eps)

CE_REDUCTIONS = ("mean", "sum", "none")  # cross-entropy's (every term is > 0: no "mean_nonzero")

Scale = Union[float, torch.Tensor]


def normalize_scale(x: torch.Tensor, scale: Scale, eps: float = NORM_EPS) -> torch.Tensor:
    """The N-S layer: s · x / max(‖x‖, eps) row-wise, in the accumulation dtype; differentiable.

    Args:
        x: (B, D) features, any float dtype (computed in fp32, fp64 stays fp64).
        scale: s > 0, a float or a 0-dim tensor (a learnable scale: gradients flow to it).
        eps: the norm floor (``F.normalize``'s placement).

    Returns:
        (B, D) rows of norm s (rows with ‖x‖ < eps have norm s·‖x‖/eps). Autograd gives the gradient
        s·(I − x̂x̂ᵀ)/‖x‖ · g, and s/eps · g on rows below eps.
    """
    x = x.to(accumulation_dtype(x.dtype))
    return F.normalize(x, p=2.0, dim=1, eps=eps) * scale


def unit_rows(w: torch.Tensor, dtype: torch.dtype, eps: float = NORM_EPS
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise the rows of a (k, D) block without autograd: ``(v, norm, active)``.

    v = w / max(‖w‖, eps) in ``dtype``; ``norm`` (k,) is the clamped norm; ``active`` (k,) bool is
    ‖w‖ >= eps, where the norm depends on w (below eps the divisor is the constant eps), exactly as
    autograd differentiates ``F.normalize``. Used with :func:`normalize_backward`.
    """
    w = w.to(dtype)
    raw = torch.linalg.vector_norm(w, dim=1)
    norm = raw.clamp_min(eps)
    return w / norm.unsqueeze(1), norm, raw >= eps


def normalize_backward(grad_v: torch.Tensor, v: torch.Tensor, norm: torch.Tensor,
                       active: torch.Tensor) -> torch.Tensor:
    """Map dL/dv back to dL/dw for v = w / max(‖w‖, eps), in place on ``grad_v``.

    dv/dw = (I − v vᵀ)/‖w‖ where ‖w‖ >= eps, and I/eps below it, so
    dL/dw = (g − [‖w‖ >= eps]·v·(v·g)) / max(‖w‖, eps).
    """
    radial = torch.linalg.vecdot(v, grad_v, dim=1) * active.to(v.dtype)
    grad_v.addcmul_(v, radial.unsqueeze(1), value=-1.0)
    return grad_v.div_(norm.unsqueeze(1))


def block_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view at the start of the flat ``buffer``.

    The streamed ops allocate one (B, chunk) buffer per pass and write every chunk's GEMM into it
    (``out=``), so the allocator serves one block instead of a fresh one per chunk (fresh blocks of a few
    MiB fragment the heap and inflate the peak resident memory).
    """
    return buffer[: rows * cols].view(rows, cols)


def cosine_logits(x: torch.Tensor, weight: torch.Tensor, scale: Scale, labels: Optional[torch.Tensor] = None,
                  margin: float = 0.0, eps: float = NORM_EPS) -> torch.Tensor:
    """Dense cosine logits s·x̂·Ŵᵀ (B, C) in the accumulation dtype; the target column is s·(cos − m)
    when ``labels`` are given and ``margin`` > 0 (CosFace). Differentiable in x, W and a tensor scale.
    """
    dtype = accumulation_dtype(torch.promote_types(x.dtype, weight.dtype))
    a = normalize_scale(x.to(dtype), scale, eps)           # s·x̂: the scale costs O(B·D), not O(B·C)
    logits = a @ F.normalize(weight.to(dtype), p=2.0, dim=1, eps=eps).T
    if labels is not None and margin > 0:
        rows = torch.arange(x.shape[0], device=x.device)
        shift = -(margin * torch.as_tensor(scale, dtype=dtype, device=x.device)).expand(x.shape[0])
        logits = logits.index_put((rows, labels), shift, accumulate=True)
    return logits


# ----------------------------------------------------------------------------------------------------
# NormSoftmax streamed over classes
# ----------------------------------------------------------------------------------------------------

def _target_in_chunk(labels: torch.Tensor, s: int, e: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(in_chunk (B,) bool, col (B, 1) int64): whether y_i is in classes [s, e) and its column there
    (clamped into range for rows whose target lies elsewhere, so gathers and scatters stay valid)."""
    in_chunk = (labels >= s) & (labels < e)
    return in_chunk, (labels - s).clamp_(0, e - s - 1).unsqueeze(1)


class StreamedNormSoftmax(torch.autograd.Function):
    """Per-row cross-entropy of the logits a·Ŵᵀ, streamed over class chunks; O(B·chunk) memory.

    Inputs: ``a`` (B, D) the scaled unit features s·x̂ in the accumulation dtype, ``weight`` (C, D) the raw
    class weights (normalised chunk by chunk), ``labels`` (B,) int64 in [0, C), ``class_chunk`` and ``eps``.
    Outputs: (B,) per-row losses ℓ_i = logsumexp_c(z_ic) − z_{i,y_i}, z = a·Ŵᵀ, in ``a``'s dtype, and the
    (B,) logsumexp (non-differentiable, saved for backward). Gradients flow to ``a`` and ``weight``.
    ``setup_context`` form (``torch.func.grad`` works). Not twice differentiable: a second derivative
    raises (:func:`~metricloss.ops.autograd.not_twice_differentiable`); the dense path
    (``class_chunk=None``) is plain autograd and is.

    The forward pass keeps only the running max and sum of the logsumexp (B,) per row; the backward pass
    recomputes each chunk's logits (the softmax needs the final logsumexp, so a second GEMM per chunk is
    the price of never holding (B, C)).
    """

    @staticmethod
    def forward(a, weight, labels, class_chunk, eps):
        b, c = a.shape[0], weight.shape[0]
        run_max = torch.full((b,), float("-inf"), dtype=a.dtype, device=a.device)
        run_sum = torch.zeros(b, dtype=a.dtype, device=a.device)
        target = torch.zeros(b, dtype=a.dtype, device=a.device)
        buffer = torch.empty(b * min(class_chunk, c), dtype=a.dtype, device=a.device)
        for s in range(0, c, class_chunk):
            e = min(s + class_chunk, c)
            # 1. the chunk's logits z = a·v_cᵀ, v_c = w_c / max(‖w_c‖, eps): one GEMM, (B, k)
            v, _, _ = unit_rows(weight[s:e], a.dtype, eps)
            z = torch.mm(a, v.T, out=block_view(buffer, b, e - s))
            # 2. the target logit z_{i,y_i}, for the rows whose class is in this chunk
            in_chunk, col = _target_in_chunk(labels, s, e)
            target = torch.where(in_chunk, z.gather(1, col).squeeze(1), target)
            # 3. online logsumexp: M' = max(M, max_c z), S' = S·e^(M − M') + Σ_c e^(z − M')
            #    (the logits are bounded by s, so M' is finite unless the input holds NaN, which propagates)
            new_max = torch.maximum(run_max, z.amax(1))
            run_sum.mul_(torch.exp(run_max - new_max)).add_(z.sub_(new_max.unsqueeze(1)).exp_().sum(1))
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        return lse - target, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, weight, labels, class_chunk, eps = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(a, weight, labels, lse)
        ctx.class_chunk, ctx.eps = class_chunk, eps

    @staticmethod
    def backward(ctx, grad_rows, _grad_lse):
        a, weight, labels, lse = ctx.saved_tensors
        with torch.no_grad():
            grad_a, grad_w = _norm_softmax_backward(a, weight, labels, lse, grad_rows, ctx.class_chunk, ctx.eps,
                                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_a, grad_w = not_twice_differentiable("norm_softmax_loss (class_chunk streaming)", (grad_a, grad_w),
                                                  (a, weight))
        return grad_a, grad_w, None, None, None


def _norm_softmax_backward(a: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           grad_rows: torch.Tensor, class_chunk: int, eps: float, need_a: bool, need_w: bool
                           ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of Σ_i g_i·ℓ_i with respect to ``a`` and ``weight``, streamed over class chunks."""
    c = weight.shape[0]
    g = grad_rows.to(a.dtype).unsqueeze(1)
    # dℓ_i/dz_ic = p_ic − [c = y_i]; the upstream g_i scales row i, so it is folded into the (B, D)
    # operands (a·g for W's gradient, a final row scaling for a's) instead of the (B, k) blocks
    grad_a = torch.zeros_like(a) if need_a else None
    grad_w = torch.empty_like(weight) if need_w else None
    a_g = a * g if need_w else None
    write_in_place = need_w and grad_w.dtype == a.dtype
    b = a.shape[0]
    buffer = torch.empty(b * min(class_chunk, c), dtype=a.dtype, device=a.device)
    for s in range(0, c, class_chunk):
        e = min(s + class_chunk, c)
        v, norm, active = unit_rows(weight[s:e], a.dtype, eps)
        # 1. recompute the chunk's softmax p = exp(z − lse)
        p = torch.mm(a, v.T, out=block_view(buffer, b, e - s)).sub_(lse.unsqueeze(1)).exp_()
        # 2. minus the one-hot of the target, on the rows whose target is in this chunk
        in_chunk, col = _target_in_chunk(labels, s, e)
        p.scatter_add_(1, col, -in_chunk.to(p.dtype).unsqueeze(1))
        # 3. dL/da += (P − Y)·v_c ; dL/dv_c = (P − Y)ᵀ·(g⊙a), then back through W's row normalisation
        if need_a:
            grad_a.addmm_(p, v)
        if need_w:
            if write_in_place:
                normalize_backward(torch.mm(p.T, a_g, out=grad_w[s:e]), v, norm, active)
            else:
                grad_w[s:e] = normalize_backward(torch.mm(p.T, a_g), v, norm, active)
    if need_a:
        grad_a.mul_(g)
    return grad_a, grad_w


def norm_softmax_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, scale: float,
                    class_chunk: Optional[int], reduction: str, eps: float = NORM_EPS) -> torch.Tensor:
    """NormSoftmax on validated inputs: cross-entropy on s·x̂·Ŵᵀ.

    ``class_chunk=None`` builds the dense (B, C) logits (:func:`cosine_logits`) and calls
    ``F.cross_entropy``; an int streams classes in chunks of that size (:class:`StreamedNormSoftmax`).

    Returns:
        () for ``"mean"``/``"sum"``, (B,) for ``"none"``; fp32 at least.
    """
    if class_chunk is None:
        return F.cross_entropy(cosine_logits(x, weight, scale, eps=eps), labels, reduction=reduction)
    dtype = accumulation_dtype(torch.promote_types(x.dtype, weight.dtype))
    a = normalize_scale(x.to(dtype), scale, eps)
    rows, _ = StreamedNormSoftmax.apply(a, weight, labels, class_chunk, eps)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()
