"""Distances, written once and shared by every loss, miner and kernel driver.

Three distances (see *Design › Semantics and defaults* in the docs), all computed in the accumulation dtype (fp32, or fp64 for fp64 input):

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
  the distance shrinks relative to the norms, so blocks can be *refined*: entries below ``REFINE_RATIO``
  of their own two squared norms are recomputed exactly from ``a − r``. Duplicate reference rows read
  the same column, so ties between them are exact.
* **Paired distances** (:func:`paired_distance`): rows ``a[i]`` vs ``b[i]`` from the difference, exact,
  differentiable, O(n·D). Every selected pair whose distance enters a loss goes through here.

The gradient of a weighted sum of a block, Σ_ij W_ij·d(a_i, r_j), is :func:`gram_backward` (after
:func:`scale_distance_weights_`): two GEMMs, so losses over all pairs (batch-all) never build an
autograd graph of size N×M.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DISTANCES",
    "REFINE_RATIO",
    "accumulation_dtype",
    "prepare_embeddings",
    "promote_pair",
    "squared_norms",
    "sqrt_rn",
    "sqrt_rn_",
    "safe_sqrt",
    "paired_distance",
    "may_have_duplicate_rows",
    "canonical_columns",
    "canonical_columns_dense",
    "canonical_columns_for",
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


# ----------------------------------------------------------------------------------------------------
# The square root of every distance that enters a decision: correctly rounded, on every path.
#
# torch's CPU ``sqrt`` is not correctly rounded (torch 2.13: 1 ulp off for ~20% of fp32 and ~1.4% of fp64
# inputs, at every ATEN_CPU_CAPABILITY), while C++ ``std::sqrt`` (the native ops), CUDA's ``sqrt`` and
# numpy's are. A decision t − √u > 0 at a tie (margin 0, a cross-class duplicate, zero rows) or at a
# rounding-level tie then went one way on one path and the other way on another. Every path therefore takes
# the correctly rounded root: the native ops ``std::sqrt`` (and bounds on u that assume it), the torch path
# and the dense reference :func:`sqrt_rn` / :func:`sqrt_rn_`, which on CPU compute it with numpy (the same
# memory, no copy) and elsewhere are ``torch.sqrt`` (no extra kernel where the device's root is already
# correct; the choice is static, by device). Under ``torch.compile`` the compiled code's root is taken.
# ----------------------------------------------------------------------------------------------------

def _numpy_root(u: torch.Tensor) -> bool:
    """Whether :func:`sqrt_rn` computes √u with numpy: CPU fp32/fp64, eager (not traced or compiled)."""
    # is_compiling first: Dynamo must not trace the tensor tests after it (an opaque object, a graph break)
    return (not torch.compiler.is_compiling() and u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64)
            and u.layout == torch.strided and not u.is_conj() and type(u) is torch.Tensor
            and not torch._C._functorch.is_functorch_wrapped_tensor(u))


def _host_array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor's memory. Hidden from torch function modes: a mode that counts host
    syncs sees ``.numpy()`` as one (it is, for a GPU tensor), but this path only ever runs on CPU tensors,
    where it copies and waits for nothing; on CUDA the root is ``torch.sqrt``."""
    with torch._C.DisableTorchFunction():
        return t.detach().numpy()


def sqrt_rn_(u: torch.Tensor) -> torch.Tensor:
    """√u in place, correctly rounded (round to nearest), on any device; no autograd. Returns ``u``."""
    if _numpy_root(u):
        arr = _host_array(u)
        np.sqrt(arr, out=arr)
        return u
    return u.sqrt_()


class _SqrtRN(torch.autograd.Function):
    """√u correctly rounded (numpy) with torch.sqrt's gradient, grad / (2√u)."""

    @staticmethod
    def forward(u):
        out = torch.empty_like(u, memory_format=torch.contiguous_format)
        np.sqrt(_host_array(u), out=_host_array(out))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        return grad / (2.0 * root)


def sqrt_rn(u: torch.Tensor) -> torch.Tensor:
    """√u correctly rounded (round to nearest) on any device, differentiable as ``torch.sqrt``."""
    if not _numpy_root(u):
        return torch.sqrt(u)
    if torch.is_grad_enabled() and u.requires_grad:
        return _SqrtRN.apply(u)
    return sqrt_rn_(u.clone(memory_format=torch.contiguous_format))


def safe_sqrt(u: torch.Tensor) -> torch.Tensor:
    """√u (correctly rounded, :func:`sqrt_rn`) with value 0 and gradient 0 where u <= 0; NaN propagates.

    The inner ``where`` keeps √0's infinite derivative out of the graph (otherwise 0·inf = NaN in
    backward); the comparison is written as ``~(u <= 0)`` so a NaN stays NaN instead of becoming 0.
    """
    keep = ~(u <= 0)
    return torch.where(keep, sqrt_rn(torch.where(keep, u, torch.ones_like(u))), torch.zeros_like(u))


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
    sq = torch.linalg.vecdot(diff, diff, dim=-1)
    if distance == "euclidean":
        # the correctly rounded root of the same sum of squares as the squared kind, the refinement and the
        # dense reference (not vector_norm, whose own summation order differs in the last bit); gradient 0
        # at a == b, the subgradient
        return safe_sqrt(sq)
    return sq


_HASH_ROWS = 8192  # rows hashed at once: an (8192, D) int64 temporary
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # float element size -> same-width int


def may_have_duplicate_rows(x: torch.Tensor) -> bool:
    """False only if the rows of the 2-D float tensor ``x`` are pairwise distinct (a cheap proof that makes
    ``torch.unique(x, dim=0)`` unnecessary); True when they may not be.

    Each row's bit pattern (−0.0 read as +0.0, as ``unique`` compares) is hashed to one int64 by a fixed
    random linear form (wrapping arithmetic). Identical rows hash alike, so G distinct hashes prove G
    distinct rows, for one O(G·D) pass and a sort of G integers instead of ``unique``'s sort of whole rows
    (measured: 15 ms against under 2 ms for 4096 × 128 fp32 on a 2-core CPU). A hash collision, or rows
    that only ``unique`` can tell apart (NaN payloads), only cost the exact ``unique``. One host read.
    """
    if x.shape[0] < 2:
        return False
    ordered = torch.sort(_row_hashes(x)).values
    return bool((ordered[1:] == ordered[:-1]).any())


def canonical_columns(r: torch.Tensor) -> Optional[torch.Tensor]:
    """(M,) int64: for each row of ``r`` the first row identical to it, or None when all rows differ.

    A GEMM may round the same dot product differently in different output columns (blocking, edge
    tiles), so exact duplicate reference rows could get different Gram values and a tie between them
    would go to whichever copy rounded lower. Reading each column from its first copy makes duplicates
    bitwise equal, so ties among them go to the first index, as with exactly computed distances.
    One hash pass (:func:`may_have_duplicate_rows`) and one device read per call; a sort of the rows
    (``torch.unique``) and a second read only when two rows may be equal.
    """
    m = r.shape[0]
    if not may_have_duplicate_rows(r):
        return None
    _, inverse = torch.unique(r, dim=0, return_inverse=True)
    first = torch.full((m,), m, dtype=torch.int64, device=r.device)
    first.scatter_reduce_(0, inverse, torch.arange(m, device=r.device), reduce="amin")
    canon = first[inverse]
    if not bool((canon != torch.arange(m, device=r.device)).any()):
        return None
    return canon


# Up to this many reference rows, an accelerator finds duplicate rows with canonical_columns_dense (an (M, M)
# bool temporary, 16 MiB at 4096) instead of reading the device.
DENSE_CANONICAL_MAX_ROWS = 4096


def canonical_columns_for(r: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`canonical_columns`, or on an accelerator's path (see :func:`metricloss._checks.accelerator_rules`)
    with at most :data:`DENSE_CANONICAL_MAX_ROWS` rows :func:`canonical_columns_dense`: the same columns
    without a host read (a tensor even when every row differs), so the step can be captured in a CUDA graph."""
    from .reduction import _cpu_kernels

    if not _cpu_kernels(r) and r.shape[0] <= DENSE_CANONICAL_MAX_ROWS:
        return canonical_columns_dense(r)
    return canonical_columns(r)


_HASH_COEFFS: dict = {}


def _hash_coefficients(dim: int, device: torch.device) -> torch.Tensor:
    """The fixed random linear form of :func:`may_have_duplicate_rows` for rows of ``dim``, made once per
    (dim, device): a training loop then never rebuilds or copies it (no per-step launch)."""
    key = (dim, device)
    if key not in _HASH_COEFFS:
        gen = torch.Generator().manual_seed(0x5EED)
        _HASH_COEFFS[key] = (torch.randint(-(1 << 62), 1 << 62, (dim,), generator=gen, dtype=torch.int64)
                             | 1).to(device)
    return _HASH_COEFFS[key]


def _row_hashes(x: torch.Tensor) -> torch.Tensor:
    """(B,) int64: each row's bit pattern (−0.0 read as +0.0) under the fixed random linear form of
    :func:`_hash_coefficients` (wrapping arithmetic), in blocks of ``_HASH_ROWS`` rows."""
    int_dtype = _INT_VIEW[x.element_size()]
    coeff = _hash_coefficients(x.shape[1], x.device)

    def mixed(block: torch.Tensor) -> torch.Tensor:
        bits = (block + 0.0).view(int_dtype).to(torch.int64)
        # fold the high bits down before the odd multiplier: a sign flip alone changes the bit pattern by
        # 2^63, which every odd multiplier keeps at 2^63, so two rows that differ by an even number of sign
        # flips ((1, −1) and (−1, 1)) would collide for every choice of coefficients
        return bits.bitwise_xor_(bits >> 31).mul_(coeff).sum(1)

    if x.shape[0] <= _HASH_ROWS:
        return mixed(x)
    hashes = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], _HASH_ROWS):
        hashes[s:s + _HASH_ROWS] = mixed(x[s:s + _HASH_ROWS])
    return hashes


def canonical_columns_dense(r: torch.Tensor) -> torch.Tensor:
    """(M,) int64: for each row of ``r`` its first identical row, without a host read, in O(M·D + M²) work
    and an (M, M) bool temporary: for batches small enough to mine in one block
    (:func:`~metricloss.ops.mining.batch_hard_indices_dense`).

    Each row's bit pattern is hashed as in :func:`may_have_duplicate_rows` (−0.0 read as +0.0, as ``==``
    compares); a row's candidate is the first row with the same hash, kept when the two rows are equal
    (``==`` on every element, so rows holding NaN are never duplicates) and replaced by the row itself
    otherwise. This equals :func:`canonical_columns` (identity where that returns None) unless two different
    rows collide in the 64-bit hash *and* the earlier one precedes a real duplicate of the later one; such a
    duplicate then reads its own column (its tie goes by the GEMM's rounding, as without canonical columns).
    """
    m = r.shape[0]
    arange = torch.arange(m, device=r.device)
    if m < 2 or r.shape[1] == 0:
        return arange
    hashes = _row_hashes(r)
    # 1. the first row with the same hash: the first True of each row of the (M, M) equality (its diagonal
    #    is True, so there is one)
    first = (hashes.unsqueeze(1) == hashes.unsqueeze(0)).view(torch.uint8).argmax(1)
    # 2. kept only when the rows are equal
    return torch.where((r[first] == r).all(1), first, arange)


Rows = Union[slice, torch.Tensor]


class GramFactors:
    """GEMM operands whose product is the distance block: ``A[rows] @ R.T`` = d² (Euclidean kinds) or
    1 − a·r (cosine), with no broadcast bias and no extra pass.

    * Euclidean kinds: A = [a, ‖a‖², 1], R = [−2r, 1, ‖r‖²], so A·Rᵀ = ‖a‖² + ‖r‖² − 2a·r.
    * cosine (unit rows): A = [a, 1], R = [−r, 1], so A·Rᵀ = 1 − a·r.

    Folding the norms into the operands replaces ``addmm(‖r‖², a, rᵀ)``, whose broadcast bias costs a
    full extra copy of the (c, M) block before the GEMM (measured: 40% on top of the GEMM at D=128).
    Built once per call, O((N + M)·D), plus the duplicate-row check of :func:`canonical_columns`.

    An entry is *small* (cancellation-prone, recomputed exactly by a refinement) when
    d²_ij < REFINE_RATIO·(‖a_i‖² + ‖r_j‖²), each entry judged by its own two norms (cosine:
    1 − a·r < REFINE_RATIO): one large row (an outlier) then flags only its own near-coincident entries,
    not every entry of every row. ``a_slack`` (N,) and ``r_slack`` (M,) are the two halves of that bound.

    Args:
        a: (N, D) prepared anchors; r: (M, D) prepared references (may be ``a``).
        distance: one of :data:`DISTANCES`.
        canonical: read duplicate reference rows from their first copy (:func:`canonical_columns`), so
            that selections tie exactly between them. Miners ask for it; default False.
    """

    def __init__(self, a: torch.Tensor, r: torch.Tensor, distance: str, canonical: bool = False):
        self.a, self.r, self.distance = a, r, distance
        self.self_ref = r is a  # anchor i is reference i: its diagonal is 0 by definition
        self._A: Optional[torch.Tensor] = None
        self._R: Optional[torch.Tensor] = None
        self.a_sq = squared_norms(a)
        self.r_sq = self.a_sq if r is a else squared_norms(r)
        self._a_slack: Optional[torch.Tensor] = None
        self._r_slack: Optional[torch.Tensor] = None
        self._refine_thresh: Optional[torch.Tensor] = None
        self.canon = canonical_columns_for(r.detach()) if canonical else None

    # The refinement bounds are built on first use too: a miner that only orders by the block (batch-hard's
    # one-block path) launches no kernel for them.
    @property
    def a_slack(self) -> torch.Tensor:
        """(N,) the anchors' half of the small-entry bound: REFINE_RATIO·‖a‖² (cosine: REFINE_RATIO)."""
        if self._a_slack is None:
            self._a_slack = (torch.full_like(self.a_sq, REFINE_RATIO) if self.distance == "cosine"
                             else REFINE_RATIO * self.a_sq)
        return self._a_slack

    @property
    def r_slack(self) -> torch.Tensor:
        """(M,) the references' half: REFINE_RATIO·‖r‖² (cosine: 0)."""
        if self._r_slack is None:
            self._r_slack = (torch.zeros_like(self.r_sq) if self.distance == "cosine"
                             else REFINE_RATIO * self.r_sq)
        return self._r_slack

    @property
    def refine_thresh(self) -> torch.Tensor:
        """(N,) the older per-row bound REFINE_RATIO·(‖a_i‖² + max_j ‖r_j‖²), for callers that refine by row."""
        if self._refine_thresh is None:
            self._refine_thresh = self.a_slack + (self.r_slack.max() if self.r.shape[0] else 0.0)
        return self._refine_thresh

    # The factors are built on first use (O((N + M)·D) copies): a caller that only needs the norms and
    # slacks (the native self-pair op) never builds them. Plain attributes, not functools.cached_property,
    # whose lock (Python 3.11) torch.compile cannot trace.
    @property
    def A(self) -> torch.Tensor:
        """(N, K) left GEMM factor: [a, ‖a‖², 1] (cosine: [a, 1])."""
        if self._A is None:
            ones = torch.ones_like(self.a_sq).unsqueeze(1)
            parts = [self.a, ones] if self.distance == "cosine" else [self.a, self.a_sq.unsqueeze(1), ones]
            self._A = torch.cat(parts, dim=1)
        return self._A

    @property
    def R(self) -> torch.Tensor:
        """(M, K) right GEMM factor: [−2r, 1, ‖r‖²] (cosine: [−r, 1])."""
        if self._R is None:
            ones = torch.ones_like(self.r_sq).unsqueeze(1)
            parts = [-self.r, ones] if self.distance == "cosine" else [-2.0 * self.r, ones, self.r_sq.unsqueeze(1)]
            self._R = torch.cat(parts, dim=1)
        return self._R

    def raw_block(self, s: int, e: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(e − s, M) unclamped d² (or cosine d) of anchors s:e (see :meth:`raw_rows`)."""
        return self.raw_rows(slice(s, e), out=out)

    def raw_rows(self, rows: Rows, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(c, M) unclamped d² (or cosine d) of anchors ``rows`` (a slice or an index tensor): orders each
        row like the distance; duplicate reference rows get bitwise equal columns.

        ``out``: a (c, M) buffer to write into (chunk loops reuse one, avoiding a fresh allocation and
        its page faults per chunk).
        """
        if self.canon is None:
            return torch.mm(self.A[rows], self.R.T, out=out)
        block = torch.mm(self.A[rows], self.R.T)
        return torch.index_select(block, 1, self.canon, out=out) if out is not None else block[:, self.canon]

    def squared_block(self, rows: Rows, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(c, M) d² (cosine: d) clamped at 0, unrefined, in place on ``out``; the anchors' own cells are
        +inf when the reference set is the batch (kept out of the small-entry search). No gradient.
        Finish with :meth:`finish` after any refinement."""
        u = self.raw_rows(rows, out=out).clamp_min_(0)
        if self.self_ref:
            own = _row_indices(rows, u.device)
            u[torch.arange(u.shape[0], device=u.device), own] = float("inf")
        return u

    def finish(self, u: torch.Tensor, rows: Rows) -> torch.Tensor:
        """The distances from a :meth:`squared_block`: own cells back to exactly 0, √ for ``euclidean``."""
        if self.self_ref:
            own = _row_indices(rows, u.device)
            u[torch.arange(u.shape[0], device=u.device), own] = 0.0
        return sqrt_rn_(u) if self.distance == "euclidean" else u

    def refine(self, u: torch.Tensor, rows: Rows, track: bool = False) -> torch.Tensor:
        """Recompute the small entries of a (c, M) block of squared distances exactly (one device read)."""
        return refine_small_entries(u, self.a[rows], self.r, self.a_slack[rows], self.distance, track,
                                    r_slack=self.r_slack)

    def distance_block(self, s: int, e: int, refine: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(e − s, M) distances of anchors s:e to all references, clamped at 0, optionally refined.

        ``refine`` recomputes exactly (from ``a − r``) the small entries (see the class notes): one mask
        pass, one ``nonzero`` (a device read), and an O(k·D) gather for the k small entries.
        In place on its own buffer when no gradient is recorded; otherwise an ordinary differentiable
        expression (used by :func:`pairwise_distance`).
        """
        track = torch.is_grad_enabled() and (self.a.requires_grad or self.r.requires_grad)
        if not track:
            u = self.squared_block(slice(s, e), out=out)
            if refine:
                u = self.refine(u, slice(s, e))
            return self.finish(u, slice(s, e))
        u = self.raw_rows(slice(s, e)).clamp_min(0)
        diag = None
        if self.self_ref:
            # Self-distances are exactly 0 by definition, and are kept out of the refinement search (every
            # row would otherwise have a "small" entry). Set by index, never decided by value.
            rows = torch.arange(e - s, device=u.device)
            diag = (rows, rows + s)
            u = u.index_put(diag, torch.full_like(rows, float("inf"), dtype=u.dtype))
        if refine:
            u = self.refine(u, slice(s, e), track=True)
        if diag is not None:
            u = u.index_put(diag, torch.zeros_like(diag[0], dtype=u.dtype))
        return safe_sqrt(u) if self.distance == "euclidean" else u


def _row_indices(rows: Rows, device: torch.device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def refine_small_entries(u: torch.Tensor, a: torch.Tensor, r: torch.Tensor, thresh: torch.Tensor,
                         distance: str, track: bool, r_slack: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Overwrite the entries ``u[i, j] < thresh[i] (+ r_slack[j])`` with the exact squared distance (or exact
    cosine distance), computed from the rows' difference. One ``nonzero`` (a device read)."""
    bound = thresh.unsqueeze(1) if r_slack is None else thresh.unsqueeze(1) + r_slack.unsqueeze(0)
    rows, cols = (u < bound).nonzero(as_tuple=True)
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
                  grad_r_colsum: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        row_mask: optional (c,) 0/1 weights of the rows' contributions to ``grad_r`` (rows that will be
            recomputed contribute 0), applied on O(c·D) and one GEMV, never on the (c, M) block.
    """
    grad_a = torch.mm(w, r).neg_()
    grad_r.addmm_(w.T, a if row_mask is None else a * row_mask.unsqueeze(1), alpha=-1.0)
    if distance != "cosine":
        grad_a.addcmul_(w.sum(1, keepdim=True), a)
        grad_r_colsum.add_(w.sum(0) if row_mask is None else torch.mv(w.T, row_mask))
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
