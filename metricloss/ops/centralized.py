"""Decorrelated global centralized ranking loss (DGCRL; Zheng et al., AAAI 2019) — a reconstruction.

The paper's text was not available (see *Methods › DGCRL and the N-S layer* and *Methods › Provenance* in the docs): the abstract confirms an N-S layer on the
features and the class centres, a *global* ranking loss against the centres of all classes, and a
Gram-Schmidt decorrelation of the centres. The formulas below are our documented reconstruction [U]:

* N-S features and centres: x̂_i = s·x_i/max(‖x_i‖, eps), ĉ_k = s·w_k/max(‖w_k‖, eps)
  (or, with ``decorrelation="qr"``, ĉ_k = s·q_k with q_k the Gram-Schmidt orthonormalisation of the rows
  of W in class order, so that the centres are exactly orthogonal).
* Per-sample loss over all C centres: ℓ_i = Σ_{k≠y_i} [m + ‖x̂_i − ĉ_{y_i}‖² − ‖x̂_i − ĉ_k‖²]_+ .
* Decorrelation: the QR re-parametrisation above (needs D >= C), or the orthogonality penalty
  P = mean((ŴŴᵀ − I)²) over the C² entries (any D), or none.

Streaming: classes are processed in chunks of ``class_chunk`` centres; per chunk one GEMM gives the
hinge arguments m + d_iy − d_ik of all rows against the chunk's centres, and the gradient of the hinge
block is applied by two GEMMs (:func:`~metricloss.ops.distance.gram_backward`), so no (B, C) tensor is
needed. The target distance d_iy is computed exactly from the difference x̂_i − ĉ_{y_i}; the own centre
is excluded from the rivals by index, never by value.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from .._checks import device_assert, host_reads_are_free
from .autograd import not_twice_differentiable, scaled_saved_gradients
from .cosine import NORM_EPS, block_view, normalize_backward, normalize_scale, unit_rows
from .distance import (accumulation_dtype, gram_backward, paired_distance, scale_distance_weights_,
                       squared_norms)
from .mining import rows_per_chunk
from .reduction import reduce_loss

__all__ = [
    "DECORRELATIONS",
    "resolve_decorrelation",
    "gram_schmidt_rows",
    "orthogonality_penalty",
    "StreamedOrthogonalityPenalty",
    "class_centres",
    "StreamedCentralizedRanking",
    "centralized_ranking_op",
]

DECORRELATIONS = ("auto", "qr", "penalty", "none")


def resolve_decorrelation(decorrelation: str, in_features: int, num_classes: int) -> str:
    """``"auto"`` is ``"qr"`` when D >= C (orthonormal centres exist) and ``"penalty"`` otherwise."""
    if decorrelation == "auto":
        return "qr" if in_features >= num_classes else "penalty"
    return decorrelation


def gram_schmidt_rows(weight: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt orthonormalisation of the rows of ``weight`` (C, D), C <= D, in class order; (C, D).

    Computed as the reduced QR decomposition Wᵀ = QR (Householder, differentiable), with the columns of Q
    flipped where diag(R) < 0 so that R has a positive diagonal: that is exactly classical Gram-Schmidt
    (q_1 ∥ w_1, q_2 ∥ the part of w_2 orthogonal to q_1, …). Needs linearly independent rows.
    """
    return _gram_schmidt(weight)[0]


def _gram_schmidt(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`gram_schmidt_rows` and a () bool tensor: whether the rows are (numerically) linearly dependent.

    Dependent rows (an all-zero row, a repeated row) leave Gram-Schmidt undefined: the forward picks some
    orthonormal direction, but the QR backward divides by diag(R) and gives NaN gradients. A row counts as
    dependent when |r_kk| <= C · eps · max_j ‖w_j‖ (the rounding level of the decomposition).
    """
    q, r = torch.linalg.qr(weight.to(accumulation_dtype(weight.dtype)).T, mode="reduced")
    diag = r.diagonal()
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype).detach()
    with torch.no_grad():
        tol = weight.shape[0] * torch.finfo(r.dtype).eps * torch.linalg.vector_norm(r, dim=0).amax()
        dependent = (diag.abs() <= tol).any()
    return (q * sign).T, dependent


def orthogonality_penalty(weight: torch.Tensor, eps: float = NORM_EPS, chunk_bytes: Optional[int] = None
                          ) -> torch.Tensor:
    """P = mean((ŴŴᵀ − I)²) over the C² entries, Ŵ = row-normalised W; () in the accumulation dtype.

    Uses the smaller Gram matrix: (C, C) by plain autograd when C <= D; otherwise the identity
    ‖ŴŴᵀ − I‖_F² = ‖ŴᵀŴ‖_F² − 2‖Ŵ‖_F² + C with the (D, D) matrix M = ŴᵀŴ, streamed over row chunks
    (:class:`StreamedOrthogonalityPenalty`), so a large C needs neither C×C nor copies of W.
    """
    c, d = weight.shape
    if c > d:
        rows = rows_per_chunk(d, 4 * weight.element_size(), chunk_bytes)
        return StreamedOrthogonalityPenalty.apply(weight, eps, rows)[0]
    v = F.normalize(weight.to(accumulation_dtype(weight.dtype)), p=2.0, dim=1, eps=eps)
    gram = v @ v.T
    return (gram - torch.eye(c, dtype=v.dtype, device=v.device)).pow(2).sum() / (c * c)


class StreamedOrthogonalityPenalty(torch.autograd.Function):
    """P = (‖M‖_F² − 2‖Ŵ‖_F² + C) / C² with M = ŴᵀŴ (D, D), over row chunks of W (C, D).

    Forward accumulates M and ‖Ŵ‖_F² chunk by chunk and returns (P, M), M non-differentiable and saved;
    backward maps dP/dŴ = (4/C²)·Ŵ(M − I) back through each chunk's row normalisation. Memory: M, W's
    gradient and one chunk's temporaries. ``setup_context`` form. Not twice differentiable (a second
    derivative raises).
    """

    @staticmethod
    def forward(weight, eps, rows):
        c, d = weight.shape
        dtype = accumulation_dtype(weight.dtype)
        gram = torch.zeros(d, d, dtype=dtype, device=weight.device)
        total_sq = torch.zeros((), dtype=dtype, device=weight.device)
        for s in range(0, c, rows):
            v, _, _ = unit_rows(weight[s:s + rows], dtype, eps)
            gram.addmm_(v.T, v)
            total_sq += v.pow(2).sum()
        return (gram.pow(2).sum() - 2.0 * total_sq + c) / (c * c), gram

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, eps, rows = inputs
        _, gram = output
        ctx.mark_non_differentiable(gram)
        ctx.save_for_backward(weight, gram)
        ctx.eps, ctx.rows = eps, rows

    @staticmethod
    def backward(ctx, grad_out, _grad_gram):
        weight, gram = ctx.saved_tensors
        with torch.no_grad():
            c = weight.shape[0]
            # dP/dŴ = (4/C²)·Ŵ·(M − I), scaled by the upstream gradient
            m_minus_i = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            m_minus_i.mul_(grad_out.to(gram.dtype) * (4.0 / (c * c)))
            grad_w = torch.empty_like(weight)
            for s in range(0, c, ctx.rows):
                v, norm, active = unit_rows(weight[s:s + ctx.rows], gram.dtype, ctx.eps)
                grad_w[s:s + ctx.rows] = normalize_backward(v @ m_minus_i, v, norm, active)
        (grad_w,) = not_twice_differentiable("centralized_ranking_loss (decorrelation penalty, C > D)",
                                             (grad_w,), (weight,))
        return grad_w, None, None


def class_centres(weight: torch.Tensor, scale: float, decorrelation: str,
                  eps: float = NORM_EPS) -> torch.Tensor:
    """The N-S class centres ĉ (C, D) the loss ranks against (dense; for inspection and retrieval).

    ``decorrelation`` must be resolved (``"qr"``, ``"penalty"`` or ``"none"``).
    """
    if decorrelation == "qr":
        return scale * gram_schmidt_rows(weight)
    return normalize_scale(weight, scale, eps)


class _RankingPlan:
    """What every class chunk of one call shares: the rows' N-S features and exact target distances.

    Args:
        a: (B, D) N-S features s·x̂ in the accumulation dtype.
        centres: (C, D) raw class weights (``normalize=True``) or unit centre directions (``False``).
    """

    def __init__(self, a: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, scale: float,
                 margin: float, normalize: bool, eps: float, class_chunk: int):
        self.a, self.centres, self.labels = a, centres, labels
        self.scale, self.normalize, self.eps, self.class_chunk = scale, normalize, eps, class_chunk
        # 1. target centres ĉ_{y_i} (B, D) and the exact d_iy = ‖x̂_i − ĉ_{y_i}‖² from the difference
        self.v_y, self.norm_y, self.active_y = self.directions(centres[labels])
        self.c_y = self.v_y * scale
        self.d_y = paired_distance(a, self.c_y, "squared_euclidean")
        # 2. GEMM operands: [a, b, 1]·[2ĉ_k, 1, −‖ĉ_k‖²]ᵀ = m + d_iy − d_ik with b_i = m + d_iy − ‖a_i‖²
        #    (‖a_i‖² cancels in the difference, so it is folded into the per-row constant)
        base = margin + self.d_y - squared_norms(a)
        self.lhs = torch.cat([a, base.unsqueeze(1), torch.ones_like(base).unsqueeze(1)], dim=1)

    def directions(self, w: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                   Optional[torch.Tensor]]:
        """Unit rows v (and norm, active for the backward) of a block of centre weights."""
        if self.normalize:
            return unit_rows(w, self.a.dtype, self.eps)
        return w.to(self.a.dtype), None, None

    def to_weight_grad(self, grad_c: torch.Tensor, v: torch.Tensor, norm: Optional[torch.Tensor],
                       active: Optional[torch.Tensor]) -> torch.Tensor:
        """dL/dĉ → dL/dw through ĉ = s·v (and v = w/max(‖w‖, eps) when normalising), in place."""
        grad_v = grad_c.mul_(self.scale)
        return normalize_backward(grad_v, v, norm, active) if self.normalize else grad_v

    def hinge_block(self, s: int, e: int, buffer: torch.Tensor):
        """The chunk's hinges H_ik = [m + d_iy − d_ik]_+ (B, k), 0 at the own class, written into
        ``buffer``; and the chunk's centres."""
        v, norm, active = self.directions(self.centres[s:e])
        c = v * self.scale
        rhs = torch.cat([2.0 * c, torch.ones_like(c[:, :1]), -squared_norms(c).unsqueeze(1)], dim=1)
        arg = torch.mm(self.lhs, rhs.T, out=block_view(buffer, self.a.shape[0], e - s))
        # the own centre is not a rival: its cell becomes −inf (hinge 0), set by index
        in_chunk = (self.labels >= s) & (self.labels < e)
        col = (self.labels - s).clamp_(0, e - s - 1).unsqueeze(1)
        hide = torch.where(in_chunk, float("-inf"), float("inf")).to(arg.dtype).unsqueeze(1)
        arg.scatter_reduce_(1, col, hide, reduce="amin")
        return arg.clamp_min_(0), c, v, norm, active

    def run(self, row_weight: Optional[torch.Tensor]):
        """One pass over the class chunks.

        Returns per-row hinge sums (B,), the number of active hinges (), and — when ``row_weight`` (B,)
        is given — the gradients of Σ_i row_weight_i·ℓ_i with respect to ``a`` and ``centres``.
        """
        a, labels = self.a, self.labels
        b, num_classes = a.shape[0], self.centres.shape[0]
        sums = torch.zeros(b, dtype=a.dtype, device=a.device)
        active_count = torch.zeros(b, dtype=a.dtype, device=a.device)
        want = row_weight is not None
        if want:
            grad_a = torch.zeros_like(a)
            grad_w = torch.empty(self.centres.shape, dtype=self.centres.dtype, device=a.device)
            target_weight = torch.zeros(b, dtype=a.dtype, device=a.device)
            g = row_weight.to(a.dtype).unsqueeze(1)
        buffer = torch.empty(b * min(self.class_chunk, num_classes), dtype=a.dtype, device=a.device)
        for s in range(0, num_classes, self.class_chunk):
            e = min(s + self.class_chunk, num_classes)
            hinge, c, v, norm, active = self.hinge_block(s, e, buffer)
            sums += hinge.sum(1)
            # slope of each hinge, in place: 1 where active, 0 where not (and 0 for NaN, whose loss is NaN)
            slope = hinge.sign_()
            active_count += slope.sum(1)
            if not want:
                continue
            # dL/dd_ik = −g_i·[H_ik > 0] for the rivals; the target d_iy gets +g_i per active rival
            w = slope.mul_(g).neg_()
            target_weight -= w.sum(1)
            w = scale_distance_weights_(w, w, "squared_euclidean")  # ×2; the distance is not needed
            grad_c = torch.zeros_like(c)
            colsum = torch.zeros(e - s, dtype=a.dtype, device=a.device)
            grad_a += gram_backward(w, a, c, "squared_euclidean", grad_c, colsum)
            grad_c.addcmul_(colsum.unsqueeze(1), c)
            grad_w[s:e] = self.to_weight_grad(grad_c, v, norm, active)
        nonzero = active_count.sum().to(torch.int64)
        if not want:
            return sums, nonzero, None, None
        # the target term Σ_i t_i·‖a_i − ĉ_{y_i}‖²: ∂/∂a_i = 2t_i(a_i − ĉ_y), ∂/∂ĉ_y = −2t_i(a_i − ĉ_y)
        pull = (a - self.c_y).mul_(2.0 * target_weight.unsqueeze(1))
        grad_a += pull
        grad_w.index_add_(0, labels, self.to_weight_grad(pull.neg(), self.v_y, self.norm_y,
                                                         self.active_y).to(grad_w.dtype))
        return sums, nonzero, grad_a, grad_w


def _scalar_factor(reduction: str, num_terms: int, nonzero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The factor between the summed hinges and a scalar reduction: 1, 1/#terms or 1/#active (device)."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=nonzero.device)
    denom = torch.tensor(num_terms, device=nonzero.device) if reduction == "mean" else nonzero
    return 1.0 / denom.clamp_min(1).to(dtype)


class StreamedCentralizedRanking(torch.autograd.Function):
    """The global centralized ranking loss over class chunks, O(B·chunk) memory, GEMM gradients.

    Inputs: ``a`` (B, D) N-S features s·x̂ (accumulation dtype), ``centres`` (C, D) raw class weights
    (normalised and scaled by s chunk by chunk when ``normalize``) or unit centre directions (scaled by s
    only), ``labels`` (B,) int64, and the static options. Outputs: the reduced loss (), or per-row sums
    ℓ_i (B,) for ``reduction="none"``; and, for a scalar reduction with ``want_grad``, the loss's
    gradients with respect to ``a`` and ``centres``, computed in the same pass over the classes (one pass
    instead of two), non-differentiable and saved (empty tensors otherwise). The first backward scales
    them in place; ``"none"``, or a second backward through a retained graph, recomputes the chunks with
    each row weighted by its upstream gradient. ``setup_context`` form; nothing but the saved tensors is
    kept, so backward releases every buffer. Not twice differentiable (a second derivative raises,
    including through the QR of ``decorrelation="qr"``).
    """

    @staticmethod
    def forward(a, centres, labels, scale, margin, normalize, eps, class_chunk, reduction, want_grad):
        plan = _RankingPlan(a, centres, labels, scale, margin, normalize, eps, class_chunk)
        grad_now = want_grad and reduction != "none"
        ones = torch.ones(a.shape[0], dtype=a.dtype, device=a.device) if grad_now else None
        sums, nonzero, grad_a, grad_w = plan.run(ones)
        # every (row, rival class) pair is a term: B·(C − 1) of them
        num_terms = a.shape[0] * (centres.shape[0] - 1)
        loss = reduce_loss(sums, torch.tensor(num_terms, device=a.device), nonzero, reduction)
        if not grad_now:
            return loss, a.new_empty(0), centres.new_empty(0)
        factor = _scalar_factor(reduction, num_terms, nonzero, a.dtype)
        return loss, grad_a.mul_(factor), grad_w.mul_(factor.to(grad_w.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, centres, labels, scale, margin, normalize, eps, class_chunk, reduction, want_grad = inputs
        _, grad_a, grad_w = output
        ctx.mark_non_differentiable(grad_a, grad_w)
        ctx.save_for_backward(a, centres, labels, grad_a, grad_w)
        ctx.options = (scale, margin, normalize, eps, class_chunk)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_out, _grad_a, _grad_w):
        a, centres, labels, saved_a, saved_w = ctx.saved_tensors
        grads = None
        if ctx.reduction != "none" and saved_a.numel() > 0:
            grads = scaled_saved_gradients(ctx, (saved_a, saved_w), grad_out)
        if grads is None:
            with torch.no_grad():
                plan = _RankingPlan(a, centres, labels, *ctx.options)
                if ctx.reduction == "none":
                    # each row weighted by its own upstream gradient
                    _, _, grad_a, grad_w = plan.run(grad_out)
                else:
                    # the same unit-weight pass as the forward's, so every backward gives the same gradients
                    _, nonzero, grad_a, grad_w = plan.run(torch.ones_like(plan.d_y))
                    num_terms = a.shape[0] * (centres.shape[0] - 1)
                    factor = _scalar_factor(ctx.reduction, num_terms, nonzero, a.dtype) * grad_out.to(a.dtype)
                    grad_a.mul_(factor)
                    grad_w.mul_(factor.to(grad_w.dtype))
            grads = (grad_a, grad_w)
        grads = not_twice_differentiable("centralized_ranking_loss", grads, (a, centres))
        return grads + (None,) * 8


def centralized_ranking_op(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: float,
                           scale: float, decorrelation: str, decorrelation_weight: float, reduction: str,
                           class_chunk: Optional[int], eps: float = NORM_EPS) -> torch.Tensor:
    """DGCRL (reconstruction) on validated inputs; ``decorrelation`` already resolved.

    Returns:
        ranking loss (reduced) + ``decorrelation_weight``·P for ``"penalty"``; for ``"none"`` the (B,)
        per-row sums ℓ_i, each plus decorrelation_weight·P/B (so they add up to the ``"sum"`` loss).
    """
    dtype = accumulation_dtype(torch.promote_types(x.dtype, weight.dtype))
    a = normalize_scale(x.to(dtype), scale, eps)
    dependent = None
    if decorrelation == "qr":
        (centres, dependent), normalize = _gram_schmidt(weight.to(dtype)), False
        message = ("centralized_ranking_loss: `weight` has linearly dependent rows (e.g. an all-zero or a "
                   "repeated class row), so decorrelation='qr' (Gram-Schmidt) is undefined and its gradient would "
                   "be NaN; re-initialise those rows or use decorrelation='penalty'")
        if not host_reads_are_free(dependent):
            device_assert(~dependent, message)  # no host read on an accelerator or under torch.compile
        elif bool(dependent):  # CPU: one host read per call, outside any loop
            raise ValueError(message)
    else:
        centres, normalize = weight, True
    chunk = centres.shape[0] if class_chunk is None else class_chunk
    want_grad = torch.is_grad_enabled() and (a.requires_grad or centres.requires_grad)
    loss, _, _ = StreamedCentralizedRanking.apply(a, centres, labels, scale, margin, normalize, eps, chunk,
                                                  reduction, want_grad)
    if decorrelation == "penalty" and decorrelation_weight > 0:
        penalty = decorrelation_weight * orthogonality_penalty(weight, eps)
        loss = loss + (penalty / x.shape[0] if reduction == "none" else penalty)
    if dependent is not None:
        # compiled code cannot raise on a device value: a NaN loss flags the dependent rows there instead
        loss = torch.where(dependent, torch.full_like(loss, float("nan")), loss)
    return loss
