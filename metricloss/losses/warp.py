"""WARP (Weston, Bengio, Usunier 2011) as an ``nn.Module`` drop-in: :class:`WARPLoss`."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from .. import _checks as C
from ..functional import WARP_BACKENDS, check_warp_options, warp_loss

__all__ = ["WARPLoss"]


class WARPLoss(nn.Module):
    """Weighted Approximate-Rank Pairwise loss on scores/logits, vectorised rank sampling.

    For every (row, positive label) pair, negatives are drawn uniformly with replacement until one
    violates the margin (s_n + m − s_p > 0); found at trial N, the loss is L(⌊|𝒩|/N⌋) · (s_n + m − s_p)
    with L(k) = Σ_{j≤k} 1/j. ``mode="exact"`` uses the full violator count r instead:
    L(r)/r · Σ_violators (s_j + m − s_p). See :func:`metricloss.functional.warp_loss` for the details.

    Args:
        margin: m >= 0. Default 1.0.
        max_trials: trials per example, default None = |𝒩| (C − 1 for integer labels).
        mode: ``"sampled"`` (default) or ``"exact"`` (no RNG).
        rank_weight: ``"harmonic"`` (default), ``"log"`` (LightFM, clipped at 10) or a callable
            (int64 ranks -> weights of the same shape).
        reduction: ``"mean"`` (default; over the B rows), ``"sum"`` or ``"none"`` ((B,) per row).
        generator: optional ``torch.Generator`` used for every draw (reproducible training); None uses
            the global generator.
        backend: ``"auto"`` (default: the Triton kernel for CUDA scores in sampled mode with one label per
            row and a built-in ``rank_weight``), ``"torch"`` or ``"triton"``.

    Shapes:
        - scores: (B, C) float (fp16/bf16/fp32/fp64), C >= 2.
        - labels: (B,) integer in [0, C), or (B, C) multi-hot (bool or 0/1).
        - output: () or (B,) for ``reduction="none"``, fp32 (fp64 for fp64 scores).

    Example::

        >>> criterion = WARPLoss()
        >>> loss = criterion(torch.randn(32, 100, requires_grad=True), torch.randint(0, 100, (32,)))
        >>> loss.backward()
    """

    def __init__(self, margin: float = 1.0, max_trials: Optional[int] = None, mode: str = "sampled",
                 rank_weight: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "harmonic",
                 reduction: str = "mean", generator: Optional[torch.Generator] = None, backend: str = "auto"):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.margin, self.max_trials = check_warp_options(where, margin, max_trials, mode, rank_weight, reduction)
        self.mode = mode
        self.rank_weight = rank_weight
        self.reduction = reduction
        self.generator = C.check_generator(generator, None, "generator", where)
        self.backend = C.check_option(backend, "backend", WARP_BACKENDS, where)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The WARP loss of a batch of scores.

        Args:
            scores: (B, C) float scores or logits (fp16, bf16, fp32 or fp64), C >= 2; never upcast as a
                whole.
            labels: (B,) integer labels in [0, C), or a (B, C) multi-hot matrix (bool, or 0/1 of any
                dtype): every (row, positive) pair is then an example, and rows without a positive or
                without a negative contribute 0.

        Returns:
            A 0-dim loss (``"mean"`` divides the sum by B), or (B,) per-row losses for
            ``reduction="none"``, in fp32 (fp64 for fp64 scores). 0 and still connected to the graph when
            nothing violates the margin; NaN or Inf in ``scores`` gives NaN. ``mode="sampled"`` draws from
            ``generator`` (or the global generator).

        Raises:
            TypeError, ValueError: bad dtypes, shapes or label values, named in the message.
        """
        return warp_loss(scores, labels, margin=self.margin, max_trials=self.max_trials, mode=self.mode,
                         rank_weight=self.rank_weight, reduction=self.reduction, generator=self.generator,
                         backend=self.backend)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        weight = self.rank_weight if isinstance(self.rank_weight, str) else getattr(
            self.rank_weight, "__name__", type(self.rank_weight).__name__)
        return (f"margin={self.margin!r}, max_trials={self.max_trials!r}, mode={self.mode!r}, "
                f"rank_weight={weight!r}, reduction={self.reduction!r}, backend={self.backend!r}")
