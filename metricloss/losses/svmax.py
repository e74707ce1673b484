"""The SVMax regulariser as an ``nn.Module``: :class:`SVMaxRegularizer`."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .. import _checks as C
from ..functional import mean_singular_value, svmax_bounds
from ..ops.svmax import SVMAX_METHODS

__all__ = ["SVMaxRegularizer"]


class SVMaxRegularizer(nn.Module):
    """SVMax (Taha et al. 2021): −weight · s_μ, the negated mean singular value of the embedding batch.

    Add it to a ranking loss to keep the embeddings from collapsing onto few directions::

        loss = triplet(embeddings, labels) + svmax(embeddings)

    s_μ = ‖E‖_* / min(b, d) for the (b, d) batch E with L2-normalised rows
    (:func:`metricloss.functional.mean_singular_value`); it lies in :meth:`bounds` (b, d).

    Args:
        weight: λ >= 0 (default 1.0). The authors give no default; the paper picks λ from the range of the
            ranking loss relative to the bounds' range (upper − lower).
        normalize: L2-normalise rows first (default True; the bounds assume unit rows).
        method: ``"auto"`` (default), ``"gram"`` or ``"svd"``: the exact route to the singular values
            (:func:`~metricloss.functional.mean_singular_value`).

    Shapes:
        - embeddings: (b, d) float (fp16/bf16/fp32/fp64).
        - output: (), fp32 (fp64 for fp64 input).

    Example::

        >>> svmax = SVMaxRegularizer(weight=0.1)
        >>> reg = svmax(torch.randn(64, 32, requires_grad=True))   # in [-0.1·√(64/32), -0.1·√64/32]
        >>> reg.backward()
    """

    def __init__(self, weight: float = 1.0, normalize: bool = True, method: str = "auto"):
        """Build the regularizer; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        self.weight = C.check_nonnegative(weight, "weight", where)
        if not isinstance(normalize, bool):
            raise TypeError(f"{where}: `normalize` must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.method = C.check_option(method, "method", SVMAX_METHODS, where)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The SVMax term of a batch: −weight · s_μ, to add to a ranking loss.

        Args:
            embeddings: (B, D) float batch (fp16/bf16/fp32/fp64), B >= 1, D >= 1; its rows are
                L2-normalised first when the module's ``normalize`` is True.

        Returns:
            A () tensor, −weight times the mean singular value of the batch, in fp32 (fp64 for fp64 input);
            it lies in −weight · :meth:`bounds` (B, D). Gradients flow to ``embeddings``.
        """
        return -self.weight * mean_singular_value(embeddings, normalize=self.normalize, method=self.method)

    @staticmethod
    def bounds(b: int, d: int) -> Tuple[float, float]:
        """``(lower, upper)`` of s_μ for a (b, d) batch of unit rows (:func:`~metricloss.functional.svmax_bounds`)."""
        return svmax_bounds(b, d)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return f"weight={self.weight!r}, normalize={self.normalize}, method={self.method!r}"
