"""The centroid op: Do et al.'s linear-time upper bound on the triplet loss, and its fixed centroids.

Per row (see *Methods › Centroid bound* and *Methods › Provenance* in the docs; Do, Tran, Reid, Kumar, Hoang, Carneiro, CVPR 2019), with C fixed centroids
c_0 … c_{C−1} and α = 1 / (3(C − 1)):

    ℓ_i = ‖x_i − c_{y_i}‖ − α · Σ_{m ≠ y_i} ‖x_i − c_m‖          (non-squared, no hinge; the constant
                                                                 scale G = 3(C−1)(N/C−1)(N/C) is dropped)

    ∂ℓ_i/∂x_i = (x_i − c_{y_i}) / ‖x_i − c_{y_i}‖ − α · (s_i · x_i − v_i),
    s_i = Σ_{m ≠ y_i} w_im,   v_i = Σ_{m ≠ y_i} w_im · c_m,   w_im = 1 / ‖x_i − c_m‖   (0 where x_i = c_m).

:class:`CentroidLossRows` (a custom autograd function) computes ℓ_i and its gradient; the two terms are
computed differently, on purpose:

* the **own term** ‖x_i − c_{y_i}‖ is the attractor (x converges onto its centroid), so it is computed
  exactly from the difference x_i − c_{y_i}, O(B·D), with value and subgradient 0 at x = c;
* the **other C − 1 terms** are walked in (row tile × class chunk) tiles under a memory budget, never as
  a (B, C) matrix. Tensor centroids take one GEMM per tile (the Gram expansion of
  :class:`~metricloss.ops.distance.GramFactors`); one-hot centroids c_m = e_m need no GEMM at all:
  ‖x − e_m‖² = ‖x‖² + 1 − 2·x_m. Small, cancellation-prone entries (below REFINE_RATIO of the squared
  norms) are recomputed exactly from the difference, and the gradient's near pairs (the same entries) are
  applied from their exact differences too. They are found without a host sync: one row argmin per tile
  takes each row's :data:`NEAR_PAIRS_PER_CHUNK` smallest entries (a row argmin for one); a row with more near centroids in a
  chunk is flagged and redone with every pair exact after the loops (one host read per call).

Row i depends on x_i only, so the forward pass also accumulates s_i and v_i and keeps the (B, D) Jacobian
rows: backward is one scaling, whatever the reduction. Gradients w.r.t. a centroid tensor that requires
grad (the loss's centroids are fixed, but the functional accepts any tensor) are recomputed tile by tile
in backward.

Peak extra memory is O(B·D + tile), tile ≤ ``chunk_bytes`` (and the cache-sized :data:`TILE_BYTES`).

Centroid construction lives here too (:func:`build_centroids`), so the module, the examples and later
losses share one implementation: ``"onehot"`` (:func:`onehot_centroids`) and ``"kmeans"``
(:func:`kmeans_sphere_centroids`, the paper's data-free scheme).
"""

from __future__ import annotations

import abc

from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .autograd import not_twice_differentiable
from .distance import REFINE_RATIO, GramFactors, squared_norms
from .mining import default_chunk_bytes, rows_per_chunk
from .reduction import reduce_loss, row_argmax, row_argmin

__all__ = [
    "CENTROID_SCHEMES",
    "CENTROID_REDUCTIONS",
    "KMEANS_POINTS_PER_CLASS",
    "KMEANS_MAX_ITERATIONS",
    "TILE_BYTES",
    "NEAR_PAIRS_PER_CHUNK",
    "onehot_centroids",
    "kmeans_sphere_centroids",
    "build_centroids",
    "CentroidLossRows",
    "centroid_backends",
    "centroid_triplet_loss_op",
]

CENTROID_SCHEMES = ("onehot", "kmeans")

# The loss has no valid/invalid terms and can be negative, so "mean_nonzero" has no meaning here.
CENTROID_REDUCTIONS = ("mean", "sum", "none")

# K-means over random unit-sphere points: this many points per class (the lead's floor), and at most this
# many Lloyd iterations. Measured: in D >= 128 the assignment is stable after 2–8 iterations.
KMEANS_POINTS_PER_CLASS = 20
KMEANS_MAX_ITERATIONS = 20

# A tile's temporaries are kept cache-sized (L2/L3) whatever the budget: the per-tile element-wise passes
# (clamp, √, masking, sums, 1/d) then run from cache, so time per sample does not grow with B.
TILE_BYTES = 8 << 20

# Classes per chunk at most: a chunk rebuilds the (B, D + 2) GEMM operand of the rows once, so chunks
# are wide enough to amortise it; narrower only when the budget forces it.
_CLASS_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------
# centroid construction (one place: the module, the examples and later losses use these)
# ----------------------------------------------------------------------------------------------------

def onehot_centroids(num_classes: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """One-hot centroids c_m = e_m, shape (C, D), needs D >= C: orthonormal, every pair √2 apart."""
    if embedding_dim < num_classes:
        raise ValueError(f"one-hot centroids need `embedding_dim` >= `num_classes`, got D={embedding_dim} < "
                         f"C={num_classes}; use centroids='kmeans' (any D) or pass a (C, D) tensor")
    return torch.eye(num_classes, embedding_dim, dtype=dtype, device=device)


def kmeans_sphere_centroids(num_classes: int, embedding_dim: int, seed: int = 0, *,
                            points_per_class: int = KMEANS_POINTS_PER_CLASS,
                            max_iterations: int = KMEANS_MAX_ITERATIONS,
                            chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """The paper's data-free centroids: K-means with K = C over random points on the unit sphere.

    Do et al. draw many random points on the unit sphere in D dimensions and run K-means with K = C
    (see *Methods › Provenance* in the docs). The K-means variant and any scaling are not given by the sources ([U]); this is the
    reconstruction:

    1. ``points_per_class · C`` Gaussian vectors from a ``torch.Generator`` seeded with ``seed``,
       L2-normalised;
    2. initial centroids: C distinct points chosen by a seeded permutation;
    3. spherical Lloyd iterations: assign each point to the centroid of largest cosine (one GEMM per row
       chunk, first index on ties), then set each centroid to the normalised sum of its points; an empty
       cluster takes the point worst served by its centroid; stop when no assignment changes or after
       ``max_iterations``.

    Centroids are unit vectors, as one-hot centroids are, so switching schemes keeps the loss's scale; for
    D >= C they are nearly orthogonal (pairwise ≈ √2).

    Cost: O(iterations · points_per_class · C² · D) time on the CPU (about 1 s for C=1000, D=512 on 2
    threads) and O(points_per_class · C · D + chunk) memory. For very large C, build them once and pass
    the tensor (the module stores them in its ``state_dict``).

    Returns:
        (C, D) float32 CPU tensor with unit rows. Deterministic for a seed (same torch build and threads).
    """
    gen = torch.Generator().manual_seed(seed)
    n = points_per_class * num_classes
    # 1. random points on the unit sphere
    points = F.normalize(torch.randn(n, embedding_dim, generator=gen), dim=1)
    # 2. initial centroids: C distinct random points
    centroids = points[torch.randperm(n, generator=gen)[:num_classes]].clone()
    rows = rows_per_chunk(num_classes, 2 * points.element_size(), chunk_bytes)
    assignment: Optional[torch.Tensor] = None
    for _ in range(max_iterations):
        # 3a. assign: largest cosine (unit vectors), row chunks of the (n, C) similarity under the budget
        best = torch.empty(n, dtype=points.dtype)
        new = torch.empty(n, dtype=torch.int64)
        for s in range(0, n, rows):
            best[s:s + rows], new[s:s + rows] = row_argmax(points[s:s + rows] @ centroids.T)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        # 3b. update: normalised sum of each cluster's points; empty clusters take the worst-served points
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        empty = (torch.bincount(assignment, minlength=num_classes) == 0).nonzero().squeeze(1)
        if empty.numel():
            worst = torch.argsort(best, stable=True)[:empty.numel()]
            sums[empty] = points[worst]
        centroids = F.normalize(sums, dim=1)
    return centroids


def build_centroids(scheme: Union[str, torch.Tensor], num_classes: int, embedding_dim: int,
                    seed: int = 0) -> torch.Tensor:
    """Centroids for ``scheme``: ``"onehot"``, ``"kmeans"`` (seeded) or a (C, D) tensor (copied, detached).

    Validation of the arguments is the caller's (the module's); this only builds. Returns float32 for the
    named schemes, the tensor's own floating dtype otherwise.
    """
    if isinstance(scheme, torch.Tensor):
        return scheme.detach().clone()
    if scheme == "onehot":
        return onehot_centroids(num_classes, embedding_dim)
    if scheme == "kmeans":
        return kmeans_sphere_centroids(num_classes, embedding_dim, seed)
    raise ValueError(f"unknown centroid scheme {scheme!r}; expected one of {CENTROID_SCHEMES} or a tensor")


# ----------------------------------------------------------------------------------------------------
# distance tiles: one row tile × one class chunk
# ----------------------------------------------------------------------------------------------------

class _Tile(abc.ABC):
    """Distances of a row tile ``x`` (rows, D) to the centroids ``c0:c1``, never deciding anything on the host.

    Subclasses give the squared distances from an expansion (:meth:`_expanded_sq`, a GEMM or the one-hot
    closed form) and the exact differences x_i − c_m of chosen pairs (:meth:`_differences`). Expanded
    entries below the refinement threshold (REFINE_RATIO of the squared norms) cancel; every row's
    ``near_k`` smallest entries are found with one row argmin (``topk`` for several), and those below the
    threshold are recomputed from their differences, which are kept for the gradient's near pairs. A row
    with more than ``near_k``
    such entries in the chunk is flagged in ``overflow`` (the driver redoes it with every pair exact).
    """

    c0: int
    c1: int
    x: torch.Tensor
    thresh: torch.Tensor

    @abc.abstractmethod
    def _expanded_sq(self) -> torch.Tensor:
        """(rows, c1 − c0) squared distances from the expansion (unclamped)."""

    @abc.abstractmethod
    def _differences(self, cols: torch.Tensor) -> torch.Tensor:
        """(rows, k, D) exact differences x_i − c_m for the (rows, k) chunk-local centroid indices ``cols``."""

    def distances(self, own_col: torch.Tensor, own_inside: torch.Tensor, near_k: Optional[int]) -> torch.Tensor:
        """(rows, c1 − c0) distances ‖x_i − c_m‖ in a fresh buffer, 0 at the own class (``own_col`` (rows, 1),
        where ``own_inside`` (rows, 1) says the row's class lies in this chunk)."""
        u = self._expanded_sq().clamp_min_(0)
        width = u.shape[1]
        # the own class is not a rival: +inf keeps it out of the near search, 0 below takes it out of the sums
        u.scatter_(1, own_col, torch.where(own_inside, float("inf"), u.gather(1, own_col)))
        k = width if near_k is None else min(near_k, width)
        if k == 1:
            # the fast first-index row argmin (torch.topk and torch.min(dim=1) cost several passes on CPU)
            vals, cols = row_argmin(u)
            vals, cols = vals.unsqueeze(1), cols.unsqueeze(1)
        else:
            vals, cols = torch.topk(u, k, dim=1, largest=False, sorted=False)
        near = vals < self.thresh.unsqueeze(1)
        if k < width:
            # more near entries than slots iff the smallest entry outside the slots is near too: one amin
            # pass with the slots hidden (a bool count over the tile costs several times more)
            u.scatter_(1, cols, float("inf"))
            self.overflow = u.amin(1) < self.thresh
        else:
            self.overflow = torch.zeros_like(near[:, 0])
        diff = self._differences(cols)                                  # (rows, k, D)
        exact = torch.linalg.vecdot(diff, diff, dim=2)
        u.scatter_(1, cols, torch.where(near, exact, vals))
        self.near_cols, self.near_mask, self.near_diff = cols, near, diff
        d = u.sqrt_()
        d.scatter_(1, own_col, torch.where(own_inside, 0.0, d.gather(1, own_col)))
        return d

    def take_near_weights_(self, w: torch.Tensor) -> torch.Tensor:
        """Zero the near pairs' weights in ``w`` (rows, c1 − c0) in place and return them, (rows, k) (0 where a
        slot is not near). The GEMM form Σ_m w_im (x_i − c_m) = s_i·x_i − Σ_m w_im c_m cancels when one w_im
        is large (a pair at distance d adds a unit vector as the difference of two terms of size ‖x‖/d), so
        near pairs are applied from their exact differences instead."""
        slots = w.gather(1, self.near_cols)
        near_w = torch.where(self.near_mask, slots, torch.zeros_like(slots))
        w.scatter_(1, self.near_cols, slots - near_w)
        return near_w

    def near_term(self, near_w: torch.Tensor) -> torch.Tensor:
        """Σ_k near_w_ik (x_i − c_{m_k}), (rows, D), from the exact differences."""
        return torch.einsum("rk,rkd->rd", near_w, self.near_diff)


class _GramTile(_Tile):
    """Distances of a row tile to tensor centroids ``c0:c1``: one GEMM, small entries recomputed exactly."""

    def __init__(self, x: torch.Tensor, centroids: torch.Tensor, c0: int, c1: int):
        self.x, self.c0, self.c1 = x, c0, c1
        self.c = centroids[c0:c1]
        self.gram = GramFactors(x, self.c, "euclidean")
        self.thresh = self.gram.refine_thresh

    def _expanded_sq(self) -> torch.Tensor:
        return self.gram.raw_block(0, self.x.shape[0])

    def _differences(self, cols: torch.Tensor) -> torch.Tensor:
        return self.x.unsqueeze(1) - self.c[cols]

    def add_weighted_centroids_(self, out: torch.Tensor, w: torch.Tensor) -> None:
        """out (rows, D) += Σ_m w_im · c_m over this chunk."""
        out.addmm_(w, self.c)


class _OneHotTile(_Tile):
    """Distances of a row tile to one-hot centroids e_c0 … e_{c1−1}, without a GEMM."""

    def __init__(self, x: torch.Tensor, x_sq: torch.Tensor, c0: int, c1: int):
        self.x, self.x_sq, self.c0, self.c1 = x, x_sq, c0, c1
        # the refinement threshold of GramFactors (REFINE_RATIO of the squared norms), with ‖e_m‖² = 1
        self.thresh = REFINE_RATIO * (x_sq + 1.0)

    def _expanded_sq(self) -> torch.Tensor:
        # ‖x − e_m‖² = ‖x‖² + 1 − 2·x_m: element-wise, no GEMM
        return torch.add((self.x_sq + 1.0).unsqueeze(1), self.x[:, self.c0:self.c1], alpha=-2.0)

    def _differences(self, cols: torch.Tensor) -> torch.Tensor:
        diff = self.x.unsqueeze(1).repeat(1, cols.shape[1], 1)
        return diff.scatter_add_(2, (cols + self.c0).unsqueeze(2), torch.full_like(diff[:, :, :1], -1.0))

    def add_weighted_centroids_(self, out: torch.Tensor, w: torch.Tensor) -> None:
        # Σ_m w_im · e_m puts w_im in column m
        out[:, self.c0:self.c1] += w


# Near pairs (d² below the refinement threshold: x almost on another class's centroid) a row may have in
# one class chunk and still be refined without a host sync. Two need centroids closer to each other than
# twice the refinement radius (rare: unit or one-hot centroids are about √2 apart), so one slot, found by a
# row argmin, serves almost every row; a row with more is flagged and redone with every pair of the chunk
# exact (one host read per call, outside the loops). Measured at B=4096, D=128, C=1000: 4 slots (topk)
# cost about 2× the step, 1 slot about the same as the former host-synchronised refinement.
NEAR_PAIRS_PER_CHUNK = 1


def _tile_shape(num_rows: int, num_classes: int, dim: int, elem: int, chunk_bytes: Optional[int],
                near_k: Optional[int] = NEAR_PAIRS_PER_CHUNK) -> Tuple[int, int]:
    """(rows per tile, classes per chunk) so a tile's temporaries fit min(budget, TILE_BYTES).

    ``near_k=None`` (every pair exact) keeps a (rows, classes, D) difference block, so classes shrink too.
    """
    budget = min(default_chunk_bytes() if chunk_bytes is None else chunk_bytes, TILE_BYTES)
    per_elem = elem + 1  # the distance tile (then 1/d in place) + the refinement's bool scratch
    if near_k is None:
        per_elem += dim * elem + 16  # the differences, the topk values and int64 columns per entry
    classes = max(1, min(num_classes, _CLASS_CHUNK, budget // per_elem))
    # per row: the GEMM operand (D + 2), x − c_y and the Jacobian rows (D each), the near differences
    near_row = 0 if near_k is None else min(near_k, classes) * (dim * elem + 16)
    rows = rows_per_chunk(classes, per_elem, budget, bytes_per_row=(3 * dim + 2) * elem + near_row)
    return min(num_rows, rows), classes


def _other_class_tiles(x: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], num_classes: int,
                       classes: int, near_k: Optional[int] = NEAR_PAIRS_PER_CHUNK
                       ) -> Iterator[Tuple[Union[_GramTile, _OneHotTile], torch.Tensor]]:
    """For one row tile ``x`` (rows, D), yield ``(tile, d)`` per chunk of ``classes`` classes:
    d (rows, cc) = ‖x_i − c_m‖ with the own class set to 0 (so it drops out of the sums and, through
    w = 1/d → 0, out of the gradient). ``d`` is a fresh buffer the caller may overwrite. No host sync.
    """
    x_sq = squared_norms(x) if centroids is None else None
    for c0 in range(0, num_classes, classes):
        c1 = min(c0 + classes, num_classes)
        tile = _OneHotTile(x, x_sq, c0, c1) if centroids is None else _GramTile(x, centroids, c0, c1)
        # own class: column y_i − c0 of the rows whose class falls in this chunk (no host sync)
        rel = labels - c0
        col = rel.clamp(0, c1 - c0 - 1).unsqueeze(1)
        inside = ((rel >= 0) & (rel < c1 - c0)).unsqueeze(1)
        yield tile, tile.distances(col, inside, near_k)


def _inverse_distances_(d: torch.Tensor) -> torch.Tensor:
    """w = 1/d in place, 0 where d = 0 (the subgradient at x = c_m, and the masked own class)."""
    return d.reciprocal_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _own_difference(x: torch.Tensor, centroids: Optional[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """x_i − c_{y_i}, (rows, D), from the difference (exact; one-hot: subtract 1 in column y_i)."""
    if centroids is not None:
        return x - centroids[labels]
    diff = x.clone()
    diff[torch.arange(x.shape[0], device=x.device), labels] -= 1.0
    return diff


def _rows_torch(x: torch.Tensor, centroids: Optional[torch.Tensor], labels: torch.Tensor, num_classes: int,
                chunk_bytes: Optional[int], want_grad_x: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-row losses ℓ (B,) and, with ``want_grad_x``, the Jacobian rows J = ∂ℓ_i/∂x_i (B, D): the tiled torch
    path (row tiles outer, class chunks inner), and the rows redone with every pair exact (int64 indices, or
    None when no row has more than :data:`NEAR_PAIRS_PER_CHUNK` near pairs in a chunk).

    No host sync inside the loops; one after them (whether any row overflowed), skipped under
    ``torch.compile`` (where the extra near pairs of such a row keep their Gram-expansion values).
    """
    loss, jacobian, overflow = _rows_torch_pass(x, centroids, labels, num_classes, chunk_bytes, want_grad_x,
                                                NEAR_PAIRS_PER_CHUNK)
    if torch.compiler.is_compiling() or not bool(overflow.any()):
        return loss, jacobian, None
    redo = overflow.nonzero().squeeze(1)
    sub_loss, sub_jac, _ = _rows_torch_pass(x[redo], centroids, labels[redo], num_classes, chunk_bytes,
                                            want_grad_x, None)
    loss[redo] = sub_loss
    if want_grad_x:
        jacobian[redo] = sub_jac
    return loss, jacobian, redo


def _rows_torch_pass(x: torch.Tensor, centroids: Optional[torch.Tensor], labels: torch.Tensor, num_classes: int,
                     chunk_bytes: Optional[int], want_grad_x: bool, near_k: Optional[int]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """One pass of :func:`_rows_torch` with ``near_k`` near pairs per row and chunk; also returns the (B,)
    bool rows that had more."""
    n, dim = x.shape
    alpha = 1.0 / (3.0 * (num_classes - 1))
    rows, classes = _tile_shape(n, num_classes, dim, x.element_size(), chunk_bytes, near_k)
    loss = torch.empty(n, dtype=x.dtype, device=x.device)
    overflow = torch.zeros(n, dtype=torch.bool, device=x.device)
    jacobian = torch.empty_like(x) if want_grad_x else None
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        xr, yr = x[r0:r1], labels[r0:r1]
        # 1. own term from the difference (exact; √0 = 0, and its subgradient is taken as 0 below)
        diff = _own_difference(xr, centroids, yr)
        own = torch.linalg.vecdot(diff, diff, dim=1).sqrt_()
        if want_grad_x:
            # v starts at (x − c_y)/(α‖x − c_y‖), the own term's gradient, so that J = α (v − s·x) below
            v = torch.mul(diff, (_inverse_distances_(own.clone()) / alpha).unsqueeze(1), out=jacobian[r0:r1])
            w_sum = torch.zeros_like(own)
        del diff
        # 2. the other C − 1 distances: Σ_m d_im over class chunks, own class 0
        sums = torch.zeros_like(own)
        for tile, d in _other_class_tiles(xr, yr, centroids, num_classes, classes, near_k):
            sums += d.sum(1)
            overflow[r0:r1] |= tile.overflow
            if want_grad_x:
                # 3. w = 1/d in place; s_i += Σ_m w_im, v_i += Σ_m w_im c_m (GEMM; one-hot: a column add)
                w = _inverse_distances_(d)
                near_w = tile.take_near_weights_(w)
                w_sum += w.sum(1)
                tile.add_weighted_centroids_(v, w)
                # near pairs exactly: v_i −= Σ (x_i − c_m)·w_im, so v_i − s_i·x_i gains their exact term
                v.sub_(tile.near_term(near_w))
        torch.sub(own, sums, alpha=alpha, out=loss[r0:r1])
        if want_grad_x:
            # 4. J = (x − c_y)/‖x − c_y‖ + α (Σ_m w_im c_m − s·x) = α (v − s·x), in place
            v.addcmul_(w_sum.unsqueeze(1), xr, value=-1.0).mul_(alpha)
    return loss, jacobian, overflow


def _rows_triton(x: torch.Tensor, centroids: Optional[torch.Tensor], labels: torch.Tensor, num_classes: int,
                 chunk_bytes: Optional[int], want_grad_x: bool
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`_rows_torch` from the fused Triton kernels (:mod:`metricloss.kernels.centroid`), fp32 rows and
    tensor centroids only. Rows the kernels flag as having a *near* pair (x within the refinement radius
    of another class's centroid, where the Gram expansion cancels) are recomputed with the torch path
    (one host read per call)."""
    from ..kernels.centroid import centroid_sums_triton

    alpha = 1.0 / (3.0 * (num_classes - 1))
    own, sums, near, s, v = centroid_sums_triton(x, labels, centroids, want_grad_x)
    loss = (own - alpha * sums).to(x.dtype)
    jacobian = None
    if want_grad_x:
        # J = (x − c_y)/‖x − c_y‖ − α (s·x − v), subgradient 0 at x = c_y
        diff = _own_difference(x, centroids, labels)
        jacobian = diff.mul_(_inverse_distances_(own.clone()).unsqueeze(1).to(x.dtype))
        jacobian.add_((v.to(x.dtype) - s.to(x.dtype).unsqueeze(1) * x).mul_(alpha))
    redo = (near > 0).nonzero().squeeze(1)
    exact_rows = None
    if redo.numel():
        sub_loss, sub_jac, sub_exact = _rows_torch(x[redo], centroids, labels[redo], num_classes, chunk_bytes,
                                                   want_grad_x)
        loss[redo] = sub_loss
        if want_grad_x:
            jacobian[redo] = sub_jac
        exact_rows = None if sub_exact is None else redo[sub_exact]
    return loss, jacobian, exact_rows


class CentroidLossRows(torch.autograd.Function):
    """Per-row centroid bound ℓ_i = ‖x_i − c_{y_i}‖ − α Σ_{m ≠ y_i} ‖x_i − c_m‖, in tiles; never (B, C).

    Inputs: prepared rows ``x`` (B, D) in the accumulation dtype, ``centroids`` (C, D) in the same dtype or
    None for one-hot centroids e_0 … e_{C−1} (needs D >= C), int64 ``labels`` (B,) in [0, C), ``num_classes``
    C >= 2, ``chunk_bytes``, and whether x / the centroids need a gradient. Outputs: ℓ (B,), and the
    Jacobian rows (B, D) (non-differentiable, saved; empty when x needs no gradient).

    Row tiles outer, class chunks inner (the layout of a fused kernel: one program per row tile streaming
    the centroids), so everything a row tile needs stays in cache. Row i depends on x_i only, so forward
    also builds the Jacobian rows J_i = ∂ℓ_i/∂x_i = (x_i − c_{y_i})/‖x_i − c_{y_i}‖ + α (v_i − s_i x_i)
    (B, D) and backward is ``grad_out[:, None] * J`` for any reduction. The centroid gradient depends on the
    upstream gradient and is recomputed tile by tile in backward. Subgradient 0 where x_i = c_m.
    ``setup_context`` form (``torch.func.grad`` works); backward releases the Jacobian. Not twice
    differentiable: a second derivative raises (the saved Jacobian is a constant here).
    """

    @staticmethod
    def forward(x, centroids, labels, num_classes, chunk_bytes, want_grad_x, want_grad_c, backend="torch"):
        if backend == "triton":
            loss, jacobian, exact_rows = _rows_triton(x, centroids, labels, num_classes, chunk_bytes, want_grad_x)
        else:
            loss, jacobian, exact_rows = _rows_torch(x, centroids, labels, num_classes, chunk_bytes, want_grad_x)
        jacobian = x.new_empty(0) if jacobian is None else jacobian
        exact_rows = labels.new_empty(0, dtype=torch.int64) if exact_rows is None else exact_rows
        return loss, jacobian, exact_rows

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, centroids, labels, num_classes, chunk_bytes, want_grad_x, want_grad_c = inputs[:7]
        _, jacobian, exact_rows = output
        ctx.mark_non_differentiable(jacobian, exact_rows)
        ctx.save_for_backward(jacobian, x, centroids, labels, exact_rows)
        ctx.num_classes, ctx.chunk_bytes = num_classes, chunk_bytes
        ctx.alpha = 1.0 / (3.0 * (num_classes - 1))

    @staticmethod
    def backward(ctx, grad_out, _grad_jacobian, _grad_exact_rows):
        jacobian, x, centroids, labels, exact_rows = ctx.saved_tensors
        grad_x = grad_c = None
        with torch.no_grad():
            if ctx.needs_input_grad[0]:
                grad_x = jacobian * grad_out.unsqueeze(1)
            if ctx.needs_input_grad[1] and centroids is not None:
                grad_c = _centroid_gradient(x, centroids, labels, grad_out, ctx.num_classes, ctx.chunk_bytes,
                                            ctx.alpha, NEAR_PAIRS_PER_CHUNK)
                if exact_rows.numel() > 0:
                    # the rows forward redid with every pair exact: replace their contribution likewise
                    sub_x, sub_y, sub_g = x[exact_rows], labels[exact_rows], grad_out[exact_rows]
                    grad_c -= _centroid_gradient(sub_x, centroids, sub_y, sub_g, ctx.num_classes,
                                                 ctx.chunk_bytes, ctx.alpha, NEAR_PAIRS_PER_CHUNK)
                    grad_c += _centroid_gradient(sub_x, centroids, sub_y, sub_g, ctx.num_classes,
                                                 ctx.chunk_bytes, ctx.alpha, None)
        grad_x, grad_c = not_twice_differentiable("centroid_triplet_loss", (grad_x, grad_c), (x, centroids))
        return grad_x, grad_c, None, None, None, None, None, None


def _centroid_gradient(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor,
                       num_classes: int, chunk_bytes: Optional[int], alpha: float,
                       near_k: Optional[int]) -> torch.Tensor:
    """∂(Σ_i g_i ℓ_i)/∂c (C, D), recomputed tile by tile with ``near_k`` exact near pairs per row and chunk
    (None: every pair). No host sync."""
    grad_c = torch.zeros_like(centroids)
    n, dim = x.shape
    rows, classes = _tile_shape(n, num_classes, dim, x.element_size(), chunk_bytes, near_k)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        xr, yr, g = x[r0:r1], labels[r0:r1], grad_out[r0:r1]
        # own term: ∂‖x_i − c_{y_i}‖/∂c_{y_i} = −(x_i − c_{y_i})/‖x_i − c_{y_i}‖
        diff = _own_difference(xr, centroids, yr)
        inv_own = _inverse_distances_(torch.linalg.vecdot(diff, diff, dim=1).sqrt_())
        grad_c.index_add_(0, yr, diff.mul_((-g * inv_own).unsqueeze(1)))
        # others, weight g' = −α g: ∂/∂c_m Σ_i g'_i d_im = (Σ_i g'_i w_im)·c_m − Σ_i g'_i w_im x_i
        g = g * -alpha
        for tile, d in _other_class_tiles(xr, yr, centroids, num_classes, classes, near_k):
            w = _inverse_distances_(d)
            near_w = tile.take_near_weights_(w).mul_(g.unsqueeze(1))
            w.mul_(g.unsqueeze(1))
            grad_chunk = grad_c[tile.c0:tile.c1]
            grad_chunk.addcmul_(w.sum(0).unsqueeze(1), tile.c).addmm_(w.T, xr, alpha=-1.0)
            # near pairs from their exact differences, as in forward: c_m gains −g'_i w_im (x_i − c_m)
            exact = tile.near_diff.mul(near_w.unsqueeze(2)).neg_()
            grad_c.index_add_(0, (tile.near_cols + tile.c0).reshape(-1), exact.reshape(-1, dim))
    return grad_c


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------

def centroid_backends(onehot: bool) -> Tuple[str, ...]:
    """Backends of :func:`centroid_triplet_loss_op`: Triton kernels for tensor centroids (one-hot centroids need no
    GEMM; their element-wise torch path is what a kernel would do)."""
    return ("torch", "reference") if onehot else ("torch", "triton", "reference")


def centroid_triplet_loss_op(x: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor],
                             num_classes: int, reduction: str, chunk_bytes: Optional[int],
                             backend: str = "torch") -> torch.Tensor:
    """Chunked-torch centroid bound on validated, prepared inputs.

    Args:
        x: (B, D) rows in the accumulation dtype (fp32 or fp64).
        labels: (B,) integer labels in [0, C).
        centroids: (C, D) in x's dtype and device, or None for one-hot centroids e_m (needs D >= C).
        num_classes: C >= 2.
        reduction: one of :data:`CENTROID_REDUCTIONS`.
        chunk_bytes: memory budget of one tile (default 64 MiB; tiles are also capped at :data:`TILE_BYTES`).
        backend: ``"torch"``, or ``"triton"`` for fp32 rows and tensor centroids (fp64 runs on torch: the
            kernels accumulate in fp32).

    Returns:
        The reduced loss (``()``) or per-row losses (``(B,)``) for ``reduction="none"``.
    """
    grad = torch.is_grad_enabled()
    want_grad_x = grad and x.requires_grad
    want_grad_c = grad and centroids is not None and centroids.requires_grad
    if backend == "triton" and (centroids is None or x.dtype != torch.float32):
        backend = "torch"
    per_row, _, _ = CentroidLossRows.apply(x, centroids, labels.long(), num_classes, chunk_bytes, want_grad_x,
                                        want_grad_c, backend)
    count = torch.tensor(x.shape[0], device=x.device)
    return reduce_loss(per_row, count, count, reduction)
