"""Functional twins of every loss and the public building blocks (thin: validate, dispatch, reduce).

Each function validates its arguments before any work (:mod:`metricloss._checks`), prepares the inputs
(upcast to at least fp32, normalise), picks a backend (:mod:`metricloss._backend`) and calls the op in
:mod:`metricloss.ops`. Autocast is disabled inside: losses accumulate in fp32 or fp64 whatever the
surrounding autocast region says.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from . import _checks as C
from ._backend import resolve_backend
from .ops import centralized as _centralized
from .ops import cosine as _cosine
from .ops import centroid as _centroid
from .ops import distance as _distance
from .ops import mining as _mining
from .ops import warp as _warp
from .ops.reduction import REDUCTIONS, LossTerms, mask_nonfinite
from .ops.labels import Relation
from .ops.triplet import DEFAULT_FORM, MININGS, TripletForm, triplet_backends, triplet_loss_op, triplet_loss_terms_op

__all__ = ["pairwise_distance", "mine_batch_hard", "triplet_loss", "triplet_loss_terms", "LossTerms", "warp_loss", "normalize_scale",
           "cosine_logits", "norm_softmax_loss", "centralized_ranking_loss", "centroid_triplet_loss"]

Margin = Union[float, str]


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, distance: str = "euclidean",
                      normalize: bool = False) -> torch.Tensor:
    """Dense pairwise distances (small inputs only: the result is (N, M)).

    Args:
        x: (N, D) float tensor.
        y: (M, D) float tensor, or None for ``x`` against itself.
        distance: ``"euclidean"`` (‖x−y‖), ``"squared_euclidean"`` (‖x−y‖²) or ``"cosine"`` (1 − cos).
        normalize: L2-normalise rows first.

    Returns:
        (N, M) distances in fp32 (fp64 for fp64 input), differentiable; exact (refined) near 0, with
        gradient 0 at 0.
    """
    where = "pairwise_distance"
    C.check_embeddings(x, "x", where)
    if y is not None:
        C.check_embeddings(y, "y", where)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"{where}: `y` must have D={x.shape[1]} columns like `x`, got shape {tuple(y.shape)}")
        C.check_same_device([("x", x), ("y", y)], where)
    C.check_option(distance, "distance", _distance.DISTANCES, where)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _distance.pairwise_distance(x, y, distance, normalize)


def _check_triplet_inputs(where: str, embeddings, labels, ref_embeddings, ref_labels, distance, backend,
                          chunk_bytes, mining: str = "batch_hard", relation=None) -> bool:
    C.check_embeddings(embeddings, "embeddings", where)
    C.check_relation(relation, where)
    related = relation is not None
    # multi-hot rows (N, L): positive iff a label in common, negative iff none (every mining); with a
    # relation, labels are whatever it takes (n rows)
    width = labels.shape[1] if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not related else None
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device, multi_hot=width,
                   related=related)
    has_ref = C.check_reference_set(ref_embeddings, ref_labels, embeddings, where, multi_hot=width, related=related)
    if has_ref and width is None and not related:
        C.check_comparable_labels(labels, ref_labels, where=where)
    C.check_option(distance, "distance", _distance.DISTANCES, where)
    C.check_option(backend, "backend", ("auto", "torch", "triton", "reference"), where)
    C.check_chunk_bytes(chunk_bytes, where)
    return has_ref


def _refuse_tracing(where: str) -> None:
    """Mining is data-dependent (which rows are selected, how many chunks): a trace would freeze one batch's
    choices and give wrong values on the next, so tracing raises instead."""
    if torch.jit.is_tracing():
        raise RuntimeError(f"{where}: torch.jit.trace is not supported (mining depends on the data, and a trace "
                           f"would replay one batch's selections); use eager mode or torch.compile")


def _own_rows(where: str, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor],
              ref_labels: Optional[torch.Tensor], ref_self_index: object,
              has_ref: bool) -> Tuple[bool, Optional[torch.Tensor]]:
    """Which reference row is each anchor itself: ``(self_ref, self_index)``.

    * no reference set: the batch is its own reference, anchor i is row i (``self_ref``);
    * ``ref_self_index`` given: validated, (N,) int64 with -1 where an anchor has no own row;
    * ``ref_embeddings is embeddings`` (the same object) without ``ref_self_index``: row i is anchor i,
      as without a reference set (the plain self-referenced path when ``ref_labels is labels`` too);
    * otherwise no anchor has an own row.
    """
    if not has_ref:
        if ref_self_index is not None:
            raise ValueError(f"{where}: `ref_self_index` was given without `ref_embeddings` and `ref_labels`")
        return True, None
    if ref_self_index is not None:
        return False, C.check_self_index(ref_self_index, embeddings.shape[0], ref_embeddings.shape[0],
                                         "ref_self_index", where, device=embeddings.device)
    if ref_embeddings is embeddings:
        if ref_labels is labels:
            return True, None
        return False, torch.arange(embeddings.shape[0], device=embeddings.device)
    return False, None


def mine_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None, distance: str = "euclidean", backend: str = "auto",
                    chunk_bytes: Optional[int] = None,
                    ref_self_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative of every anchor, without an N×M tensor.

    Args:
        embeddings: (N, D) anchors, any float dtype (mined in fp32 at least). Not normalised here
            (``"cosine"`` is scale-free); normalise first if your loss does.
        labels: (N,) integer labels (any integer dtype; compared with ``ref_labels`` in their common dtype),
            or (N, L) multi-hot rows (a label in common: positive; none: negative).
        ref_embeddings: optional (M, D) reference set. Without it the anchors are mined against each other
            and an anchor is never its own positive (excluded by index). A reference set of another float
            dtype is promoted with the anchors to their common dtype.
        ref_labels: (M,) integer labels of ``ref_embeddings`` (given with it).
        distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (see *Design › Backends* in the docs).
        chunk_bytes: memory budget of one anchor chunk's temporaries (default 64 MiB).
        ref_self_index: optional (N,) integer tensor: entry i is the reference row that *is* anchor i
            (never its positive, never its negative; excluded by index), or -1 where it has none. Default:
            ``arange(N)`` when ``ref_embeddings is embeddings``, else no own rows.

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,) indices into the reference set (the batch by default), -1 where
        the anchor has no positive / no negative. Ties resolve to the first index. No gradient.
    """
    where = "mine_batch_hard"
    _refuse_tracing(where)
    has_ref = _check_triplet_inputs(where, embeddings, labels, ref_embeddings, ref_labels, distance, backend,
                                    chunk_bytes)
    self_ref, self_index = _own_rows(where, embeddings, labels, ref_embeddings, ref_labels, ref_self_index, has_ref)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if self_ref:
            return _mining.mine_batch_hard(embeddings, labels, distance=distance, backend=backend,
                                           chunk_bytes=chunk_bytes)
        return _mining.mine_batch_hard(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                                       backend=backend, chunk_bytes=chunk_bytes, ref_self_index=self_index)


_TRIPLET_DOC = """
    Args:
        embeddings: (N, D) anchors, any float dtype; the loss is computed in fp32 (fp64 for fp64).
        labels: (N,) integer class labels (any integer dtype; compared with ``ref_labels`` in their common
            dtype, never by a narrowing cast), or (N, L) multi-hot rows (bool or 0/1; every mining): a
            reference is a positive when it shares a label with the anchor, a negative when it shares none.
            With ``relation``: any tensor of N rows the relation takes.
        ref_embeddings, ref_labels: optional (M, D), (M,) reference set the anchors are mined against
            (cross-batch memory, other ranks). Without it, the batch is its own reference set and an anchor
            is never its own positive. Gradients flow to both. A reference set of another float dtype is
            promoted with the anchors to their common accumulation dtype (fp32 with fp64: fp64).
        margin: float >= 0 for the hinge [m + d_ap − d_an]_+, or ``"soft"`` for softplus(d_ap − d_an).
        mining: ``"batch_hard"`` (hardest positive and negative per anchor), ``"batch_all"`` (every valid
            (a, p, n)) or ``"semi_hard"`` (per (a, p): the nearest negative farther than p, else the
            farthest negative; TF-Addons semantics; "farther" is beyond a relative tie band
            :func:`metricloss.ops.mining.tie_rtol`, and tied nearest negatives go to the first index, so
            exact ties are decided alike on every backend and chunk size).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"`` (1 − cos).
        normalize: L2-normalise embeddings first (default True, as FaceNet and PML).{reduction}
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (dense; small inputs only).
        chunk_bytes: memory budget of one anchor chunk's temporaries (default 64 MiB).
        ref_self_index: optional (N,) integer tensor: entry i is the reference row that *is* anchor i, or -1
            where anchor i has no row there (a memory bank that already holds the current batch, a gathered
            global batch). That row is never a positive nor a negative of anchor i: it is excluded by index,
            never by value. Default: ``arange(N)`` when ``ref_embeddings is embeddings`` (the same object),
            so ``f(x, y, x, y)`` equals ``f(x, y)``; otherwise no anchor has an own row. (PML drops the
            diagonal when ``ref_labels is labels``; here the test is on the embeddings, pass
            ``ref_self_index`` to say it explicitly.)
        positive: batch-hard's positive: ``"hardest"`` (default; the farthest of the class) or ``"easiest"``
            (the nearest that is not a near-duplicate, cosine similarity > ``duplicate_similarity``; Xuan et
            al.'s easy positive). Batch-hard only.
        loss: ``"triplet"`` (default; the margin's hinge or softplus), ``"nca"`` (−log softmax([S_ap, S_an]/T)[0]
            on cosine similarities: EPHN) or ``"sct"`` (selectively contrastive: λ·S_an on hard triplets, S_an >
            S_ap or S_an > ``hard_threshold``; the nca term on the others). ``"nca"`` and ``"sct"`` need
            ``distance="cosine"`` and ignore ``margin``. Batch-hard only.
        temperature: T of ``"nca"`` / ``"sct"`` (default 0.1). hard_threshold: ``"sct"``'s τ (default 0.8).
        hard_weight: ``"sct"``'s λ (default 1.0).
        duplicate_similarity: near-duplicate threshold of ``positive="easiest"`` and of ``"sct"``'s negatives
            (default 0.9999; None: none).
        min_similarity: ``"nca"`` only counts anchors with S_ap and S_an above this (default None; EPHN's
            code uses 0).
        relation: optional callable ``relation(labels[i0:i1], ref_labels) -> (i1 − i0, M)`` bool tensor,
            True where reference j is a positive of anchor i, False where it is a negative (default None:
            label equality, or a label in common for multi-hot rows). Called on chunks of anchors (at most
            the chunk budget's rows, or about 16 MiB of relation cells), on the labels' device; it must not
            depend on the chunk. The anchor's own row stays excluded by index. Every mining and distance;
            the Triton kernel and the dense one-block miner are not used with it (the chunked torch engine
            is).
"""

_REDUCTION_DOC = """
        reduction: ``"mean"`` over valid terms (anchors for batch-hard, (a, p, n) triplets for batch-all,
            (a, p) pairs for semi-hard), ``"mean_nonzero"`` over terms > 0, ``"sum"``, or ``"none"``
            (per-anchor sum of its terms, (N,); zero for anchors without a positive or a negative)."""


def _triplet(where: str, embeddings, labels, ref_embeddings, ref_labels, margin, mining, distance, normalize,
             reduction: Optional[str], backend, chunk_bytes, ref_self_index, form: Optional[TripletForm] = None,
             stats: Optional[dict] = None, relation: Optional[Relation] = None):
    """Validate and run a triplet loss; ``reduction=None`` returns its :class:`LossTerms`. ``form``: a validated
    :class:`TripletForm` (None: the default); ``stats``: a dict the op fills for a collapse monitor;
    ``relation``: a user's label relation (None: label equality, or a label in common for multi-hot rows)."""
    _refuse_tracing(where)
    form = DEFAULT_FORM if form is None else form
    has_ref = _check_triplet_inputs(where, embeddings, labels, ref_embeddings, ref_labels, distance, backend,
                                    chunk_bytes, mining, relation)
    margin = C.check_margin(margin, "margin", where)
    C.check_option(mining, "mining", MININGS, where)
    if reduction is not None:
        C.check_option(reduction, "reduction", REDUCTIONS, where)
    if not isinstance(normalize, bool):
        raise TypeError(f"{where}: `normalize` must be a bool, got {type(normalize).__name__}")
    self_ref, self_index = _own_rows(where, embeddings, labels, ref_embeddings, ref_labels, ref_self_index, has_ref)
    resolved = resolve_backend(backend, embeddings.device, where, implemented=triplet_backends(mining))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if resolved == "reference":
            from . import reference

            args = (embeddings, labels) if self_ref else (embeddings, labels, ref_embeddings, ref_labels)
            kwargs = dict(margin=margin, mining=mining, distance=distance, normalize=normalize,
                          ref_self_index=self_index, form=form, relation=relation)
            out = reference.triplet_loss_terms(*args, **kwargs) if reduction is None else \
                reference.triplet_loss(*args, reduction=reduction, **kwargs)
        else:
            a = _distance.prepare_embeddings(embeddings, distance, normalize)
            if self_ref or ref_embeddings is embeddings:
                r = a
            else:
                a, r = _distance.promote_pair(a, _distance.prepare_embeddings(ref_embeddings, distance, normalize))
            args = (a, labels, r, labels if self_ref else ref_labels, self_ref, margin, mining, distance)
            kwargs = dict(backend=resolved, mining_dtype=_mining.kernel_dtype(embeddings.dtype),
                          self_index=self_index, form=form, stats=stats, relation=relation)
            out = triplet_loss_terms_op(*args, chunk_bytes, **kwargs) if reduction is None else \
                triplet_loss_op(*args, reduction, chunk_bytes, **kwargs)
        guards = (embeddings, ref_embeddings) if has_ref else (embeddings,)
        if reduction is None:
            return LossTerms(mask_nonfinite(out.per_anchor, *guards), out.num_terms, out.num_nonzero)
        return mask_nonfinite(out, *guards)


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                 ref_labels: Optional[torch.Tensor] = None, *, margin: Margin = 0.2, mining: str = "batch_hard",
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", chunk_bytes: Optional[int] = None,
                 ref_self_index: Optional[torch.Tensor] = None, positive: str = "hardest", loss: str = "triplet",
                 temperature: float = 0.1, hard_threshold: float = 0.8, hard_weight: float = 1.0,
                 duplicate_similarity: Optional[float] = 0.9999,
                 min_similarity: Optional[float] = None, relation: Optional[Relation] = None) -> torch.Tensor:
    form = C.check_triplet_form("triplet_loss", mining, distance, normalize, positive, loss, temperature,
                                hard_threshold, hard_weight, duplicate_similarity, min_similarity)
    return _triplet("triplet_loss", embeddings, labels, ref_embeddings, ref_labels, margin, mining, distance,
                    normalize, reduction, backend, chunk_bytes, ref_self_index, form, relation=relation)


triplet_loss.__doc__ = """Triplet loss with on-the-fly mining, exact and O(chunk·M) in memory.
""" + _TRIPLET_DOC.format(reduction=_REDUCTION_DOC) + """
    Returns:
        A scalar loss (or (N,) for ``"none"``) in fp32/fp64. With no valid term it is 0 and still
        connected to the graph (zero gradients). NaN or Inf anywhere in the inputs gives a NaN loss.

    Only anchors with at least one positive and one negative contribute. Distances that enter the loss
    are exact: batch-hard recomputes the two selected distances from the differences; batch-all and
    semi-hard use Gram-expansion blocks whose cancellation-prone small entries are recomputed from the
    differences (:data:`metricloss.ops.distance.REFINE_RATIO`).
    """


def triplet_loss_terms(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                       ref_labels: Optional[torch.Tensor] = None, *, margin: Margin = 0.2,
                       mining: str = "batch_hard", distance: str = "euclidean", normalize: bool = True,
                       backend: str = "auto", chunk_bytes: Optional[int] = None,
                       ref_self_index: Optional[torch.Tensor] = None, positive: str = "hardest",
                       loss: str = "triplet", temperature: float = 0.1, hard_threshold: float = 0.8,
                       hard_weight: float = 1.0, duplicate_similarity: Optional[float] = 0.9999,
                       min_similarity: Optional[float] = None, relation: Optional[Relation] = None) -> LossTerms:
    form = C.check_triplet_form("triplet_loss_terms", mining, distance, normalize, positive, loss, temperature,
                                hard_threshold, hard_weight, duplicate_similarity, min_similarity)
    return _triplet("triplet_loss_terms", embeddings, labels, ref_embeddings, ref_labels, margin, mining, distance,
                    normalize, None, backend, chunk_bytes, ref_self_index, form, relation=relation)


triplet_loss_terms.__doc__ = """The unreduced pieces of :func:`triplet_loss`, for callers that reduce them
    themselves (across ranks, over accumulated steps).
""" + _TRIPLET_DOC.format(reduction="") + """
    Returns:
        :class:`~metricloss.ops.reduction.LossTerms` ``(per_anchor (N,), num_terms (), num_nonzero ())``:
        ``per_anchor`` is ``triplet_loss(..., reduction="none")`` (differentiable w.r.t. the anchors and the
        reference set), ``num_terms`` the count ``"mean"`` divides by, ``num_nonzero`` the count
        ``"mean_nonzero"`` divides by (int64). ``terms.reduce(r)`` equals ``triplet_loss(..., reduction=r)``;
        summing the pieces over ranks first gives the loss of the union. For batch-all and semi-hard the
        gradient is prepared in the forward pass and only rescaled by backward when the upstream gradient
        is the same for every anchor (as after dividing the sum by any count; one device read checks it),
        otherwise recomputed.
    """


# ----------------------------------------------------------------------------------------------------
# WARP
# ----------------------------------------------------------------------------------------------------

RankWeight = Union[str, Callable[[torch.Tensor], torch.Tensor]]

# WARP's backends: the chunked torch path and the Triton kernel (its dense reference is
# :func:`metricloss.reference.warp_loss`, its loop :func:`metricloss.reference.warp_loss_loop`)
WARP_BACKENDS = ("auto", "torch", "triton")


def check_warp_options(where: str, margin: object, max_trials: object, mode: object, rank_weight: object,
                       reduction: object) -> Tuple[float, Optional[int]]:
    """Validate WARP's hyper-parameters (shared by :func:`warp_loss` and :class:`~metricloss.WARPLoss`).

    Returns the margin as a float and ``max_trials`` as an int or None.
    """
    margin = C.check_margin(margin, "margin", where, allow_soft=False)
    max_trials = None if max_trials is None else C.check_positive_int(max_trials, "max_trials", where)
    C.check_option(mode, "mode", _warp.MODES, where)
    C.check_option_or_callable(rank_weight, "rank_weight", _warp.RANK_WEIGHTS, where)
    C.check_option(reduction, "reduction", _warp.REDUCTIONS, where)
    return margin, max_trials


def _check_warp_labels(labels: object, scores: torch.Tensor, where: str) -> None:
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        C.check_multi_hot(labels, tuple(scores.shape), "labels", where, of="scores", device=scores.device)
        return
    if isinstance(labels, torch.Tensor) and labels.dim() != 1:
        raise ValueError(f"{where}: `labels` must be (B,) integer labels or a (B, C) multi-hot matrix, "
                         f"got shape {tuple(labels.shape)}")
    C.check_labels(labels, scores.shape[0], "labels", where, of="scores", device=scores.device)
    C.check_label_range(labels, scores.shape[1], "labels", where)


def warp_loss(scores: torch.Tensor, labels: torch.Tensor, *, margin: float = 1.0, max_trials: Optional[int] = None,
              mode: str = "sampled", rank_weight: RankWeight = "harmonic", reduction: str = "mean",
              generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
    """WARP loss (Weston, Bengio, Usunier 2011) on scores/logits, vectorised over rows and trials.

    Every (row, positive label) pair is an example; its negatives 𝒩 are the labels not in the row's
    positive set. A negative j *violates* when z_j = s_j + (m − s_p) > 0 (strict; the positive itself is
    never a violator). L(k) is the rank weight (harmonic: L(k) = Σ_{j≤k} 1/j, L(0) = 0).

    Provenance (see *Methods › WARP* and *Methods › Provenance* in the docs): the harmonic L and the ⌊(Y − 1)/N⌋ estimate are confirmed by
    independent implementations, not by the paper's text. For multi-hot rows, |𝒩| replaces the paper's
    Y − 1 in the rank estimate and the trial cap. That is our reconstruction [U]: the paper states Y.

    * ``mode="sampled"`` (default, the paper's estimator): draw negatives uniformly and independently,
      *with replacement*, until the first violator or ``max_trials`` draws. If found at trial N, the
      example's loss is L(⌊|𝒩|/N⌋) · z_chosen with the weight a detached constant, so the gradient
      reaches only s_p and s_chosen. The (trial count, violator) pair has exactly the law of the paper's
      sequential loop (:func:`metricloss.reference.warp_loss_loop`). With one label per row it is drawn
      from that law directly: the row's r violators are counted, N is geometric with p = r/|𝒩| truncated
      at ``max_trials``, the violator uniform among the r (two uniforms per row, one RNG call; no host
      read: a native CPU loop over rows, a fixed sequence of torch ops, or one Triton kernel on CUDA).
      Multi-hot rows draw their trials in a few vectorised blocks (one RNG call each, memory bounded by a
      64 MiB budget, ``METRICLOSS_CHUNK_BYTES``), examples leaving as soon as they find their violator;
      examples without any violator are detected exactly and skip drawing.
    * ``mode="exact"``: r = number of violators, loss L(r)/r · Σ_{violators} z_j (0 when r = 0). No RNG.
      Row chunks; multi-hot rows cost one pass per positive (O(K·B·C) for K positives per row).

    Args:
        scores: (B, C) float scores (fp16/bf16/fp32/fp64), C >= 2. Never upcast as a whole.
        labels: (B,) integer labels in [0, C), or a (B, C) multi-hot matrix (bool, or 0/1 float/integer).
            Multi-hot rows without a positive or without a negative contribute 0.
        margin: m >= 0, default 1.0.
        max_trials: trials per example (>= 1), default None = |𝒩| (C − 1 for integer labels). Trials are
            drawn with replacement, so values above |𝒩| are allowed; the rank estimate is then 0 after
            more than |𝒩| trials (weight L(0) = 0 for the built-in weights). Ignored by ``"exact"``.
        mode: ``"sampled"`` or ``"exact"``.
        rank_weight: ``"harmonic"`` (the paper), ``"log"`` (LightFM: min(log(max(k, 1)), 10), so ranks
            0 and 1 weigh 0), or a callable mapping an int64 tensor of ranks to weights of the same shape
            (vectorised; it may be called several times per call and sees 0 for examples without a
            violator, whose weight is ignored). Weights are detached.
        reduction: ``"mean"`` (sum over rows / B; rows without a violator count as 0), ``"sum"`` or
            ``"none"`` ((B,) per row; a multi-hot row sums its positives).
        generator: a ``torch.Generator`` on the scores' device for reproducible draws; None uses the
            global generator. Ignored by ``"exact"``.
        backend: ``"auto"`` (default: the Triton kernel for CUDA scores where it serves the call, sampled
            mode with one label per row and a built-in ``rank_weight``; the torch path otherwise),
            ``"torch"`` or ``"triton"`` (falls back to torch with a warning where it cannot serve). The
            paths draw from the same law; for the same uniforms they pick the same violators, so a loss
            differs between them only by the rounding of the final sum.

    Returns:
        A scalar (or (B,) for ``"none"``) in fp32, fp64 for fp64 scores. NaN or Inf in ``scores`` gives
        a NaN loss. With no violator anywhere the loss is 0 and still connected to the graph.
    """
    where = "warp_loss"
    C.check_scores(scores, "scores", where)
    _check_warp_labels(labels, scores, where)
    margin, max_trials = check_warp_options(where, margin, max_trials, mode, rank_weight, reduction)
    C.check_generator(generator, scores.device, "generator", where)
    C.check_option(backend, "backend", WARP_BACKENDS, where)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        return _warp.warp_loss_op(scores, labels, margin, max_trials, mode, rank_weight, reduction, generator,
                                  backend=backend)


# ----------------------------------------------------------------------------------------------------
# cosine normalize-scale: N-S layer, cosine logits, NormSoftmax, DGCRL (issue 6)
# ----------------------------------------------------------------------------------------------------

Scale = Union[float, torch.Tensor]


def _check_scale(scale: object, where: str, name: str = "scale") -> Scale:
    """A float > 0, or a 0-dim floating tensor (a learnable scale; its sign is not read, to avoid a sync)."""
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(f"{where}: `{name}` must be a float > 0 or a 0-dim floating-point tensor, "
                             f"got a tensor of shape {tuple(scale.shape)} and dtype {scale.dtype}")
        return scale
    return C.check_positive(scale, name, where)


def _check_class_weights(where: str, embeddings: torch.Tensor, weight: object) -> None:
    """``weight`` (C, D) floating, with D = in_features of ``embeddings``, on the same device."""
    C.check_embeddings(weight, "weight", where)
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{where}: `embeddings` has {embeddings.shape[1]} features but `weight` has "
                         f"in_features={weight.shape[1]} (shape {tuple(weight.shape)} is (num_classes, "
                         f"in_features)); they must match")
    C.check_same_device([("embeddings", embeddings), ("weight", weight)], where)


def _check_class_labels(where: str, labels: object, embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device)
    C.check_label_range(labels, num_classes, "labels", where)
    return labels.long()


def _check_class_chunk(class_chunk: object, where: str) -> Optional[int]:
    return None if class_chunk is None else C.check_positive_int(class_chunk, "class_chunk", where)


def normalize_scale(x: torch.Tensor, scale: Scale = 20.0, eps: float = 1e-12) -> torch.Tensor:
    """The Normalize-Scale (N-S) layer: ``s · x / max(‖x‖, eps)`` per row (Zheng et al., AAAI 2019).

    Args:
        x: (B, D) features, any float dtype.
        scale: s, a float > 0 or a 0-dim tensor (e.g. ``log_s.exp()`` for a learnable scale).
        eps: norm floor, placed as in ``F.normalize``: rows with ‖x‖ < eps are divided by eps (a zero row
            stays zero and gets the finite gradient s/eps · g).

    Returns:
        (B, D) in ``x``'s dtype (computed in fp32 at least, autocast or not); every row with ‖x‖ >= eps
        has norm s.
    """
    where = "normalize_scale"
    C.check_embeddings(x, "x", where)
    scale = _check_scale(scale, where)
    eps = C.check_positive(eps, "eps", where)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _cosine.normalize_scale(x, scale, eps).to(x.dtype)


def cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                  scale: Scale = 20.0, margin: float = 0.0) -> torch.Tensor:
    """Cosine-classifier logits ``s · x̂ · Ŵᵀ``; with ``labels`` and ``margin`` > 0 the target logit is
    ``s · (cos − margin)`` (CosFace form).

    Args:
        embeddings: (B, D) features, any float dtype.
        weight: (C, D) class weights (one row per class); never modified.
        labels: optional (B,) integer labels in [0, C), used only for the margin.
        scale: s, a float > 0 or a 0-dim tensor (learnable scale).
        margin: float >= 0, subtracted from the target cosine when ``labels`` are given.

    Returns:
        (B, C) logits in fp32 (fp64 for fp64 inputs): a dense output. For a loss over very many classes
        use :func:`norm_softmax_loss` with ``class_chunk``, which never builds it.
    """
    where = "cosine_logits"
    C.check_embeddings(embeddings, "embeddings", where)
    _check_class_weights(where, embeddings, weight)
    if labels is not None:
        labels = _check_class_labels(where, labels, embeddings, weight.shape[0])
    scale = _check_scale(scale, where)
    margin = C.check_margin(margin, "margin", where, allow_soft=False)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _cosine.cosine_logits(embeddings, weight, scale, labels, margin)


def norm_softmax_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, *,
                      temperature: float = 0.05, class_chunk: Optional[int] = None,
                      reduction: str = "mean") -> torch.Tensor:
    """NormSoftmax (Zhai & Wu, BMVC 2019): cross-entropy on ``x̂ · Ŵᵀ / temperature``.

    Args:
        embeddings: (B, D) features, any float dtype (normalised here).
        labels: (B,) integer labels in [0, C).
        weight: (C, D) class weights (normalised here, never modified). Gradients flow to it.
        temperature: T > 0; the logits are cosines times s = 1/T (default 0.05, s = 20).
        class_chunk: ``None`` (default) builds the dense (B, C) logits and calls ``F.cross_entropy``;
            an int streams the classes in chunks of that many with an online logsumexp, in forward and
            backward, so memory is O(B·class_chunk) instead of O(B·C). Aim for a block of about 4M
            entries, ``class_chunk ≈ 4_000_000 // B`` (see the README's benchmark).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` ((B,) per-row losses).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs); NaN/Inf in the inputs give NaN.
    """
    where = "norm_softmax_loss"
    C.check_embeddings(embeddings, "embeddings", where)
    _check_class_weights(where, embeddings, weight)
    labels = _check_class_labels(where, labels, embeddings, weight.shape[0])
    temperature = C.check_positive(temperature, "temperature", where)
    class_chunk = _check_class_chunk(class_chunk, where)
    C.check_option(reduction, "reduction", _cosine.CE_REDUCTIONS, where)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _cosine.norm_softmax_op(embeddings, labels, weight, 1.0 / temperature, class_chunk, reduction)


def centralized_ranking_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, *,
                             margin: float = 0.2, scale: float = 1.0, decorrelation: str = "auto",
                             decorrelation_weight: float = 1.0, reduction: str = "mean",
                             class_chunk: Optional[int] = None) -> torch.Tensor:
    """Decorrelated global centralized ranking loss (DGCRL, Zheng et al. AAAI 2019): **our reconstruction**.

    The paper's formulas were not available; this implements the reconstruction of *Methods › DGCRL and the N-S layer* in the docs:
    N-S features x̂_i = s·x_i/‖x_i‖ and centres ĉ_k = s·w_k/‖w_k‖, and per sample
    ``ℓ_i = Σ_{k≠y_i} [margin + ‖x̂_i − ĉ_{y_i}‖² − ‖x̂_i − ĉ_k‖²]_+`` against all C centres.

    Args:
        embeddings: (B, D) features, any float dtype.
        labels: (B,) integer labels in [0, C).
        weight: (C, D) class-centre weights. Gradients flow to it.
        margin: float >= 0, in squared-distance units of the radius-s sphere (distances lie in [0, 4s²]):
            the loss at scale s equals s² times the loss at scale 1 with margin/s².
        scale: s > 0, the N-S radius (default 1).
        decorrelation: ``"qr"``: the centres are the Gram-Schmidt orthonormalisation of W's rows (a QR
            re-parametrisation in forward; needs D >= C and linearly independent rows of W, else ``ValueError``:
            Gram-Schmidt of an all-zero or repeated row is undefined and its gradient NaN); ``"penalty"``: plain N-S centres plus
            ``decorrelation_weight · mean((ŴŴᵀ − I)²)``; ``"none"``; ``"auto"`` (default): ``"qr"`` when
            D >= C, else ``"penalty"``.
        decorrelation_weight: λ >= 0 of the penalty (ignored unless the penalty is used).
        reduction: ``"mean"`` over the B·(C − 1) (sample, rival class) terms (default), ``"mean_nonzero"``
            over the active ones, ``"sum"``, or ``"none"`` ((B,) per-sample ℓ_i). The penalty is added once
            to a reduced loss, and as λP/B to each entry of ``"none"``.
        class_chunk: ``None`` processes all C classes as one (B, C) block; an int streams them in chunks of
            that many, forward and backward, so no (B, C) tensor is needed.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs); NaN/Inf in the inputs give NaN.
    """
    where = "centralized_ranking_loss"
    C.check_embeddings(embeddings, "embeddings", where)
    _check_class_weights(where, embeddings, weight)
    labels = _check_class_labels(where, labels, embeddings, weight.shape[0])
    margin = C.check_margin(margin, "margin", where, allow_soft=False)
    scale = C.check_positive(scale, "scale", where)
    C.check_option(decorrelation, "decorrelation", _centralized.DECORRELATIONS, where)
    decorrelation_weight = C.check_nonnegative(decorrelation_weight, "decorrelation_weight", where)
    C.check_option(reduction, "reduction", REDUCTIONS, where)
    class_chunk = _check_class_chunk(class_chunk, where)
    num_classes, in_features = weight.shape
    resolved = _centralized.resolve_decorrelation(decorrelation, in_features, num_classes)
    if resolved == "qr" and in_features < num_classes:
        raise ValueError(f"{where}: `decorrelation`='qr' needs in_features >= num_classes (orthonormal "
                         f"centres), got in_features={in_features} < num_classes={num_classes}; "
                         f"use 'penalty' or 'auto'")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _centralized.centralized_ranking_op(embeddings, labels, weight, margin, scale, resolved,
                                                   decorrelation_weight, reduction, class_chunk)


# ----------------------------------------------------------------------------------------------------
# centroid bound (Do et al. CVPR 2019)
# ----------------------------------------------------------------------------------------------------

def _check_centroid_inputs(where: str, embeddings, labels, centroids, num_classes) -> int:
    """Validate the centroid loss's inputs; return C. Reads the label range (one host sync)."""
    C.check_embeddings(embeddings, "embeddings", where)
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device)
    dim = embeddings.shape[1]
    if isinstance(centroids, str):
        if centroids != "onehot":
            raise ValueError(f"{where}: `centroids` must be a (C, D) tensor or 'onehot', got {centroids!r} "
                             f"(build 'kmeans' centroids once with metricloss.ops.centroid.build_centroids, "
                             f"or use CentroidTripletLoss, which stores them)")
        if num_classes is None:
            raise ValueError(f"{where}: `num_classes` is required with centroids='onehot'")
        num = C.check_positive_int(num_classes, "num_classes", where, minimum=2)
        if dim < num:
            raise ValueError(f"{where}: `centroids`='onehot' needs D >= C (one-hot c_m = e_m), got D={dim} < "
                             f"C={num}; use centroids='kmeans' (CentroidTripletLoss) or pass a (C, D) tensor")
    else:
        if not isinstance(centroids, torch.Tensor):
            raise TypeError(f"{where}: `centroids` must be a (C, D) torch.Tensor or 'onehot', "
                            f"got {type(centroids).__name__}")
        if not centroids.is_floating_point():
            raise TypeError(f"{where}: `centroids` must be a floating-point tensor, "
                            f"got dtype {centroids.dtype}")
        if centroids.dim() != 2 or centroids.shape[1] != dim:
            raise ValueError(f"{where}: `centroids` must have shape (C, D) with D={dim} like `embeddings`, "
                             f"got shape {tuple(centroids.shape)}")
        num = centroids.shape[0]
        if num < 2:
            raise ValueError(f"{where}: `centroids` must hold C >= 2 classes (the loss pushes each row away "
                             f"from the other C - 1 centroids), got C={num}")
        if num_classes is not None:
            C.check_positive_int(num_classes, "num_classes", where, minimum=2)  # 4.0 or True: TypeError
        if num_classes is not None and num_classes != num:
            raise ValueError(f"{where}: `num_classes`={num_classes!r} does not match "
                             f"`centroids`.shape[0]={num}")
        C.check_same_device([("embeddings", embeddings), ("centroids", centroids)], where)
    C.check_label_range(labels, num, "labels", where)
    return num


def centroid_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                          centroids: Union[torch.Tensor, str], *, num_classes: Optional[int] = None,
                          reduction: str = "mean", backend: str = "auto",
                          chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Do et al.'s upper bound on the triplet loss with fixed class centroids, linear in the batch size.

    Per row, with C centroids::

        ℓ_i = ‖x_i − c_{y_i}‖ − 1/(3(C − 1)) · Σ_{m ≠ y_i} ‖x_i − c_m‖

    (non-squared Euclidean distances, no hinge, no margin; the paper's constant factor G = 3(C−1)(N/C−1)(N/C)
    is dropped). The loss is not normalised: embeddings are used as given.

    Args:
        embeddings: (B, D) float tensor, any float dtype; the loss is computed in fp32 (fp64 if embeddings
            or centroids are fp64).
        labels: (B,) integer class labels in [0, C).
        centroids: (C, D) float tensor with C >= 2, or ``"onehot"`` for c_m = e_m (needs D >= C and
            ``num_classes``; computed without any GEMM). Gradients flow to a centroid tensor that requires
            grad (the loss's centroids are meant to be fixed: :class:`~metricloss.CentroidTripletLoss` keeps
            them in a buffer).
        num_classes: C; required with ``"onehot"``, optional (checked) with a tensor.
        reduction: ``"mean"`` over rows (default), ``"sum"``, or ``"none"`` (per-row losses, (B,)).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (dense; small inputs only).
        chunk_bytes: memory budget of one tile of distances (default 64 MiB).

    Returns:
        A scalar loss, or (B,) for ``"none"``, in fp32/fp64. NaN or Inf in the embeddings or centroids gives
        a NaN loss.

    Cost O(B·C·D) time and O(B·D + tile) extra memory: no (B, C) matrix. The distance to the own centroid
    is exact (from the difference) with subgradient 0 when a row sits on it; the other distances come from
    Gram tiles whose small entries are recomputed exactly.
    """
    where = "centroid_triplet_loss"
    num = _check_centroid_inputs(where, embeddings, labels, centroids, num_classes)
    C.check_option(reduction, "reduction", _centroid.CENTROID_REDUCTIONS, where)
    C.check_option(backend, "backend", ("auto", "torch", "triton", "reference"), where)
    C.check_chunk_bytes(chunk_bytes, where)
    onehot = isinstance(centroids, str)
    resolved = resolve_backend(backend, embeddings.device, where, implemented=_centroid.centroid_backends(onehot))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if resolved == "reference":
            from . import reference

            loss = reference.centroid_triplet_loss(embeddings, labels, centroids, num_classes=num,
                                                   reduction=reduction)
        else:
            dtype = _distance.accumulation_dtype(
                embeddings.dtype if onehot else torch.promote_types(embeddings.dtype, centroids.dtype))
            c = None if onehot else centroids.to(dtype)
            loss = _centroid.centroid_triplet_loss_op(embeddings.to(dtype), labels, c, num, reduction,
                                                      chunk_bytes, backend=resolved)
        # A non-finite embedding reaches its row (its own distance) and a non-finite centroid every row
        # (through the own distance or the sum), so checking the result is enough: ±inf becomes NaN, and no
        # O(B·D) pass over the inputs.
        return mask_nonfinite(loss, loss)


# ----------------------------------------------------------------------------------------------------
# retrieval toolbox (Taha 2021, issue 14): SVMax regulariser, two-head loss
# ----------------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402

from .ops import svmax as _svmax  # noqa: E402

__all__ += ["mean_singular_value", "svmax_bounds", "svmax_regularizer", "two_head_loss"]


def _check_bool(value: object, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: `{name}` must be a bool, got {type(value).__name__}")
    return value


def mean_singular_value(embeddings: torch.Tensor, normalize: bool = True, method: str = "auto") -> torch.Tensor:
    """SVMax's s_μ: the mean of the singular values of the (L2-normalised) batch of embeddings.

    With E the (b, d) batch (rows L2-normalised when ``normalize``) and r = min(b, d)::

        s_μ = (σ_1 + … + σ_r) / r

    It lies in :func:`svmax_bounds` (b, d) for unit rows: √b / r when every row points the same way, up to
    √(b / r) when the rows spread evenly (see *Methods › SVMax* in the docs).

    Args:
        embeddings: (b, d) float tensor, any float dtype; computed in fp32 at least (fp64 for fp64).
        normalize: L2-normalise rows first (``F.normalize``; default True, as the authors). Without it the
            bounds do not apply.
        method: ``"auto"`` (default, = ``"gram"``), ``"gram"`` (square roots of the eigenvalues of the
            smaller Gram matrix, formed in fp64; on CPU as fast as ``"svd"`` for a tall batch's forward,
            1.25× faster forward + backward at b = 4096, d = 512, 4–6× faster when b < d) or ``"svd"``
            (``torch.linalg.svdvals``).

    Returns:
        A () tensor in fp32 (fp64 for fp64 input), differentiable: the gradient w.r.t. the normalised batch
        is U·Vᵀ / r (thin SVD). At a rank-deficient batch the ``"gram"`` route takes the subgradient with
        no null-space part (and never Inf/NaN); for an exactly collapsed batch (all rows parallel) that
        gradient, taken through the normalisation, is 0, while ``"svd"`` returns LAPACK's arbitrary null
        singular vectors. NaN or Inf in ``embeddings`` gives NaN.
    """
    where = "mean_singular_value"
    C.check_embeddings(embeddings, "embeddings", where)
    _check_bool(normalize, "normalize", where)
    C.check_option(method, "method", _svmax.SVMAX_METHODS, where)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        e = _distance.prepare_embeddings(embeddings, "euclidean", normalize)
        # LAPACK refuses non-finite matrices: compute on a finite stand-in and return NaN (no host sync)
        finite = torch.isfinite(e).all()
        value = _svmax.mean_singular_value_op(torch.where(finite, e, torch.zeros_like(e)), method)
        return torch.where(finite, value, torch.full_like(value, float("nan")))


def svmax_bounds(b: int, d: int) -> Tuple[float, float]:
    """``(lower, upper)`` bounds of :func:`mean_singular_value` for a (b, d) batch of unit rows.

    With r = min(b, d): lower = √b / r (all rows collapsed: rank 1, σ_1 = √b), upper = √(b / r) (all r
    singular values equal; ‖E‖_* ≤ √r·‖E‖_F). For b > d: [√b/d, √(b/d)] as in the authors' code; for
    b ≤ d: [1/√b, 1] (orthonormal rows attain 1).

    Args:
        b: batch size, int >= 1.
        d: embedding dimension, int >= 1.
    """
    where = "svmax_bounds"
    b = C.check_positive_int(b, "b", where)
    d = C.check_positive_int(d, "d", where)
    return _svmax.svmax_bounds(b, d)


def svmax_regularizer(embeddings: torch.Tensor, weight: float = 1.0, normalize: bool = True,
                      method: str = "auto") -> torch.Tensor:
    """The SVMax regulariser −weight · s_μ, to add to any loss (maximises the mean singular value).

    Args:
        embeddings: (b, d) float tensor.
        weight: λ >= 0 (default 1.0). The authors give no default; the paper relates λ to the range of the
            ranking loss and to :func:`svmax_bounds`.
        normalize: as :func:`mean_singular_value`.
        method: as :func:`mean_singular_value`.

    Returns:
        A () tensor in fp32 (fp64 for fp64 input).
    """
    weight = C.check_nonnegative(weight, "weight", "svmax_regularizer")
    return -weight * mean_singular_value(embeddings, normalize=normalize, method=method)


TWO_HEAD_MININGS = ("semi_hard", "batch_hard")


def two_head_loss(logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, *,
                  triplet_weight: float = 1.0, margin: Margin = 0.2, mining: str = "semi_hard",
                  distance: str = "squared_euclidean", normalize: bool = True) -> torch.Tensor:
    """The two-head loss (Taha et al., WACV 2020): cross-entropy on the logits + λ · triplet on the embeddings.

    ``F.cross_entropy(logits, labels) + triplet_weight * triplet_loss(embeddings, labels, margin=margin,
    mining=mining, distance=distance, normalize=normalize)``, exactly. The authors' defaults: λ = 1,
    margin 0.2, semi-hard mining (batch-hard as the alternative), squared Euclidean distance on
    L2-normalised embeddings, mean over (a, p) pairs (semi-hard) or anchors (batch-hard).

    Args:
        logits: (B, C) float class scores of the classification head.
        embeddings: (B, D) float embeddings of the embedding head.
        labels: (B,) integer class labels in [0, C).
        triplet_weight: λ >= 0 (default 1.0).
        margin: as :func:`triplet_loss`.
        distance: as :func:`triplet_loss`.
        normalize: as :func:`triplet_loss`.
        mining: ``"semi_hard"`` (default) or ``"batch_hard"``.

    Returns:
        A () tensor in fp32 (fp64 when the logits or embeddings are fp64).
    """
    where = "two_head_loss"
    triplet_weight = C.check_nonnegative(triplet_weight, "triplet_weight", where)
    C.check_option(mining, "mining", TWO_HEAD_MININGS, where)
    ce = two_head_cross_entropy(logits, embeddings, labels, where)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        triplet = triplet_loss(embeddings, labels, margin=margin, mining=mining, distance=distance,
                               normalize=normalize)
        return ce + triplet_weight * triplet


def two_head_cross_entropy(logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                           where: str) -> torch.Tensor:
    """The two-head loss's input checks (the two heads' outputs agree in B and device, labels in range)
    and its cross-entropy term, in fp32 at least and outside autocast; shared by :func:`two_head_loss` and
    :class:`~metricloss.TwoHeadLoss`."""
    C.check_scores(logits, "logits", where)
    C.check_labels(labels, logits.shape[0], "labels", where, of="logits", device=logits.device)
    C.check_embeddings(embeddings, "embeddings", where)
    if embeddings.shape[0] != logits.shape[0]:
        raise ValueError(f"{where}: `embeddings` must have B={logits.shape[0]} rows like `logits`, "
                         f"got shape {tuple(embeddings.shape)}")
    C.check_same_device([("logits", logits), ("embeddings", embeddings)], where)
    C.check_label_range(labels, logits.shape[1], "labels", where)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        # cross_entropy takes int64 (or uint8) targets only; the range is checked above
        return F.cross_entropy(logits.to(_distance.accumulation_dtype(logits.dtype)), labels.long())
