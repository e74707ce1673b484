"""The triplet op: batch-hard, batch-all and semi-hard on the chunked torch backend.

Layout (Liger style): per-chunk block math → a driver that walks the chunks → an ``autograd.Function``;
:func:`metricloss.functional.triplet_loss` validates, prepares and dispatches to :func:`triplet_loss_op`.

* **batch-hard**: mine indices (:func:`~metricloss.ops.mining.batch_hard_indices`, no gradient), then
  recompute d(a, p*) and d(a, n*) exactly from the gathered rows; autograd sees O(N·D).
* **batch-all** and **semi-hard**: every anchor chunk builds its (c, M) distance block (Gram, exact
  refinement of small entries). Batch-all turns it into per-anchor loss sums and a (c, M) weight block
  W = ∂loss/∂d applied with two GEMMs (:func:`~metricloss.ops.distance.gram_backward`); semi-hard only
  selects from it, then recomputes the selected d(a, p) and d(a, n*) exactly from the rows, and so its
  gradient (O(c·K·D), :class:`PairChunkGrad`).
  With a scalar reduction the gradient is computed in the forward pass (the loss is terminal, so this
  saves a second distance pass) and backward only rescales it; with ``reduction="none"`` the upstream
  gradient weighs anchors differently, so backward recomputes the chunks with W's rows scaled.

Batch-all without enumerating triplets. For anchor a with positive thresholds t_p = d_ap + m:

    Σ_p Σ_n [t_p − d_an]_+ ,   ∂/∂d_ap = k_p = #{n : d_an < t_p},   ∂/∂d_an = −c_n = −#{p : t_p > d_an}.

With few positives (P×K batches) one pass per positive slot over the chunk's negatives accumulates the
hinge sums, k_p and c_n: O(N·M·K). With large classes the thresholds are sorted per anchor and each
negative is placed among them with ``searchsorted``; counts and prefix sums of the sorted thresholds
give c_n, Σ_{t_p > d_an} t_p and, by a cumulative histogram, every k_p: O(N·M·log K). Both are exact.
The soft margin (softplus) has no such decomposition and always takes the per-slot pass.

On CPU (float32/float64) the block preparation, the batch-all epilogue and the semi-hard selection run
in C++ (:mod:`metricloss.ops.native`, built on first use) when it builds; the torch code here is the
fallback (``METRICLOSS_NATIVE=0``) and the reference the native path is tested against. Batch-all over
the batch itself with a numeric margin and 1 to 12 positives per anchor skips the chunks: one native op
takes each unordered pair once for both its anchors (:func:`_run_self_pairs`), 1.5 N×N×D GEMMs instead
of 3.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .distance import (GramFactors, Rows, gram_backward, paired_distance, safe_sqrt, scale_distance_weights_,
                       sqrt_rn, sqrt_rn_)
from .labels import ClassIndex, Relation, RelationIndex, is_multi_hot
from .mining import (batch_hard_dense, batch_hard_fits_one_block, batch_hard_indices, batch_hard_indices_multi_hot,
                     batch_hard_indices_triton, duplicate_key, mask_own_class_, rows_per_chunk, semi_hard_negative_idx, tie_rtol_slots,
                     triton_or_torch_for_multi_hot, triton_or_torch_for_positive, triton_or_torch_for_self_index,
                     use_sorted_semi_hard)
from .native import batch_all_epilogue as native_batch_all_epilogue
from .native import batch_all_fused as native_batch_all_fused
from .native import batch_all_self as native_batch_all_self
from .native import ENV_VAR, fused_tile_rows, native_enabled
from .native import prepare_block as native_prepare_block
from .native import semi_hard_fused as native_semi_hard_fused
from .native import semi_hard_negatives as native_semi_hard_negatives
from .reduction import LossTerms
from .._checks import host_reads_are_free
from .._warn import warn_if_no_valid_multi_hot, warn_if_no_valid_triplet

__all__ = ["MININGS", "LOSS_FORMS", "TripletForm", "DEFAULT_FORM", "triplet_backends", "triplet_loss_op",
           "triplet_loss_terms_op", "use_sorted_batch_all"]

MININGS = ("batch_hard", "batch_all", "semi_hard")

#: What a selected (anchor, positive, negative) costs: ``"triplet"`` the margin's hinge or softplus of
#: d_ap − d_an; ``"nca"`` −log softmax([S_ap, S_an]/T)[0] on cosine similarities (EPHN, Xuan et al. WACV
#: 2020); ``"sct"`` the selectively contrastive form (Xuan et al. ECCV 2020): λ·S_an for a hard triplet
#: (S_an > S_ap or S_an > the hard threshold), the NCA form for an easy one.
LOSS_FORMS = ("triplet", "nca", "sct")


class TripletForm(NamedTuple):
    """How batch-hard selects its positive and what a selected triplet costs (see *Losses › Collapse-proof
    batch-hard* in the docs). Hashable and constant, so ``torch.compile`` specialises on it.

    Attributes:
        positive: ``"hardest"`` (Hermans et al.) or ``"easiest"`` (the most similar positive that is not a
            near-duplicate).
        loss: one of :data:`LOSS_FORMS`.
        temperature: T of the ``"nca"`` / ``"sct"`` softmax over (S_ap, S_an). Default 0.1 (both papers).
        hard_threshold: ``"sct"``: a triplet is hard when S_an > S_ap or S_an > this. Default 0.8.
        hard_weight: ``"sct"``: λ, the weight of λ·S_an on hard triplets. Default 1.0.
        duplicate_similarity: a reference more similar than this to the anchor is a near-duplicate: never an
            easy positive, and ``"sct"`` drops an anchor whose hardest negative is one. Default 0.9999. None:
            no such rule.
        min_similarity: ``"nca"``: drop anchors whose S_ap or S_an is not above this (EPHN's code keeps
            S > 0 only). Default None (keep all).
    """

    positive: str = "hardest"
    loss: str = "triplet"
    temperature: float = 0.1
    hard_threshold: float = 0.8
    hard_weight: float = 1.0
    duplicate_similarity: Optional[float] = 0.9999
    min_similarity: Optional[float] = None


DEFAULT_FORM = TripletForm()

# Above this many positives per anchor, batch-all places negatives among the sorted thresholds with
# searchsorted (cost ~log K per element) instead of one pass per positive (cost ~K passes).
_BATCH_ALL_SORT_MIN_POSITIVES = 12

Margin = Union[float, str]


# Named heuristic: the largest weight block (c, M) of one fused batch-all chunk. Its two gradient GEMMs
# (W̃·r and W̃ᵀ·a) ran fastest with blocks of about this size (measured at N = 4096 and 16384, D = 128,
# one core: 2.72× / 3.20× one matmul at 8 MiB against 3.71× / 3.63× at 64 MiB).
BATCH_ALL_WEIGHT_BYTES = 8 << 20


def use_sorted_batch_all(width: int) -> bool:
    """Named heuristic: threshold-sorting batch-all for anchors with many positives."""
    return width > _BATCH_ALL_SORT_MIN_POSITIVES


def _hinge(z: torch.Tensor, margin: Margin) -> torch.Tensor:
    """h(z): [m + z]_+ for a numeric margin, softplus(z) for ``"soft"``."""
    return F.softplus(z) if margin == "soft" else F.relu(z + margin)


def _nonzero_terms(terms: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Which valid terms count as nonzero: h > 0, or for the soft margin every term with z not NaN
    (softplus(z) > 0 for every z: the count must not depend on whether exp(z) underflowed, which differs
    between torch's exp and C++'s). One rule for every path and the dense reference."""
    return valid & ((z == z) if margin == "soft" else (terms > 0))


# ----------------------------------------------------------------------------------------------------
# batch-hard: indices, then exact recompute with autograd
# ----------------------------------------------------------------------------------------------------

# The mining paths that read no class sizes (the Triton kernel, the dense one-block miner) check the labels
# for a batch without a valid triplet on every CPU call, and on an accelerator on their first call only (one
# device read per process, before any CUDA-graph capture): whether that first check ran, by path.
_LABELS_CHECKED = {"triton": False, "dense": False}


def _check_labels_once(path: str, ref_labels: torch.Tensor, self_ref: bool) -> None:
    """The no-valid-triplet warning of a path that reads no class sizes: every call where host reads are free
    (CPU, eager), the first call of the process elsewhere (one device read)."""
    if torch.compiler.is_compiling():
        return
    if not host_reads_are_free(ref_labels):
        if _LABELS_CHECKED[path]:
            return
        _LABELS_CHECKED[path] = True
    index = ClassIndex(ref_labels)
    warn_if_no_valid_triplet(index.max_count, index.num_refs, self_ref, "triplet_loss (batch_hard)")


def _batch_hard_terms(a: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, ref_labels: torch.Tensor,
                      self_ref: bool, self_index: Optional[torch.Tensor], margin: Margin, distance: str,
                      chunk_bytes: Optional[int], backend: str, mining_dtype: torch.dtype,
                      form: TripletForm = DEFAULT_FORM, stats: Optional[dict] = None,
                      relation: Optional[Relation] = None) -> LossTerms:
    dup_key = duplicate_key(distance, form.duplicate_similarity) if form.positive == "easiest" else None
    with torch.no_grad():
        requested = backend
        multi_hot = relation is not None or is_multi_hot(labels)
        backend = triton_or_torch_for_self_index(backend, self_index, requested, "triplet_loss")
        backend = triton_or_torch_for_positive(backend, form.positive, requested, "triplet_loss")
        backend = triton_or_torch_for_multi_hot(backend, multi_hot, requested, "triplet_loss")
        if backend == "triton":
            _check_labels_once("triton", ref_labels, self_ref)
            pos_idx, neg_idx = batch_hard_indices_triton(a.detach().to(mining_dtype), labels,
                                                         r.detach().to(mining_dtype), ref_labels, self_ref, distance)
            valid = (pos_idx >= 0) & (neg_idx >= 0)
            idx = torch.stack([pos_idx, neg_idx]).clamp_min_(0)
        elif relation is None and batch_hard_fits_one_block(a.shape[0], r.shape[0], a.element_size(), chunk_bytes,
                                                            cpu=host_reads_are_free(a)):
            # small batches: one dense block, no host read (see batch_hard_dense)
            if not multi_hot:
                _check_labels_once("dense", ref_labels, self_ref)
            a_d = a.detach()
            pos_idx, neg_idx, has_pos, has_neg = batch_hard_dense(a_d, a_d if r is a else r.detach(), labels,
                                                                  ref_labels, self_ref, distance, self_index,
                                                                  form.positive, dup_key)
            valid = has_pos & has_neg
            idx = torch.stack([pos_idx, neg_idx])
        elif multi_hot:
            pos_idx, neg_idx = batch_hard_indices_multi_hot(a.detach(), r.detach(), labels, ref_labels, self_ref,
                                                            distance, chunk_bytes, self_index, form.positive, dup_key,
                                                            relation)
            valid = (pos_idx >= 0) & (neg_idx >= 0)
            idx = torch.stack([pos_idx, neg_idx]).clamp_min_(0)
        else:
            index = ClassIndex(ref_labels)
            cls = index.anchor_classes(labels, self_ref, self_index)
            warn_if_no_valid_triplet(index.max_count, index.num_refs, self_ref, "triplet_loss (batch_hard)")
            pos_idx, neg_idx = batch_hard_indices(a.detach(), r.detach(), index, cls, self_ref, distance,
                                                  chunk_bytes, self_index, form.positive, dup_key)
            valid = (pos_idx >= 0) & (neg_idx >= 0)
            idx = torch.stack([pos_idx, neg_idx]).clamp_min_(0)
    if form.loss != "triplet":
        terms, num_terms, num_nonzero, d, kept = _similarity_terms(a, r, idx, valid, form)
    else:
        # r is a: passed as None (one tensor given twice is something torch.compile cannot capture)
        terms, num_terms, num_nonzero, d = BatchHardPairTerms.apply(a, None if r is a else r, idx, valid, margin,
                                                                    distance)[:4]
        kept = valid
    if stats is not None:
        stats.update(d=d.detach(), valid=kept)
    return LossTerms(terms, num_terms, num_nonzero)


def _similarity_terms(a: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, form: TripletForm):
    """The ``"nca"`` / ``"sct"`` terms of the selected pairs on cosine similarities (unit rows), with autograd
    (O(N·D); the mining above is the cost). Returns ``(terms (N,), num_terms, num_nonzero, d (2, N) = 1 − S,
    kept (N,) bool)``.

    1. S_ap, S_an = a·r_p, a·r_n from one gather of both rows.
    2. nca: term = softplus((S_an − S_ap)/T) = −log softmax([S_ap, S_an]/T)[0]; with ``min_similarity`` m
       only anchors with S_ap > m and S_an > m count.
    3. sct: an anchor whose negative is a near-duplicate (S_an > ``duplicate_similarity``) is dropped; hard
       (S_an > S_ap or S_an > τ): term = λ·S_an; easy (S_an < S_ap and S_an < τ): the nca term; a triplet that
       is neither (an exact tie) counts nowhere. num_terms = hard + easy, so "mean" is the papers' division.
    """
    n, dim = a.shape
    rows = r.index_select(0, idx.reshape(-1)).view(2, n, dim)
    sim = torch.linalg.vecdot(a, rows, dim=-1)                                       # 1. (2, N)
    s_ap, s_an = sim[0], sim[1]
    z = (s_an - s_ap) / form.temperature
    if form.loss == "nca":                                                           # 2.
        kept = valid
        if form.min_similarity is not None:
            kept = kept & (s_ap > form.min_similarity) & (s_an > form.min_similarity)
        terms = F.softplus(z).masked_fill(~kept, 0.0)
        nonzero = kept & (z == z)
    else:                                                                            # 3.
        kept = valid
        if form.duplicate_similarity is not None:
            kept = kept & ~(s_an > form.duplicate_similarity)
        hard = kept & ((s_an > s_ap) | (s_an > form.hard_threshold))
        easy = kept & (s_an < s_ap) & (s_an < form.hard_threshold)
        terms = torch.where(hard, form.hard_weight * s_an, F.softplus(z).masked_fill(~easy, 0.0))
        kept = hard | easy
        nonzero = easy | (hard & (terms != 0))  # λ·S_an is negative when S_an < 0: non-zero, counted
    return terms, kept.sum(), nonzero.sum(), (1.0 - sim).detach(), kept


def _pair_distances(a: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, distance: str):
    """d(a_i, r_idx[g, i]) for the (2, N) pairs of ``idx``, both groups from one gather: ``(d (2, N), e, sq,
    rows)`` with rows = r[idx] (2, N, D), e = a − rows and sq = ‖e‖² (None for cosine). Bitwise
    :func:`~metricloss.ops.distance.paired_distance` (the same products and sums, the correctly rounded
    root); differentiable. ``sq`` is None unless the distance is Euclidean (then d = √sq)."""
    n, dim = a.shape
    rows = r.index_select(0, idx.reshape(-1)).view(2, n, dim)
    if distance == "cosine":
        return 1.0 - torch.linalg.vecdot(a, rows, dim=-1), None, None, rows
    e = a - rows
    sq = torch.linalg.vecdot(e, e, dim=-1)
    if distance != "euclidean":
        return sq, e, None, rows  # the distance is sq itself (returned once: one tensor twice trips Dynamo)
    # sq >= 0 or NaN, so the root needs safe_sqrt's guard only for its gradient (which backward writes)
    return sqrt_rn(sq), e, sq, rows


def _batch_hard_from_distances(d: torch.Tensor, valid: torch.Tensor, margin: Margin):
    """(terms (N,), z, active (N,) bool) from the (2, N) distances: term = h(d_ap − d_an), 0 where not valid;
    ``active`` the terms :func:`_nonzero_terms` counts."""
    z = d[0] - d[1]
    terms = _hinge(z, margin).masked_fill(~valid, 0.0)
    active = (terms > 0) if margin != "soft" else (valid & (z == z))
    return terms, z, active


class BatchHardPairTerms(torch.autograd.Function):
    """The batch-hard terms of the selected pairs, exact, with a closed-form gradient: few kernels per step.

    Inputs: prepared anchors ``a`` (N, D) and references ``r`` (M, D) (None: the anchors themselves), ``idx`` (2, N)
    int64 the selected positive (row 0) and negative (row 1) reference rows (any in-range row for an invalid
    anchor), ``valid`` (N,) bool (the anchor has both), the margin and the distance. Outputs: ``(terms (N,),
    num_terms (), num_nonzero ())``, the counts int64 and not differentiable; the rest is internal.

    1. d_ap, d_an from the rows' difference, both pairs in one gather (:func:`_pair_distances`).
    2. term_i = h(d_ap − d_an) (hinge [m + z]_+ or softplus z), 0 where not valid.
    3. Gradient, prepared in the forward pass and scaled by the upstream one in backward. With e = a − r_idx:
       ∂d/∂a = e/d (Euclidean; 0 at d = 0, the subgradient), 2e (squared), −r_idx (cosine on unit rows);
       ∂d/∂r_idx = −∂d/∂a (cosine: −a); ∂term/∂d_ap = −∂term/∂d_an = h'(z) (the hinge's step, or
       sigmoid(z)). For the hinge these are autograd's own roundings (g·h'/d, then ·e).

    A backward run with ``create_graph=True`` recomputes the terms with autograd from the saved inputs, so
    second derivatives (``gradgradcheck``) are autograd's.
    """

    @staticmethod
    def forward(a, r, idx, valid, margin, distance):
        d, e, sq, rows = _pair_distances(a, a if r is None else r, idx, distance)
        terms, z, active = _batch_hard_from_distances(d, valid, margin)
        return terms, valid.sum(), active.sum(), d, z, active, e, sq, rows

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, r, idx, valid, margin, distance = inputs
        terms, num_terms, num_nonzero, d, z, active, e, sq, rows = output
        ctx.mark_non_differentiable(*(t for t in (num_terms, num_nonzero, d, z, active, e, sq, rows) if t is not None))
        ctx.set_materialize_grads(False)  # the internal outputs get no gradient: no zero tensors for them
        ctx.margin, ctx.distance, ctx.self_ref = margin, distance, r is None
        ctx.r_rows = a.shape[0] if r is None else r.shape[0]
        # the gradients to compute: the anchors', and the references' (folded into the anchors' when r is a)
        ctx.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[0] if r is None else ctx.needs_input_grad[1])
        if not any(ctx.needs):
            return
        # h'(z) per anchor, signed per pair: +h' for d_ap, −h' for d_an (0 where not valid)
        with torch.no_grad():
            slope = active.to(terms.dtype) if margin != "soft" else torch.sigmoid(z).masked_fill_(~valid, 0.0)
            signed = torch.stack([slope, slope.neg()])
            if distance == "euclidean":
                # ∂d/∂e = e/d: g·h'/d, 0 where d = 0 (a division by +inf); NaN propagates
                signed = signed / d.masked_fill(sq <= 0, float("inf"))
            elif distance == "squared_euclidean":
                signed = signed * 2.0
        ctx.save_for_backward(signed, rows if distance == "cosine" else e, a, a if r is None else r, idx, valid)

    @staticmethod
    def backward(ctx, grad_terms, *unused):
        none = (None,) * 4
        if grad_terms is None or not any(ctx.needs):
            return (None, None) + none
        signed, pair, a, r, idx, valid = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same terms through autograd, for a differentiable gradient
            with torch.enable_grad():
                # two distinct views, so that each input gets its own partial derivative even when r is a
                a_in, r_in = a.view_as(a), r.view_as(r)
                inputs = [t for t, need in ((a_in, ctx.needs[0]), (r_in, ctx.needs[1])) if need]
                if ctx.distance == "euclidean":
                    # autograd through the root: safe_sqrt's guard keeps √0's infinite slope out
                    d = safe_sqrt(_pair_distances(a_in, r_in, idx, "squared_euclidean")[0])
                else:
                    d = _pair_distances(a_in, r_in, idx, ctx.distance)[0]
                terms = _batch_hard_from_distances(d, valid, ctx.margin)[0]
                grads = iter(torch.autograd.grad(terms, inputs, grad_terms, create_graph=True, allow_unused=True))
            grad_a, grad_r = (next(grads) if ctx.needs[0] else None), (next(grads) if ctx.needs[1] else None)
            if ctx.self_ref:
                return (grad_a + grad_r, None) + none
            return (grad_a, grad_r) + none
        coef = (signed * grad_terms).unsqueeze(-1)                               # (2, N, 1)
        dim = pair.shape[-1]
        if ctx.distance == "cosine":
            grad_a = (coef * pair).sum(0).neg_() if ctx.needs[0] else None       # ∂(1 − a·r)/∂a = −r
            grad_pairs = (coef * a).view(-1, dim)                                # ∂/∂r = −a
        else:
            ge = coef * pair                                                     # (2, N, D): g·h'/d · e
            grad_a = ge[0] + ge[1] if ctx.needs[0] else None
            grad_pairs = ge.view(-1, dim)                                        # ∂/∂r = −ge
        grad_r = None
        if ctx.needs[1]:
            grad_r = grad_pairs.new_zeros((ctx.r_rows, dim)).index_add_(0, idx.reshape(-1), grad_pairs, alpha=-1.0)
            if ctx.self_ref:  # one tensor: its two gradients summed as autograd sums them (bitwise)
                return (grad_a + grad_r, None) + none
        return (grad_a, grad_r) + none


# ----------------------------------------------------------------------------------------------------
# batch-all and semi-hard: per-chunk block math
# ----------------------------------------------------------------------------------------------------

def _batch_all_block(dist: torch.Tensor, d_ap: torch.Tensor, members: torch.Tensor, in_class: torch.Tensor,
                     valid: torch.Tensor, self_cols: Optional[torch.Tensor], margin: Margin, distance: str,
                     want_weights: bool, a_c: torch.Tensor, r: torch.Tensor, scratch: "_Scratch"):
    """Batch-all on one chunk. Overwrites ``dist``. Returns (sums (c,), nonzero counts (c,), DenseChunkGrad or None)."""
    c = dist.shape[0]
    width = members.shape[1]
    # CPU: the whole epilogue in one C++ pass per row (None: the native path does not serve this block)
    native = native_batch_all_epilogue(dist, d_ap, members, in_class, valid, self_cols, margin, distance,
                                       use_sorted_batch_all(width), want_weights)
    if native is not None:
        sums, nonzero, w = native
        return sums, nonzero, (DenseChunkGrad(w) if want_weights else None)
    # The block becomes the negatives' distances: own class (and self) +inf, so it contributes 0 below.
    neg = mask_own_class_(dist, members, in_class, self_cols, float("inf"))
    ninf = torch.full_like(d_ap, float("-inf"))
    pos_weight = torch.zeros_like(d_ap)
    neg_weight = None
    if margin != "soft" and width > 0 and use_sorted_batch_all(width):
        # Sorted thresholds t_p = d_ap + m; -inf pads (invalid slots) sort first, below every distance.
        t_sorted, order = torch.sort(torch.where(valid, d_ap + margin, ninf), dim=1)
        # 1. q_n = #{p : t_p <= d_an}; the thresholds above d_an are the last W - q_n of the row.
        q = torch.searchsorted(t_sorted, neg, right=True)
        above = (width - q).to(dist.dtype)
        # 2. hinge sum per negative: Σ_{t_p > d_an} t_p − c_n·d_an, from prefix sums of finite thresholds
        finite_t = torch.where(torch.isfinite(t_sorted), t_sorted, torch.zeros_like(t_sorted))
        prefix = torch.cat([torch.zeros_like(finite_t[:, :1]), finite_t.cumsum(1)], dim=1)
        above_sum = prefix[:, -1:] - prefix.gather(1, q)
        sums = torch.where(above > 0, above_sum - above * neg, torch.zeros_like(neg)).sum(1)
        # 3. k_p = #{n : q_n <= rank of t_p}: a cumulative histogram of q per row
        hist = torch.zeros((c, width + 1), dtype=dist.dtype, device=dist.device)
        hist.scatter_add_(1, q, torch.ones_like(neg))
        pos_weight.scatter_(1, order, hist.cumsum(1)[:, :width])
        pos_weight = torch.where(valid, pos_weight, torch.zeros_like(pos_weight))
        nonzero = pos_weight.sum(1).to(torch.int64)
        if want_weights:
            neg_weight = above.neg_()
    else:
        # One pass per positive slot over the chunk's negatives, float-only (no bool temporaries).
        sums = torch.zeros(c, dtype=dist.dtype, device=dist.device)
        nonzero = torch.zeros(c, dtype=torch.int64, device=dist.device)
        neg_weight = scratch.get("weight", c).zero_() if want_weights else None
        term = scratch.get("term", c)
        for k in range(width):
            t_k = torch.where(valid[:, k], d_ap[:, k], ninf[:, k]).unsqueeze(1)  # (c, 1)
            if margin == "soft":
                torch.sub(t_k, neg, out=term)                   # z = d_ap − d_an
                slope = torch.sigmoid(term) if want_weights else None
                soft = F.softplus(term)
                sums += soft.sum(1)
                # nonzero: every visible negative of a valid slot (z > -inf), whatever softplus rounded to
                nonzero += (term > float("-inf")).sum(1)
                if want_weights:
                    pos_weight[:, k] = slope.sum(1)
                    neg_weight.sub_(slope)
            else:
                torch.sub(t_k + margin, neg, out=term).clamp_min_(0)  # [m + d_ap − d_an]_+
                sums += term.sum(1)
                if want_weights:
                    slope = term.sign_()                           # 1 where the hinge is active
                    pos_weight[:, k] = slope.sum(1)
                    nonzero += pos_weight[:, k].to(torch.int64)
                    neg_weight.sub_(slope)
                else:
                    nonzero += torch.count_nonzero(term, dim=1)
    if not want_weights:
        return sums, nonzero, None
    # W̃: the negatives scaled by their own distances (own-class cells are 0/inf = 0), the positives'
    # weights scaled by d_ap and scattered into their columns.
    w = scale_distance_weights_(neg_weight, neg, distance)
    pos_w = scale_distance_weights_(torch.where(valid, pos_weight, torch.zeros_like(pos_weight)), d_ap, distance)
    w.scatter_add_(1, members, pos_w)
    return sums, nonzero, DenseChunkGrad(w)


def _semi_hard_block(dist: torch.Tensor, d_ap: torch.Tensor, members: torch.Tensor, in_class: torch.Tensor,
                     valid: torch.Tensor, self_cols: Optional[torch.Tensor], margin: Margin, distance: str,
                     want_weights: bool, a_c: torch.Tensor, r: torch.Tensor, scratch: "_Scratch",
                     a_sq: torch.Tensor, r_sq_max: torch.Tensor):
    """Semi-hard on one chunk. Overwrites ``dist``. Returns (sums (c,), nonzero counts (c,), PairChunkGrad or None).

    The block only selects: the loss recomputes d(a, p) and d(a, n*) exactly from the selected rows
    (O(c·W·D)), and so does the gradient. ``a_sq`` (c,) and ``r_sq_max`` () are the Gram factors' squared
    norms, for the tie band of each slot (:func:`~metricloss.ops.mining.tie_rtol_slots`).
    """
    rtol = tie_rtol_slots(d_ap, a_sq, r_sq_max, a_c.shape[1], a_c.dtype, distance)
    # CPU, few positives: the selection in native passes per row (None: the native path does not serve it)
    neg_idx = native_semi_hard_negatives(dist, d_ap, members, in_class, self_cols,
                                         use_sorted_semi_hard(members.shape[1]), rtol, distance)
    if neg_idx is None:
        neg_idx = semi_hard_negative_idx(dist, d_ap, members, in_class, self_cols,
                                         scratch.get("term", dist.shape[0]), rtol=rtol, distance=distance)
    pairs = _PairRows(a_c, r, members.shape[1], distance)
    return _semi_hard_terms(a_c, r, members, valid, neg_idx, pairs, pairs.gather(0, members), margin, distance,
                            want_weights)


class _PairRows:
    """The reference rows of a chunk's (anchor, positive) and (anchor, negative) pairs, gathered once and
    kept for the gradient: group 0 the positives, group 1 the negatives, each (c, W) pairs.

    ``rows[g]`` (c, W, D) holds r[idx] − a (Euclidean kinds) or r[idx] (cosine): what both the exact
    distance and its gradient are made of, so neither gathers nor subtracts the rows again.
    """

    def __init__(self, a_c: torch.Tensor, r: torch.Tensor, width: int, distance: str):
        self.a_c, self.r, self.distance = a_c, r, distance
        self.rows = torch.empty((2, a_c.shape[0], width, r.shape[1]), dtype=r.dtype, device=r.device)
        self.idx = torch.empty((2, a_c.shape[0], width), dtype=torch.int64, device=r.device)
        self.dist = torch.empty((2, a_c.shape[0], width), dtype=r.dtype, device=r.device)

    def gather(self, group: int, idx: torch.Tensor) -> torch.Tensor:
        """Gather the pairs ``idx`` (c, W) into ``group``; returns their exact distances (c, W), bitwise
        those of :func:`~metricloss.ops.distance.paired_distance` (the same products, of negated
        differences)."""
        self.idx[group] = idx
        rows = self.rows[group]
        torch.index_select(self.r, 0, idx.reshape(-1), out=rows.view(-1, self.r.shape[1]))
        a3 = self.a_c.unsqueeze(1)
        if self.distance == "cosine":
            d = 1.0 - torch.linalg.vecdot(a3, rows, dim=-1)
        elif self.distance == "euclidean":
            e = rows.sub_(a3)
            d = sqrt_rn_(torch.linalg.vecdot(e, e, dim=-1))
        else:
            e = rows.sub_(a3)
            d = torch.linalg.vecdot(e, e, dim=-1)
        self.dist[group] = d
        return d


def _semi_hard_terms(a_c: torch.Tensor, r: torch.Tensor, members: torch.Tensor, valid: torch.Tensor,
                     neg_idx: torch.Tensor, pairs: _PairRows, d_ap: torch.Tensor, margin: Margin, distance: str,
                     want_weights: bool):
    """Semi-hard terms of one chunk from its selected negatives ``neg_idx`` (c, W) and the exact positive
    distances ``d_ap`` (c, W) of ``pairs`` group 0: d(a, n*) computed exactly from the rows (group 1),
    O(c·W·D). Returns as :func:`_semi_hard_block`."""
    d_an = pairs.gather(1, neg_idx)
    z = d_ap - d_an
    terms = torch.where(valid, _hinge(z, margin), torch.zeros_like(z))
    sums, nonzero = terms.sum(1), _nonzero_terms(terms, z, valid, margin).sum(1)
    if not want_weights:
        return sums, nonzero, None
    slope = torch.sigmoid(z) if margin == "soft" else (z + margin > 0).to(z.dtype)
    slope = torch.where(valid, slope, torch.zeros_like(slope))
    return sums, nonzero, PairChunkGrad(pairs, torch.stack([slope, slope.neg()]))


class DenseChunkGrad:
    """A chunk's gradient as a dense scaled weight block W̃ (c, M), applied by :func:`gram_backward`."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def apply(self, a_c: torch.Tensor, r: torch.Tensor, distance: str, grad_r: torch.Tensor, colsum: torch.Tensor,
              row_scale: Optional[torch.Tensor] = None, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the chunk's anchor gradient (c, D); accumulates into ``grad_r``/``colsum``. ``row_scale``
        (c,) weighs rows (upstream gradients); ``row_mask`` (c,) 0/1 drops rows from the accumulation."""
        w = self.w if row_scale is None else self.w.mul_(row_scale.unsqueeze(1))
        return gram_backward(w, a_c, r, distance, grad_r, colsum, row_mask=row_mask)


class PairChunkGrad:
    """A chunk's gradient as a few weighted (anchor, reference) pairs per row, from their gathered rows.

    Gradient of Σ weight_gik · d(a_i, r_{idx_gik}) over the pairs of a :class:`_PairRows` (``weight``
    (2, c, W)), O(c·W·D): with e = r − a, ∂d/∂r = h·e and ∂d/∂a = −h·e, h = 1/d (Euclidean; 0 where d = 0,
    the subgradient) or 2 (squared); cosine (d = 1 − a·r on unit rows): ∂d/∂a = −r, ∂d/∂r = −a.
    """

    def __init__(self, pairs: "_PairRows", weight: torch.Tensor):
        self.pairs, self.weight = pairs, weight

    def apply(self, a_c: torch.Tensor, r: torch.Tensor, distance: str, grad_r: torch.Tensor, colsum: torch.Tensor,
              row_scale: Optional[torch.Tensor] = None, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As :meth:`DenseChunkGrad.apply`."""
        weight = self.weight if row_scale is None else self.weight * row_scale.view(1, -1, 1)
        if row_mask is not None:
            weight = weight * row_mask.view(1, -1, 1)
        # The gathered rows are scaled in place (they are not needed again): a fresh (2, c, W, D)
        # temporary costs its page faults, several times the arithmetic (measured).
        rows, idx = self.pairs.rows, self.pairs.idx
        if distance == "cosine":
            # grad_r: −w·a into each pair's reference row, one (c, D) product per slot
            for g in range(idx.shape[0]):
                for k in range(idx.shape[2]):
                    grad_r.index_add_(0, idx[g, :, k], a_c * weight[g, :, k:k + 1], alpha=-1.0)
            h = weight
        else:
            dist = self.pairs.dist
            if distance == "euclidean":
                h = torch.where(dist > 0, weight / torch.where(dist > 0, dist, torch.ones_like(dist)),
                                torch.zeros_like(dist))
            else:
                h = 2.0 * weight
        scaled = rows.mul_(h.unsqueeze(-1))                    # h·e (cosine: w·r) per pair
        if distance != "cosine":
            grad_r.index_add_(0, idx.reshape(-1), scaled.view(-1, scaled.shape[-1]))
        # grad_a = −Σ_g Σ_k h_gik rows_gik: for few pairs per anchor as adds of (c, D) slices (measured 0.6 ms
        # against 3.0 ms for one strided sum((0, 2)) at (2, 2048, 3, 128), 2 threads)
        groups, width = scaled.shape[0], scaled.shape[2]
        if groups * width > 16 or groups * width == 0:
            return scaled.sum(0).sum(1).neg_()
        out = scaled[0, :, 0].clone()
        for g in range(groups):
            for k in range(width):
                if g or k:
                    out.add_(scaled[g, :, k])
        return out.neg_()


class _Scratch:
    """(rows, M) buffers allocated once per call and reused by every chunk: a fresh (c, M) allocation per
    chunk costs its page faults each time (measured: a third of batch-all's non-GEMM time)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self._buffers: Dict[str, torch.Tensor] = {}

    def get(self, name: str, c: int) -> torch.Tensor:
        """The first ``c`` rows of buffer ``name`` (uninitialised)."""
        if name not in self._buffers:
            self._buffers[name] = torch.empty((self.rows, self.cols), dtype=self.dtype, device=self.device)
        return self._buffers[name][:c]


class _BlockTripletPlan:
    """What every chunk of a batch-all / semi-hard call shares (built once per call)."""

    def __init__(self, a: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor,
                 self_ref: bool, self_index: Optional[torch.Tensor], mining: str, margin: Margin, distance: str,
                 chunk_bytes: Optional[int], relation: Optional[Relation] = None):
        self.self_ref, self.mining, self.margin, self.distance = self_ref, mining, margin, distance
        self.self_index = None if self_ref else self_index
        # multi-hot rows (N, L): positive iff a label in common; the member table is built per chunk from the
        # chunk's relation GEMM (MultiHotIndex), and everything downstream is the single-label engine's
        # (and a user's relation: the same, with its blocks)
        self.multi_hot = relation is not None or is_multi_hot(labels)
        if self.multi_hot:
            self.index = RelationIndex(ref_labels, relation)
            self.cls = self.index.anchor_classes(labels, self_ref, self.self_index)
            self.width = self.index.max_positives(self.cls)
            warn_if_no_valid_multi_hot(self.cls.valid, f"triplet_loss ({mining})")
        else:
            self.index = ClassIndex(ref_labels)
            self.cls = self.index.anchor_classes(labels, self_ref, self.self_index)
            self.width = max(self.index.max_count - (1 if self_ref else 0), 0)
            warn_if_no_valid_triplet(self.index.max_count, self.index.num_refs, self_ref, f"triplet_loss ({mining})")
        # CPU, batch-all over the batch itself with 1 to 12 positives and a hard margin: the whole call in
        # one native op over the upper triangle of the block, each unordered pair once for both its anchors
        # (:func:`~metricloss.ops.native.batch_all_self`). It refines small entries in place (no redo) and
        # needs no canonical columns: duplicate rows get bitwise equal Gram values from the same products
        # (see :func:`_self_positive_distances`) and exact zeros from the refinement.
        self.self_pairs = (mining == "batch_all" and self_ref and not self.multi_hot and margin != "soft" and 0 < self.width
                           and not use_sorted_batch_all(self.width) and _SELF_PAIR_MIN_ROWS <= a.shape[0]
                           and _exact_class_ids(a.shape[0], a.dtype) and native_enabled(a, "self_pairs"))
        self.gram = GramFactors(a, r, distance, canonical=not self.self_pairs)
        # the largest reference norm², for semi-hard's tie band (a 0-dim tensor: no host read)
        self.r_sq_max = self.gram.r_sq.amax() if r.shape[0] else self.gram.r_sq.new_zeros(())
        m, elem = r.shape[0], a.element_size()
        # dist, slack, neg, the weight block and one temporary per element, plus bool/int scratch
        per_ref = 5 * elem + 2 + (16 if (mining == "batch_all" and use_sorted_batch_all(self.width)) else 0)
        per_ref += 16 if (mining == "semi_hard" and self.width > 0) else 0
        per_row = self.width * (24 + 2 * elem)
        # the member table's rows and their differences (exact positive distances); semi-hard also gathers
        # the negative rows and the gradients
        per_row += (8 if mining == "semi_hard" else 2) * self.width * a.shape[1] * elem
        # chunks of the exact (redo) pass and of the torch/unfused path: (c, M) blocks and scratch
        self.exact_rows = rows_per_chunk(m, per_ref, chunk_bytes, bytes_per_row=per_row)
        # CPU: the native fused ops compute each chunk's block themselves, in cache-sized tiles, and reduce
        # each tile while it is in cache (:func:`~metricloss.ops.native.batch_all_fused`, and
        # :func:`~metricloss.ops.native.semi_hard_fused` for few positives). A chunk then holds only the
        # weight block of the gradient (batch-all) or nothing (semi-hard) per reference: far larger
        # chunks (one for a whole batch, typically for semi-hard), so fewer, larger GEMMs and torch ops.
        self.fused = self.self_pairs or (self.width > 0 and m > 0 and self.gram.canon is None
                                         and (mining == "batch_all" or not use_sorted_semi_hard(self.width))
                                         and native_enabled(a, "triplet"))
        self.rows = self.exact_rows
        if self.fused:
            self.rows = rows_per_chunk(m, elem if mining == "batch_all" else 1, chunk_bytes, bytes_per_row=per_row)
            if mining == "batch_all":
                self.rows = min(self.rows, max(1, BATCH_ALL_WEIGHT_BYTES // max(1, m * elem)))
            self.fused_weights = _Scratch(min(self.rows, a.shape[0]), m, a.dtype, a.device)
        if self.self_pairs:
            # panels of at least _SELF_PAIR_MIN_ROWS rows (the op merges a short last one into the one
            # before): the BLAS computes a GEMM of very few rows with another kernel, whose rounding would
            # differ from the band's (measured with MKL: 1 to 5 rows)
            self.self_pair_rows = max(_SELF_PAIR_MIN_ROWS, min(fused_tile_rows(m, elem), _SELF_PAIR_MAX_ROWS,
                                                               self.rows))
        # number of valid terms: triplets (batch-all) or (anchor, positive) pairs (semi-hard)
        valid_pos = self.cls.num_pos * (self.cls.num_neg > 0)
        self.num_terms = (valid_pos * self.cls.num_neg).sum() if mining == "batch_all" else valid_pos.sum()
        self.scratch = _Scratch(min(self.exact_rows, a.shape[0]), m, a.dtype, a.device)

    def own_cols(self, rows: Rows) -> Optional[torch.Tensor]:
        """The anchors' own reference columns (-1: none), or None when no anchor has one."""
        if self.self_ref:
            return torch.arange(rows.start, rows.stop, device=self.gram.a.device) if isinstance(rows, slice) else rows
        return None if self.self_index is None else self.self_index[rows]

    def chunk(self, a: torch.Tensor, r: torch.Tensor, rows: Rows, want_weights: bool, exact: bool):
        """One chunk of anchors ``rows`` (a slice, or an index tensor for the redo pass).

        Returns (sums (c,), nonzero counts (c,), the chunk's gradient (a ``*ChunkGrad``, or None), redo):
        ``redo`` (c,) bool marks anchors with a small (cancellation-prone) *negative* entry; their
        results are only right after :meth:`chunk` with ``exact=True`` (the block refined exactly, which
        reads the device once). Without ``exact`` nothing here reads the device: small *positive*
        entries are exact anyway (the K-wide member table is recomputed from the rows).
        """
        cls = self.cls[rows]
        c = len(cls)
        gram = self.gram
        members, in_class = self.index.positive_table(cls, self.width)
        self_cols = self.own_cols(rows)
        if self.fused and not exact and isinstance(rows, slice):
            fused = self._native_fused(a, r, rows, cls, members, in_class, self_cols, want_weights)
            if fused is None:  # the plan's chunks are sized for the fused op: no unfused fallback per chunk
                raise RuntimeError("metricloss: the native semi-hard path was switched off during a call "
                                   f"({ENV_VAR} changed?); set it before the loss runs")
            return fused
        if not exact and isinstance(rows, slice):
            prepared = self._native_prepare(rows, c, members, in_class, self_cols)
            if prepared is not None:
                dist, redo, small_ap = prepared
                return self._finish_chunk(a, r, rows, cls, dist, redo, small_ap, members, in_class, self_cols,
                                          want_weights, exact)
        u = gram.squared_block(rows, out=self.scratch.get("dist", c))
        if exact:
            u = gram.refine(u, rows)
            redo = None
        else:
            slack = torch.sub(u, gram.r_slack, out=self.scratch.get("slack", c))
            mask_own_class_(slack, members, in_class, self_cols, float("inf"))
            redo = (slack.amin(1) < gram.a_slack[rows]) if u.shape[1] else torch.zeros(c, dtype=torch.bool,
                                                                                        device=u.device)
            small_ap = u.gather(1, members) < gram.a_slack[rows].unsqueeze(1) + gram.r_slack[members]
        dist = gram.finish(u, rows)
        return self._finish_chunk(a, r, rows, cls, dist, redo, None if exact else small_ap, members, in_class,
                                  self_cols, want_weights, exact)

    def _native_fused(self, a: torch.Tensor, r: torch.Tensor, rows: slice, cls, members: torch.Tensor,
                      in_class: torch.Tensor, self_cols: Optional[torch.Tensor], want_weights: bool):
        """CPU: the chunk's block, its preparation and its epilogue in one native op
        (:func:`~metricloss.ops.native.batch_all_fused`; semi-hard: the selection,
        :func:`~metricloss.ops.native.semi_hard_fused`, then the terms from the selected rows). Returns as
        :meth:`chunk`, or None where the native path does not serve it."""
        gram = self.gram
        a_c = a[rows]
        own_start = rows.start if gram.self_ref else None
        if self.mining == "batch_all":
            d_ap = paired_distance(a_c.unsqueeze(1), r[members], self.distance)  # exact, for small entries
            valid = in_class & (cls.num_neg > 0).unsqueeze(1)
            w = self.fused_weights.get("weight", a_c.shape[0]) if want_weights else None
            out = native_batch_all_fused(gram.A[rows], gram.R, gram.a_slack[rows], gram.r_slack, members, in_class,
                                         valid, self_cols, own_start, self.distance, d_ap, self.margin,
                                         use_sorted_batch_all(self.width), w)
            if out is None:
                return None
            sums, nonzero, redo = out
            return sums, nonzero, (DenseChunkGrad(w) if want_weights else None), redo
        pairs = _PairRows(a_c, r, self.width, self.distance)
        d_ap = pairs.gather(0, members)  # exact; the bounds of the small entries, and the loss
        selected = native_semi_hard_fused(gram.A[rows], gram.R, gram.a_slack[rows], gram.r_slack, members, in_class,
                                          self_cols, own_start, self.distance, d_ap,
                                          tie_rtol_slots(d_ap, gram.a_sq[rows], self.r_sq_max, a.shape[1], a.dtype,
                                                         self.distance))
        if selected is None:
            return None
        neg_idx, redo = selected
        valid = in_class & (cls.num_neg > 0).unsqueeze(1)
        sums, nonzero, grad = _semi_hard_terms(a_c, r, members, valid, neg_idx, pairs, d_ap, self.margin,
                                               self.distance, want_weights)
        return sums, nonzero, grad, redo

    def _native_prepare(self, rows: slice, c: int, members: torch.Tensor, in_class: torch.Tensor,
                        self_cols: Optional[torch.Tensor]):
        """CPU: the block as distances plus its ``redo`` and ``small_ap`` tests in one C++ pass per row
        (:func:`~metricloss.ops.native.prepare_block`); None where the native path does not serve it."""
        gram = self.gram
        if not native_enabled(gram.A, "triplet"):
            return None
        u = gram.raw_rows(rows, out=self.scratch.get("dist", c))
        # the positives' cancellation test reads the clamped d² (own cells +inf), before the block is finished
        u_ap = u.gather(1, members).clamp_min_(0)
        if gram.self_ref:
            own = torch.arange(rows.start, rows.stop, device=u.device).unsqueeze(1)
            u_ap = u_ap.masked_fill_(members == own, float("inf"))
        a_slack = gram.a_slack[rows]
        redo = native_prepare_block(u, a_slack, gram.r_slack, members, in_class, self_cols,
                                    rows.start if gram.self_ref else None, self.distance)
        if redo is None:
            return None
        return u, redo, u_ap < a_slack.unsqueeze(1) + gram.r_slack[members]

    def _finish_chunk(self, a, r, rows, cls, dist, redo, small_ap, members, in_class, self_cols, want_weights,
                      exact):
        d_ap = dist.gather(1, members)
        a_c = a[rows]
        if not exact and self.width > 0:
            d_ap = torch.where(small_ap, paired_distance(a_c.unsqueeze(1), r[members], self.distance), d_ap)
        valid = in_class & (cls.num_neg > 0).unsqueeze(1)
        args = (dist, d_ap, members, in_class, valid, self_cols, self.margin, self.distance, want_weights, a_c, r,
                self.scratch)
        if self.mining == "batch_all":
            sums, nonzero, grad = _batch_all_block(*args)
        else:
            sums, nonzero, grad = _semi_hard_block(*args, self.gram.a_sq[rows], self.r_sq_max)
        return sums, nonzero, grad, redo


def _exact_class_ids(n: int, dtype: torch.dtype) -> bool:
    """Whether class ids below ``n`` are exact in ``dtype`` (the self-pair op compares them as floats)."""
    return n < (1 << 24 if dtype == torch.float32 else 1 << 53)


# Rows of a self-pair panel: at least this many (a batch of fewer rows keeps the chunked ops), at most
# so many that the op's packed 8-bit column counts hold a panel with a merged short last one (224 + 31).
_SELF_PAIR_MIN_ROWS = 32
_SELF_PAIR_MAX_ROWS = 224

# Rows per block of the band GEMM of :func:`_self_positive_distances` (its columns: these plus the class
# width on either side); small blocks keep the band's flops low, one batched GEMM keeps the calls few.
_BAND_ROWS = 32


def _self_positive_distances(plan: _BlockTripletPlan, a: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """(N, W) anchor-positive distances of a batch against itself, bitwise those of the chunked path: the Gram
    entry of each (anchor, positive), clamped and √'d, or the exact distance from the rows where it is small
    (u < a_slack_i + r_slack_p), as :meth:`_BlockTripletPlan._finish_chunk` takes them.

    The Gram entries come from one batched GEMM over a band around the diagonal of the class-sorted batch (a
    class's rows are consecutive there, so an anchor's positives lie within ``width`` rows of it):
    O(N·(B + 2W)·D) for blocks of B = :data:`_BAND_ROWS` rows, about 1% of one N×N×D GEMM. Each entry is
    ((a_i·(−2a_p)) + ‖a_i‖²) + ‖a_p‖² (cosine: a_i·(−a_p) + 1), the chunked path's factor product up to the
    order of its last two terms (exact where the BLAS sums a dot product in index order; see
    :func:`native_batch_all_self`). One device read (whether any entry is small).
    """
    n, width, dim = a.shape[0], members.shape[1], a.shape[1]
    gram = plan.gram
    order, inverse = plan.index.order, plan.index.inverse
    step = _BAND_ROWS
    blocks = (n + step - 1) // step
    pad = blocks * step - n
    # the sorted rows in blocks (zero rows pad the last), and the right factor −2a (cosine −a) of the sorted
    # rows with `width` zero rows before and after, so that every block's band is one strided window
    rows = a.new_empty(blocks * step, dim)
    ordered = torch.index_select(a, 0, order, out=rows[:n])
    rows[n:].zero_()
    padded = a.new_empty(n + 2 * width + pad, dim)
    padded[:width].zero_()
    padded[width + n:].zero_()
    if plan.distance == "cosine":
        torch.neg(ordered, out=padded[width:width + n])
    else:
        torch.mul(ordered, -2.0, out=padded[width:width + n])
    rows = rows.view(blocks, step, dim)
    cols = padded.as_strided((blocks, step + 2 * width, dim), (step * dim, dim, 1))
    band = torch.bmm(rows, cols.transpose(1, 2)).view(blocks * step, step + 2 * width)[:n]
    # sorted row q holds column c for sorted position q − (q mod B) − W + c
    offset = inverse[members] - (inverse - inverse % step).unsqueeze(1) + width
    g = band[inverse.unsqueeze(1), offset.clamp_(0, step + 2 * width - 1)]  # padding slots: any in-band entry
    if plan.distance == "cosine":
        u = (g + 1.0).clamp_min_(0)
    else:
        u = ((g + gram.a_sq.unsqueeze(1)) + gram.a_sq[members]).clamp_min_(0)
    small = u < gram.a_slack.unsqueeze(1) + gram.r_slack[members]
    d = sqrt_rn_(u) if plan.distance == "euclidean" else u  # correctly rounded: the op's bounds assume it
    i, k = small.nonzero(as_tuple=True)  # the one device read
    if i.numel():
        d[i, k] = paired_distance(a[i], a[members[i, k]], plan.distance)
    return d


def _run_self_pairs(plan: _BlockTripletPlan, a: torch.Tensor, want_grad: bool,
                    row_scale: Optional[torch.Tensor]):
    """The whole batch-all call over the batch itself in one native op (:func:`native_batch_all_self`):
    returns as :func:`_run_chunks`, with the reference gradient folded into the anchors' (None for ``r``:
    ``a`` and ``r`` are one tensor)."""
    cls = plan.cls
    members, in_class = plan.index.positive_table(cls, plan.width)
    valid = in_class & (cls.num_neg > 0).unsqueeze(1)
    d_ap = _self_positive_distances(plan, a, members)
    out = native_batch_all_self(a, plan.gram.a_sq, plan.gram.a_slack, cls.start, members, valid, d_ap,
                                plan.margin, plan.distance, row_scale, want_grad, plan.self_pair_rows)
    if out is None:
        raise RuntimeError("metricloss: the native batch-all path was switched off during a call "
                           f"({ENV_VAR} changed?); set it before the loss runs")
    sums, nonzero, grad = out
    return sums, nonzero.sum(), grad, None


def _run_chunks(plan: _BlockTripletPlan, a: torch.Tensor, r: torch.Tensor, want_grad: bool,
                row_scale: Optional[torch.Tensor] = None):
    """Walk the anchor chunks: per-anchor sums (N,), the nonzero count () and, with ``want_grad``, the
    gradients of Σ_i row_scale_i · sums_i (``row_scale`` None: all ones) w.r.t. ``a`` and ``r``.

    Host reads: none inside the chunk loop. Anchors with a small negative entry are marked by the loop
    (their gradient contributions masked out) and redone after it, with exact refinement: one device
    read for the whole call (``nonzero`` of the marks), plus one per redo chunk when there are any.
    """
    if plan.self_pairs:
        return _run_self_pairs(plan, a, want_grad, row_scale)
    n = a.shape[0]
    sums = torch.empty(n, dtype=a.dtype, device=a.device)
    nonzero = torch.zeros(n, dtype=torch.int64, device=a.device)
    redo = torch.zeros(n, dtype=torch.bool, device=a.device)
    grad_a = grad_r = colsum = None
    if want_grad:
        grad_a = torch.empty_like(a)
        grad_r = torch.zeros_like(r)
        colsum = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for s in range(0, n, plan.rows):
        e = min(s + plan.rows, n)
        chunk_sums, chunk_nonzero, chunk_grad, chunk_redo = plan.chunk(a, r, slice(s, e), want_grad, exact=False)
        sums[s:e] = chunk_sums
        nonzero[s:e] = chunk_nonzero
        redo[s:e] = chunk_redo
        if want_grad:
            grad_a[s:e] = chunk_grad.apply(a[s:e], r, plan.distance, grad_r, colsum,
                                           row_scale=None if row_scale is None else row_scale[s:e],
                                           row_mask=(~chunk_redo).to(a.dtype))
    redo_rows = redo.nonzero().squeeze(1)  # the one device read of the call
    for t in range(0, redo_rows.numel(), plan.exact_rows):
        rows = redo_rows[t:t + plan.exact_rows]
        chunk_sums, chunk_nonzero, chunk_grad, _ = plan.chunk(a, r, rows, want_grad, exact=True)
        sums[rows] = chunk_sums
        nonzero[rows] = chunk_nonzero
        if want_grad:
            grad_a[rows] = chunk_grad.apply(a[rows], r, plan.distance, grad_r, colsum,
                                            row_scale=None if row_scale is None else row_scale[rows])
    if want_grad:
        grad_r.addcmul_(colsum.unsqueeze(1), r)
    return sums, nonzero.sum(), grad_a, grad_r


# How BlockTripletLoss gets its gradient (a static option of each call):
#  * "uniform": computed in the forward pass (the loss is terminal, so this saves a second distance
#    pass); backward rescales it. Only for an upstream gradient that is the same for every anchor, which
#    the scalar reductions guarantee (the sum's gradient is 1 or 1/count for every anchor).
#  * "check": computed in the forward pass too, and backward checks (one device read) that the upstream
#    gradient is uniform; if not, it recomputes. For loss terms handed to a caller (cross-rank reductions
#    divide by a global count: uniform).
#  * "recompute": backward recomputes the chunks with each anchor's row scaled by its upstream gradient
#    (reduction="none").
GRAD_MODES = ("uniform", "check", "recompute")

_DOUBLE_BACKWARD_MESSAGE = (b"metricloss: the batch-all / semi-hard triplet loss is not twice differentiable "
                            b"(its backward is a closed-form chunked gradient); use mining='batch_hard' or "
                            b"backend='reference' for second derivatives")


def _refuse_double_backward(grads: Tuple[torch.Tensor, ...], inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """Outputs of a backward run with ``create_graph=True``: the same values, but differentiating them
    again raises a clear error instead of silently treating this gradient as a constant."""
    if not torch.is_grad_enabled():
        return grads
    # An exact zero that depends on the Function's inputs (the sum of an empty slice) puts the error on
    # every path from these gradients back to the inputs: a second derivative must pass it. None stays None.
    link = sum(t[:0].sum() for t in inputs if t.requires_grad)
    present = [g + link for g in grads if g is not None]
    delayed = torch._C._functions.DelayedError(_DOUBLE_BACKWARD_MESSAGE, len(present))(*present)
    out = iter(delayed if isinstance(delayed, (tuple, list)) else (delayed,))
    return tuple(None if g is None else next(out) for g in grads)


class BlockTripletLoss(torch.autograd.Function):
    """Batch-all / semi-hard triplet loss over anchor chunks, O(chunk·M) memory, GEMM gradients.

    Inputs: prepared anchors ``a`` (N, D) and references ``r`` (M, D) (the same tensor when the reference
    set is the batch), labels, the own-row index (or None), and the static options. Outputs:
    ``(per_anchor (N,), num_terms (), num_nonzero (), grad_a, grad_r)``; the last two are internal (the
    precomputed unit gradients of the "uniform"/"check" modes, empty otherwise) and not differentiable.

    Written in the ``setup_context`` form, so ``torch.func.grad`` and ``torch.func.grad_and_value`` give
    the autograd gradient. It has no vmap rule: ``torch.func.vmap`` and the transforms built on it
    (``jacrev``, ``jacfwd``, ``hessian``) raise. Not twice differentiable: a second derivative through it
    raises an error. Nothing but saved tensors outlives the forward pass
    (the plan and its scratch buffers are rebuilt if backward needs them), and autograd frees those after
    backward.
    """

    @staticmethod
    def forward(a, r, labels, ref_labels, self_index, self_ref, mining, margin, distance, chunk_bytes, grad_mode,
                relation):
        plan = _BlockTripletPlan(a, r, labels, ref_labels, self_ref, self_index, mining, margin, distance,
                                 chunk_bytes, relation)
        precompute = grad_mode != "recompute"
        sums, nonzero, grad_a, grad_r = _run_chunks(plan, a, r, precompute)
        if not precompute:
            grad_a, grad_r = a.new_empty(0), r.new_empty(0)
        elif grad_r is None:  # folded into grad_a (a is r): a 1-D empty marker, never r's shape
            grad_r = r.new_empty(0)
        return sums, plan.num_terms, nonzero, grad_a, grad_r

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, r, labels, ref_labels, self_index, self_ref, mining, margin, distance, chunk_bytes, grad_mode, relation = \
            inputs
        _, num_terms, nonzero, grad_a, grad_r = output
        ctx.mark_non_differentiable(num_terms, nonzero, grad_a, grad_r)
        # the outputs without a gradient arrive as None, not as zeros (four kernels a step)
        ctx.set_materialize_grads(False)
        ctx.grad_mode = grad_mode
        ctx.options = (self_ref, mining, margin, distance, chunk_bytes, relation)
        ctx.save_for_backward(grad_a, grad_r, a, r, labels, ref_labels, self_index)

    @staticmethod
    def backward(ctx, grad_sums, *unused):
        grad_a, grad_r, a, r, labels, ref_labels, self_index = ctx.saved_tensors
        if grad_sums is None:
            return (None,) * 12
        if ctx.grad_mode == "uniform" or (ctx.grad_mode == "check" and bool((grad_sums == grad_sums[0]).all())):
            g = grad_sums[0]
            folded = grad_r.shape != r.shape
            grads = _refuse_double_backward((grad_a * g, None if folded else grad_r * g), (a, r))
        else:
            self_ref, mining, margin, distance, chunk_bytes, relation = ctx.options
            with torch.no_grad():
                plan = _BlockTripletPlan(a, r, labels, ref_labels, self_ref, self_index, mining, margin, distance,
                                         chunk_bytes, relation)
                _, _, grad_a, grad_r = _run_chunks(plan, a, r, True, row_scale=grad_sums)
            grads = _refuse_double_backward((grad_a, grad_r), (a, r))
        return grads + (None,) * 10


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------

def triplet_backends(mining: str) -> Tuple[str, ...]:
    """Backends :func:`triplet_loss_op` implements for ``mining``: batch-hard mines with a Triton kernel."""
    return ("torch", "triton", "reference") if mining == "batch_hard" else ("torch", "reference")


def triplet_loss_terms_op(a: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, ref_labels: torch.Tensor,
                          self_ref: bool, margin: Margin, mining: str, distance: str, chunk_bytes: Optional[int],
                          backend: str = "torch", mining_dtype: torch.dtype = torch.float32,
                          self_index: Optional[torch.Tensor] = None, grad_mode: str = "check",
                          form: TripletForm = DEFAULT_FORM, stats: Optional[dict] = None,
                          relation: Optional[Relation] = None) -> LossTerms:
    """Unreduced triplet loss on prepared inputs (accumulation dtype, normalised if asked).

    Args:
        a: (N, D) anchors; r: (M, D) references, ``a`` itself when ``self_ref``.
        labels: (N,) ints; ref_labels: (M,) ints (``labels`` when ``self_ref``).
        self_ref: the reference set is the batch (reference i is anchor i, same labels).
        self_index: otherwise, an optional (N,) int64 own reference row per anchor (-1: none), excluded
            from the anchor's positives and negatives by index.
        backend: ``"torch"`` or ``"triton"`` (batch-hard mining only; the loss itself is torch).
        mining_dtype: the dtype the Triton kernel mines in (see :func:`~metricloss.ops.mining.kernel_dtype`).
        grad_mode: how batch-all / semi-hard get their gradient, one of :data:`GRAD_MODES`.
        form: batch-hard's positive and loss form (:class:`TripletForm`; the other minings take the default).
        stats: a dict to fill with the step's selected distances for a collapse monitor (batch-hard:
            ``d`` (2, N) detached d_ap and d_an, ``valid`` (N,) the anchors that count); no extra kernel.
        relation: a user's label relation (:data:`~metricloss.ops.labels.Relation`), or None.

    Returns:
        :class:`~metricloss.ops.reduction.LossTerms`.
    """
    if mining == "batch_hard":
        terms = _batch_hard_terms(a, labels, r, ref_labels, self_ref, self_index, margin, distance, chunk_bytes,
                                  backend, mining_dtype, form, stats, relation)
    else:
        if not (torch.is_grad_enabled() and (a.requires_grad or r.requires_grad)):
            grad_mode = "recompute"  # no backward will run: skip the gradient pass
        sums, num_terms, nonzero, _, _ = BlockTripletLoss.apply(a, r, labels, ref_labels, self_index, self_ref,
                                                                mining, margin, distance, chunk_bytes, grad_mode,
                                                                relation)
        terms = LossTerms(sums, num_terms, nonzero)
    if stats is not None:
        stats.update(num_terms=terms.num_terms, num_nonzero=terms.num_nonzero)
    return terms


def triplet_loss_op(a: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, ref_labels: torch.Tensor,
                    self_ref: bool, margin: Margin, mining: str, distance: str, reduction: str,
                    chunk_bytes: Optional[int], backend: str = "torch",
                    mining_dtype: torch.dtype = torch.float32,
                    self_index: Optional[torch.Tensor] = None, form: TripletForm = DEFAULT_FORM,
                    stats: Optional[dict] = None, relation: Optional[Relation] = None) -> torch.Tensor:
    """Triplet loss on prepared inputs: :func:`triplet_loss_terms_op` reduced with ``reduction``.

    Returns:
        The reduced loss, or per-anchor sums for ``reduction="none"``.
    """
    terms = triplet_loss_terms_op(a, labels, r, ref_labels, self_ref, margin, mining, distance, chunk_bytes,
                                  backend, mining_dtype, self_index,
                                  grad_mode="recompute" if reduction == "none" else "uniform", form=form,
                                  stats=stats, relation=relation)
    return terms.reduce(reduction)
