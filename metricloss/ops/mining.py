"""The mining engine: hardest positives/negatives and semi-hard negatives, chunked, indices out.

Every miner walks the anchors in row chunks sized from a memory budget (:func:`rows_per_chunk`), builds
one (chunk, M) Gram block per chunk, and keeps only O(chunk) results: no N×M tensor is ever resident and
no pair list is built. Labels enter through :class:`~metricloss.ops.labels.ClassIndex`: an anchor's own
class is a K-wide member table, so masking it costs a K-wide gather/scatter, not an M-wide compare.

Mining returns indices only (no gradient). Losses recompute the selected distances exactly
(:func:`~metricloss.ops.distance.paired_distance`), so autograd is O(N·D) and the same for all backends.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from .._backend import _warn_once, resolve_backend
from .distance import GramFactors, canonical_columns_dense, prepare_embeddings, promote_pair
from .labels import AnchorClasses, ClassIndex, Relation, RelationIndex, comparable_labels, is_multi_hot, shares_no_label
from .reduction import row_argmax, row_argmin

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "default_chunk_bytes",
    "rows_per_chunk",
    "mask_own_class_",
    "MINING_BACKENDS",
    "mine_batch_hard",
    "batch_hard_indices",
    "batch_hard_indices_dense",
    "batch_hard_indices_multi_hot",
    "batch_hard_dense",
    "batch_hard_fits_one_block",
    "batch_hard_indices_triton",
    "kernel_dtype",
    "semi_hard_negative_idx",
    "tie_bound",
    "tie_rtol",
    "tie_rtol_slots",
    "use_sorted_semi_hard",
    "POSITIVES",
    "duplicate_key",
    "triton_or_torch_for_positive",
    "triton_or_torch_for_multi_hot",
]

#: Which positive batch-hard selects per anchor: the farthest same-class reference (Hermans et al.) or the
#: nearest one that is not a near-duplicate (easy positive: Xuan et al., WACV 2020 and ECCV 2020).
POSITIVES = ("hardest", "easiest")

DEFAULT_CHUNK_BYTES = 64 << 20  # 64 MiB of per-chunk temporaries (see *Design › Backends* in the docs)

# Above this many positives per anchor, semi-hard selection sorts each row once (O(M log M)) instead
# of one masked-argmin pass per positive (O(M·K)); measured crossover on 2 CPU threads: K ≈ 40.
_SEMI_HARD_SORT_MIN_POSITIVES = 40


# Distances within this many Gram error bounds of each other are a tie (see tie_rtol).
_TIE_SAFETY = 2.0


def tie_rtol(dim: int, dtype: torch.dtype) -> float:
    """Relative tolerance under which two distances count as tied in semi-hard's "farther than the positive".

    The chunked path reads distances from Gram blocks: after refinement of small entries (d² below
    ``REFINE_RATIO`` of the norms) their relative error is at most about 2·(D + 2)·eps / REFINE_RATIO. Two
    distances closer than twice that are treated as equal by every backend (the dense reference too), so
    an exact tie (integer-valued or quantised embeddings, symmetric points) is decided the same way
    whatever the chunk size or the backend's rounding. fp64, D = 128: 7e-12; fp32, D = 128: 4e-3.
    """
    from .distance import REFINE_RATIO

    return _TIE_SAFETY * 2.0 * (dim + 2) * torch.finfo(dtype).eps / REFINE_RATIO


def tie_rtol_slots(d_ap: torch.Tensor, a_sq: torch.Tensor, r_sq_max: torch.Tensor, dim: int, dtype: torch.dtype,
                   distance: str) -> torch.Tensor:
    """The tie tolerance of each (anchor, positive slot): how far a negative's Gram distance near d_ap can be
    off, so semi-hard's "farther than the positive" is decided the same by every path and the reference.

    An unrefined Gram entry's d² = ‖a‖² + ‖r‖² − 2a·r has absolute error at most about
    2·(D + 2)·eps·(‖a‖² + ‖r‖²) (a dot product of D + 2 terms whose magnitudes sum to at most
    2·(‖a‖² + ‖r‖²)); a refined (small) entry is exact to rounding. Near d_ap that is a relative error of
    (D + 2)·eps·(‖a‖² + max‖r‖²)/d_ap² on the distance (twice that on d²; cosine, unit rows: an absolute
    4·(D + 2)·eps). The tolerance is :data:`_TIE_SAFETY` times that, never wider than :func:`tie_rtol`
    (the worst case over every entry). L2-normalised fp32 rows at D = 512: about 1e-4 against ``tie_rtol``'s
    1.6e-2.

    Args:
        d_ap: (c, W) anchor-positive distances (squared for ``squared_euclidean``, 1 − cos for cosine).
        a_sq: (c,) the anchors' squared norms (the Gram factors'); r_sq_max: () the largest reference one.
        dim, dtype: the embeddings' width and the dtype the distances are computed in.

    Returns:
        (c, W) relative tolerances in ``d_ap``'s dtype, for :func:`tie_bound`.
    """
    cap = tie_rtol(dim, dtype)
    eps = torch.finfo(dtype).eps
    if distance == "cosine":
        return torch.full_like(d_ap, min(cap, _TIE_SAFETY * 4.0 * (dim + 2) * eps))
    err_sq = (a_sq.to(d_ap.dtype).unsqueeze(1) + r_sq_max.to(d_ap.dtype)) * (2.0 * (dim + 2) * eps)  # on d²
    rel = err_sq / (2.0 * d_ap * d_ap) if distance == "euclidean" else err_sq / d_ap
    # d_ap = 0 (a duplicate positive, or zero rows): inf or 0/0, the worst case
    return torch.nan_to_num(rel * _TIE_SAFETY, nan=cap, posinf=cap).clamp_(max=cap)


def tie_bound(d: torch.Tensor, rtol: Union[float, torch.Tensor], distance: str) -> torch.Tensor:
    """The largest distance still tied with ``d``: ``d·(1 + rtol)``, plus ``rtol`` for cosine, whose error
    is absolute (1 − â·b̂ cancels for near-parallel rows; its scale is 1 whatever ``d``). ``rtol``: a float,
    or a tensor broadcasting with ``d`` (:func:`tie_rtol_slots`)."""
    return d * (1.0 + rtol) + rtol if distance == "cosine" else d * (1.0 + rtol)


def default_chunk_bytes() -> int:
    """The per-chunk memory budget: ``METRICLOSS_CHUNK_BYTES`` if set, else 64 MiB."""
    env = os.environ.get("METRICLOSS_CHUNK_BYTES", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"the environment variable METRICLOSS_CHUNK_BYTES must be a positive number of bytes "
                             f"written as an integer (e.g. 67108864 for 64 MiB), got {env!r}")
        return value
    return DEFAULT_CHUNK_BYTES


def rows_per_chunk(num_refs: int, bytes_per_ref: int, chunk_bytes: Optional[int], bytes_per_row: int = 0) -> int:
    """Anchor rows per chunk so that ``rows · (num_refs · bytes_per_ref + bytes_per_row)`` fits the budget.

    Always at least 1 row: a single row's temporaries are O(M), the floor of any exact miner.
    """
    budget = default_chunk_bytes() if chunk_bytes is None else chunk_bytes
    per_row = max(1, num_refs * bytes_per_ref + bytes_per_row)
    return max(1, budget // per_row)


def use_sorted_semi_hard(width: int) -> bool:
    """Named heuristic: sort-based semi-hard selection for anchors with many positives."""
    return width > _SEMI_HARD_SORT_MIN_POSITIVES


def mask_own_class_(block: torch.Tensor, members: torch.Tensor, in_class: torch.Tensor,
                    self_cols: Optional[torch.Tensor], value: float) -> torch.Tensor:
    """Set ``block[i, j] = value`` (±inf) for every reference j of anchor i's own class, in place.

    Args:
        block: (c, M) values; members/in_class: (c, W) positive table (self excluded);
        self_cols: (c,) int64, each anchor's own column (its row in the reference set), -1 where it has
            none; None when no anchor has one.
        value: ``+inf`` (hide from a min) or ``-inf`` (hide from a max).

    Padding entries of the table point at arbitrary columns, so the write is an ``amax``/``amin``
    scatter that leaves those columns unchanged (duplicates are then harmless too).
    """
    if members.shape[1] > 0:
        neutral = float("-inf") if value > 0 else float("inf")
        src = torch.full(members.shape, neutral, dtype=block.dtype, device=block.device)
        src.masked_fill_(in_class, value)
        block.scatter_reduce_(1, members, src, reduce="amax" if value > 0 else "amin")
    if self_cols is not None:
        # -1 (no own row) writes the cell's own value back: one O(c) gather, no host branch
        rows = torch.arange(block.shape[0], device=block.device)
        cols = self_cols.clamp_min(0)
        block[rows, cols] = torch.where(self_cols >= 0, torch.full_like(block[rows, cols], value), block[rows, cols])
    return block


def own_columns(s: int, e: int, self_ref: bool, self_index: Optional[torch.Tensor],
                device: torch.device) -> Optional[torch.Tensor]:
    """Anchors s:e's own reference columns: ``s:e`` when the reference is the batch, else the slice of
    ``self_index`` (-1 where none), else None."""
    if self_ref:
        return torch.arange(s, e, device=device)
    return None if self_index is None else self_index[s:e]


def duplicate_key(distance: str, duplicate_similarity: Optional[float]) -> Optional[float]:
    """The Gram key below which a reference is a near-duplicate of the anchor, for unit rows: cosine
    similarity S > ``duplicate_similarity`` is key = 1 − S < 1 − s (cosine) or d² = 2 − 2S < 2(1 − s)
    (the Euclidean kinds, whose key is d²). None (no duplicate rule) stays None."""
    if duplicate_similarity is None:
        return None
    gap = 1.0 - float(duplicate_similarity)
    return gap if distance == "cosine" else 2.0 * gap


def _select_positive(key: torch.Tensor, excluded: torch.Tensor, positive: str,
                     dup_key: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, has) of each row's selected positive among the cells not ``excluded``: the largest key
    (``"hardest"``) or the smallest one not below ``dup_key`` (``"easiest"``; a near-duplicate is never an
    easy positive). First index on ties. ``key`` is not modified."""
    if positive == "hardest":
        return row_argmax(key.masked_fill(excluded, float("-inf")))[1], ~excluded.all(1)
    if dup_key is not None:
        excluded = excluded | (key < dup_key)  # a NaN key stays a candidate: the loss's NaN guard reports it
    return row_argmin(key.masked_fill(excluded, float("inf")))[1], ~excluded.all(1)


def batch_hard_indices(a: torch.Tensor, r: torch.Tensor, index: ClassIndex, cls: AnchorClasses,
                       self_ref: bool, distance: str, chunk_bytes: Optional[int],
                       self_index: Optional[torch.Tensor] = None, positive: str = "hardest",
                       dup_key: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest (or easiest) positive and hardest negative per anchor, chunked torch (the engine behind
    :func:`mine_batch_hard`).

    Args:
        a: (N, D) prepared anchors; r: (M, D) prepared references (``a`` itself when ``self_ref``).
        index, cls: the reference class index and the anchors' class facts.
        self_index: (N,) int64 own reference row per anchor (-1: none), when not ``self_ref``.
        positive: one of :data:`POSITIVES`. dup_key: with ``"easiest"``, the key below which a positive is a
            near-duplicate and never selected (:func:`duplicate_key`); None: no such rule.

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,), -1 where the anchor has no positive / no negative. Ties go to
        the first index.
    """
    n, m = a.shape[0], r.shape[0]
    width = max(index.max_count - (1 if self_ref else 0), 0)
    elem = a.element_size()
    rows = rows_per_chunk(m, elem + elem // 8 + 1, chunk_bytes, bytes_per_row=width * (16 + elem))
    gram = GramFactors(a, r, distance, canonical=True)  # duplicate rows tie exactly: first index wins
    pos_idx = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    neg_idx = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    block = torch.empty((min(rows, n), m), dtype=a.dtype, device=a.device)  # reused by every chunk
    for s in range(0, n, rows):
        e = min(s + rows, n)
        c = cls[s:e]
        # 1. one GEMM: key_ij = d²(a_i, r_j) (cosine: d) unclamped, orders row i like the distance
        key = gram.raw_block(s, e, out=block[:e - s])
        members, in_class = index.positive_table(c, width)
        # 2. the positive: the largest key (or the smallest non-duplicate one) of the anchor's K-wide member
        #    table row; the table lists members in index order, so the first slot is the first index
        if width > 0:
            slot, has_pos = _select_positive(key.gather(1, members), ~in_class, positive, dup_key)
            pos = members.gather(1, slot.unsqueeze(1)).squeeze(1)
            pos_idx[s:e] = torch.where((c.num_pos > 0) & has_pos, pos, -1)
        # 3. hardest negative: hide the own class (K-wide scatter), then one fast row argmin
        mask_own_class_(key, members, in_class, own_columns(s, e, self_ref, self_index, a.device), float("inf"))
        _, neg = row_argmin(key)
        neg_idx[s:e] = torch.where(c.num_neg > 0, neg, -1)
    return pos_idx, neg_idx


# Named heuristic: bytes per (anchor, reference) cell of the one-block batch-hard miner: the key block, its two
# masked copies and three bool masks (same class, own column, and their combinations).
_DENSE_BYTES_PER_CELL = 3 * 4 + 4


# On CPU the dense block's few full (N, M) passes (masks, selections) cost more than the chunked engine's
# K-wide member tables once the block is large; there it serves at most this many cells. Measured per
# forward + backward (fp32, D = 128, K = 4, 1 thread): N = 64: 0.69 ms dense against 0.94 ms chunked;
# N = 256: 1.75 against 1.65 ms; N = 1024: 12.0 against 7.0 ms.
_DENSE_MAX_CELLS_CPU = 256 * 256


def batch_hard_fits_one_block(n: int, m: int, elem: int, chunk_bytes: Optional[int], cpu: bool = False) -> bool:
    """Named heuristic: whether batch-hard mines the whole (N, M) problem as one dense block
    (:func:`batch_hard_indices_dense`): when its temporaries, (N·M) cells of
    ``_DENSE_BYTES_PER_CELL`` bytes (fp32; fp64 keys count double) plus the (M, M) duplicate test, fit the
    chunk budget. At the default 64 MiB that is N = M up to about 1,400 (fp32, the batch as its own
    reference set). With ``cpu`` (CPU tensors, where host reads cost nothing and the chunked engine is
    faster on large blocks) also at most ``_DENSE_MAX_CELLS_CPU`` cells (N = M = 256)."""
    budget = default_chunk_bytes() if chunk_bytes is None else chunk_bytes
    per_cell = _DENSE_BYTES_PER_CELL + 3 * max(elem - 4, 0)
    return n * m * per_cell + m * m <= budget and not (cpu and n * m > _DENSE_MAX_CELLS_CPU)


def batch_hard_indices_dense(a: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor,
                             self_ref: bool, distance: str, self_index: Optional[torch.Tensor] = None,
                             positive: str = "hardest", dup_key: Optional[float] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative per anchor in one dense (N, M) block, with no host read.

    The small-batch form of :func:`batch_hard_indices` (see :func:`batch_hard_fits_one_block`): the same
    Gram key (the same GEMM of :class:`~metricloss.ops.distance.GramFactors`), the same canonical columns for
    duplicate rows (:func:`~metricloss.ops.distance.canonical_columns_dense`), the same rules (first index on
    ties, the own row excluded by index), so the same indices; but the classes are an (N, M) label
    comparison instead of a sorted class index with a member table, whose width is a host read. No
    data-dependent shape, no host read: capturable in a CUDA graph and by ``torch.compile(fullgraph=True)``.

    Args:
        a: (N, D) prepared anchors; r: (M, D) prepared references (``a`` itself when ``self_ref``).
        labels: (N,) and ref_labels: (M,) integer labels (any integer dtypes; compared in their common one).
        self_ref: reference i is anchor i. self_index: otherwise an optional (N,) int64 own reference row
            per anchor (-1: none), neither a positive nor a negative of that anchor.
        positive, dup_key: which positive, as in :func:`batch_hard_indices`.

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,), -1 where the anchor has no positive / no negative.
    """
    pos_idx, neg_idx, has_pos, has_neg = batch_hard_dense(a, r, labels, ref_labels, self_ref, distance, self_index,
                                                          positive, dup_key)
    minus_one = torch.full((), -1, dtype=torch.int64, device=a.device)
    return torch.where(has_pos, pos_idx, minus_one), torch.where(has_neg, neg_idx, minus_one)


def batch_hard_dense(a: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor,
                     self_ref: bool, distance: str, self_index: Optional[torch.Tensor] = None,
                     positive: str = "hardest", dup_key: Optional[float] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`batch_hard_indices_dense` before the -1 marks: ``(pos_idx, neg_idx, has_pos, has_neg)``, the
    indices (N,) int64 always in range (an anchor without a positive gets some row; mask with ``has_pos``)
    and the two (N,) bool masks. For the loss, which gathers the rows and masks the terms itself."""
    n, m = a.shape[0], r.shape[0]
    gram = GramFactors(a, r, distance)
    # 1. one GEMM: key_ij orders row i like d(a_i, r_j); duplicate references read their first copy's column
    key = torch.mm(gram.A, gram.R.T).index_select(1, canonical_columns_dense(r))
    # 2. who is whom: "not a positive" = another label or the anchor's own column; "not a negative" = the
    #    same label or the own column (the own row is excluded from both sides by index, never by value).
    #    Multi-hot rows: "the same label" is "a label in common".
    if is_multi_hot(labels):
        other = shares_no_label(labels, ref_labels)
    else:
        la, lr = comparable_labels(labels), comparable_labels(ref_labels)
        other = la.unsqueeze(1) != lr.unsqueeze(0)
    own = torch.arange(n, device=a.device) if self_ref else self_index
    if own is not None:
        is_own = torch.arange(m, device=a.device).unsqueeze(0) == own.unsqueeze(1)
        not_positive, not_negative = other | is_own, other <= is_own          # other <= own: ~other | own
    else:
        not_positive, not_negative = other, ~other
    # 3. the positive: the largest key of the class (or its smallest non-duplicate one); hardest negative:
    #    the smallest key outside it (first index on ties, as torch.max / torch.min along a row; row_argmax
    #    / row_argmin give the same results, faster on CPU). Whether an anchor has a positive / a negative
    #    is read off the masks, not the values (a row of ±inf).
    pos_idx, has_pos = _select_positive(key, not_positive, positive, dup_key)
    neg_idx = row_argmin(key.masked_fill_(not_negative, float("inf")))[1]
    return pos_idx, neg_idx, has_pos, ~not_negative.all(1)


def batch_hard_indices_multi_hot(a: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor,
                                 self_ref: bool, distance: str, chunk_bytes: Optional[int],
                                 self_index: Optional[torch.Tensor] = None, positive: str = "hardest",
                                 dup_key: Optional[float] = None,
                                 relation: Optional[Relation] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`batch_hard_indices` for multi-hot labels: a reference is a positive of an anchor when they
    share a label and a negative when they share none, chunked under ``chunk_bytes``.

    Each anchor chunk builds its (c, M) Gram key (the same GEMM and canonical columns as the single-label
    engine, so the same tie rules) and its (c, M) relation block (:meth:`~metricloss.ops.labels.RelationIndex.relation_block`,
    a GEMM of the chunk's label rows with the references'), selects, and drops both: no (N, M) tensor.

    Args:
        a: (N, D) prepared anchors; r: (M, D) prepared references (``a`` itself when ``self_ref``).
        labels: (N, L) and ref_labels: (M, L) multi-hot rows (bool or 0/1).
        self_index, positive, dup_key: as :func:`batch_hard_indices`.
        relation: a user's relation instead of "a label in common" (:class:`~metricloss.ops.labels.RelationIndex`;
            the labels are then any tensors of N and M rows).

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,), -1 where the anchor has no positive / no negative.
    """
    n, m = a.shape[0], r.shape[0]
    elem = a.element_size()
    # per cell: the key and its masked copy, the fp32 label GEMM, and two bool masks
    rows = rows_per_chunk(m, 2 * elem + 4 + 2, chunk_bytes)
    gram = GramFactors(a, r, distance, canonical=True)
    pos_idx = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    neg_idx = torch.full((n,), -1, dtype=torch.int64, device=a.device)
    index = RelationIndex(ref_labels, relation)  # the reference rows converted once, not per chunk
    anchor_rows = index.anchor_rows(labels)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        key = gram.raw_block(s, e)
        # "not a positive": no label in common; "not a negative": one in common; the own column is neither
        # (an O(c) write by index, not an (c, M) comparison)
        not_positive = ~index.relation_block(anchor_rows[s:e])
        not_negative = ~not_positive
        own = own_columns(s, e, self_ref, self_index, a.device)
        if own is not None:
            has_own = own >= 0
            rows_own = torch.arange(e - s, device=a.device)[has_own]
            not_positive[rows_own, own[has_own]] = True
            not_negative[rows_own, own[has_own]] = True
        pos, has_pos = _select_positive(key, not_positive, positive, dup_key)
        neg_key, neg = row_argmin(key.masked_fill_(not_negative, float("inf")))
        pos_idx[s:e] = torch.where(has_pos, pos, -1)
        # a row of +inf has no negative (a NaN key keeps its row: the loss's NaN guard reports it)
        neg_idx[s:e] = torch.where(neg_key < float("inf"), neg, -1)
    return pos_idx, neg_idx


def semi_hard_negative_idx(dist: torch.Tensor, d_ap: torch.Tensor, members: torch.Tensor,
                           in_class: torch.Tensor, self_cols: Optional[torch.Tensor],
                           scratch: Optional[torch.Tensor] = None, rtol: Union[float, torch.Tensor] = 0.0,
                           distance: str = "euclidean") -> torch.Tensor:
    """TF-Addons semi-hard negatives for one anchor chunk.

    For each (anchor i, positive slot k) the negative is the nearest one *farther* than the positive,
    d_in > :func:`tie_bound` (d_ap[i, k]); where none is, the farthest negative (largest d_in). Ties (values
    within the tie bound of the nearest, see :func:`tie_rtol`) go to the first index; the sorted path
    (many positives) takes the smallest value among them instead.

    Args:
        dist: (c, M) distances of the chunk's anchors to all references. **Overwritten**: on return the
            anchors' own-class cells (and self) are +inf, i.e. it holds the negatives' distances.
        d_ap: (c, W) anchor-positive distances of the member table.
        members, in_class: (c, W) the positive table; self_cols as in :func:`mask_own_class_`.
        scratch: an optional (c, M) buffer like ``dist`` for the per-slot candidates.
        rtol: the tie tolerance, a float or (c, W) per slot (:func:`tie_rtol_slots`); distance: the distance
            kind (cosine ties have an absolute floor).

    Returns:
        (c, W) int64 reference indices. Entries for padding slots or anchors without negatives are
        arbitrary in-range indices; the caller masks them.
    """
    c, m = dist.shape
    width = members.shape[1]
    # 1. the fallback, farthest negative: own class hidden from the max
    neg = mask_own_class_(dist, members, in_class, self_cols, float("-inf"))
    _, far_idx = row_argmax(neg)
    # 2. hide the own class from the min (the -inf cells become +inf)
    mask_own_class_(neg, members, in_class, self_cols, float("inf"))
    if width == 0:
        return torch.empty((c, 0), dtype=torch.int64, device=dist.device)
    bound = tie_bound(d_ap, rtol, distance)  # "farther" means beyond the tie band of the positive
    if use_sorted_semi_hard(width):
        # 3a. many positives: sort each row once, binary-search every positive's bound
        sorted_neg, order = torch.sort(neg, dim=1, stable=True)
        q = torch.searchsorted(sorted_neg, bound.contiguous(), right=True)
        qc = q.clamp(max=m - 1)
        found = (q < m) & (sorted_neg.gather(1, qc) < float("inf"))
        return torch.where(found, order.gather(1, qc), far_idx.unsqueeze(1))
    # 3b. few positives (P×K batches): one masked argmin pass per positive slot, then the first index
    #     within the tie band of the nearest
    out = torch.empty((c, width), dtype=torch.int64, device=dist.device)
    cand = torch.empty_like(neg) if scratch is None else scratch
    inf = torch.full((), float("inf"), dtype=neg.dtype, device=neg.device)
    per_slot = isinstance(rtol, torch.Tensor)
    for k in range(width):
        torch.where(neg > bound[:, k:k + 1], neg, inf, out=cand)
        val, idx = row_argmin(cand)
        if per_slot or rtol > 0:
            limit = tie_bound(val, rtol[:, k] if per_slot else rtol, distance)
            idx = torch.le(cand, limit.unsqueeze(1)).view(torch.uint8).argmax(1)
        out[:, k] = torch.where(val < float("inf"), idx, far_idx)
    return out


def mine_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None, distance: str = "euclidean", backend: str = "auto",
                    chunk_bytes: Optional[int] = None,
                    ref_self_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Op-level batch-hard miner on validated inputs: backend dispatch, no gradient.

    See :func:`metricloss.functional.mine_batch_hard` for the public, validated entry point. Embeddings
    are used as given (normalise them first if the loss does); cosine normalises internally.
    ``ref_self_index``: validated (N,) int64 own reference row per anchor (-1: none), or None. The Triton
    kernel excludes self only for the plain batch (no reference set): with ``ref_self_index`` the torch
    engine mines (with a one-time warning when ``backend="triton"`` was asked for).
    """
    self_ref = ref_embeddings is None
    resolved = resolve_backend(backend, embeddings.device, "mine_batch_hard", implemented=MINING_BACKENDS)
    with torch.no_grad():
        if resolved == "reference":
            from .. import reference

            return reference.mine_batch_hard(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                                             ref_self_index=ref_self_index)
        a = prepare_embeddings(embeddings.detach(), distance, normalize=False)
        r = a if self_ref else prepare_embeddings(ref_embeddings.detach(), distance, normalize=False)
        a, r = promote_pair(a, r)
        lr = labels if self_ref else ref_labels
        resolved = triton_or_torch_for_self_index(resolved, ref_self_index, backend, "mine_batch_hard")
        resolved = triton_or_torch_for_multi_hot(resolved, is_multi_hot(labels), backend, "mine_batch_hard")
        if is_multi_hot(labels):
            return batch_hard_indices_multi_hot(a, r, labels, lr, self_ref, distance, chunk_bytes, ref_self_index)
        if resolved == "triton":
            dtype = kernel_dtype(embeddings.dtype)
            return batch_hard_indices_triton(a.to(dtype), labels, r.to(dtype), lr, self_ref, distance)
        index = ClassIndex(lr)
        cls = index.anchor_classes(labels, self_ref, ref_self_index)
        return batch_hard_indices(a, r, index, cls, self_ref, distance, chunk_bytes, ref_self_index)


def triton_or_torch_for_self_index(resolved: str, self_index: Optional[torch.Tensor], requested: str, op: str) -> str:
    """The Triton mining kernel excludes self only by ``row == column`` (the batch as its own reference):
    with an explicit own-row index the torch engine mines; an explicit ``backend="triton"`` warns once."""
    if resolved != "triton" or self_index is None:
        return resolved
    if requested == "triton":
        _warn_once(op, requested, "the Triton mining kernel does not take ref_self_index")
    return "torch"


def triton_or_torch_for_multi_hot(resolved: str, multi_hot: bool, requested: str, op: str) -> str:
    """The Triton mining kernel compares single labels: multi-hot rows are mined by the torch engine; an
    explicit ``backend="triton"`` warns once."""
    if resolved != "triton" or not multi_hot:
        return resolved
    if requested == "triton":
        _warn_once(op, requested, "the Triton mining kernel takes one label per sample")
    return "torch"


def triton_or_torch_for_positive(resolved: str, positive: str, requested: str, op: str) -> str:
    """The Triton mining kernel selects the hardest positive only: the easy positive is mined by the torch
    engine (same results, no kernel fusion); an explicit ``backend="triton"`` warns once."""
    if resolved != "triton" or positive == "hardest":
        return resolved
    if requested == "triton":
        _warn_once(op, requested, "the Triton mining kernel selects the hardest positive only")
    return "torch"


MINING_BACKENDS = ("torch", "triton", "reference")


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Triton kernel mines in: 16-bit inputs keep their precision (tensor cores), fp32 stays
    fp32 (3-pass TF32 dots), fp64 is mined in fp32 (indices only; the loss is recomputed in fp64)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def batch_hard_indices_triton(a: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, ref_labels: torch.Tensor,
                              self_ref: bool, distance: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive / negative indices from the fused Triton kernel (:mod:`metricloss.kernels.mining`).

    Same contract as :func:`batch_hard_indices`: int64 (N,), -1 where none, first index on ties.
    """
    from ..kernels.mining import mine_batch_hard_triton

    return mine_batch_hard_triton(a, labels, a if self_ref else r, labels if self_ref else ref_labels,
                                  self_ref=self_ref, distance=distance)

