"""Distances, written once and shared by every loss, miner and kernel driver.

Three distances (docs/design.md §2), all computed in the accumulation dtype (fp32, or fp64 for fp64 input):

================== ====================== =========================================================
name               value                  notes
================== ====================== =========================================================
``euclidean``      ‖a − b‖                √ with value and gradient 0 at 0 (never NaN)
``squared_euclidean`` ‖a − b‖²
``cosine``         1 − â·b̂                inputs are L2-normalised first (:func:`prepare_embeddings`)
================== ====================== =========================================================

Two ways to compute them, used for different jobs:

* **Gram blocks** (:class:`GramFactors`): a row chunk of anchors against all references with one GEMM,
  ``‖a‖² + ‖r‖² − 2·a·rᵀ`` clamped at 0. This is what mining orders by. Its cancellation error grows as
  the distance shrinks relative to the norms, so :meth:`GramFactors.distance_block` can *refine*:
  entries below ``REFINE_RATIO`` of the squared norms are recomputed exactly from ``a − r``.
* **Paired distances** (:func:`paired_distance`): rows ``a[i]`` vs ``b[i]`` from the difference, exact,
  differentiable, O(n·D). Every selected pair whose distance enters a loss goes through here.

The gradient of a weighted sum of a block, Σ_ij W_ij·d(a_i, r_j), is :func:`gram_backward` (after
:func:`scale_distance_weights_`): two GEMMs, so losses over all pairs (batch-all) never build an
autograd graph of size N×M.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "DISTANCES",
    "REFINE_RATIO",
    "accumulation_dtype",
    "prepare_embeddings",
    "promote_pair",
    "squared_norms",
    "safe_sqrt",
    "paired_distance",
    "paired_distance_grad",
    "GramFactors",
    "refine_small_entries",
    "scale_distance_weights_",
    "gram_backward",
    "pairwise_distance",
]

DISTANCES = ("euclidean", "squared_euclidean", "cosine")

# Gram entries with d² < REFINE_RATIO·(‖a‖² + max‖r‖²) are recomputed from the difference. The Gram
# expansion's absolute error is about eps·√D·(‖a‖² + ‖r‖²), so above this ratio its relative error stays
# below ~1e-4 in fp32 and ~1e-13 in fp64; below it, cancellation would make small distances (tight
# clusters, duplicated rows) meaningless.
REFINE_RATIO = 2.0 ** -6

# Rows of a refinement gathered at once: bounds the (k, D) temporaries of the exact recompute.
_REFINE_PAIRS_PER_STEP = 1 << 16


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses accumulate in: fp32 for half/bfloat16/fp32 input, fp64 for fp64 input."""
    return torch.promote_types(dtype, torch.float32)


def prepare_embeddings(x: torch.Tensor, distance: str, normalize: bool) -> torch.Tensor:
    """Upcast ``x`` (B, D) to the accumulation dtype and L2-normalise rows when asked.

    Rows are normalised when ``normalize`` is true or the distance is ``"cosine"`` (cosine distance is
    1 − â·b̂ on unit vectors). Normalisation uses ``F.normalize`` (divides by max(‖x‖, 1e-12)), as PML and
    FaceNet-style models do; a zero row stays zero. Differentiable.
    """
    x = x.to(accumulation_dtype(x.dtype))
    if normalize or distance == "cosine":
        x = F.normalize(x, p=2.0, dim=1)
    return x


def promote_pair(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` in their common accumulation dtype (fp32 with fp64 gives fp64 for both), so that
    anchors and a reference set of different float dtypes meet in one GEMM. Differentiable; a tensor
    already in that dtype is returned as is (identity, so ``b is a`` survives)."""
    common = torch.promote_types(accumulation_dtype(a.dtype), accumulation_dtype(b.dtype))
    return a.to(common), b.to(common)


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row squared norms ‖x_i‖², shape (B,), in ``x``'s dtype."""
    return torch.linalg.vecdot(x, x, dim=1)


def safe_sqrt(u: torch.Tensor) -> torch.Tensor:
    """√u with value 0 and gradient 0 where u <= 0; NaN propagates.

    The inner ``where`` keeps √0's infinite derivative out of the graph (otherwise 0·inf = NaN in
    backward); the comparison is written as ``~(u <= 0)`` so a NaN stays NaN instead of becoming 0.
    """
    keep = ~(u <= 0)
    return torch.where(keep, torch.sqrt(torch.where(keep, u, torch.ones_like(u))), torch.zeros_like(u))


def paired_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Exact distance between matching rows, from the difference: ``d(a[..., i, :], b[..., i, :])``.

    Args:
        a, b: (..., D) tensors of the same shape, already prepared (normalised for ``"cosine"``).
        distance: one of :data:`DISTANCES`.

    Returns:
        (...,) tensor of distances; differentiable, with gradient 0 (not NaN) where a == b.
    """
    if distance == "cosine":
        return 1.0 - torch.linalg.vecdot(a, b, dim=-1)
    diff = a - b
    u = torch.linalg.vecdot(diff, diff, dim=-1)
    return safe_sqrt(u) if distance == "euclidean" else u


def paired_distance_grad(a: torch.Tensor, b: torch.Tensor, distance: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """∂d(a, b)/∂a and ∂d(a, b)/∂b for matching rows, from the difference (no autograd), shape (..., D) each.

    Euclidean: ±(a − b)/‖a − b‖ (0 where a = b, the subgradient); squared: ±2(a − b); cosine on unit rows
    (d = 1 − a·b): −b and −a. Broadcasts like ``a - b``.
    """
    if distance == "cosine":
        return (-b).expand(torch.broadcast_shapes(a.shape, b.shape)), (-a).expand(torch.broadcast_shapes(a.shape,
                                                                                                     b.shape))
    diff = a - b
    if distance == "squared_euclidean":
        return 2.0 * diff, -2.0 * diff
    norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    unit = torch.where(norm > 0, diff / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(diff))
    return unit, -unit


class GramFactors:
    """GEMM operands whose product is the distance block: ``A[s:e] @ R.T`` = d² (Euclidean kinds) or
    1 − a·r (cosine), with no broadcast bias and no extra pass.

    * Euclidean kinds: A = [a, ‖a‖², 1], R = [−2r, 1, ‖r‖²], so A·Rᵀ = ‖a‖² + ‖r‖² − 2a·r.
    * cosine (unit rows): A = [a, 1], R = [−r, 1], so A·Rᵀ = 1 − a·r.

    Folding the norms into the operands replaces ``addmm(‖r‖², a, rᵀ)``, whose broadcast bias costs a
    full extra copy of the (c, M) block before the GEMM (measured: 40% on top of the GEMM at D=128).
    Built once per call, O((N + M)·D).

    Args:
        a: (N, D) prepared anchors; r: (M, D) prepared references (may be ``a``).
        distance: one of :data:`DISTANCES`.
    """

    def __init__(self, a: torch.Tensor, r: torch.Tensor, distance: str):
        self.a, self.r, self.distance = a, r, distance
        self.self_ref = r is a  # anchor i is reference i: its diagonal is 0 by definition
        self.a_sq = squared_norms(a)
        self.r_sq = self.a_sq if r is a else squared_norms(r)
        ones_a = torch.ones_like(self.a_sq).unsqueeze(1)
        ones_r = torch.ones_like(self.r_sq).unsqueeze(1)
        if distance == "cosine":
            self.A = torch.cat([a, ones_a], dim=1)
            self.R = torch.cat([-r, ones_r], dim=1)
        else:
            self.A = torch.cat([a, self.a_sq.unsqueeze(1), ones_a], dim=1)
            self.R = torch.cat([-2.0 * r, ones_r, self.r_sq.unsqueeze(1)], dim=1)
        # refinement threshold per anchor row: REFINE_RATIO of the squared norms involved
        if distance == "cosine":
            self.refine_thresh = torch.full_like(self.a_sq, REFINE_RATIO)
        else:
            self.refine_thresh = REFINE_RATIO * (self.a_sq + (self.r_sq.max() if r.shape[0] else 0.0))

    def raw_block(self, s: int, e: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(e − s, M) unclamped d² (or cosine d) of anchors s:e: orders each row like the distance.

        ``out``: an (e − s, M) buffer to write into (chunk loops reuse one, avoiding a fresh allocation and
        its page faults per chunk).
        """
        return torch.mm(self.A[s:e], self.R.T, out=out)

    def distance_block(self, s: int, e: int, refine: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(e − s, M) distances of anchors s:e to all references, clamped at 0, optionally refined.

        ``refine`` recomputes exactly (from ``a − r``) the entries small enough for cancellation to matter
        (see :data:`REFINE_RATIO`): one read-only pass, plus an O(k·D) gather for the k small entries.
        In place on its own buffer when no gradient is recorded; otherwise an ordinary differentiable
        expression (used by :func:`pairwise_distance`).
        """
        track = torch.is_grad_enabled() and (self.a.requires_grad or self.r.requires_grad)
        u = self.raw_block(s, e, out=None if track else out)
        u = u.clamp_min(0) if track else u.clamp_min_(0)
        diag = None
        if self.self_ref:
            # Self-distances are exactly 0 by definition, and are kept out of the refinement search (every
            # row would otherwise have a "small" entry). Set by index, never decided by value.
            rows = torch.arange(e - s, device=u.device)
            diag = (rows, rows + s)
            u = u.index_put(diag, torch.full_like(rows, float("inf"), dtype=u.dtype)) if track else \
                u.index_put_(diag, torch.tensor(float("inf"), dtype=u.dtype, device=u.device))
        if refine:
            u = refine_small_entries(u, self.a[s:e], self.r, self.refine_thresh[s:e], self.distance, track)
        if diag is not None:
            u = u.index_put(diag, torch.zeros_like(diag[0], dtype=u.dtype)) if track else \
                u.index_put_(diag, torch.tensor(0.0, dtype=u.dtype, device=u.device))
        if self.distance == "euclidean":
            return safe_sqrt(u) if track else u.sqrt_()
        return u


def refine_small_entries(u: torch.Tensor, a: torch.Tensor, r: torch.Tensor, thresh: torch.Tensor,
                          distance: str, track: bool) -> torch.Tensor:
    """Overwrite entries ``u[i, j] < thresh[i]`` with the exact squared distance (or exact cosine)."""
    # A read-only amin pass finds the rows with small entries; usually few or none, so the bool mask
    # and nonzero run on those rows only.
    row_has_small = u.amin(1) < thresh if u.shape[1] else torch.zeros_like(thresh, dtype=torch.bool)
    if not bool(row_has_small.any()):
        return u
    sel = row_has_small.nonzero().squeeze(1)
    sub_rows, cols = (u[sel] < thresh[sel].unsqueeze(1)).nonzero(as_tuple=True)
    rows = sel[sub_rows]
    exact_kind = "cosine" if distance == "cosine" else "squared_euclidean"
    if track:
        u = u.clone()
    for s in range(0, rows.numel(), _REFINE_PAIRS_PER_STEP):
        ri, ci = rows[s:s + _REFINE_PAIRS_PER_STEP], cols[s:s + _REFINE_PAIRS_PER_STEP]
        exact = paired_distance(a[ri], r[ci], exact_kind).clamp_min(0)
        u = u.index_put((ri, ci), exact) if track else u.index_put_((ri, ci), exact)
    return u


def scale_distance_weights_(weight: torch.Tensor, dist: torch.Tensor, distance: str) -> torch.Tensor:
    """Turn dL/dd into the weights W̃ of :func:`gram_backward`, in place; any shape.

    W̃ = W/d (Euclidean; 0 where d = 0, the subgradient, or d = +inf, a masked cell), 2W (squared) or W
    (cosine). Entries of ``dist`` that are +inf must carry weight 0.
    """
    if distance == "euclidean":
        # W/0 and 0/0 become 0 (subgradient at coincident points); one division plus one cleanup pass.
        return weight.div_(dist).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if distance == "squared_euclidean":
        return weight.mul_(2.0)
    return weight


def gram_backward(w: torch.Tensor, a: torch.Tensor, r: torch.Tensor, distance: str, grad_r: torch.Tensor,
                  grad_r_colsum: torch.Tensor) -> torch.Tensor:
    """Gradient of Σ_ij W_ij · d(a_i, r_j) for one anchor chunk, by GEMMs (no N×M graph).

    With ∂d/∂a = (a − r)/d (Euclidean), 2(a − r) (squared) or −r (cosine on unit vectors) and W̃ from
    :func:`scale_distance_weights_`:

    * grad_a = rowsum(W̃)·a − W̃·r          (returned, shape (c, D))
    * grad_r = colsum(W̃)·r − W̃ᵀ·a         (accumulated: ``grad_r -= W̃ᵀ·a`` here, ``grad_r_colsum +=
      colsum(W̃)``; the caller adds ``grad_r_colsum[:, None]·r`` once after the last chunk)

    For cosine (d = 1 − a·r) the rowsum/colsum terms vanish and ``grad_r_colsum`` is left unchanged.

    Args:
        w: (c, M) scaled weights W̃; a: (c, D) anchors; r: (M, D) references.
        grad_r: (M, D) accumulator; grad_r_colsum: (M,) accumulator.
    """
    grad_a = torch.mm(w, r).neg_()
    grad_r.addmm_(w.T, a, alpha=-1.0)
    if distance != "cosine":
        grad_a.addcmul_(w.sum(1, keepdim=True), a)
        grad_r_colsum.add_(w.sum(0))
    return grad_a


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, distance: str = "euclidean",
                      normalize: bool = False) -> torch.Tensor:
    """Dense (N, M) distance matrix, differentiable. For small inputs: it materialises N×M.

    Uses the Gram expansion with exact refinement of small entries (:class:`GramFactors`); the diagonal
    of ``pairwise_distance(x)`` is exactly 0 with gradient 0. Computed in the accumulation dtype, the
    common one of ``x`` and ``y`` when they differ (fp32 with fp64: fp64).
    """
    xp = prepare_embeddings(x, distance, normalize)
    yp = xp if y is None else prepare_embeddings(y, distance, normalize)
    xp, yp = promote_pair(xp, yp)
    return GramFactors(xp, yp, distance).distance_block(0, xp.shape[0], refine=True)
