"""Retrieval metrics (docs/methods.md §7), chunked: R@K, full mAP, MAP@R and R-precision.

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

How ranks are found without sorting each gallery row (O(G log G)) or holding a (Q, G) matrix:
similarities of a query chunk are encoded as int64 keys, ``(order-preserving float bits << 32) |
(G − 1 − index)``, so a larger key means "ranked earlier" and ties break by index exactly. The query's
R_q relevant keys are sorted (a short member table, :class:`~metricloss.ops.labels.ClassIndex`), every
gallery key is placed among them with ``searchsorted``, and a per-row histogram of those positions
gives, for each relevant item, the number of gallery items ranked above it: its exact rank.
Cost O(Q·G·(D + log R)) time, O(chunk·G) memory.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _checks as C
from .ops.distance import GramFactors
from .ops.labels import ClassIndex
from .ops.mining import rows_per_chunk

__all__ = ["METRICS", "retrieval_metrics"]

METRICS = ("cosine", "euclidean")

_INDEX_BITS = 32
_SELF_KEY = torch.iinfo(torch.int64).min          # the left-out query: below every real key
_PAD_KEY = torch.iinfo(torch.int64).min + 1       # member-table padding: below every real key, above self


def _order_keys(similarity: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (similarity desc, column index asc) as plain integers descending.

    ``similarity``: a (rows, G) fp32 block the caller no longer needs: it is overwritten (its bits become
    the order-preserving int32). The float32 bit pattern is made order-preserving as a signed int32
    (negative floats have their magnitude bits flipped), shifted to the high half; the low half holds
    ``G − 1 − index``. Temporaries: one int32 block beside the int64 result (12 bytes per element).
    """
    sim = similarity.add_(0.0)  # -0.0 becomes +0.0, so they tie (and break by index)
    bits = sim.view(torch.int32)
    # b ^ 0x7FFFFFFF for negative b only: (b >> 31) is -1 for negatives and 0 otherwise
    bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF))
    g = sim.shape[1]
    keys = bits.to(torch.int64).bitwise_left_shift_(_INDEX_BITS)
    return keys.bitwise_or_((g - 1) - torch.arange(g, device=sim.device, dtype=torch.int64))


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8), *,
                      gallery: Optional[torch.Tensor] = None, gallery_labels: Optional[torch.Tensor] = None,
                      metric: str = "cosine", chunk_bytes: Optional[int] = None,
                      progress: bool = False) -> Dict[str, float]:
    """Retrieval quality of an embedding: R@K, mAP, MAP@R and R-precision.

    Args:
        embeddings: (Q, D) query embeddings, any float dtype (ranked in fp32).
        labels: (Q,) integer labels.
        ks: the K of R@K, each >= 1. Default (1, 2, 4, 8) (CUB/CARS protocol).
        gallery, gallery_labels: optional (G, D), (G,) gallery. Without it the queries are their own
            gallery, each query left out of its own ranking (leave-one-out).
        metric: ``"cosine"`` (rank by cosine similarity, default) or ``"euclidean"`` (by distance).
        chunk_bytes: memory budget of one query chunk (default 64 MiB).
        progress: show a tqdm progress bar over query chunks (needs ``tqdm``).

    Returns:
        ``{"R@1": …, "R@2": …, "mAP": …, "MAP@R": …, "R-precision": …}`` as Python floats, over the
        queries with at least one relevant gallery item (NaN if there is none).
    """
    where = "retrieval_metrics"
    C.check_embeddings(embeddings, "embeddings", where)
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device)
    has_gallery = C.check_reference_set(gallery, gallery_labels, embeddings, where,
                                        names=("gallery", "gallery_labels"))
    C.check_option(metric, "metric", METRICS, where)
    C.check_chunk_bytes(chunk_bytes, where)
    ks = tuple(ks)
    if not ks:
        raise ValueError(f"{where}: `ks` must name at least one K, got ()")
    for k in ks:
        C.check_positive_int(k, "ks", where)

    with torch.no_grad(), torch.autocast(device_type=embeddings.device.type, enabled=False):
        q = embeddings.detach().float()
        g = gallery.detach().float() if has_gallery else q
        if metric == "cosine":
            q = F.normalize(q, dim=1)
            g = F.normalize(g, dim=1) if has_gallery else q
        g_labels = gallery_labels if has_gallery else labels
        return _retrieval_metrics(q, labels, g, g_labels, not has_gallery, ks, metric, chunk_bytes, progress)


def _retrieval_metrics(q: torch.Tensor, labels: torch.Tensor, g: torch.Tensor, g_labels: torch.Tensor,
                       leave_one_out: bool, ks: Iterable[int], metric: str, chunk_bytes: Optional[int],
                       progress: bool) -> Dict[str, float]:
    n_query, n_gallery = q.shape[0], g.shape[0]
    index = ClassIndex(g_labels)
    cls = index.anchor_classes(labels, self_ref=leave_one_out)
    width = max(index.max_count - (1 if leave_one_out else 0), 0)
    # Exact duplicates must tie (and then break by index), but a GEMM may round two identical columns
    # differently. Deduplicated gallery rows get one column each; the block is expanded back by index.
    g_unique, g_inverse = torch.unique(g, dim=0, return_inverse=True)
    expand = g_unique.shape[0] < n_gallery
    if not expand:
        g_unique = g_inverse = None  # no duplicates: do not keep a second (G, D) copy alive
    g_ranked = g_unique if expand else g
    if metric == "cosine":
        # unit rows: the similarity is the plain product, no augmented operands ((G, D) copies) needed
        def similarity_block(s: int, e: int) -> torch.Tensor:
            return torch.mm(q[s:e], g_ranked.T)
    else:
        # the Gram block is d²: smaller is closer, so similarity = −block
        gram = GramFactors(q, g_ranked, "squared_euclidean")

        def similarity_block(s: int, e: int) -> torch.Tensor:
            return gram.raw_block(s, e).neg_()
    # Peak per element: the int64 key with the fp32 block and an int32 temporary while the keys are
    # built (16 bytes), then the int64 key and its int64 position (16 bytes); with duplicates, the
    # unexpanded block lives beside them (+4). Per row: the member table, its keys and the histogram.
    rows = rows_per_chunk(n_gallery, 16 + (4 if expand else 0), chunk_bytes, bytes_per_row=width * 40)
    names = [f"R@{k}" for k in ks] + ["mAP", "MAP@R", "R-precision"]
    k_values = torch.tensor(list(ks), dtype=torch.float64, device=q.device)
    # per-metric sums over the counted queries, then their count; on the device, read once at the end
    totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=q.device)
    starts = range(0, n_query, rows)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("retrieval_metrics(progress=True) needs tqdm: pip install tqdm") from err
        starts = tqdm(starts, desc="retrieval metrics", unit="chunk")
    for s in starts:
        e = min(s + rows, n_query)
        c = cls[s:e]
        if width == 0:  # no query has a relevant gallery item: all lone
            continue
        # 1. keys: larger = ranked earlier; the left-out query sinks below everything
        block = similarity_block(s, e)
        keys = _order_keys(block[:, g_inverse] if expand else block)
        del block  # overwritten by the keys' construction; free it before the positions exist
        if leave_one_out:
            keys[torch.arange(e - s, device=keys.device), torch.arange(s, e, device=keys.device)] = _SELF_KEY
        # 2. the relevant items' keys, ascending, padding first
        members, valid = index.positive_table(c, width)
        rel = torch.where(valid, keys.gather(1, members), torch.full_like(members, _PAD_KEY))
        rel, _ = torch.sort(rel, dim=1)
        # 3. above_i = #{gallery items ranked above the i-th relevant key} = #{k : pos_k >= i + 1},
        #    where pos_k = #{relevant keys < key_k}: a suffix sum of the histogram of pos
        pos = torch.searchsorted(rel, keys)
        del keys
        hist = torch.zeros((e - s, width + 1), dtype=torch.int64, device=pos.device)
        hist.scatter_add_(1, pos, torch.ones((1, 1), dtype=pos.dtype, device=pos.device).expand_as(pos))
        del pos
        suffix = hist.flip(1).cumsum(1).flip(1)             # suffix[b] = Σ_{b' >= b} hist[b']
        rank = (suffix[:, 1:] + 1).double()                  # rank of the relevant key at ascending slot i
        # 4. per query: the n-th best relevant item sits at ascending slot width − n
        num_rel = c.num_pos
        slots = torch.arange(width, device=hist.device)
        is_rel = slots.unsqueeze(0) >= (width - num_rel).unsqueeze(1)
        nth = (width - slots).unsqueeze(0).double()          # n for each slot (valid where is_rel)
        prec = torch.where(is_rel, nth / rank, torch.zeros_like(rank))
        within_r = is_rel & (rank <= num_rel.unsqueeze(1))
        r_q = num_rel.clamp_min(1).double()
        keep = num_rel > 0
        best_rank = rank[:, -1:]
        per_query = torch.cat([(best_rank <= k_values).double(),                       # R@K hits
                               (prec.sum(1) / r_q).unsqueeze(1),                         # AP
                               (torch.where(within_r, prec, torch.zeros_like(prec)).sum(1) / r_q).unsqueeze(1),
                               (within_r.sum(1) / r_q).unsqueeze(1),                    # R-precision
                               torch.ones_like(r_q).unsqueeze(1)], dim=1)               # counted
        totals += (per_query * keep.unsqueeze(1)).sum(0)
    *sums, counted = totals.tolist()
    if counted == 0:
        return {name: float("nan") for name in names}
    return {name: value / counted for name, value in zip(names, sums)}
