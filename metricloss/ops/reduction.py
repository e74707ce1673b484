"""Reductions, written once: loss reductions shared by every loss, and fast row-wise arg-reductions.

Loss reductions (see *Design › Semantics and defaults* in the docs): every loss produces per-anchor sums of its terms plus two counts, the
number of valid terms and the number of strictly positive terms; :func:`reduce_loss` turns them into
``"mean"`` (over valid terms), ``"mean_nonzero"`` (PML's AvgNonZero, Hermans' BA≠0), ``"sum"`` or
``"none"`` (the per-anchor sums). Counts stay on the device: no host sync.

Row arg-reductions: ``torch.min(x, dim=1)`` with indices runs about 15× slower on CPU than ``amin`` (it
cannot vectorise the index bookkeeping). :func:`row_argmin` / :func:`row_argmax` take the min of each
64-wide group with ``amin``, pick the first best group, then the first best entry inside it: same
result as ``torch.min(dim=1)`` (first index on ties, NaN wins and propagates), at ~1/6 of the cost.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .. import _checks

__all__ = ["REDUCTIONS", "LossTerms", "reduce_loss", "mask_nonfinite", "row_argmin", "row_argmax"]

REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")

_GROUP = 64


class LossTerms(NamedTuple):
    """The unreduced pieces of a loss, so that a caller can reduce them itself (e.g. across ranks).

    Attributes:
        per_anchor: (N,) float, the sum of each anchor's loss terms (0 for an anchor without a valid
            term); differentiable with respect to the anchors and the reference set.
        num_terms: () int64, the number of valid terms over the batch (what ``"mean"`` divides by).
        num_nonzero: () int64, the number of valid terms that are > 0 (what ``"mean_nonzero"`` divides by).

    ``per_anchor.sum() / num_terms`` is the ``"mean"`` loss and ``per_anchor.sum() / num_nonzero`` the
    ``"mean_nonzero"`` one (each denominator clamped at 1); :meth:`reduce` does exactly that. Summing
    ``per_anchor`` and both counts over several batches (ranks) before dividing gives the loss of their
    union.
    """

    per_anchor: torch.Tensor
    num_terms: torch.Tensor
    num_nonzero: torch.Tensor

    def reduce(self, reduction: str = "mean") -> torch.Tensor:
        """:func:`reduce_loss` of these pieces."""
        return reduce_loss(self.per_anchor, self.num_terms, self.num_nonzero, reduction)


def reduce_loss(per_anchor: torch.Tensor, num_terms: torch.Tensor, num_nonzero: torch.Tensor,
                reduction: str) -> torch.Tensor:
    """Reduce per-anchor loss sums.

    Args:
        per_anchor: (N,) sum of each anchor's loss terms (0 for anchors without a valid term).
        num_terms: () number of valid terms over the batch.
        num_nonzero: () number of valid terms that are > 0.
        reduction: one of :data:`REDUCTIONS`.

    Returns:
        () for the reducing modes, (N,) for ``"none"``. A batch without valid terms gives a zero that is
        still connected to the graph (its gradient is 0, never NaN).
    """
    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    if reduction == "sum":
        return total
    denom = num_terms if reduction == "mean" else num_nonzero
    return total / denom.clamp_min(1).to(total.dtype)


def mask_nonfinite(loss: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Make ``loss`` NaN when any input holds NaN or ±Inf (as dense torch losses do).

    Mining selects by index, so a non-finite row that is never selected would otherwise leave the loss
    finite and hide the corruption. One O(N·D) pass, no host sync; the gradient of a finite loss is
    untouched. The pass is ``aminmax`` (NaN propagates into both, ±Inf into one): no (N, D) bool temporary
    (measured 0.06 ms against 0.63 ms for ``isfinite(t).all()`` on 4096 × 128 fp32).
    """
    # 0·lo + 0·hi is 0 for finite extremes and NaN for ±Inf or NaN (0·inf = NaN): added to the loss, a
    # constant that leaves a finite loss bitwise unchanged (x + 0 = x; only −0.0 becomes +0.0) and its
    # gradient untouched: five kernels for one input (aminmax, two products, two sums; the former where over
    # isfinite masks took thirteen)
    guard = None
    for t in inputs:
        if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue  # nothing to check; integers are finite
        if t.is_complex():
            part = torch.where(torch.isfinite(t).all(), 0.0, float("nan")).to(loss.dtype)
        else:
            lo, hi = torch.aminmax(t.detach())
            part = lo * 0.0 + hi * 0.0
        guard = part if guard is None else guard + part
    return loss if guard is None else loss + guard.to(loss.dtype)


def _cpu_kernels(x: torch.Tensor) -> bool:
    """Whether to take the CPU-tuned form of an op: a CPU tensor, unless the step is being counted as an
    accelerator's (:func:`metricloss._checks.accelerator_rules`), whose form is the plain torch op."""
    return x.device.type == "cpu" and not _checks._ACCELERATOR_RULES[0]


def _group_view(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    rows, cols = x.shape
    full = cols // _GROUP
    return x.as_strided((rows, full, _GROUP), (x.stride(0), _GROUP * x.stride(1), x.stride(1))), full


def row_argmin(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.min(x, dim=1)`` for a 2-D tensor, faster on CPU; returns (values, int64 indices)."""
    return _row_arg(x, largest=False)


def row_argmax(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.max(x, dim=1)`` for a 2-D tensor, faster on CPU; returns (values, int64 indices)."""
    return _row_arg(x, largest=True)


def _row_arg(x: torch.Tensor, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    if cols < 2 * _GROUP or not _cpu_kernels(x):
        return x.max(1) if largest else x.min(1)
    grouped, full = _group_view(x)
    # 1. best value of each 64-wide group (vectorised amin/amax)
    group_best = grouped.amax(2) if largest else grouped.amin(2)
    # 2. first group holding the row's best value
    _, group_idx = group_best.max(1) if largest else group_best.min(1)
    # 3. first best entry inside that group
    inside = grouped[torch.arange(rows, device=x.device), group_idx]
    val, local = inside.max(1) if largest else inside.min(1)
    idx = group_idx * _GROUP + local
    tail_start = full * _GROUP
    if tail_start < cols:
        # 4. the ragged tail: it wins only if strictly better, or if it holds the first NaN of the row
        tval, tidx = x[:, tail_start:].max(1) if largest else x[:, tail_start:].min(1)
        better = (tval > val) if largest else (tval < val)
        better = better | (torch.isnan(tval) & ~torch.isnan(val))
        val = torch.where(better, tval, val)
        idx = torch.where(better, tidx + tail_start, idx)
    return val, idx
