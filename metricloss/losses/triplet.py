"""Triplet losses as ``nn.Module`` drop-ins: :class:`TripletLoss` and its three mining presets."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import _checks as C
from .._backend import BACKENDS
from ..functional import triplet_loss, triplet_loss_terms
from ..ops.distance import DISTANCES
from ..ops.reduction import REDUCTIONS, LossTerms
from ..ops.triplet import MININGS

__all__ = ["TripletLoss", "BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss"]


class TripletLoss(nn.Module):
    """Triplet loss with on-device mining that never holds an N×N matrix.

    Args:
        margin: float >= 0 (hinge [m + d_ap − d_an]_+), or ``"soft"`` (softplus, Hermans et al.). Default 0.2.
        mining: ``"batch_hard"`` (default; Hermans et al. 2017), ``"batch_all"`` or ``"semi_hard"``
            (FaceNet, with TF-Addons semantics: the nearest negative farther than the positive, else the
            farthest negative).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"``.
        normalize: L2-normalise embeddings first. Default True.
        reduction: ``"mean"`` (default; over valid anchors / triplets / (a, p) pairs), ``"mean_nonzero"``
            (PML's AvgNonZero), ``"sum"`` or ``"none"`` (per-anchor sums, (N,)).
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: memory budget of one anchor chunk (default 64 MiB, or ``METRICLOSS_CHUNK_BYTES``).

    Shapes:
        - embeddings: (N, D) float (fp16/bf16/fp32/fp64); labels: (N,) int.
        - ref_embeddings: (M, D), ref_labels: (M,), optional: mine the anchors against this set instead.
        - ref_self_index: (N,) int, optional: the reference row that is anchor i (-1: none).
        - output: () or (N,) for ``reduction="none"``, fp32 (fp64 for fp64 input).

    Example::

        >>> criterion = TripletLoss(margin=0.2, mining="batch_hard")
        >>> loss = criterion(torch.randn(32, 128, requires_grad=True), torch.arange(8).repeat(4))
        >>> loss.backward()
    """

    def __init__(self, margin: Union[float, str] = 0.2, mining: str = "batch_hard", distance: str = "euclidean",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 chunk_bytes: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.margin = C.check_margin(margin, "margin", where)
        self.mining = C.check_option(mining, "mining", MININGS, where)
        self.distance = C.check_option(distance, "distance", DISTANCES, where)
        if not isinstance(normalize, bool):
            raise TypeError(f"{where}: `normalize` must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.reduction = C.check_option(reduction, "reduction", REDUCTIONS, where)
        self.backend = C.check_option(backend, "backend", BACKENDS, where)
        self.chunk_bytes = C.check_chunk_bytes(chunk_bytes, where)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None,
                ref_self_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The triplet loss of a batch, mined on the fly with this module's settings.

        Args:
            embeddings: (N, D) anchors, a float tensor (fp16, bf16, fp32 or fp64), N >= 1, D >= 1.
            labels: (N,) integer class labels (any integer dtype, any values, negative ones included).
            ref_embeddings: optional (M, D) reference set the anchors are mined against (cross-batch
                memory, other ranks), same D; given together with ``ref_labels``. Without it the batch
                is its own reference set and an anchor is never its own positive. Gradients flow to it.
            ref_labels: optional (M,) integer labels of ``ref_embeddings``.
            ref_self_index: optional (N,) integer tensor, the reference row that *is* anchor i (-1: none),
                excluded from anchor i's positives and negatives by index. Default: ``arange(N)`` when
                ``ref_embeddings is embeddings``, else none.

        Returns:
            A 0-dim loss, or (N,) per-anchor sums for ``reduction="none"`` (0 for anchors without a
            positive or a negative), in fp32 (fp64 when the embeddings are fp64), autocast or not. With
            no valid term it is 0 and still connected to the graph. NaN or Inf in the input gives NaN.

        Raises:
            TypeError, ValueError: bad dtypes or shapes, named in the message (see *Design › Bad input* in the docs).
        """
        return triplet_loss(embeddings, labels, ref_embeddings, ref_labels, margin=self.margin, mining=self.mining,
                            distance=self.distance, normalize=self.normalize, reduction=self.reduction,
                            backend=self.backend, chunk_bytes=self.chunk_bytes, ref_self_index=ref_self_index)

    def loss_terms(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                   ref_labels: Optional[torch.Tensor] = None,
                   ref_self_index: Optional[torch.Tensor] = None) -> LossTerms:
        """The unreduced pieces of :meth:`forward` (this module's ``reduction`` is not applied).

        Same arguments as :meth:`forward`. Returns :class:`~metricloss.ops.reduction.LossTerms`
        ``(per_anchor (N,), num_terms (), num_nonzero ())``; ``terms.reduce(self.reduction)`` equals
        :meth:`forward`. For wrappers that reduce across ranks or steps: sum ``per_anchor.sum()`` and the
        counts over them, then divide.
        """
        return triplet_loss_terms(embeddings, labels, ref_embeddings, ref_labels, margin=self.margin,
                                  mining=self.mining, distance=self.distance, normalize=self.normalize,
                                  backend=self.backend, chunk_bytes=self.chunk_bytes, ref_self_index=ref_self_index)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return (f"margin={self.margin!r}, mining={self.mining!r}, distance={self.distance!r}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")


class BatchHardTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="batch_hard"``: hardest positive and hardest negative per anchor.

    ``BatchHardTripletLoss(margin=0.2, reduction="mean_nonzero")`` equals PML's
    ``TripletMarginLoss(margin=0.2)`` with ``BatchHardMiner()``.
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__(margin, "batch_hard", distance, normalize, reduction, backend, chunk_bytes)


class BatchAllTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="batch_all"``: every valid (a, p, n), exactly, in O(chunk·N) memory.

    ``BatchAllTripletLoss(margin=0.2, reduction="mean_nonzero")`` equals PML's ``TripletMarginLoss(margin=0.2)``
    without a miner (Hermans' BA≠0).
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__(margin, "batch_all", distance, normalize, reduction, backend, chunk_bytes)


class SemiHardTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="semi_hard"`` (FaceNet; TF-Addons ``triplet_semihard_loss`` semantics).

    TF-Addons' defaults correspond to ``SemiHardTripletLoss(margin=1.0, distance="squared_euclidean",
    normalize=False)``, except that anchors without a negative contribute nothing here.
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__(margin, "semi_hard", distance, normalize, reduction, backend, chunk_bytes)
