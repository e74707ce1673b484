"""Retrieval metrics (see *Methods › Retrieval metrics* in the docs), chunked: R@K, full mAP, MAP@R and R-precision.

Protocol: every query is ranked against a gallery by similarity (cosine by default). Without a separate
gallery the query set is its own gallery and each query is left out of its own ranking (by index).
Ties are broken by index: among equally similar items the lower index ranks first. Exact duplicates in
the gallery always tie: the gallery is deduplicated before the GEMM, because a GEMM may round two
identical columns differently and so order duplicates by rounding noise. Queries without any
relevant gallery item ("lone" queries, R_q = 0) are excluded from every metric, as PML does.

For a query q with R_q relevant items whose ranks are r_1 < r_2 < … < r_{R_q}:

* R@K = 1[r_1 <= K] (a hit rate, as in the DML literature), averaged over queries;
* mAP = mean_q (1/R_q) Σ_n n / r_n (AP normalised by all relevant items);
* MAP@R = mean_q (1/R_q) Σ_{n : r_n <= R_q} n / r_n (Musgrave et al. 2020);
* R-precision = mean_q #{n : r_n <= R_q} / R_q.

How ranks are found without sorting any gallery row (O(G log G)) or holding a (Q, G) matrix: all four
metrics follow from the ranks of the R_q relevant items, and the rank of a relevant item is one plus the
number of gallery items ranked above it. Per query chunk, every similarity becomes an int64 key,
``(row << (32 + b)) | (order-preserving fp32 bits << b) | (G − 1 − index)`` with ``b`` the bits of a
gallery index, so a larger key means "ranked earlier" within a row, ties break by index exactly, and the
keys of all rows of the chunk form one sorted sequence. The R_q relevant keys of each query are sorted
(a short member table, :class:`~metricloss.ops.labels.ClassIndex`), every counted gallery key is placed
among them by one 1-D ``searchsorted`` (O(log R) per item), and a ``bincount`` of those positions gives,
for each relevant item, the number of items above it: its exact rank.

Only the items scored at least as high as the query's lowest relevant item can be above any relevant
item, so on CPU only those are keyed and counted. Three paths give the same ranks (tested, bitwise):

* CPU, native (the default): about one C++ pass per query row over its similarities
  (``metricloss/csrc/retrieval_rank.cpp``, :func:`metricloss.ops.native.retrieval_rank_histogram`, threads
  over rows) gives the same (n, R + 1) histogram of positions among the row's sorted relevant keys. The
  order bits of the items at or above the lowest relevant one are split into up to 16384 equal buckets;
  a bucket that holds no relevant key lies between two consecutive relevant keys, so its items share one
  position and are only counted (a branch-free, vectorised pass where such items are many, a branch per
  item where they are few); the items of the few buckets that hold a relevant key are keyed as above and
  placed exactly. The left-out column is skipped. No temporary the size of the tile.
* CPU, torch (``METRICLOSS_NATIVE=0``, or the extension did not build: one warning names the cause): the
  candidates are found by one comparison pass and ``nonzero`` (on a CPU no device sync), keyed, placed by a
  1-D ``searchsorted`` and counted by ``index_add_``, in pieces of ``chunk_bytes``.
* Other devices: every item is keyed and counted (no data-dependent shape, no sync in the loop), in row
  pieces of ``chunk_bytes``.

Determinism: the similarities are computed by one GEMM per *similarity tile* of
:func:`similarity_tile_rows` query rows, a shape fixed by the query and gallery sizes alone (into one
reused tile buffer); the ranks are exact integer logic, and per-query values are summed in a fixed
order. So the results are bitwise identical for every ``chunk_bytes`` and for the native and torch paths
(a GEMM of another shape may round differently, which would move near-ties between chunkings;
``chunk_bytes`` only sets how many items of a tile the torch paths rank at once).

Non-finite embeddings (NaN or ±Inf in ``embeddings`` or ``gallery``) make every metric NaN, as the losses
return NaN: a corrupted embedding must not look like a plausible score.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _checks as C
from .ops.distance import GramFactors, may_have_duplicate_rows, paired_distance
from .ops.labels import ClassIndex, Relation, RelationIndex, is_multi_hot
from .ops.mining import rows_per_chunk
from .ops.native import retrieval_rank_histogram as native_rank_histogram

__all__ = ["METRICS", "retrieval_metrics", "similarity_tile_rows", "compact_candidates"]

METRICS = ("cosine", "euclidean")

# Named heuristic: one similarity GEMM computes about this many bytes of fp32 similarities. Its shape
# (rows × G) depends on the query and gallery sizes only, never on `chunk_bytes`, so the values do not either.
SIMILARITY_TILE_BYTES = 128 << 20
# Named heuristic: but at least this many query rows, within SIMILARITY_TILE_MAX_BYTES. Every GEMM call
# streams the whole (G, D) gallery, so a thin tile runs it slowly: at G = 1M, D = 128, one thread, the
# 33 rows of 128 MiB ran at about 70 GFLOP/s and 128 rows (512 MiB) at about 105 (benchmarks/metrics_speed.py
# notes). Only galleries above 2**18 items (where 128 MiB holds fewer than 128 rows) get larger tiles.
SIMILARITY_TILE_MIN_ROWS = 128
SIMILARITY_TILE_MAX_BYTES = 512 << 20
# Ranking temporaries per counted item (the budget of `chunk_bytes`): its flat index (8), row (8), column
# (8), value (4), key (8) and position (8), some freed before the next exists.
_BYTES_PER_ITEM = 40


def similarity_tile_rows(n_query: int, n_gallery: int) -> int:
    """Query rows of one similarity GEMM: :data:`SIMILARITY_TILE_BYTES` of fp32, but at least
    :data:`SIMILARITY_TILE_MIN_ROWS` rows within :data:`SIMILARITY_TILE_MAX_BYTES`; at least 1, at most Q.

    Depends on the sizes only, so every ``chunk_bytes`` computes each similarity by the same GEMM call.
    """
    row_bytes = 4 * max(n_gallery, 1)
    rows = max(SIMILARITY_TILE_BYTES // row_bytes, min(SIMILARITY_TILE_MIN_ROWS, SIMILARITY_TILE_MAX_BYTES // row_bytes))
    return max(1, min(n_query, rows))


def compact_candidates(device: torch.device) -> bool:
    """Named heuristic: count only the items scored at least as high as the lowest relevant one.

    On CPU, finding them (one comparison pass and ``nonzero``) costs far less than placing every item
    among the relevant keys. Elsewhere ``nonzero`` would stall the device once per chunk, so every item is
    counted instead (sync-free; the same ranks).
    """
    return device.type == "cpu"


_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def _comparable_labels(labels: torch.Tensor, gallery_labels: Optional[torch.Tensor],
                       where: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Both label tensors as int64 tensors that are equal exactly where the labels are equal.

    Labels are only compared for equality, in a dtype wide enough for both, never cast down: casting 256
    to uint8 (0) or 2**32 + 7 to int32 (7) would merge classes. Every dtype but uint64 converts to int64
    by value; uint64 labels (and unsigned ones meeting them) keep their 64 bits, reinterpreted as int64
    (a bijection, so equality is kept). uint64 cannot meet a signed dtype without loss: refused.
    """
    tensors = [labels] if gallery_labels is None else [labels, gallery_labels]
    if any(t.dtype == torch.uint64 for t in tensors):
        if gallery_labels is not None and not all(t.dtype in _UNSIGNED for t in tensors):
            raise TypeError(f"{where}: `labels` ({labels.dtype}) and `gallery_labels` ({gallery_labels.dtype}) "
                            f"have no common integer dtype that holds both without loss; cast them to one dtype")
        out = [t.to(torch.uint64).view(torch.int64) for t in tensors]
    else:
        out = [t.to(torch.int64) for t in tensors]
    return out[0], (out[1] if gallery_labels is not None else None)


class _Problem:
    """The prepared operands of one call: fp32 queries and (deduplicated) gallery, labels in a common dtype.

    ``similarity(s, e)`` is the (e − s, G) fp32 block of queries s:e (higher = ranked earlier), expanded
    back from the deduplicated gallery columns. The ranking path and the tests' dense reference both read
    similarities through it, tile by tile (:func:`similarity_tile_rows`).

    Euclidean: the similarity is −fp32(‖q − g‖²) of the (power-of-two scaled) fp32 rows, the squared
    distance computed exactly enough (fp64 from the rows' difference) wherever a rank decision depends on
    it. The block comes from one GEMM of the *centred* rows (:class:`~metricloss.ops.distance.GramFactors`:
    translation keeps every distance and removes most of the expansion's cancellation), and
    :meth:`_refine` recomputes from the difference every entry whose value lies within the expansion's
    rigorous error bound of a relevant item's value (see :func:`_gram_error_factor`): every comparison
    against a relevant item, hence every rank, is then the one the exact values give.
    """

    def __init__(self, q: torch.Tensor, labels: torch.Tensor, g: Optional[torch.Tensor],
                 g_labels: Optional[torch.Tensor], metric: str, chunk_bytes: Optional[int] = None,
                 relation: Optional[Relation] = None):
        self.leave_one_out = g is None
        self.labels = labels
        self.g_labels = labels if g is None else g_labels
        self.q = q
        self.g = q if g is None else g
        self.metric = metric
        self.chunk_bytes = chunk_bytes
        self.n_query, self.n_gallery = q.shape[0], self.g.shape[0]
        # Exact duplicates must tie (and then break by index), but a GEMM may round two identical columns
        # differently. Deduplicated gallery rows get one column each; the block is expanded back by index.
        self.expand, self.g_inverse, g_ranked = False, None, self.g
        if may_have_duplicate_rows(self.g):
            g_unique, g_inverse = torch.unique(self.g, dim=0, return_inverse=True)
            self.expand = g_unique.shape[0] < self.n_gallery
            if self.expand:  # no duplicates: no second (G, D) copy kept alive
                g_ranked, self.g_inverse = g_unique, g_inverse
        self.g_ranked = g_ranked
        # multi-hot rows: relevant iff a label in common; each tile's relevant items are a member table from
        # the tile's relation GEMM (MultiHotIndex), the ranking is the same
        # (and a user's relation: the same, with its blocks)
        self.multi_hot = relation is not None or is_multi_hot(labels)
        self.index = RelationIndex(self.g_labels, relation) if self.multi_hot else ClassIndex(self.g_labels)
        self.cls = self.index.anchor_classes(self.labels, self_ref=self.leave_one_out)
        self._width: Optional[int] = None
        self._block: Callable[[int, int, Optional[torch.Tensor]], torch.Tensor]
        if metric == "cosine":
            # unit rows: the similarity is the plain product, no augmented operands ((G, D) copies) needed
            self._block = lambda s, e, out: torch.mm(q[s:e], g_ranked.T, out=out)
        else:
            # the Gram block of the centred rows is d²: smaller is closer, so similarity = −block
            n_rows = q.shape[0] + (0 if g is None else g_ranked.shape[0])
            centre = (q.sum(0) if g is None else q.sum(0) + g_ranked.sum(0)) / max(n_rows, 1)
            q_c = q - centre
            gram = GramFactors(q_c, q_c if g is None and not self.expand else g_ranked - centre, "squared_euclidean")
            # per-entry error bound of the block against −fp32(exact d²): factor·(‖q'‖² + ‖g'‖²) + an
            # absolute term (underflow), split into its query and gallery halves
            self.bound_dtype = torch.float64 if q.device.type != "mps" else torch.float32
            factor = _gram_error_factor(q.shape[1])
            tiny = (q.shape[1] + 8) * 2.0 ** -120
            self.q_slack = gram.a_sq.to(self.bound_dtype).mul_(factor).add_(tiny)
            self.g_slack = gram.r_sq.to(self.bound_dtype).mul_(factor).add_(tiny)
            self.g_slack_max = self.g_slack.max() if self.g_slack.numel() else self.g_slack.new_zeros(())
            self._block = lambda s, e, out: gram.raw_block(s, e, out=out).neg_()
        self.tile_rows = similarity_tile_rows(self.n_query, self.n_gallery)

    @property
    def width(self) -> int:
        """Member-table width: the largest number of relevant gallery items of a query (one host read)."""
        if self._width is None:
            if self.multi_hot:
                self._width = self.index.max_positives(self.cls)
            else:
                self._width = max(self.index.max_count - (1 if self.leave_one_out else 0), 0)
        return self._width

    def similarity(self, s: int, e: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(e − s, G) fp32 similarities of queries s:e; written into ``out`` (a contiguous (e − s, G) fp32
        buffer) if given: the ranking loop reuses one tile buffer, so that no tile pays a fresh allocation
        and its page faults (a third of the time of a (33, 10**6) GEMM). The same values either way."""
        if not self.expand:
            block = self._block(s, e, out)
            if self.metric == "euclidean":
                self._refine(block, s)
            return block
        block = self._block(s, e, None)
        if self.metric == "euclidean":
            self._refine(block, s)
        return torch.index_select(block, 1, self.g_inverse, out=out) if out is not None else block[:, self.g_inverse]

    def _refine(self, block: torch.Tensor, s: int) -> None:
        """Recompute, in place, every entry of the (n, U) euclidean block (deduplicated columns) of queries
        s:s+n whose rank decisions the expansion cannot be trusted with.

        Entry (i, u) has value a (the expansion) and error bound E = q_slack[i] + g_slack[u]: its exact
        value lies in [a − E, a + E]. A comparison of an item with a relevant item can only differ from
        the exact one when their two intervals overlap; so an entry is recomputed when its interval meets
        that of another relevant column of its row, and a relevant entry when any other candidate's does.
        Every other comparison is decided the same by the expansion as by the exact values (strictly: the
        intervals are disjoint). Candidates are the entries at or above the row's lowest relevant value
        minus the widest two bounds (one comparison pass and ``nonzero``); each is placed among its row's
        sorted relevant values by ``searchsorted`` (over-wide intervals, conservatively rounded to fp32,
        only recompute a few more entries). Duplicate gallery rows share one column, so their entries get
        one (bitwise equal) value. Candidates are processed in pieces of ``chunk_bytes``; each entry's
        value does not depend on the piece, so neither do the results.
        """
        n, n_cols = block.shape
        width = self.width
        if n == 0 or n_cols == 0 or width == 0:
            return
        device, wd = block.device, self.bound_dtype
        members, valid = self.index.positive_table(self.cls[s:s + n], width)   # (n, W) gallery columns
        uid = members if self.g_inverse is None else self.g_inverse[members]
        row_ids = torch.arange(n, device=device)
        pair = (row_ids.unsqueeze(1) * n_cols + uid)[valid]                      # relevant (row, column)
        pair = torch.unique(pair) if self.expand else torch.sort(pair).values  # sorted, one per column
        m = pair.shape[0]
        if m == 0:
            return
        r_rows = torch.div(pair, n_cols, rounding_mode="floor")
        r_cols = pair - r_rows * n_cols
        r_val = block[r_rows, r_cols]
        q_slack = self.q_slack[s:s + n]
        # per row: the widest relevant bound and the lowest relevant value (+inf: no relevant column)
        rel_slack = torch.zeros(n, dtype=wd, device=device).scatter_reduce_(0, r_rows, self.g_slack[r_cols], "amax")
        rel_slack += q_slack
        lowest = torch.full((n,), float("inf"), device=device).scatter_reduce_(0, r_rows, r_val, "amin")
        threshold = lowest.to(wd) - (q_slack + self.g_slack_max + rel_slack)
        threshold = torch.nextafter(threshold.float(), torch.tensor(float("-inf"), device=device))
        # the relevant values as keys (row << 32) | order bits, ascending: one sorted sequence
        r_keys, perm = torch.sort(_order_bits(r_val.clone()).bitwise_or_(r_rows.bitwise_left_shift(32)))
        marks = torch.zeros(m + 1, dtype=torch.int64, device=device)
        flat = torch.nonzero((block >= threshold.unsqueeze(1)).view(-1)).squeeze(1)
        piece = rows_per_chunk(1, 12 * 8, self.chunk_bytes)
        down = torch.tensor(float("-inf"), device=device)
        up = torch.tensor(float("inf"), device=device)
        for p in range(0, flat.shape[0], piece):
            idx = flat[p:p + piece]
            rows = torch.div(idx, n_cols, rounding_mode="floor")
            cols = idx - rows * n_cols
            value = block.view(-1)[idx].to(wd)
            half = q_slack[rows] + self.g_slack[cols] + rel_slack[rows]
            shift = rows.bitwise_left_shift(32)
            lo = _order_bits(torch.nextafter((value - half).float(), down)).bitwise_or_(shift)
            hi = _order_bits(torch.nextafter((value + half).float(), up)).bitwise_or_(shift)
            lo_pos = torch.searchsorted(r_keys, lo)
            hi_pos = torch.searchsorted(r_keys, hi, right=True)
            at = torch.searchsorted(pair, idx).clamp_max_(m - 1)
            is_rel = pair[at] == idx
            flag = (hi_pos - lo_pos - is_rel.long()) >= 1
            marks.index_add_(0, lo_pos[flag], torch.ones_like(lo_pos[flag]))
            marks.index_add_(0, hi_pos[flag], torch.full_like(hi_pos[flag], -1))
            other = flag & ~is_rel
            self._recompute(block, s, rows[other], cols[other])
        marked = perm[marks.cumsum(0)[:m] > 0]
        self._recompute(block, s, r_rows[marked], r_cols[marked])

    def _recompute(self, block: torch.Tensor, s: int, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """block[rows, cols] = −fp32(‖q − g‖²) from the (scaled, uncentred) rows' difference, in fp64."""
        step = rows_per_chunk(self.q.shape[1], 3 * 8, self.chunk_bytes)
        for p in range(0, rows.shape[0], step):
            ri, ci = rows[p:p + step], cols[p:p + step]
            exact = paired_distance(self.q[s + ri].to(self.bound_dtype), self.g_ranked[ci].to(self.bound_dtype),
                                    "squared_euclidean")
            block[ri, ci] = exact.float().neg_()

    def tiles(self) -> List[Tuple[int, int]]:
        """The (start, end) query ranges of the similarity GEMMs: fixed by Q and G alone."""
        return [(s, min(s + self.tile_rows, self.n_query)) for s in range(0, self.n_query, self.tile_rows)]


def _prepare(embeddings: torch.Tensor, labels: torch.Tensor, ks: Union[int, Sequence[int]],
             gallery: Optional[torch.Tensor], gallery_labels: Optional[torch.Tensor], metric: str,
             chunk_bytes: Optional[int], where: str,
             relation: Optional[Relation] = None) -> Tuple[_Problem, Tuple[int, ...], torch.Tensor]:
    """Validate the arguments (before any work) and prepare the operands.

    Returns ``(problem, ks, finite)``: ``finite`` is a 0-d bool device tensor (all embeddings finite),
    read with the results so that it costs no extra sync.
    """
    C.check_embeddings(embeddings, "embeddings", where)
    C.check_relation(relation, where)
    related = relation is not None
    # multi-hot rows (Q, L): a gallery item is relevant iff it shares a label with the query
    width = labels.shape[1] if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not related else None
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device, multi_hot=width,
                   related=related)
    has_gallery = C.check_reference_set(gallery, gallery_labels, embeddings, where,
                                        names=("gallery", "gallery_labels"), multi_hot=width, related=related)
    C.check_option(metric, "metric", METRICS, where)
    C.check_chunk_bytes(chunk_bytes, where)
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)  # ks=1 means (1,)
    elif isinstance(ks, (str, bytes, torch.Tensor)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"{where}: `ks` must be an int or a sequence of ints >= 1, got {type(ks).__name__}")
    ks = tuple(ks)
    if not ks:
        raise ValueError(f"{where}: `ks` must name at least one K, got ()")
    ks = tuple(C.check_positive_int(k, "ks", where) for k in ks)
    if width is None and not related:
        labels, gallery_labels = _comparable_labels(labels, gallery_labels if has_gallery else None, where)
    with torch.no_grad(), torch.autocast(device_type=embeddings.device.type, enabled=False):
        finite = torch.isfinite(embeddings.detach()).all()
        if has_gallery:
            finite = finite & torch.isfinite(gallery.detach()).all()
        if metric == "cosine":  # each row by its own power of two: cosine is scale-invariant per row
            q = F.normalize(scale_by_power_of_two(embeddings.detach(), per_row=True), dim=1)
            g = F.normalize(scale_by_power_of_two(gallery.detach(), per_row=True), dim=1) if has_gallery else None
        else:  # one power of two for queries and gallery together: distances scale, ranks stay
            g = gallery.detach() if has_gallery else None
            q, g = scale_by_power_of_two(embeddings.detach(), together_with=g)
        return _Problem(q, labels, g, gallery_labels if has_gallery else None, metric, chunk_bytes,
                        relation), ks, finite


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: Union[int, Sequence[int]] = (1, 2, 4, 8),
                      *, gallery: Optional[torch.Tensor] = None, gallery_labels: Optional[torch.Tensor] = None,
                      metric: str = "cosine", chunk_bytes: Optional[int] = None,
                      progress: bool = False, relation: Optional[Relation] = None) -> Dict[str, float]:
    """Retrieval quality of an embedding: R@K, mAP (full ranking), MAP@R and R-precision.

    Args:
        embeddings: (Q, D) query embeddings, any float dtype (ranked in fp32).
        labels: (Q,) integer labels. With a gallery, ``labels`` and ``gallery_labels`` may have different
            integer dtypes: they are compared in a dtype wide enough for both (int64), never cast down.
            ``uint64`` labels pair only with unsigned ones (TypeError otherwise). Or (Q, L) multi-hot rows
            (bool, or integers / floats holding 0 and 1): a gallery item is relevant to a query when they
            share a label (``gallery_labels`` then (G, L), the same L); a query without any label is lone.
        ks: the K of R@K, an int or a sequence of ints, each >= 1. Default (1, 2, 4, 8) (CUB/CARS protocol).
        gallery: optional (G, D) gallery. Without it the queries are their own gallery, each query left
            out of its own ranking (leave-one-out).
        gallery_labels: (G,) integer labels of ``gallery`` (given with it), or (G, L) multi-hot rows.
        metric: ``"cosine"`` (rank by cosine similarity, default) or ``"euclidean"`` (by distance).
        chunk_bytes: memory budget of the torch paths' ranking temporaries of one piece of a tile
            (default 64 MiB, or ``METRICLOSS_CHUNK_BYTES``); the native CPU kernel needs none. The results
            do not depend on it (bitwise): the similarities are computed in tiles of
            :func:`similarity_tile_rows` rows (about 128 MiB of fp32; at least 128 rows, within 512 MiB, for
            galleries above 2**18 items), a shape set by Q and G alone; a tile is ranked in pieces of the
            budget. Peak memory O(rows · G), never (Q, G): one tile, plus on the torch CPU path its
            candidate list (8 bytes per candidate, usually a few % of the tile's items) and one piece.
        progress: show a tqdm progress bar over the similarity tiles (needs ``tqdm``).
        relation: optional callable ``relation(labels_chunk, gallery_labels) -> (c, G)`` bool tensor, True
            where a gallery item is relevant to the query (default None: label equality, or a label in common
            for multi-hot rows). Called on pieces of queries (about 16 MiB of cells each), never on Q × G at
            once; the labels are then any tensors of Q and G rows.

    Returns:
        ``{"R@1": …, "R@2": …, "mAP": …, "MAP@R": …, "R-precision": …}`` as Python floats, over the
        queries with at least one relevant gallery item (NaN if there is none). Every value is NaN when
        ``embeddings`` or ``gallery`` holds a NaN or ±Inf (checked on the device, read with the results:
        no extra sync).

    Cost: one GEMM per tile, O(Q·G·D) time, plus one pass over the tile and O(log R) per counted item.
    On CPU the ranking runs in the native kernel (``metricloss/csrc/retrieval_rank.cpp``, built on first
    use; ``METRICLOSS_NATIVE=0`` or a failed build runs the torch path, with the same results: see
    :mod:`metricloss.ops.native`). Three host reads per call (whether the gallery may hold duplicate rows,
    the largest class size, and the results), whatever the number of chunks. Multi-hot labels add, per
    tile, the relation GEMM of the tile's label rows with the gallery's (O(rows·G·L), in pieces of 16 MiB:
    :data:`~metricloss.ops.labels.MULTI_HOT_PIECE_BYTES`); the relevant items are then ranked as above.
    """
    problem, ks, finite = _prepare(embeddings, labels, ks, gallery, gallery_labels, metric, chunk_bytes,
                                   "retrieval_metrics", relation)
    with torch.no_grad(), torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _retrieval_metrics(problem, ks, finite, chunk_bytes, progress,
                                  compact_candidates(embeddings.device))


# Named constants of the euclidean error bound (see _gram_error_factor).
_UNIT_ROUNDOFF = 2.0 ** -24


def _gram_error_factor(dim: int) -> float:
    """A rigorous bound factor c: |expansion − (−fp32(exact d²))| <= c·(‖q'‖² + ‖g'‖²) (+ an underflow term).

    The GEMM of [q', ‖q'‖², 1] with [−2g', 1, ‖g'‖²] (K = D + 2 terms, any summation order, FMA or not)
    errs by at most γ_K·Σ|terms| <= γ_K·2(‖q'‖² + ‖g'‖²)(1 + γ_D); the fp32 norms add γ_D·(‖q'‖² + ‖g'‖²);
    the rounding of the centred rows q' = fl(q − c) moves d² by at most 4u(1 + u)(‖q'‖² + ‖g'‖²); the fp32
    rounding of the exact value adds u·d² <= 2u(1 + u)(‖q'‖² + ‖g'‖²). Together about (3D + 10)·u; taken as
    (3D + 16)·u·1.01 (u = 2**-24), which also covers the fp64 arithmetic of the exact values and bounds.
    """
    return (3 * dim + 16) * _UNIT_ROUNDOFF * 1.01


def _pow2(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """x · 2**exponent (integer tensor, broadcast) in two exact steps, so that no factor over- or underflows."""
    half = torch.div(exponent, 2, rounding_mode="floor")
    one = torch.ones(half.shape, dtype=x.dtype, device=x.device)
    return x * torch.ldexp(one, half) * torch.ldexp(one, exponent - half)


def scale_by_power_of_two(x: torch.Tensor, *, per_row: bool = False,
                          together_with: Optional[torch.Tensor] = None):
    """The rows of ``x`` as fp32, multiplied by a power of two that brings the largest magnitude into
    [0.5, 1): exact (up to entries more than 2**126 below the largest, which fp32 could not hold next to
    it anyway), so rank-preserving, and no squared norm or distance of the result overflows or
    underflows at fp32 (finite fp32 embeddings at 1e20, or fp64 at 1e300, rank as at 1).

    ``per_row``: each row by its own power (cosine); else one power for all rows, shared with
    ``together_with`` (the gallery, or None), and then ``(x, together_with)`` is returned. Zero rows
    (and non-finite ones, whose metrics are NaN anyway) are left unscaled. Scaled in the input's dtype
    when it is fp64, in fp32 otherwise; the device never syncs.
    """
    def work(t):
        return t if t.dtype == torch.float64 else t.float()
    x = work(x)
    if per_row:
        peak = x.abs().amax(1, keepdim=True) if x.shape[1] else x.new_zeros((x.shape[0], 1))
    else:
        peak = x.abs().amax() if x.numel() else x.new_zeros(())
        if together_with is not None:
            together_with = work(together_with)
            if together_with.numel():
                peak = torch.maximum(peak.double(), together_with.abs().amax().double())
    exponent = torch.frexp(peak.to(x.dtype) if per_row else peak)[1]
    exponent = torch.where(torch.isfinite(peak), exponent, torch.zeros_like(exponent)).long().neg_()
    out = _pow2(x, exponent).float()
    if per_row:
        return out
    return out, (None if together_with is None else _pow2(together_with, exponent).float())


def _order_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) ordering fp32 ``values`` like the floats (−0.0 and +0.0 equal); overwrites them.

    The float32 bit pattern as a signed int32 orders non-negative floats; negative floats have their
    magnitude bits flipped (b ^ 0x7FFFFFFF for b < 0: (b >> 31) is −1 for negatives, 0 otherwise), and
    the offset 2**31 makes every key non-negative.
    """
    v = values.add_(0.0)  # -0.0 becomes +0.0, so they tie (and break by index)
    bits = v.view(torch.int32)
    bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF))
    return bits.to(torch.int64).add_(1 << 31)


def _rank_keys(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, index_bits: int,
               n_gallery: int) -> torch.Tensor:
    """Keys ``(row << (32 + b)) | (order bits << b) | (G − 1 − col)``: ascending = (row asc, rank desc).

    ``values`` (fp32, overwritten), ``rows``, ``cols`` (int64) broadcast together.
    """
    keys = _order_bits(values).bitwise_left_shift_(index_bits)
    keys = keys.bitwise_or_((n_gallery - 1) - cols)
    return keys.bitwise_or_(rows.bitwise_left_shift(32 + index_bits))


def _rank_tile(tile: torch.Tensor, ts: int, problem: _Problem, index: ClassIndex, cls, width: int,
               ks_values: torch.Tensor, compact: bool, chunk_bytes: Optional[int]) -> torch.Tensor:
    """Per-query values ``[R@K hits…, AP, AP@R, R-precision]`` (n, len(ks) + 3) fp64 of queries ts:ts+n.

    ``tile``: their (n, G) fp32 similarities (overwritten by the torch paths). ``cls``: their class facts.
    The rank histogram comes from the native kernel on CPU (:func:`~metricloss.ops.native.retrieval_rank_histogram`)
    or else from :func:`_torch_rank_histogram`: the same exact integers.
    """
    n, n_gallery = tile.shape
    device = tile.device
    index_bits = max(1, (n_gallery - 1).bit_length())
    row_shift = 32 + index_bits
    row_ids = torch.arange(n, device=device)
    members, valid = index.positive_table(cls, width)                        # (n, W) gallery columns
    rel_values = tile.gather(1, members)                                      # bitwise the tile's values
    # The lowest relevant similarity per row (+inf for lone queries: nothing is counted). Taken before
    # the keys overwrite `rel_values`.
    lowest = torch.where(valid, rel_values, torch.full_like(rel_values, float("inf"))).amin(1, keepdim=True)
    # 1. the relevant keys, ascending per row, padding (row << (32 + b), below every real key of the
    #    row) first; flattened they are one sorted sequence over the tile
    rel = _rank_keys(rel_values, row_ids.unsqueeze(1), members, index_bits, n_gallery)
    del rel_values
    rel = torch.where(valid, rel, row_ids.unsqueeze(1).bitwise_left_shift(row_shift).expand_as(rel))
    rel = torch.sort(rel, dim=1).values
    # 2. count the items: hist[row, p] = #{counted items of the row with p relevant keys below theirs};
    #    natively on CPU (one pass per row, no temporaries), else by torch
    hist = native_rank_histogram(tile, rel, lowest, ts if problem.leave_one_out else None, index_bits)
    if hist is None:
        hist = _torch_rank_histogram(tile, ts, rel, lowest, problem.leave_one_out, index_bits, compact, chunk_bytes)
    hist = hist.view(n, width + 1)
    # above_i = #{items ranked above the relevant key at ascending slot i} = #{k : pos_k >= i + 1}
    suffix = hist.flip(1).cumsum(1).flip(1)             # suffix[b] = Σ_{b' >= b} hist[b']
    rank = (suffix[:, 1:] + 1).double()                  # rank of the relevant key at ascending slot i
    # 3. per query: the n-th best relevant item sits at ascending slot width − n
    num_rel = cls.num_pos
    slots = torch.arange(width, device=device)
    is_rel = slots.unsqueeze(0) >= (width - num_rel).unsqueeze(1)
    nth = (width - slots).unsqueeze(0).double()          # n for each slot (valid where is_rel)
    prec = torch.where(is_rel, nth / rank, torch.zeros_like(rank))
    within_r = is_rel & (rank <= num_rel.unsqueeze(1))
    r_q = num_rel.clamp_min(1).double().unsqueeze(1)
    # sums by cumsum: a sequential scan per row, the same order whatever the number of rows (a `sum` may
    # reduce a (1, W) and an (n, W) tensor in different orders); exact for the integer counts anyway
    ap = prec.cumsum(1)[:, -1:]
    ap_r = torch.where(within_r, prec, torch.zeros_like(prec)).cumsum(1)[:, -1:]
    return torch.cat([(rank[:, -1:] <= ks_values).double(), ap / r_q, ap_r / r_q,
                      within_r.sum(1, keepdim=True) / r_q], dim=1)


def _torch_rank_histogram(tile: torch.Tensor, ts: int, rel: torch.Tensor, lowest: torch.Tensor, leave_one_out: bool,
                          index_bits: int, compact: bool, chunk_bytes: Optional[int]) -> torch.Tensor:
    """The torch paths of the rank histogram of :func:`_rank_tile`: (n · (W + 1),) int64, flat.

    ``tile`` (n, G) fp32 (overwritten), ``rel`` (n, W) int64 relevant keys, ascending per row, ``lowest``
    (n, 1). The items are keyed and counted in chunks of the ``chunk_bytes`` budget: pieces of the
    candidate list (compact), or of rows (every item counted); the counts are integers, so the chunking
    changes nothing. Bin of an item = row·(W + 1) + #{relevant keys of the row below the item's key} =
    its ``searchsorted`` position in the flattened ``rel`` (one sorted sequence: row·W + that count) + row.
    """
    n, n_gallery = tile.shape
    device = tile.device
    width = rel.shape[1]
    rel = rel.reshape(-1)
    row_shift = 32 + index_bits
    row_ids = torch.arange(n, device=device)
    hist = torch.zeros(n * (width + 1), dtype=torch.int64, device=device)
    one = torch.ones(1, dtype=torch.int64, device=device)
    if leave_one_out:
        tile[row_ids, row_ids + ts] = float("nan")  # the left-out query: NaN >= x is False, never counted
    if compact:
        flat = torch.nonzero((tile >= lowest).view(-1)).squeeze(1)           # only these can be above
        piece = rows_per_chunk(1, _BYTES_PER_ITEM, chunk_bytes)            # candidates per piece
        for p in range(0, flat.shape[0], piece):
            idx = flat[p:p + piece]
            rows = torch.div(idx, n_gallery, rounding_mode="floor")
            keys = _rank_keys(tile.view(-1)[idx], rows, idx - rows * n_gallery, index_bits, n_gallery)
            pos = torch.searchsorted(rel, keys).add_(rows)
            hist.index_add_(0, pos, one.expand(pos.shape[0]))  # a bincount would read its size from the device
            del idx, rows, keys
        del flat
    else:
        cols = torch.arange(n_gallery, device=device)
        step = rows_per_chunk(n_gallery, _BYTES_PER_ITEM, chunk_bytes)
        for s in range(0, n, step):
            e = min(s + step, n)
            sub = row_ids[s:e].unsqueeze(1)
            keys = _rank_keys(tile[s:e], sub, cols, index_bits, n_gallery)
            if leave_one_out:  # the padding key: placed below every relevant key, counted nowhere
                keys[row_ids[:e - s], row_ids[s:e] + ts] = row_ids[s:e].bitwise_left_shift(row_shift)
            bins = torch.searchsorted(rel, keys.view(-1)).view(e - s, n_gallery).add_(sub)
            del keys
            hist.index_add_(0, bins.view(-1), one.expand(bins.numel()))
            del bins
    return hist


def _retrieval_metrics(problem: _Problem, ks: Tuple[int, ...], finite: torch.Tensor, chunk_bytes: Optional[int],
                       progress: bool, compact: bool) -> Dict[str, float]:
    n_query, n_gallery = problem.n_query, problem.n_gallery
    if n_gallery >= 1 << 31:
        raise ValueError(f"retrieval_metrics: the gallery has {n_gallery} items; at most 2**31 - 1 are supported")
    device = problem.q.device
    index, cls = problem.index, problem.cls
    width = problem.width  # one host sync
    names = [f"R@{k}" for k in ks] + ["mAP", "MAP@R", "R-precision"]
    if width == 0:  # no query has a relevant gallery item: all lone
        return {name: float("nan") for name in names}
    ks_values = torch.tensor(ks, dtype=torch.float64, device=device)
    # per-query values stay on the device; summed once, in one fixed order, at the end
    per_query = torch.zeros((n_query, len(names)), dtype=torch.float64, device=device)
    tiles = problem.tiles()
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("retrieval_metrics(progress=True) needs tqdm: pip install tqdm") from err
        tiles = tqdm(tiles, desc="retrieval metrics", unit="tile")
    buffer = torch.empty((problem.tile_rows, n_gallery), dtype=torch.float32, device=device)  # one tile, reused
    for ts, te in tiles:
        per_query[ts:te] = _rank_tile(problem.similarity(ts, te, out=buffer[:te - ts]), ts, problem, index, cls[ts:te],
                                      width, ks_values, compact, chunk_bytes)
    keep = (cls.num_pos > 0).double()
    totals = torch.cat([keep @ per_query, keep.sum().unsqueeze(0), finite.double().unsqueeze(0)])
    *sums, counted, all_finite = totals.tolist()  # the one read of the results
    if counted == 0 or not all_finite:
        return {name: float("nan") for name in names}
    return {name: value / counted for name, value in zip(names, sums)}
