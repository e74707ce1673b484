"""P×K batch sampling: P classes (or labels), K samples each, every sample at least once per epoch, DDP-aware.

Batch-hard and batch-all triplet losses need every anchor to have positives in its batch; the usual
answer is P×K batches (Hermans et al. 2017). :class:`PKSampler` yields them as index lists for
``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``; :class:`MultiLabelPKSampler` does the
same for multi-hot labels (P distinct labels × K carriers of each).

How a :class:`PKSampler` epoch is built (everything from one generator seeded with ``seed + epoch``,
identical on every rank):

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

:class:`MultiLabelPKSampler` runs the same three steps on labels instead of classes; what differs (the
home label of a sample, groups completed from any carrier, duplicates across groups) is in its docstring.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Sampler

from . import _checks as C

__all__ = ["PKSampler", "MultiLabelPKSampler"]


def _distributed_default(num_replicas: Optional[int], rank: Optional[int]):
    """(num_replicas, rank) from torch.distributed when a process group is initialised, else (1, 0)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    return num_replicas, rank


def _cut_into_groups(own: torch.Tensor, others: torch.Tensor, k: int, gen: torch.Generator) -> List[torch.Tensor]:
    """``own`` (the samples these groups must cover), shuffled and cut into groups of K; the last group is
    completed without replacement from the samples outside it (the other ``own`` ones and ``others``, more
    samples of the same class or label), and with replacement from all of them only when they are fewer
    than K. ``own`` is non-empty. With ``others`` empty this is PKSampler's step 1 for one class."""
    n, m = len(own), len(others)
    shuffled = own[torch.randperm(n, generator=gen)]
    if n < k:
        if n + m < k:  # too few carriers: every one of them, then complete with replacement
            pool = torch.cat([own, others])
            extra = pool[torch.randint(n + m, (k - n - m,), generator=gen)]
            return [torch.cat([shuffled, others, extra])]
        return [torch.cat([shuffled, others[torch.randperm(m, generator=gen)[:k - n]]])]
    rest = n % k
    if rest:
        # samples outside the partial last group, without replacement: the group has distinct samples
        candidates = torch.cat([shuffled[:n - rest], others])
        fill = candidates[torch.randperm(n - rest + m, generator=gen)[:k - rest]]
        shuffled = torch.cat([shuffled, fill])
    return list(shuffled.view(-1, k))


def _fresh_group(members: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """K of ``members`` drawn anew (without replacement when there are K or more)."""
    if len(members) >= k:
        return members[torch.randperm(len(members), generator=gen)[:k]]
    return members[torch.randint(len(members), (k,), generator=gen)]


class _GroupDeal(Sampler[List[int]]):
    """What PKSampler and MultiLabelPKSampler share: argument checks, the deal of groups of K into batches of
    P distinct classes (steps 2 and 3 of the module docstring), epochs, ranks and the length."""

    _where = ""

    def _check_common(self, p: int, k: int, seed: int, num_replicas: Optional[int], rank: Optional[int],
                      drop_last: bool) -> None:
        where = self._where
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

    def _set_groups(self, groups_per_class: List[int]) -> None:
        """Fix the epoch's size from the number of groups of each class (it never depends on the seed)."""
        self._groups_per_class = groups_per_class
        total_groups = sum(groups_per_class)
        self.batches_per_epoch = max(math.ceil(total_groups / self.p), max(groups_per_class))
        if self.drop_last:
            self._num_batches_per_rank = self.batches_per_epoch // self.num_replicas
        else:
            self._num_batches_per_rank = math.ceil(self.batches_per_epoch / self.num_replicas)
        if self._num_batches_per_rank == 0:
            raise ValueError(f"{self._where}: with drop_last=True, {self.batches_per_epoch} batches per epoch give "
                             f"no batch to each of num_replicas={self.num_replicas} ranks")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (seeded by ``seed + epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"{self._where}.set_epoch: `epoch` must be an int, got {type(epoch).__name__}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return self._num_batches_per_rank

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.epoch_batches()
        for batch in batches[self.rank::self.num_replicas][:self._num_batches_per_rank]:
            yield batch

    # what a subclass provides -------------------------------------------------------------------------

    def _class_groups(self, c: int, gen: torch.Generator) -> List[torch.Tensor]:
        """The epoch's groups of K samples of class c; each sampler defines how it cuts its classes."""
        raise NotImplementedError(f"{type(self).__name__} must define _class_groups (a sampler's own grouping)")

    def _fresh_group(self, c: int, gen: torch.Generator) -> torch.Tensor:
        """K samples of class c drawn anew (without replacement when the class has K or more)."""
        return _fresh_group(self._members[c], self.k, gen)

    def _batch(self, classes: List[int], groups: List[torch.Tensor], gen: torch.Generator) -> List[int]:
        """One batch's index list from its P groups (in order)."""
        return torch.cat(groups).tolist()

    # the deal -------------------------------------------------------------------------------------------

    def _fill(self, chosen: List[int], gen: torch.Generator) -> List[int]:
        """Complete ``chosen`` to P distinct classes, drawn uniformly among the others."""
        num_classes = len(self._members)
        taken = torch.zeros(num_classes, dtype=torch.bool)
        taken[chosen] = True
        others = torch.nonzero(~taken).flatten()
        pick = others[torch.randperm(len(others), generator=gen)[:self.p - len(chosen)]]
        return pick.tolist()

    def _deal(self) -> Tuple[List[List[int]], List[List[int]]]:
        """Every batch of the current epoch, all ranks', and the P classes of each (in group order)."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        num_classes = len(self._members)
        queues = [self._class_groups(c, gen) for c in range(num_classes)]
        left = torch.tensor([len(q) for q in queues], dtype=torch.float64)
        batches: List[List[int]] = []
        batch_classes: List[List[int]] = []
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
                chosen = chosen + extra
            batches.append(self._batch(chosen, groups, gen))
            batch_classes.append(chosen)
        padded = self._num_batches_per_rank * self.num_replicas
        while len(batches) < padded:  # drop_last=False: every rank gets the same number of batches
            chosen = torch.randperm(num_classes, generator=gen)[:self.p].tolist()
            batches.append(self._batch(chosen, [self._fresh_group(c, gen) for c in chosen], gen))
            batch_classes.append(chosen)
        return batches, batch_classes


class PKSampler(_GroupDeal):
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

    _where = "PKSampler"

    def __init__(self, labels: Union[torch.Tensor, Sequence[int]], p: int, k: int, *, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, drop_last: bool = False):
        """Build the sampler; every argument, its default and its valid range are in the class docstring."""
        where = self._where
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{where}: `labels` must be a 1-D tensor or sequence of ints ({err})") from None
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"{where}: `labels` must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{where}: `labels` must hold integers, got dtype {labels.dtype}")
        self._check_common(p, k, seed, num_replicas, rank, drop_last)

        labels = labels.cpu().to(torch.int64)
        classes, inverse = torch.unique(labels, return_inverse=True)
        if len(classes) < self.p:
            raise ValueError(f"{where}: `p`={self.p} classes per batch, but `labels` has only {len(classes)} classes")
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(classes))
        # members[c]: the dataset indices of class c (the one host copy this sampler keeps)
        self._members = list(torch.split(order, counts.tolist()))
        self._set_groups([max(1, math.ceil(n / self.k)) for n in counts.tolist()])

    def _class_groups(self, c: int, gen: torch.Generator) -> List[torch.Tensor]:
        """Class c's samples, shuffled, in groups of K (the last one completed from the same class)."""
        return _cut_into_groups(self._members[c], self._members[c][:0], self.k, gen)

    def epoch_batches(self) -> List[List[int]]:
        """Every batch of the current epoch, all ranks' (rank r takes entries r, r + W, …), as index lists."""
        return self._deal()[0]

    def __repr__(self) -> str:
        return (f"PKSampler(p={self.p}, k={self.k}, classes={len(self._members)}, seed={self.seed}, "
                f"num_replicas={self.num_replicas}, rank={self.rank}, drop_last={self.drop_last})")


class MultiLabelPKSampler(_GroupDeal):
    """Batches of P distinct labels × K carriers of each (index lists) for multi-hot labels, covering every
    labelled sample at least once per epoch.

    Sample i carries label l where ``labels[i, l]``; two samples are positives iff they share a label.
    Each batch has P distinct labels and, for each, a group of K consecutive indices that all carry it, so
    with ``k >= 2`` every sample of a batch has a positive in it; the P labels give negatives where the data
    allows (a sample that carries several of the batch's labels may have none).

    Args:
        labels: (N, L) multi-hot rows: a bool tensor, an integer or floating-point tensor holding only 0 and
            1, or a nested sequence of such rows (N >= 1, L >= 1; any device, read once on the host).
        p: labels per batch, ``1 <= p <= number of labels with at least one carrier``.
        k: carriers per label in a batch, >= 1. A batch has ``p * k`` indices, K consecutive ones per label.
        seed: seed of the epoch's shuffling (default 0); the epoch is reproducible from ``(seed, epoch)``.
        num_replicas: number of ranks sharing the epoch (default: the world size of the initialised
            torch.distributed process group, else 1).
        rank: this rank, ``0 <= rank < num_replicas`` (default: the process group's rank, else 0).
        drop_last: with several ranks, drop the tail batches that would not give every rank one more
            (default False: pad with extra batches instead, so every labelled sample is used).

    How an epoch is built (everything from one generator seeded with ``seed + epoch``, identical on every rank):

    1. Home labels (fixed at construction, so ``len(sampler)`` is exact): every labelled sample gets one home
       label, its rarest one (fewest carriers; ties: the lowest column). Columns without carriers are dropped.
    2. Each label's home samples are shuffled and cut into groups of K; the last group is completed without
       replacement from the label's other carriers (home or not), and with replacement only when the label
       has fewer than K carriers in all. A label with no home sample has no group of its own.
    3. The groups are dealt into ``T = max(ceil(G / P), max_l G_l)`` batches of P distinct labels exactly as
       :class:`PKSampler` deals classes (G groups in all, G_l of label l; a batch short of P labels with
       groups left is completed with fresh groups of K carriers of other labels).
    4. A sample may carry two of a batch's labels and so be in two of its groups. The batch's groups are read
       in order; an index already in the batch is replaced by a carrier of the current group's label not yet
       in the batch (drawn uniformly), and kept (a duplicate) only when there is none: the label's carriers
       are all in the batch already. The index it replaces is still in the batch, so coverage holds.
    5. Distributed, padding and ``drop_last``: as :class:`PKSampler` (batch ``j`` to rank ``j % num_replicas``).

    Duplicates: an index repeats in a batch only when, at the group where it repeats, every carrier of that
    group's label is already in the batch (e.g. a label with fewer than K carriers). So there are none when
    every label has at least ``p * k`` carriers, nor with one-hot rows and at least K samples per class.

    Samples with no label (all-zero rows) can have no positive: they are never yielded (``num_unlabelled``
    counts them). One-hot rows give exactly ``PKSampler(labels.argmax(1), p, k)``'s batches, seed for seed.

    Memory: O(N·L) on the host at construction (the home labels, in row blocks), then the carriers' indices
    (one int64 per (sample, label) pair).

    Example::

        >>> sampler = MultiLabelPKSampler(train_multi_hot, p=8, k=4)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader: ...
    """

    _where = "MultiLabelPKSampler"

    def __init__(self, labels: Union[torch.Tensor, Sequence[Sequence[Union[int, float, bool]]]], p: int, k: int,
                 *, seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 drop_last: bool = False):
        """Build the sampler; every argument, its default and its valid range are in the class docstring."""
        where = self._where
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"{where}: `labels` must be an (N, L) multi-hot tensor or nested sequence of 0/1 "
                                f"rows ({err})") from None
        if labels.dim() != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
            raise ValueError(f"{where}: `labels` must be non-empty (N, L) multi-hot rows, got shape "
                             f"{tuple(labels.shape)}")
        labels = labels.cpu()
        C.check_multi_hot(labels, tuple(labels.shape), "labels", where)
        self._check_common(p, k, seed, num_replicas, rank, drop_last)

        carried = labels if labels.dtype == torch.bool else labels != 0
        counts = carried.sum(0)  # (L,) carriers per label
        self.label_ids = torch.nonzero(counts).flatten()  # the columns with a carrier, in column order
        if len(self.label_ids) < self.p:
            raise ValueError(f"{where}: `p`={self.p} labels per batch, but `labels` has only {len(self.label_ids)} "
                             f"labels with at least one carrier")
        carried = carried[:, self.label_ids]
        counts = counts[self.label_ids]
        n, num_labels = carried.shape
        # home label: the rarest label of each row (ties: the lowest column), in row blocks of <= 16M entries
        key = counts.to(torch.int64) * num_labels + torch.arange(num_labels)
        no_label = torch.iinfo(torch.int64).max
        home = torch.empty(n, dtype=torch.int64)
        rows = max(1, (1 << 24) // num_labels)
        for s in range(0, n, rows):
            block = carried[s:s + rows]
            home[s:s + rows] = torch.where(block, key, no_label).argmin(1)
        labelled = carried.any(1)
        self.num_unlabelled = int(n - labelled.sum())
        home_of = torch.where(labelled, home, num_labels)  # num_labels: no home (skipped)
        order = torch.argsort(home_of, stable=True)
        home_counts = torch.bincount(home_of, minlength=num_labels + 1)[:num_labels]
        # home[l]: the samples label l's groups cover; carriers[l]: every sample carrying l (ascending)
        self._home = list(torch.split(order[:int(home_counts.sum())], home_counts.tolist()))
        pairs = torch.nonzero(carried.t())  # (label, sample), sorted by label then sample
        self._members = list(torch.split(pairs[:, 1], counts.tolist()))
        self._set_groups([math.ceil(h / self.k) for h in home_counts.tolist()])

    def _class_groups(self, c: int, gen: torch.Generator) -> List[torch.Tensor]:
        """Label c's home samples, shuffled, in groups of K (the last one completed from c's other carriers)."""
        home, carriers = self._home[c], self._members[c]
        if len(home) == 0:
            return []
        others = carriers[~torch.isin(carriers, home)] if len(home) < len(carriers) else carriers[:0]
        return _cut_into_groups(home, others, self.k, gen)

    def _batch(self, classes: List[int], groups: List[torch.Tensor], gen: torch.Generator) -> List[int]:
        """The batch's groups in order, an index already in the batch replaced by a carrier of the group's label
        not yet in it (kept only when there is none)."""
        flat = torch.cat(groups)
        if len(torch.unique(flat)) == len(flat):
            return flat.tolist()
        out: List[int] = []
        used = set()
        for c, group in zip(classes, groups):
            for i in group.tolist():
                if i in used:
                    carriers = self._members[c]
                    free = carriers[~torch.isin(carriers, torch.tensor(out, dtype=torch.int64))]
                    if len(free):
                        i = int(free[torch.randint(len(free), (1,), generator=gen)])
                out.append(i)
                used.add(i)
        return out

    def epoch_batches(self, return_labels: bool = False) -> Union[List[List[int]],
                                                                  Tuple[List[List[int]], List[List[int]]]]:
        """Every batch of the current epoch, all ranks' (rank r takes entries r, r + W, …), as index lists;
        with ``return_labels=True`` also each batch's P label columns (of ``labels``), one per group of K, in
        the batch's order."""
        batches, classes = self._deal()
        if not return_labels:
            return batches
        ids = self.label_ids.tolist()
        return batches, [[ids[c] for c in chosen] for chosen in classes]

    def __repr__(self) -> str:
        return (f"MultiLabelPKSampler(p={self.p}, k={self.k}, labels={len(self._members)}, "
                f"unlabelled={self.num_unlabelled}, seed={self.seed}, num_replicas={self.num_replicas}, "
                f"rank={self.rank}, drop_last={self.drop_last})")
