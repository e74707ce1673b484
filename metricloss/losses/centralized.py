"""DGCRL as an ``nn.Module``: :class:`CentralizedRankingLoss` (a documented reconstruction)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks as C
from ..functional import centralized_ranking_loss
from ..ops.centralized import DECORRELATIONS, class_centres, resolve_decorrelation
from ..ops.reduction import REDUCTIONS
from .cosine import init_class_weight_

__all__ = ["CentralizedRankingLoss"]


class CentralizedRankingLoss(nn.Module):
    """Decorrelated global centralized ranking loss (DGCRL; Zheng et al., AAAI 2019). **A reconstruction.**

    The paper's text was not available to us (see *Methods › DGCRL and the N-S layer* in the docs): its abstract confirms an N-S layer on
    features and class centres, a *global* ranking loss against the centres of all classes, and a
    Gram-Schmidt decorrelation of the centres. The exact formulas, the default scale and margin, and
    whether the decorrelation is a re-parametrisation or a penalty are our reconstruction [U]:

    * x̂_i = s·x_i/‖x_i‖, ĉ_k = s·w_k/‖w_k‖ (N-S features and centres);
    * ℓ_i = Σ_{k≠y_i} [margin + ‖x̂_i − ĉ_{y_i}‖² − ‖x̂_i − ĉ_k‖²]_+ over all C centres;
    * ``decorrelation="qr"``: ĉ_k = s·q_k, the Gram-Schmidt orthonormalisation of W's rows in class order
      (a QR re-parametrisation in forward; needs D >= C). ``"penalty"``: the loss gets
      ``decorrelation_weight · mean((ŴŴᵀ − I)²)`` (computed through the smaller of the C×C and D×D
      Gram matrices). ``"none"``: no decorrelation. ``"auto"``: ``"qr"`` if D >= C else ``"penalty"``.

    Treat it as experimental and validate it on your data; it is tested against its own dense reference
    (:func:`metricloss.reference.centralized_ranking_loss`), not against the paper's numbers.

    Args:
        in_features: D, the embedding size.
        num_classes: C.
        margin: float >= 0 (default 0.2), in squared-distance units of the radius-s sphere.
        scale: s > 0, the N-S radius (default 1; the loss at scale s is s² times the loss at scale 1 with
            margin/s², so s and margin are not independent).
        decorrelation: ``"auto"`` (default), ``"qr"``, ``"penalty"`` or ``"none"``.
        decorrelation_weight: λ >= 0 of the penalty (default 1).
        reduction: ``"mean"`` over the B·(C − 1) (sample, rival) terms (default), ``"mean_nonzero"``,
            ``"sum"`` or ``"none"`` (per-sample ℓ_i, (B,)).
        class_chunk: ``None`` (default): one (B, C) block. An int: stream the classes in chunks of that
            many, forward and backward, so no (B, C) tensor is needed.

    Attributes:
        weight: (C, D) parameter, initialised U(−1/√D, 1/√D).

    Shapes:
        - embeddings (B, D) float; labels (B,) int in [0, C).
        - output () or (B,) for ``"none"``, fp32 (fp64 for fp64 inputs).
    """

    def __init__(self, in_features: int, num_classes: int, margin: float = 0.2, scale: float = 1.0,
                 decorrelation: str = "auto", decorrelation_weight: float = 1.0, reduction: str = "mean",
                 class_chunk: Optional[int] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.in_features = C.check_positive_int(in_features, "in_features", where)
        self.num_classes = C.check_positive_int(num_classes, "num_classes", where)
        self.margin = C.check_margin(margin, "margin", where, allow_soft=False)
        self.scale = C.check_positive(scale, "scale", where)
        C.check_option(decorrelation, "decorrelation", DECORRELATIONS, where)
        if decorrelation == "qr" and self.in_features < self.num_classes:
            raise ValueError(f"{where}: `decorrelation`='qr' needs in_features >= num_classes, got "
                             f"in_features={self.in_features} < num_classes={self.num_classes}; "
                             f"use 'penalty' or 'auto'")
        self.decorrelation = decorrelation
        self.decorrelation_weight = C.check_nonnegative(decorrelation_weight, "decorrelation_weight", where)
        self.reduction = C.check_option(reduction, "reduction", REDUCTIONS, where)
        self.class_chunk = (None if class_chunk is None
                            else C.check_positive_int(class_chunk, "class_chunk", where))
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw ``weight`` as at construction: U(−1/√D, 1/√D), D = ``in_features``."""
        init_class_weight_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (reconstructed) DGCRL loss of a batch against this module's class centres.

        Args:
            embeddings: (B, D) float features (fp16, bf16, fp32 or fp64), D = ``in_features``; the N-S
                layer is applied here.
            labels: (B,) integer labels in [0, C), C = ``num_classes``.

        Returns:
            A 0-dim loss, or (B,) per-sample losses for ``reduction="none"`` (the decorrelation penalty,
            when used, is added once to a reduced loss and as λP/B to each entry of ``"none"``), in fp32
            (fp64 for fp64 inputs). Gradients flow to ``embeddings`` and ``weight``. NaN or Inf in the
            inputs gives NaN.
        """
        return centralized_ranking_loss(embeddings, labels, self.weight, margin=self.margin, scale=self.scale,
                                        decorrelation=self.decorrelation,
                                        decorrelation_weight=self.decorrelation_weight,
                                        reduction=self.reduction, class_chunk=self.class_chunk)

    def centres(self) -> torch.Tensor:
        """The current N-S class centres ĉ (C, D) the loss ranks against (dense, differentiable)."""
        mode = resolve_decorrelation(self.decorrelation, self.in_features, self.num_classes)
        return class_centres(self.weight, self.scale, mode)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, margin={self.margin!r}, "
                f"scale={self.scale!r}, decorrelation={self.decorrelation!r}, "
                f"decorrelation_weight={self.decorrelation_weight!r}, reduction={self.reduction!r}, "
                f"class_chunk={self.class_chunk!r}")
