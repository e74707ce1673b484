"""Functional twins of every loss and the public building blocks (thin: validate, dispatch, reduce).

Each function validates its arguments before any work (:mod:`metricloss._checks`), prepares the inputs
(upcast to at least fp32, normalise), picks a backend (:mod:`metricloss._backend`) and calls the op in
:mod:`metricloss.ops`. Autocast is disabled inside: losses accumulate in fp32 or fp64 whatever the
surrounding autocast region says.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _checks as C
from ._backend import resolve_backend
from .ops import centroid as _centroid
from .ops import distance as _distance
from .ops import mining as _mining
from .ops.reduction import REDUCTIONS, mask_nonfinite
from .ops.triplet import MININGS, triplet_loss_op

__all__ = ["pairwise_distance", "mine_batch_hard", "triplet_loss", "centroid_triplet_loss"]

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
                          chunk_bytes) -> bool:
    C.check_embeddings(embeddings, "embeddings", where)
    C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device)
    has_ref = C.check_reference_set(ref_embeddings, ref_labels, embeddings, where)
    C.check_option(distance, "distance", _distance.DISTANCES, where)
    C.check_option(backend, "backend", ("auto", "torch", "triton", "reference"), where)
    C.check_chunk_bytes(chunk_bytes, where)
    return has_ref


def mine_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None, distance: str = "euclidean", backend: str = "auto",
                    chunk_bytes: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative of every anchor, without an N×M tensor.

    Args:
        embeddings: (N, D) anchors, any float dtype (mined in fp32 at least). Not normalised here
            (``"cosine"`` is scale-free); normalise first if your loss does.
        labels: (N,) integer labels.
        ref_embeddings, ref_labels: optional reference set (M, D), (M,). Without it the anchors are mined
            against each other and an anchor is never its own positive (excluded by index).
        distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (DESIGN.md §4).
        chunk_bytes: memory budget of one anchor chunk's temporaries (default 64 MiB).

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,) indices into the reference set (the batch by default), -1 where
        the anchor has no positive / no negative. Ties resolve to the first index. No gradient.
    """
    where = "mine_batch_hard"
    _check_triplet_inputs(where, embeddings, labels, ref_embeddings, ref_labels, distance, backend, chunk_bytes)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return _mining.mine_batch_hard(embeddings, labels, ref_embeddings, ref_labels, distance=distance,
                                       backend=backend, chunk_bytes=chunk_bytes)


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                 ref_labels: Optional[torch.Tensor] = None, *, margin: Margin = 0.2, mining: str = "batch_hard",
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """Triplet loss with on-the-fly mining, exact and O(chunk·M) in memory.

    Args:
        embeddings: (N, D) anchors, any float dtype; the loss is computed in fp32 (fp64 for fp64).
        labels: (N,) integer class labels.
        ref_embeddings, ref_labels: optional (M, D), (M,) reference set the anchors are mined against
            (cross-batch memory, other ranks). Without it, the batch is its own reference set and an anchor
            is never its own positive. Gradients flow to both.
        margin: float >= 0 for the hinge [m + d_ap − d_an]_+, or ``"soft"`` for softplus(d_ap − d_an).
        mining: ``"batch_hard"`` (hardest positive and negative per anchor), ``"batch_all"`` (every valid
            (a, p, n)) or ``"semi_hard"`` (per (a, p): the nearest negative farther than p, else the
            farthest negative; TF-Addons semantics).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"`` (1 − cos).
        normalize: L2-normalise embeddings first (default True, as FaceNet and PML).
        reduction: ``"mean"`` over valid terms (anchors for batch-hard, (a, p, n) triplets for batch-all,
            (a, p) pairs for semi-hard), ``"mean_nonzero"`` over terms > 0, ``"sum"``, or ``"none"``
            (per-anchor sum of its terms, (N,); zero for anchors without a positive or a negative).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (dense; small inputs only).
        chunk_bytes: memory budget of one anchor chunk's temporaries (default 64 MiB).

    Returns:
        A scalar loss (or (N,) for ``"none"``) in fp32/fp64. With no valid term it is 0 and still
        connected to the graph (zero gradients). NaN or Inf anywhere in the inputs gives a NaN loss.

    Only anchors with at least one positive and one negative contribute. Distances that enter the loss
    are exact: batch-hard recomputes the two selected distances from the differences; batch-all and
    semi-hard use Gram-expansion blocks whose cancellation-prone small entries are recomputed from the
    differences (:data:`metricloss.ops.distance.REFINE_RATIO`).
    """
    where = "triplet_loss"
    has_ref = _check_triplet_inputs(where, embeddings, labels, ref_embeddings, ref_labels, distance, backend,
                                    chunk_bytes)
    margin = C.check_margin(margin, "margin", where)
    C.check_option(mining, "mining", MININGS, where)
    C.check_option(reduction, "reduction", REDUCTIONS, where)
    if not isinstance(normalize, bool):
        raise TypeError(f"{where}: `normalize` must be a bool, got {type(normalize).__name__}")
    resolved = resolve_backend(backend, embeddings.device, where, implemented=("torch", "reference"))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        if resolved == "reference":
            from . import reference

            loss = reference.triplet_loss(embeddings, labels, ref_embeddings, ref_labels, margin=margin,
                                          mining=mining, distance=distance, normalize=normalize,
                                          reduction=reduction)
        else:
            a = _distance.prepare_embeddings(embeddings, distance, normalize)
            r = _distance.prepare_embeddings(ref_embeddings, distance, normalize) if has_ref else a
            loss = triplet_loss_op(a, labels, r, ref_labels if has_ref else labels, not has_ref, margin, mining,
                                   distance, reduction, chunk_bytes)
        guards = (embeddings, ref_embeddings) if has_ref else (embeddings,)
        return mask_nonfinite(loss, *guards)


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
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes != num):
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
    resolved = resolve_backend(backend, embeddings.device, where, implemented=("torch", "reference"))
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
                                                      chunk_bytes)
        # A non-finite embedding reaches its row (its own distance) and a non-finite centroid every row
        # (through the own distance or the sum), so checking the result is enough: ±inf becomes NaN, and no
        # O(B·D) pass over the inputs.
        return mask_nonfinite(loss, loss)
