"""P×K batch sampling: P classes, K samples each, every sample at least once per epoch, DDP-aware.

Batch-hard and batch-all triplet losses need every anchor to have positives in its batch; the usual
answer is P×K batches (Hermans et al. 2017). :class:`PKSampler` yields them as index lists for
``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``.

How an epoch is built (everything from one generator seeded with ``seed + epoch``, identical on every rank):

1. Each class's indices are shuffled and cut into groups of K. The last group of a class whose size is
   not a multiple of K is completed with other samples of the same class drawn without replacement; a
   class with fewer than K samples is completed by drawing from it with replacement (duplicates are
   then unavoidable). So every sample is in at least one group.
2. The groups are dealt into ``T = max(ceil(G / P), max_c G_c)`` batches of P distinct classes (G groups
   in all, G_c of class c): T is the fewest batches that can hold them. Each batch first takes the
   classes that have as many groups left as there are batches left (they would not fit otherwise),
   then draws the rest without replacement with probability proportional to the groups they have left.
   This keeps both invariants (groups left ≤ P × batches left, and no class has more groups than
   batches left), so the deal always finishes in exactly T batches. Near the end, when fewer than P
   classes still have groups, the batch is completed with extra groups of other classes, drawn anew.
3. Distributed: the batches are dealt round-robin to the ranks (batch ``j`` to rank ``j % num_replicas``),
   so the ranks' batches are disjoint and, together, are the epoch. With ``drop_last=False`` (default)
   the epoch is padded with extra freshly drawn batches to a multiple of ``num_replicas``, so every
   rank gets the same number and every sample is still used; ``drop_last=True`` drops the tail batches
   instead (then a few samples may be missed in that epoch).

The number of batches does not depend on the seed or the epoch, so ``len(sampler)`` is exact.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import Sampler

from . import _checks as C

__all__ = ["PKSampler"]


def _distributed_default(num_replicas: Optional[int], rank: Optional[int]):
    """(num_replicas, rank) from torch.distributed when a process group is initialised, else (1, 0)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    return num_replicas, rank


class PKSampler(Sampler[List[int]]):
    """Batches of P classes × K samples (index lists), covering every sample at least once per epoch.

    Args:
        labels: (N,) integer class label of every sample of the dataset (a tensor, or a sequence of ints).
        p: classes per batch, ``1 <= p <= number of classes``.
        k: samples per class in a batch, >= 1. A batch has ``p * k`` indices, K consecutive ones per class.
        seed: seed of the epoch's shuffling (default 0); the epoch is reproducible from ``(seed, epoch)``.
        num_replicas: number of ranks sharing the epoch (default: the world size of the initialised
            torch.distributed process group, else 1).
        rank: this rank, ``0 <= rank < num_replicas`` (default: the process group's rank, else 0).
        drop_last: with several ranks, drop the tail batches that would not give every rank one more
            (default False: pad with extra batches instead, so every sample is used).

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``) to draw a new order.

    Example::

        >>> sampler = PKSampler(train_labels, p=16, k=4)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader: ...
    """

    def __init__(self, labels: Union[torch.Tensor, Sequence[int]], p: int, k: int, *, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, drop_last: bool = False):
        """Build the sampler; every argument, its default and its valid range are in the class docstring."""
        where = "PKSampler"
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{where}: `labels` must be a 1-D tensor or sequence of ints ({err})") from None
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"{where}: `labels` must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{where}: `labels` must hold integers, got dtype {labels.dtype}")
        self.p = C.check_positive_int(p, "p", where)
        self.k = C.check_positive_int(k, "k", where)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: `seed` must be an int, got {type(seed).__name__}")
        if not isinstance(drop_last, bool):
            raise TypeError(f"{where}: `drop_last` must be a bool, got {type(drop_last).__name__}")
        num_replicas, rank = _distributed_default(num_replicas, rank)
        self.num_replicas = C.check_positive_int(num_replicas, "num_replicas", where)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.num_replicas:
            raise ValueError(f"{where}: `rank` must be an int in [0, num_replicas={self.num_replicas}), got {rank!r}")
        self.rank, self.seed, self.drop_last, self.epoch = rank, seed, drop_last, 0

        labels = labels.cpu().to(torch.int64)
        classes, inverse = torch.unique(labels, return_inverse=True)
        if len(classes) < self.p:
            raise ValueError(f"{where}: `p`={self.p} classes per batch, but `labels` has only {len(classes)} classes")
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(classes))
        # members[c]: the dataset indices of class c (the one host copy this sampler keeps)
        self._members = list(torch.split(order, counts.tolist()))
        self._groups_per_class = [max(1, math.ceil(n / self.k)) for n in counts.tolist()]
        total_groups = sum(self._groups_per_class)
        self.batches_per_epoch = max(math.ceil(total_groups / self.p), max(self._groups_per_class))
        if self.drop_last:
            self._num_batches_per_rank = self.batches_per_epoch // self.num_replicas
        else:
            self._num_batches_per_rank = math.ceil(self.batches_per_epoch / self.num_replicas)
        if self._num_batches_per_rank == 0:
            raise ValueError(f"{where}: with drop_last=True, {self.batches_per_epoch} batches per epoch give no "
                             f"batch to each of num_replicas={self.num_replicas} ranks")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (seeded by ``seed + epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"PKSampler.set_epoch: `epoch` must be an int, got {type(epoch).__name__}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return self._num_batches_per_rank

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.epoch_batches()
        for batch in batches[self.rank::self.num_replicas][:self._num_batches_per_rank]:
            yield batch

    # ------------------------------------------------------------------------------------------------

    def _class_groups(self, c: int, gen: torch.Generator) -> List[torch.Tensor]:
        """Class c's samples, shuffled, in groups of K (the last one completed from the same class)."""
        members = self._members[c]
        n, k = len(members), self.k
        shuffled = members[torch.randperm(n, generator=gen)]
        if n < k:  # too small: complete with replacement
            extra = members[torch.randint(n, (k - n,), generator=gen)]
            return [torch.cat([shuffled, extra])]
        rest = n % k
        if rest:
            # samples outside the partial last group, without replacement: the group has distinct samples
            fill = shuffled[torch.randperm(n - rest, generator=gen)[:k - rest]]
            shuffled = torch.cat([shuffled, fill])
        return list(shuffled.view(-1, k))

    def _fresh_group(self, c: int, gen: torch.Generator) -> torch.Tensor:
        """K samples of class c drawn anew (without replacement when the class has K or more)."""
        members = self._members[c]
        if len(members) >= self.k:
            return members[torch.randperm(len(members), generator=gen)[:self.k]]
        return members[torch.randint(len(members), (self.k,), generator=gen)]

    def _fill(self, chosen: List[int], gen: torch.Generator) -> List[int]:
        """Complete ``chosen`` to P distinct classes, drawn uniformly among the others."""
        num_classes = len(self._members)
        taken = torch.zeros(num_classes, dtype=torch.bool)
        taken[chosen] = True
        others = torch.nonzero(~taken).flatten()
        pick = others[torch.randperm(len(others), generator=gen)[:self.p - len(chosen)]]
        return pick.tolist()

    def epoch_batches(self) -> List[List[int]]:
        """Every batch of the current epoch, all ranks' (rank r takes entries r, r + W, …), as index lists."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        num_classes = len(self._members)
        queues = [self._class_groups(c, gen) for c in range(num_classes)]
        left = torch.tensor([len(q) for q in queues], dtype=torch.float64)
        batches: List[List[int]] = []
        for batches_left in range(self.batches_per_epoch, 0, -1):
            forced = torch.nonzero(left == batches_left).flatten()
            optional = (left > 0) & (left < batches_left)
            num_draw = min(self.p - len(forced), int(optional.sum()))
            drawn = torch.multinomial(torch.where(optional, left, torch.zeros_like(left)), num_draw,
                                      replacement=False, generator=gen) if num_draw > 0 else forced[:0]
            chosen = torch.cat([forced, drawn])
            chosen = chosen[torch.randperm(len(chosen), generator=gen)].tolist()
            groups = [queues[c].pop() for c in chosen]
            left[chosen] -= 1
            if len(chosen) < self.p:
                extra = self._fill(chosen, gen)
                groups += [self._fresh_group(c, gen) for c in extra]
            batches.append(torch.cat(groups).tolist())
        padded = self._num_batches_per_rank * self.num_replicas
        while len(batches) < padded:  # drop_last=False: every rank gets the same number of batches
            chosen = torch.randperm(num_classes, generator=gen)[:self.p].tolist()
            batches.append(torch.cat([self._fresh_group(c, gen) for c in chosen]).tolist())
        return batches

    def __repr__(self) -> str:
        return (f"PKSampler(p={self.p}, k={self.k}, classes={len(self._members)}, seed={self.seed}, "
                f"num_replicas={self.num_replicas}, rank={self.rank}, drop_last={self.drop_last})")
