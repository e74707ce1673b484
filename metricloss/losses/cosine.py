"""Cosine normalize-scale modules: :class:`NormalizeScale`, :class:`CosineClassifier`,
:class:`NormSoftmaxLoss`."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import _checks as C
from ..functional import cosine_logits, norm_softmax_loss, normalize_scale
from ..ops.cosine import CE_REDUCTIONS

__all__ = ["NormalizeScale", "CosineClassifier", "NormSoftmaxLoss", "init_class_weight_"]


def init_class_weight_(weight: torch.Tensor) -> torch.Tensor:
    """Initialise a (C, D) class-weight matrix in place with U(−1/√D, 1/√D) (NormSoftmax's init)."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class _ScaleMixin:
    """A scale s > 0 that is either a fixed float or learnable, stored as the parameter ``log_scale``
    (so it stays positive under any optimizer step)."""

    def _init_scale(self, scale: float, learnable: bool, where: str) -> None:
        scale = C.check_positive(scale, "scale", where)
        if not isinstance(learnable, bool):
            raise TypeError(f"{where}: `learnable` must be a bool, got {type(learnable).__name__}")
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self.register_parameter("log_scale", None)
        self._fixed_scale = scale

    @property
    def scale(self) -> Union[float, torch.Tensor]:
        """The current scale: a float, or ``log_scale.exp()`` (0-dim tensor) when learnable."""
        return self._fixed_scale if self.log_scale is None else self.log_scale.exp()

    def _scale_repr(self) -> str:
        if self.log_scale is None:
            return f"scale={self._fixed_scale!r}"
        return f"scale={float(self.log_scale.detach().exp()):.4g} (learnable)"


class NormalizeScale(_ScaleMixin, nn.Module):
    """The Normalize-Scale (N-S) layer of DGCRL (Zheng et al., AAAI 2019): x ↦ s · x / max(‖x‖, eps).

    Projects features onto the hypersphere of radius s, so the dot products a classifier trains on and
    the Euclidean distances used in retrieval rank alike: ‖x̂ − ŷ‖² = 2s² − 2x̂·ŷ.

    Args:
        scale: s > 0 (default 20).
        learnable: learn s, stored as the parameter ``log_scale`` = log s (so s stays positive).
            Default False.
        eps: norm floor, placed as in ``F.normalize`` (default 1e-12). A zero row maps to zero with a
            finite gradient (s/eps times the upstream gradient).

    Shapes:
        - input: (B, D) float (fp16/bf16/fp32/fp64).
        - output: (B, D), same dtype; computed in fp32 at least, autocast or not.

    Example::

        >>> layer = NormalizeScale(scale=16.0, learnable=True)
        >>> out = layer(torch.randn(8, 128))     # every row has norm 16
    """

    def __init__(self, scale: float = 20.0, learnable: bool = False, eps: float = 1e-12):
        """Build the layer; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self._init_scale(scale, learnable, where)
        self.eps = C.check_positive(eps, "eps", where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project every row of ``x`` onto the sphere of radius ``scale``.

        Args:
            x: (B, D) float features (fp16, bf16, fp32 or fp64).

        Returns:
            (B, D) in ``x``'s dtype, s · x / max(‖x‖, eps) per row (computed in fp32 at least, autocast or
            not); a zero row stays zero. Gradients flow to ``x`` and to ``log_scale`` when learnable.
        """
        return normalize_scale(x, self.scale, self.eps)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return f"{self._scale_repr()}, eps={self.eps!r}"


class CosineClassifier(_ScaleMixin, nn.Module):
    """Cosine classifier (NormFace / Baseline++ / CosFace form): logits s · x̂ · Ŵᵀ.

    With ``labels`` and ``margin`` > 0 the target logit is s · (cos − margin) (CosFace's additive margin);
    without labels (inference) no margin is applied. The weight is normalised inside forward and never
    mutated (``weight.data`` is left alone, whatever the input dtype or device).

    Args:
        in_features: D, the embedding size.
        num_classes: C.
        scale: s > 0 (default 20).
        learnable_scale: learn s, stored as the parameter ``log_scale`` (default False).
        margin: float >= 0 (default 0).

    Attributes:
        weight: (C, D) parameter, initialised U(−1/√D, 1/√D).

    Shapes:
        - embeddings (B, D) float; labels (B,) int in [0, C), optional.
        - output (B, C) logits, fp32 (fp64 for fp64 inputs).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0, learnable_scale: bool = False,
                 margin: float = 0.0):
        """Build the layer; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.in_features = C.check_positive_int(in_features, "in_features", where)
        self.num_classes = C.check_positive_int(num_classes, "num_classes", where)
        self._init_scale(scale, learnable_scale, where)
        self.margin = C.check_margin(margin, "margin", where, allow_soft=False)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw ``weight`` as at construction: U(−1/√D, 1/√D), D = ``in_features``."""
        init_class_weight_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The cosine logits s · x̂ · Ŵᵀ of a batch.

        Args:
            embeddings: (B, D) float features (fp16, bf16, fp32 or fp64), D = ``in_features``.
            labels: optional (B,) integer labels in [0, C). Used only for the margin: with labels and
                ``margin`` > 0 the target logit is s · (cos − margin); without labels (inference) no
                margin is applied.

        Returns:
            (B, C) logits in fp32 (fp64 for fp64 inputs), a dense tensor; feed them to
            ``F.cross_entropy`` or :class:`~metricloss.WARPLoss`. ``weight`` is never modified.
        """
        return cosine_logits(embeddings, self.weight, labels, scale=self.scale, margin=self.margin)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, {self._scale_repr()}, "
                f"margin={self.margin!r}")


class NormSoftmaxLoss(nn.Module):
    """NormSoftmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019).

    Cross-entropy on the cosine logits x̂ · Ŵᵀ / temperature, with its own class weights. With
    ``class_chunk`` the classes are streamed with an online logsumexp in a custom autograd function, so
    no (B, C) tensor exists in forward or backward (memory O(B·class_chunk)); gradients flow to the
    embeddings and to ``weight``. Same loss and gradients as pytorch-metric-learning's
    ``NormalizedSoftmaxLoss(num_classes, in_features, temperature)`` (whose ``W`` is our ``weight.T``),
    which, unlike this module, overwrites ``W.data`` with the input's dtype in every forward.

    Args:
        in_features: D, the embedding size.
        num_classes: C.
        temperature: T > 0 (default 0.05, the paper's; logits are cosines times 1/T).
        class_chunk: ``None`` (default): dense logits and ``F.cross_entropy``, fine for small C. An int:
            stream classes in chunks of that many. Aim for a (B, chunk) block of about 4M entries
            (``4_000_000 // batch_size``, e.g. 4096 for B=1024): at B=1024, D=512, C=100000 that took
            0.19× the dense path's peak memory and no more time (README, "Benchmarks").
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Attributes:
        weight: (C, D) parameter, initialised U(−1/√D, 1/√D) (as the paper's code).

    Shapes:
        - embeddings (B, D) float (fp16/bf16/fp32/fp64); labels (B,) int in [0, C).
        - output () or (B,) for ``"none"``, fp32 (fp64 for fp64 inputs).

    Example::

        >>> criterion = NormSoftmaxLoss(512, 100_000, class_chunk=4096)
        >>> loss = criterion(torch.randn(1024, 512, requires_grad=True), torch.randint(0, 100_000, (1024,)))
        >>> loss.backward()
    """

    def __init__(self, in_features: int, num_classes: int, temperature: float = 0.05,
                 class_chunk: Optional[int] = None, reduction: str = "mean"):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.in_features = C.check_positive_int(in_features, "in_features", where)
        self.num_classes = C.check_positive_int(num_classes, "num_classes", where)
        self.temperature = C.check_positive(temperature, "temperature", where)
        self.class_chunk = (None if class_chunk is None
                            else C.check_positive_int(class_chunk, "class_chunk", where))
        self.reduction = C.check_option(reduction, "reduction", CE_REDUCTIONS, where)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw ``weight`` as at construction: U(−1/√D, 1/√D), D = ``in_features``."""
        init_class_weight_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The NormSoftmax loss of a batch against this module's class weights.

        Args:
            embeddings: (B, D) float features (fp16, bf16, fp32 or fp64), D = ``in_features``;
                normalised here.
            labels: (B,) integer labels in [0, C), C = ``num_classes``.

        Returns:
            A 0-dim loss, or (B,) per-row cross-entropies for ``reduction="none"``, in fp32 (fp64 for
            fp64 inputs). Gradients flow to ``embeddings`` and ``weight``. With ``class_chunk`` set no
            (B, C) tensor is built. NaN or Inf in the inputs gives NaN.
        """
        return norm_softmax_loss(embeddings, labels, self.weight, temperature=self.temperature,
                                 class_chunk=self.class_chunk, reduction=self.reduction)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The dense (B, C) logits x̂ · Ŵᵀ / T (for accuracy or inspection)."""
        return cosine_logits(embeddings, self.weight, scale=1.0 / self.temperature)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"temperature={self.temperature!r}, class_chunk={self.class_chunk!r}, "
                f"reduction={self.reduction!r}")
