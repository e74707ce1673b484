"""Losses over the global batch of a torch.distributed job, exact after DDP's gradient averaging.

Two pieces, both on plain ``torch.distributed`` collectives (any backend: gloo, NCCL, …):

* :func:`all_gather_with_grad`: every rank's tensor concatenated in rank order, differentiable: the
  backward pass sums, over the ranks, the gradient each one computed for a slice and hands every rank
  the sum for its own slice. Ranks may hold different batch sizes.
* :class:`DistributedLoss`: wraps a loss that exposes ``loss_terms`` (e.g. :class:`~metricloss.TripletLoss`)
  so that each rank mines its own anchors against the whole global batch and returns a per-rank loss
  whose gradient, once DDP has averaged the ranks' gradients, is exactly the gradient of the same loss
  computed in one process on the concatenated global batch (docs/design.md §2 for the reductions).

Why the scaling (the derivation, once): with a differentiable gather in rank order and a per-rank loss
L_r, DDP's averaged parameter gradient is (1/W)·Σ_r ∂L_r/∂θ. It equals the global loss's gradient when
(1/W)·Σ_r L_r *is* the global loss as a function of every embedding. With the global loss
Σ_{all anchors} term(a) / count, the choice L_r = W · Σ_{a on rank r} term(a) / count_global does it,
with count_global all-reduced (valid terms for ``"mean"``, terms > 0 for ``"mean_nonzero"``, 1 for
``"sum"``). Each rank's terms see the other ranks' embeddings as references, so their gradients reach
those ranks through the gather's backward.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import _checks as C
from .ops.reduction import reduce_loss

__all__ = ["is_distributed", "all_gather_with_grad", "DistributedLoss"]


def is_distributed(group: Optional[object] = None) -> bool:
    """True inside an initialised torch.distributed process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def gather_sizes(n: int, device: torch.device, group: Optional[object] = None) -> List[int]:
    """Every rank's ``n`` (its batch size), in rank order. One small all-gather and one host read."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.cat(out).tolist()


def all_gather_sized(tensor: torch.Tensor, sizes: List[int], group: Optional[object] = None) -> torch.Tensor:
    """Concatenation in rank order of every rank's ``tensor`` (rank r holds ``sizes[r]`` rows); no gradient.

    Unequal sizes are padded to the largest into contiguous buffers, gathered, then sliced back: the
    collectives need equal, contiguous buffers (non-contiguous inputs lost their gradients in pytorch
    #120386). Bool tensors travel as uint8 (not every backend gathers bool).
    """
    is_bool = tensor.dtype == torch.bool
    send = tensor.to(torch.uint8) if is_bool else tensor
    largest = max(sizes)
    if send.shape[0] != largest:
        padded = send.new_zeros((largest,) + tuple(send.shape[1:]))
        padded[:send.shape[0]] = send
        send = padded
    send = send.contiguous()
    buffers = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(buffers, send, group=group)
    out = torch.cat([b[:s] for b, s in zip(buffers, sizes)])
    return out.bool() if is_bool else out


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: rank-ordered concatenation. Backward: all-reduce (sum) the gradient, keep this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: List[int], group: Optional[object]) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        ctx.start = sum(sizes[:dist.get_rank(group)])
        return all_gather_sized(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss put gradient on every slice; the sum over ranks is what belongs to each
        # slice's owner. A copy: the collective works in place and autograd's buffer is not ours.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        n = ctx.sizes[dist.get_rank(ctx.group)]
        return total[ctx.start:ctx.start + n], None, None


def all_gather_with_grad(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Differentiable all-gather: every rank's ``tensor`` concatenated along dim 0 in rank order.

    Args:
        tensor: (B_r, ...) this rank's rows; ranks may hold different B_r (the trailing dims must agree).
        group: the process group (default: the world).

    Returns:
        (Σ_r B_r, ...) the same tensor on every rank, rank 0's rows first. Its backward pass sends each
        rank the sum over all ranks of the gradient of that rank's slice, so a loss on the gathered
        tensor trains every rank's embeddings. Every rank must run the backward pass (it is a
        collective). Outside an initialised process group (or with one rank) it returns ``tensor``.

    Cost: one all-gather of the sizes (one host read), one of the data; backward one all-reduce of
    (Σ_r B_r, ...) per rank.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_gather_with_grad: `tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError("all_gather_with_grad: `tensor` must have at least one dimension (rows to gather)")
    if not is_distributed(group):
        return tensor
    sizes = gather_sizes(tensor.shape[0], tensor.device, group)
    return _AllGatherWithGrad.apply(tensor, sizes, group)


def _has_loss_terms(loss: object) -> bool:
    return callable(getattr(loss, "loss_terms", None)) and isinstance(getattr(loss, "reduction", None), str)


def reduce_across_ranks(terms, reduction: str, group: Optional[object] = None) -> torch.Tensor:
    """Reduce this rank's ``LossTerms`` into its share of the global loss (see the module docstring).

    ``"mean"`` / ``"mean_nonzero"`` / ``"sum"``: the returned *value* is the global loss (identical on
    every rank: one all-reduce of the loss sum and the two counts), and its *gradient* is that of this
    rank's share ``W · Σ_local term / count_global``, which DDP's averaging turns into the global
    gradient. ``"none"``: this rank's per-anchor sums (B_r,), unscaled (see :class:`DistributedLoss`).
    Outside a process group: the plain :func:`~metricloss.ops.reduction.reduce_loss`.
    """
    per_anchor, num_terms, num_nonzero = terms
    if reduction == "none" or not is_distributed(group):
        return reduce_loss(per_anchor, num_terms, num_nonzero, reduction)
    world = dist.get_world_size(group)
    local = per_anchor.sum()
    stats = torch.stack([local.detach().double(), num_terms.double(), num_nonzero.double()])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    if reduction == "sum":
        denom = torch.ones((), dtype=torch.float64, device=stats.device)
    else:
        denom = (stats[1] if reduction == "mean" else stats[2]).clamp_min(1)
    share = local * (world / denom).to(local.dtype)
    value = (stats[0] / denom).to(local.dtype)
    # the value of the global loss, the gradient of this rank's share
    return value + (share - share.detach())


class DistributedLoss(nn.Module):
    """Mine this rank's anchors against the global batch; gradients exact after DDP's averaging.

    Args:
        loss: a loss module with ``loss_terms(embeddings, labels, ref_embeddings, ref_labels,
            ref_self_index)`` and a ``reduction`` attribute, e.g. ``ml.TripletLoss(...)`` (any mining,
            margin, distance).
        group: the process group (default: the world).

    Semantics, for W ranks with batches B_0, …, B_{W-1} (sizes may differ, e.g. the last batch):

    * the reference set is the global batch, every rank's embeddings concatenated in rank order
      (:func:`all_gather_with_grad`, so gradients reach the rank that owns each row);
    * the anchors are this rank's own rows; an anchor's own global row is excluded by index
      (``ref_self_index``), never by value, so duplicates elsewhere still count as positives;
    * ``"mean"``, ``"mean_nonzero"``, ``"sum"``: every rank returns the **global loss value** (the one a
      single process would compute on the concatenated batch; all-reduced, so logging any rank is
      right), and its gradient is this rank's share ``W · Σ_{local anchors} term / count_global``, so
      that after DDP averages the ranks' gradients they are **exactly** the one-process gradients (no
      ``× world_size`` to add or remove). Without DDP, average the gradients over the ranks yourself
      (all-reduce, then divide by W) to get the same;
    * ``"none"``: this rank's per-anchor losses (B_r,), the rows of the one-process ``"none"`` output
      that belong to this rank. Reduce them yourself, **times W**: e.g. ``W * out.sum()`` for the global
      sum, ``W * out.sum() / n_global`` for a mean with ``n_global`` all-reduced, then DDP's averaging
      gives the one-process gradient.

    Outside an initialised process group (or with one rank) it is exactly the plain ``loss``.

    Cost per rank and step: mining B_r anchors against Σ B references, O(B·W·B) distance work in
    chunks of the wrapped loss's ``chunk_bytes`` ((chunk, Σ B) blocks), never a (W·B)² matrix.
    Communication: all-gathers of the sizes, embeddings and labels, one all-reduce of three scalars;
    backward one all-reduce of the (Σ B, D) gradient. Every rank must call forward and backward the
    same number of times (they are collectives).

    Shapes:
        - embeddings: (B_r, D) float; labels: (B_r,) int (this rank's batch).
        - output: () or (B_r,) for ``"none"``.

    Example (inside ``torchrun``)::

        >>> criterion = ml.distributed.DistributedLoss(ml.TripletLoss(mining="batch_hard"))
        >>> loss = criterion(ddp_model(x), y)   # x, y: this rank's batch
        >>> loss.backward()                      # DDP averages: the one-process global gradient
    """

    def __init__(self, loss: nn.Module, group: Optional[object] = None):
        """Build the wrapper; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        if not _has_loss_terms(loss):
            raise TypeError(f"DistributedLoss: `loss` must expose loss_terms(...) and a `reduction` attribute "
                            f"(e.g. metricloss.TripletLoss), got {type(loss).__name__}")
        self.loss = loss
        self.group = group

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's anchors mined against the global batch (every rank's rows, in rank order).

        Args:
            embeddings: (B, D) float rows of this rank (B may differ between ranks).
            labels: (B,) integer labels.

        Returns:
            A () loss in fp32 (fp64 for fp64 input) whose value is the global loss on every rank, and whose
            gradient, after DDP's averaging, is that of one process on the concatenated batch; or (B,)
            per-anchor losses of this rank for ``reduction="none"``. Outside a process group: the plain loss.
        """
        where = "DistributedLoss"
        if not is_distributed(self.group):
            return self.loss(embeddings, labels)
        C.check_embeddings(embeddings, "embeddings", where)
        C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device)
        sizes = gather_sizes(embeddings.shape[0], embeddings.device, self.group)
        global_embeddings = _AllGatherWithGrad.apply(embeddings, sizes, self.group)
        global_labels = all_gather_sized(labels, sizes, self.group)
        start = sum(sizes[:dist.get_rank(self.group)])
        self_index = torch.arange(start, start + embeddings.shape[0], device=embeddings.device)
        terms = self.loss.loss_terms(embeddings, labels, global_embeddings, global_labels,
                                     ref_self_index=self_index)
        return reduce_across_ranks(terms, self.loss.reduction, self.group)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return "group=default" if self.group is None else f"group={self.group!r}"
