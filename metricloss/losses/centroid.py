"""The centroid upper bound on the triplet loss as an ``nn.Module``: :class:`CentroidTripletLoss`."""

from __future__ import annotations

import weakref
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import _checks as C
from .._backend import BACKENDS
from ..functional import centroid_triplet_loss
from ..ops.centroid import CENTROID_REDUCTIONS, CENTROID_SCHEMES, build_centroids

__all__ = ["CentroidTripletLoss"]


class CentroidTripletLoss(nn.Module):
    """Do et al. (CVPR 2019): a linear-time upper bound on the triplet loss with fixed class centroids.

    Per row, with C centroids and α = 1/(3(C − 1))::

        ℓ_i = ‖x_i − c_{y_i}‖ − α · Σ_{m ≠ y_i} ‖x_i − c_m‖

    Summed over all triplets of a class-balanced batch, the (margin-free) triplet loss is at most this
    bound times a constant, which is dropped (see *Methods › Centroid bound* in the docs). Cost O(B·C·D), linear in the batch size;
    memory O(B·D) beyond a bounded tile, never a (B, C) matrix. Embeddings are used as given (no
    normalisation; the loss grows with ‖x‖, so it is bounded below).

    Args:
        num_classes: C >= 2, the number of classes (labels lie in [0, C)).
        embedding_dim: D, the embedding size.
        centroids: how the fixed centroids are made:

            * ``"onehot"`` (default): c_m = e_m, needs D >= C; the loss then needs no GEMM at all;
            * ``"kmeans"``: the paper's data-free scheme, seeded K-means with K = C over random points on
              the unit sphere (:func:`metricloss.ops.centroid.kmeans_sphere_centroids`; unit-norm centroids,
              a reconstruction of details the sources leave open); built once here;
            * a (C, D) float tensor, copied.
        reduction: ``"mean"`` over rows (default), ``"sum"`` or ``"none"`` (per-row losses, (B,)).
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"`` or ``"reference"``.
        seed: seed of the ``"kmeans"`` scheme (default 0): the same arguments give the same centroids.
        chunk_bytes: memory budget of one tile of distances (default 64 MiB, or ``METRICLOSS_CHUNK_BYTES``).

    The centroids are a buffer, ``self.centroids`` (C, D): saved in ``state_dict``, moved by ``.to()``, never
    a parameter, and always what the loss uses. With ``"onehot"`` the buffer holds ``torch.eye(C, D)``; while
    it does, the loss uses the closed form ‖x − e_m‖² = ‖x‖² + 1 − 2x_m instead of a GEMM. Loading other
    centroids (``load_state_dict``, an in-place edit) switches to the general path; whether the buffer is
    still the identity is checked once per change of the buffer (one host read), not per call, and under
    ``torch.compile`` the general path is used. The buffer's dtype counts as the centroids' dtype in every
    case (``.double()`` gives fp64 losses).

    Shapes:
        - embeddings: (B, D) float (fp16/bf16/fp32/fp64); labels: (B,) int in [0, C).
        - output: () or (B,) for ``reduction="none"``, fp32 (fp64 for fp64 input or centroids).

    Example::

        >>> criterion = CentroidTripletLoss(num_classes=100, embedding_dim=128)
        >>> loss = criterion(torch.randn(32, 128, requires_grad=True), torch.randint(0, 100, (32,)))
        >>> loss.backward()
    """

    centroids: torch.Tensor

    def __init__(self, num_classes: int, embedding_dim: int, centroids: Union[str, torch.Tensor] = "onehot",
                 reduction: str = "mean", backend: str = "auto", seed: int = 0,
                 chunk_bytes: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.num_classes = C.check_positive_int(num_classes, "num_classes", where, minimum=2)
        self.embedding_dim = C.check_positive_int(embedding_dim, "embedding_dim", where)
        self.seed = C.check_positive_int(seed, "seed", where, minimum=0)
        self.reduction = C.check_option(reduction, "reduction", CENTROID_REDUCTIONS, where)
        self.backend = C.check_option(backend, "backend", BACKENDS, where)
        self.chunk_bytes = C.check_chunk_bytes(chunk_bytes, where)
        shape = (self.num_classes, self.embedding_dim)
        if isinstance(centroids, torch.Tensor):
            if not centroids.is_floating_point():
                raise TypeError(f"{where}: `centroids` must be a floating-point tensor, "
                                f"got dtype {centroids.dtype}")
            if tuple(centroids.shape) != shape:
                raise ValueError(f"{where}: `centroids` must have shape (num_classes, embedding_dim) = "
                                 f"{shape}, got {tuple(centroids.shape)}")
            self.scheme = "tensor"
        else:
            self.scheme = C.check_option(centroids, "centroids", CENTROID_SCHEMES, where)
            if self.scheme == "onehot" and self.embedding_dim < self.num_classes:
                raise ValueError(f"{where}: `centroids`='onehot' needs embedding_dim >= num_classes "
                                 f"(c_m = e_m), got embedding_dim={self.embedding_dim} < "
                                 f"num_classes={self.num_classes}; use centroids='kmeans' (any "
                                 f"embedding_dim) or pass a (C, D) tensor")
        built = build_centroids(centroids, self.num_classes, self.embedding_dim, self.seed)
        self.register_buffer("centroids", built)
        self._onehot_cache: Optional[Tuple[weakref.ref, int, bool]] = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The centroid bound of a batch against the fixed centroids in ``self.centroids``.

        Args:
            embeddings: (B, D) float embeddings (fp16, bf16, fp32 or fp64), D = ``embedding_dim``; used as
                given (not normalised).
            labels: (B,) integer labels in [0, C), C = ``num_classes``.

        Returns:
            A 0-dim loss (mean over rows by default), or (B,) per-row losses for ``reduction="none"``, in
            fp32 (fp64 for fp64 embeddings or centroids). Gradients flow to ``embeddings`` only (the
            centroids are a buffer). NaN or Inf in the input gives NaN.

        Raises:
            TypeError, ValueError: bad dtypes, shapes (D other than ``embedding_dim``) or labels outside
                [0, C), named in the message.
        """
        where = type(self).__name__
        C.check_embeddings(embeddings, "embeddings", where)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"{where}: `embeddings` must have D={self.embedding_dim} columns "
                             f"(embedding_dim), "
                             f"got shape {tuple(embeddings.shape)}")
        if self._buffer_is_onehot():
            # the closed form reads no centroids; compute in (at least) the buffer's dtype, as the tensor path
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, self.centroids.dtype))
            return centroid_triplet_loss(embeddings, labels, "onehot", num_classes=self.num_classes,
                                         reduction=self.reduction, backend=self.backend,
                                         chunk_bytes=self.chunk_bytes)
        return centroid_triplet_loss(embeddings, labels, self.centroids, num_classes=self.num_classes,
                                     reduction=self.reduction, backend=self.backend,
                                     chunk_bytes=self.chunk_bytes)

    def _buffer_is_onehot(self) -> bool:
        """Whether the closed form applies: scheme ``"onehot"`` and the buffer still exactly ``eye(C, D)``.

        The answer is cached against the buffer object and its version counter (bumped by in-place writes
        such as ``load_state_dict``; ``.to()``/``.double()`` make a new buffer), so the comparison, a host
        read, runs once per change of the buffer.
        """
        if self.scheme != "onehot" or torch.compiler.is_compiling():
            return False
        buffer = self.centroids
        cached = self._onehot_cache
        if cached is not None and cached[0]() is buffer and cached[1] == buffer._version:
            return cached[2]
        is_eye = bool(torch.equal(buffer, torch.eye(*buffer.shape, dtype=buffer.dtype, device=buffer.device)))
        self._onehot_cache = (weakref.ref(buffer), buffer._version, is_eye)
        return is_eye

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        seed = f", seed={self.seed}" if self.scheme == "kmeans" else ""
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"centroids={self.scheme!r}{seed}, reduction={self.reduction!r}, backend={self.backend!r}")
