"""The two-head loss (Taha et al., WACV 2020): :class:`TwoHeadLoss` and its :class:`EmbeddingHead`."""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from ..functional import two_head_cross_entropy
from .triplet import BatchHardTripletLoss, SemiHardTripletLoss

__all__ = ["TwoHeadLoss", "EmbeddingHead"]

TripletSpec = Union[None, str, nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def _default_triplet(mining: str) -> nn.Module:
    # the authors' setting: margin 0.2, squared Euclidean distance on L2-normalised embeddings, mean over
    # (a, p) pairs (semi-hard) or anchors (batch-hard)
    cls = SemiHardTripletLoss if mining == "semi_hard" else BatchHardTripletLoss
    return cls(margin=0.2, distance="squared_euclidean")


class TwoHeadLoss(nn.Module):
    """Cross-entropy on a classification head plus λ · a triplet loss on an embedding head.

    Taha, Chen, Davis, Shrivastava, "Boosting standard classification architectures through a ranking
    regularizer" (WACV 2020): a classification network gets a second, L2-normalised embedding head
    (:class:`EmbeddingHead`) and is trained with::

        loss = F.cross_entropy(logits, labels) + triplet_weight * triplet(embeddings, labels)

    This module owns neither backbone nor heads nor optimiser: it takes the two heads' outputs.

    Args:
        triplet: the ranking term. ``None`` or ``"semi_hard"`` (default): ``SemiHardTripletLoss(margin=0.2,
            distance="squared_euclidean")``, as the authors; ``"batch_hard"``: ``BatchHardTripletLoss`` with
            the same margin and distance (the authors' alternative; that it keeps their semi-hard margin and
            distance is our reconstruction); or any module / callable ``(embeddings, labels) -> () loss``.
        triplet_weight: λ >= 0 (default 1.0, as the authors).

    Shapes:
        - logits: (B, C) float; embeddings: (B, D) float; labels: (B,) int in [0, C).
        - output: (), fp32 (fp64 when an input is fp64).

    Example::

        >>> head = EmbeddingHead(512, 128)
        >>> criterion = TwoHeadLoss()
        >>> feats = torch.randn(32, 512)                  # the backbone's pooled features
        >>> logits = classifier(feats)                    # the existing classification head
        >>> loss = criterion(logits, head(feats), labels)
    """

    def __init__(self, triplet: TripletSpec = None, triplet_weight: float = 1.0):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        if triplet is None or isinstance(triplet, str):
            mining = C.check_option("semi_hard" if triplet is None else triplet, "triplet",
                                    ("semi_hard", "batch_hard"), where)
            triplet = _default_triplet(mining)
        elif not callable(triplet):
            raise TypeError(f"{where}: `triplet` must be None, 'semi_hard', 'batch_hard', an nn.Module or a "
                            f"callable (embeddings, labels) -> loss, got {type(triplet).__name__}")
        self.triplet = triplet
        self.triplet_weight = C.check_nonnegative(triplet_weight, "triplet_weight", where)

    def forward(self, logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy(logits, labels) + triplet_weight · triplet(embeddings, labels).

        Args:
            logits: (B, C) float class scores (cross-entropy is computed in fp32 at least).
            embeddings: (B, D) float embeddings (normalised by the triplet loss, or already by the head).
            labels: (B,) integer class labels in [0, C).

        Returns:
            A () tensor in fp32 (fp64 for fp64 inputs): ``F.cross_entropy(logits, labels) + triplet_weight ·
            triplet(embeddings, labels)``; gradients flow to both heads' outputs.
        """
        ce = two_head_cross_entropy(logits, embeddings, labels, type(self).__name__)
        return ce + self.triplet_weight * self.triplet(embeddings, labels)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return f"triplet_weight={self.triplet_weight!r}"


class EmbeddingHead(nn.Module):
    """A linear embedding head with L2-normalised output: x ↦ W·x + b, then divided by max(‖·‖, eps).

    The authors' two-head network reads the backbone's last conv map flattened (pass ``in_features =
    C·H·W``) or pooled (``in_features = C``); any input (B, ...) is flattened from dimension 1. The weight
    is Xavier-uniform initialised and the bias zero, as in the authors' code (their 256-d head also carries
    an L2 weight penalty: give it through the optimiser's weight decay).

    Args:
        in_features: input features per sample (after flattening), int >= 1.
        embedding_dim: output dimension D, int >= 1 (the authors use 256).
        bias: learn an additive bias (default True).
        eps: norm floor of the normalisation (default 1e-12, as ``F.normalize``).

    Shapes:
        - input: (B, in_features) or (B, *) with prod(*) = in_features, float.
        - output: (B, embedding_dim), unit rows, the input's dtype.
    """

    def __init__(self, in_features: int, embedding_dim: int, bias: bool = True, eps: float = 1e-12):
        """Build the layer; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.in_features = C.check_positive_int(in_features, "in_features", where)
        self.embedding_dim = C.check_positive_int(embedding_dim, "embedding_dim", where)
        if not isinstance(bias, bool):
            raise TypeError(f"{where}: `bias` must be a bool, got {type(bias).__name__}")
        self.eps = C.check_positive(eps, "eps", where)
        self.linear = nn.Linear(self.in_features, self.embedding_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weight (gain 1), zero bias."""
        nn.init.xavier_uniform_(self.linear.weight, gain=1.0)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed and L2-normalise.

        Args:
            x: (B, D) float features with D = ``in_features``, or (B, *) flattened from dimension 1 to them.

        Returns:
            (B, embedding_dim) unit rows in the input's float dtype (fp32 for fp32 input).
        """
        where = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{where}: input must be a floating-point torch.Tensor, got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"{where}: input must have shape (B, {self.in_features}) or (B, *) with "
                             f"{self.in_features} features per sample, got shape {tuple(x.shape)}")
        return F.normalize(self.linear(x.flatten(1)), p=2.0, dim=1, eps=self.eps)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return f"in_features={self.in_features}, embedding_dim={self.embedding_dim}"
