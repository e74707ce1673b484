"""Label structure, written once: who is a positive or a negative of whom, without an N×M mask.

The reference labels are sorted once (stable), so each class is a contiguous run of the sorted order.
Then, for any anchor label:

* ``count`` is two ``searchsorted`` calls: the number of references with that label;
* the anchor's positives are a short *member table* row (its class's run), so mining gathers K values
  instead of comparing M labels, and masks its own class in the M-wide block with a K-wide scatter.

This is what keeps the torch backend at about one GEMM per chunk on P×K batches (K ≪ M); for large
classes the member table is wider but still bounded by the chunk budget.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["ClassIndex", "AnchorClasses", "RelationIndex", "MultiHotIndex", "MultiHotAnchors", "Relation", "comparable_labels", "is_multi_hot",
           "shares_no_label"]

# sort / searchsorted / type promotion take no uint16, uint32 or uint64: such labels are compared as int64,
# exact for uint16 and uint32, and by their bits for uint64 (equality kept; the class order does not matter)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def is_multi_hot(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are multi-hot rows ((N, L): sample i carries label l where ``labels[i, l]``)."""
    return labels.dim() == 2


def shares_no_label(labels: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """(n, M) bool: anchor i and reference j have no label in common, for multi-hot rows (n, L) and (M, L):
    j can be a negative of i, never a positive.

    One small GEMM of the 0/1 rows (fp32: the counts are exact up to 2^24 labels), never a label list. For a
    chunk of anchors this is the chunk's relation block, so no (N, M) mask outlives its chunk."""
    return torch.mm(labels.to(torch.float32), ref_labels.to(torch.float32).T) == 0


# Named heuristic: MultiHotIndex builds its relation blocks in row pieces of about this many bytes of
# temporaries (the fp32 GEMM, its bool, the int64 running count and column indices: 21 bytes per cell), so
# the relation adds at most this to any caller's own budget, whatever its chunk.
MULTI_HOT_PIECE_BYTES = 16 << 20
_RELATION_BYTES_PER_CELL = 21


def comparable_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` in a dtype that sort, searchsorted and type promotion take: int64 for uint16/32/64 (uint64
    by its bits: two labels are equal exactly when their int64 forms are), unchanged otherwise."""
    return labels.to(torch.int64) if labels.dtype in _WIDE_UNSIGNED else labels


class AnchorClasses:
    """Per-anchor class facts for a chunk or a batch of anchors (all int64 tensors of shape (n,)).

    Attributes:
        start: position in the sorted reference order where the anchor's class run begins.
        count: number of references carrying the anchor's label (the anchor's own row included).
        num_pos: number of positives (``count`` minus the anchor's own row when it is among them).
        num_neg: number of negatives (``M − count``, minus the anchor's own row when its label differs).
        self_pos: position of the anchor's own row in the sorted order when that row carries the anchor's
            label; ``M`` (past every position) where it has none or it lies outside the class; None when
            no anchor has an own row.
    """

    __slots__ = ("start", "count", "num_pos", "num_neg", "self_pos")

    def __init__(self, start: torch.Tensor, count: torch.Tensor, num_pos: torch.Tensor, num_neg: torch.Tensor,
                 self_pos: Optional[torch.Tensor]):
        self.start, self.count, self.num_pos, self.num_neg, self.self_pos = start, count, num_pos, num_neg, self_pos

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def __getitem__(self, sl: slice) -> "AnchorClasses":
        return AnchorClasses(self.start[sl], self.count[sl], self.num_pos[sl], self.num_neg[sl],
                             None if self.self_pos is None else self.self_pos[sl])

    @property
    def valid(self) -> torch.Tensor:
        """(n,) bool: the anchor has at least one positive and one negative."""
        return (self.num_pos > 0) & (self.num_neg > 0)


class ClassIndex:
    """Reference labels (M,) sorted once; answers per-anchor class questions in O(n log M).

    Anchor labels of another integer dtype are compared in the promoted dtype of the two
    (``torch.promote_types``: wide enough for both, never a narrowing cast), as ``==`` between the two
    tensors would: label 256 never matches a uint8 0, 2**32 + 7 never matches an int32 7.

    Args:
        ref_labels: (M,) integer tensor.
    """

    def __init__(self, ref_labels: torch.Tensor):
        ref_labels = comparable_labels(ref_labels)
        self.num_refs = int(ref_labels.shape[0])
        self.sorted_labels, self.order = torch.sort(ref_labels, stable=True)
        self._inverse: Optional[torch.Tensor] = None
        self._max_count: Optional[int] = None
        self._sorted_as: Dict[torch.dtype, torch.Tensor] = {self.sorted_labels.dtype: self.sorted_labels}

    def sorted_labels_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The sorted reference labels in ``dtype`` (a widening of theirs: order and values unchanged)."""
        if dtype not in self._sorted_as:
            self._sorted_as[dtype] = self.sorted_labels.to(dtype)
        return self._sorted_as[dtype]

    @property
    def inverse(self) -> torch.Tensor:
        """(M,) position of each reference in the sorted order."""
        if self._inverse is None:
            inv = torch.empty_like(self.order)
            inv[self.order] = torch.arange(self.num_refs, device=self.order.device)
            self._inverse = inv
        return self._inverse

    @property
    def max_count(self) -> int:
        """Size of the largest class among the references (reads one scalar from the device)."""
        if self._max_count is None:
            if self.num_refs == 0:
                self._max_count = 0
            else:
                # each reference's class size from two searches of the sorted labels (unique_consecutive's
                # data-dependent output size would be a second host read)
                sorted_labels = self.sorted_labels
                counts = (torch.searchsorted(sorted_labels, sorted_labels, right=True)
                          - torch.searchsorted(sorted_labels, sorted_labels, right=False))
                self._max_count = int(counts.max())
        return self._max_count

    def anchor_classes(self, labels: torch.Tensor, self_ref: bool = False,
                       self_index: Optional[torch.Tensor] = None) -> AnchorClasses:
        """Class facts for anchors with ``labels`` (n,).

        Args:
            labels: (n,) integer labels, any integer dtype (compared in the common dtype).
            self_ref: anchor i is reference i (the reference set is the batch, same labels).
            self_index: (n,) int64, the reference row that *is* anchor i, or -1 where it has none
                (ignored with ``self_ref``). That row is neither a positive nor a negative of anchor i,
                whatever its label: it is excluded by index.
        """
        labels = comparable_labels(labels)
        common = torch.promote_types(labels.dtype, self.sorted_labels.dtype)
        sorted_labels = self.sorted_labels_as(common)
        lab = labels.to(common).contiguous()  # searchsorted copies (and warns about) strided values
        start = torch.searchsorted(sorted_labels, lab, right=False)
        count = torch.searchsorted(sorted_labels, lab, right=True) - start
        if self_ref:
            return AnchorClasses(start, count, count - 1, self.num_refs - count, self.inverse)
        if self_index is None:
            return AnchorClasses(start, count, count, self.num_refs - count, None)
        has_self = self_index >= 0
        own_pos = self.inverse[self_index.clamp_min(0)]
        own_in_class = has_self & (sorted_labels[own_pos] == lab)
        num_pos = count - own_in_class.to(count.dtype)
        num_neg = self.num_refs - count - (has_self & ~own_in_class).to(count.dtype)
        self_pos = torch.where(own_in_class, own_pos, self.num_refs)
        return AnchorClasses(start, count, num_pos, num_neg, self_pos)

    def positive_table(self, cls: AnchorClasses, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The anchors' positives as a padded table.

        Args:
            cls: facts for n anchors (self excluded from positives when ``cls.self_pos`` is set).
            width: table width, at least the largest ``cls.num_pos``.

        Returns:
            ``(members, valid)``, both (n, width): ``members`` are reference indices (int64) in increasing
            index order within each class (ties then resolve to the first index), ``valid`` marks the real
            entries. Padding entries hold an arbitrary in-range index and must be masked with ``valid``.
        """
        n = cls.start.shape[0]
        j = torch.arange(width, device=cls.start.device).unsqueeze(0).expand(n, width)
        src = cls.start.unsqueeze(1) + j
        if cls.self_pos is not None:
            # Skip the anchor's own slot: entries at or after it shift right by one.
            src = src + (src >= cls.self_pos.unsqueeze(1)).to(src.dtype)
        valid = j < cls.num_pos.unsqueeze(1)
        src = src.clamp_(max=max(self.num_refs - 1, 0))
        return self.order[src], valid


class MultiHotAnchors:
    """Per-anchor relation facts (the :class:`AnchorClasses` of :class:`RelationIndex`).

    Attributes:
        rows: the anchors' labels as the relation takes them: (n, L) float32 0/1 rows for multi-hot labels.
        num_pos: (n,) int64 references sharing a label with the anchor, its own row excluded.
        num_neg: (n,) int64 references sharing none, its own row excluded.
        own: (n,) int64 the anchor's own reference row (-1: none), or None when no anchor has one.
    """

    __slots__ = ("rows", "num_pos", "num_neg", "own")

    def __init__(self, rows: torch.Tensor, num_pos: torch.Tensor, num_neg: torch.Tensor, own: Optional[torch.Tensor]):
        self.rows, self.num_pos, self.num_neg, self.own = rows, num_pos, num_neg, own

    def __len__(self) -> int:
        return int(self.num_pos.shape[0])

    def __getitem__(self, sl) -> "MultiHotAnchors":
        return MultiHotAnchors(self.rows[sl], self.num_pos[sl], self.num_neg[sl],
                               None if self.own is None else self.own[sl])

    @property
    def valid(self) -> torch.Tensor:
        """(n,) bool: the anchor has at least one positive and one negative."""
        return (self.num_pos > 0) & (self.num_neg > 0)


#: A user-given relation: ``relation(labels_chunk, ref_labels) -> (c, M) bool``, True where reference j is a
#: positive of anchor i (the same class), False where it is a negative.
Relation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RelationIndex:
    """The :class:`ClassIndex` of any relation between labels: multi-hot rows (a label in common), or a
    user-given ``relation``.

    Reference j is a positive of anchor i when the relation holds and a negative when it does not (the
    anchor's own row, by index, is neither). The relation of a chunk of anchors is computed per piece of
    anchors (:data:`MULTI_HOT_PIECE_BYTES`), so no (N, M) mask is ever kept; the positives of each anchor are
    then a padded member table in increasing index order, as :meth:`ClassIndex.positive_table` gives them (so
    ties resolve to the first index the same way).

    Args:
        ref_labels: (M, L) bool or 0/1 rows (``relation`` None), or for a ``relation`` any tensor whose first
            dimension is M.
        relation: None (multi-hot rows: one small GEMM of the 0/1 rows per piece, exact counts in fp32 up to
            2^24 labels), or a callable ``relation(labels[i0:i1], ref_labels) -> (i1 − i0, M) bool``.
    """

    def __init__(self, ref_labels: torch.Tensor, relation: Optional[Relation] = None):
        self.num_refs = int(ref_labels.shape[0])
        self.relation = relation
        self.ref_rows = ref_labels if relation is not None else ref_labels.to(torch.float32)

    @property
    def piece_rows(self) -> int:
        """Anchor rows per relation piece (:data:`MULTI_HOT_PIECE_BYTES`; at least 1)."""
        return max(1, MULTI_HOT_PIECE_BYTES // max(1, _RELATION_BYTES_PER_CELL * self.num_refs))

    def anchor_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """The anchors' labels as :meth:`relation_block` takes them (fp32 0/1 rows for multi-hot)."""
        return labels if self.relation is not None else labels.to(torch.float32)

    def relation_block(self, rows: torch.Tensor) -> torch.Tensor:
        """(c, M) bool: reference j is a positive of anchor row i (``rows``: :meth:`anchor_rows` of c anchors)."""
        if self.relation is None:
            return torch.mm(rows, self.ref_rows.T) > 0
        block = self.relation(rows, self.ref_rows)
        want = (rows.shape[0], self.num_refs)
        if not isinstance(block, torch.Tensor) or block.dtype != torch.bool or tuple(block.shape) != want:
            got = (f"{block.dtype} tensor of shape {tuple(block.shape)}" if isinstance(block, torch.Tensor)
                   else type(block).__name__)
            raise ValueError(f"metricloss: `relation(labels[i0:i1], ref_labels)` must return a bool tensor of "
                             f"shape {want} (True: positive, False: negative), got a {got}")
        if block.device != rows.device:
            raise ValueError(f"metricloss: `relation` returned a tensor on {block.device}; the labels are on "
                             f"{rows.device}")
        return block

    def _clear_own_(self, block: torch.Tensor, own: Optional[torch.Tensor], value: bool = False) -> torch.Tensor:
        """Write ``value`` into each row's own column (where it has one): an O(c) write by index."""
        if own is not None:
            has_own = own >= 0
            rows = torch.arange(block.shape[0], device=block.device)
            cols = own.clamp_min(0)
            block[rows, cols] = torch.where(has_own, torch.full_like(block[rows, cols], value), block[rows, cols])
        return block

    def anchor_classes(self, labels: torch.Tensor, self_ref: bool = False,
                       self_index: Optional[torch.Tensor] = None) -> MultiHotAnchors:
        """Relation facts for anchors with ``labels`` (n, ...); the arguments as
        :meth:`ClassIndex.anchor_classes`. The counts come from one pass of relation blocks in pieces of
        :data:`MULTI_HOT_PIECE_BYTES`."""
        rows = self.anchor_rows(labels)
        n, m = rows.shape[0], self.num_refs
        device = rows.device
        own = (torch.arange(n, device=device) if self_ref else self_index)
        count = torch.empty(n, dtype=torch.int64, device=device)
        own_related = torch.zeros(n, dtype=torch.bool, device=device)
        step = self.piece_rows
        for s in range(0, n, step):
            block = self.relation_block(rows[s:s + step])
            count[s:s + step] = block.sum(1)
            if own is not None:
                mine = own[s:s + step]
                related = block.gather(1, mine.clamp_min(0).unsqueeze(1)).squeeze(1)
                own_related[s:s + step] = related & (mine >= 0)
        if own is None:
            return MultiHotAnchors(rows, count, m - count, None)
        has_own = own >= 0
        num_pos = count - own_related.to(count.dtype)
        num_neg = m - count - (has_own & ~own_related).to(count.dtype)
        return MultiHotAnchors(rows, num_pos, num_neg, own)

    def max_positives(self, cls: MultiHotAnchors) -> int:
        """The largest number of positives of an anchor (reads one scalar from the device)."""
        return int(cls.num_pos.max()) if len(cls) else 0

    def positive_table(self, cls: MultiHotAnchors, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The anchors' positives as a padded table: as :meth:`ClassIndex.positive_table` (``members``
        increasing within each row, ``valid`` marking the real entries, padding an arbitrary in-range index).
        Built from the chunk's relation block by a running count: O(n·M), no sort."""
        n, m = len(cls), self.num_refs
        device = cls.rows.device
        members = torch.zeros((n, width + 1), dtype=torch.int64, device=device)
        cols = torch.arange(m, device=device)
        for s in range(0, n, self.piece_rows):
            part = cls[s:s + self.piece_rows]
            shares = self._clear_own_(self.relation_block(part.rows), part.own)
            # 1. slot of each positive: the number of positives before it in its row; the rest go to a pad slot
            slot = torch.cumsum(shares, 1, dtype=torch.int64).sub_(1)
            slot = torch.where(shares, slot, torch.full_like(slot, width))
            # 2. every positive's column into its slot (the pad slot takes the rest and is dropped)
            members[s:s + len(part)].scatter_(1, slot, cols.expand(len(part), m))
        valid = torch.arange(width, device=device).unsqueeze(0) < cls.num_pos.unsqueeze(1)
        return members[:, :width].contiguous(), valid


class MultiHotIndex(RelationIndex):
    """:class:`RelationIndex` of multi-hot rows (M, L): reference j is a positive of anchor i when they share
    a label, a negative when they share none."""

    def __init__(self, ref_labels: torch.Tensor):
        super().__init__(ref_labels, None)
