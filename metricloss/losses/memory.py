"""Cross-batch memory: mine the batch against a ring buffer of past embeddings (Wang et al. 2020, XBM)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import _checks as C
from .. import distributed as _dist
from ..ops.reduction import LossTerms, mask_nonfinite

__all__ = ["CrossBatchMemory"]


class CrossBatchMemory(nn.Module):
    """A loss over the batch's anchors against a ring buffer of the last ``memory_size`` embeddings.

    Each call (1) enqueues the batch's embeddings (detached) and labels into the ring buffer, overwriting
    the oldest entries, then (2) returns ``loss`` with the batch as anchors and the filled memory, which
    now includes the batch itself, as the reference set. An anchor's own slot is excluded by index
    (``ref_self_index``), so it is never its own positive, while other copies of the same sample in the
    memory still count. Gradients reach the anchors only (the memory is detached, as in XBM and PML).

    Args:
        loss: a loss module with ``loss_terms(embeddings, labels, ref_embeddings, ref_labels,
            ref_self_index)`` and a ``reduction`` attribute, e.g. ``ml.TripletLoss(...)``. Its exactness and
            memory use carry over: batch-all over a memory of 65536 mines in chunks, with no pair list.
        embedding_dim: D, the width of the embeddings.
        memory_size: number of slots, >= the number of rows enqueued per call (the global batch under
            torch.distributed).
        dtype: dtype of the stored embeddings (default float32; ``module.to(dtype)`` converts it).
        group: the torch.distributed process group (default: the world), used when one is initialised.
        num_labels: L for multi-hot labels ((B, L) rows; positive iff a label in common, every mining);
            default None: one integer label per sample.

    Buffers (in ``state_dict``, moved by ``.to()``): ``embedding_memory`` (memory_size, D), ``label_memory``
    (memory_size,) int64 (or (memory_size, L) bool with ``num_labels``), ``queue_idx`` () int64 (the next
    slot), ``num_filled`` () int64.

    ``forward(embeddings, labels, enqueue_mask=None)``: with ``enqueue_mask`` (B,) bool, as PML's, only the
    rows where it is True are enqueued and only the others are anchors (no anchor then has a slot).

    Nothing to mine: when every row is enqueued (an all-True ``enqueue_mask``), or when no row is enqueued
    into an empty memory (an all-False ``enqueue_mask`` on the first call, or after :meth:`reset_queue`:
    the anchors have no reference), the loss has no valid term and is **0, connected to the graph, with a
    zero gradient** (``"none"``: zeros, one per anchor), as for a batch without a valid triplet; NaN or Inf
    in the anchors still gives NaN. PML's CrossBatchMemory returns 0 there too.

    Under torch.distributed (inside an initialised process group of more than one rank) every rank
    enqueues the **global** batch, all ranks' rows in rank order, so the memories stay identical on every
    rank; the anchors are the rank's own rows, and the loss is scaled like
    :class:`~metricloss.distributed.DistributedLoss`: after DDP's gradient averaging the gradients equal
    those of one process running this module on the concatenated batches (the returned value is that
    process's loss, on every rank; ``"none"`` returns this rank's anchors' rows). A rank may pass an empty
    batch (0 rows): it enqueues nothing, has no anchor, and returns the global loss with a (0, D) zero
    gradient; when every rank's batch is empty, every rank raises ``ValueError("CrossBatchMemory: every
    rank's batch is empty (sizes [0, 0]); the global batch must have at least one row")``. Before any data
    collective the ranks exchange a small header (in the one all-gather that exchanges the sizes, with the
    one host read that also reads the ring's position): when they disagree on ``embedding_dim``,
    ``memory_size``, the embedding dtype, the memory dtype, the device type, the reduction or the memory
    state, every rank raises the same ``ValueError`` naming each rank's value, e.g. ``"CrossBatchMemory:
    ranks disagree on the embedding dtype: rank 0 float32, rank 1 float64"``; when one rank's inputs fail
    their checks, that rank raises its error and the others raise ``ValueError("CrossBatchMemory: rank(s)
    [r] failed their input checks (that rank raised the error saying why); no data was exchanged")``, so
    that no rank waits in a collective. A global batch larger than ``memory_size`` raises on every rank.

    Shapes:
        - embeddings: (B, D) float (B >= 1; B >= 0 under torch.distributed); labels: (B,) int, or (B, L)
          multi-hot with ``num_labels=L``; enqueue_mask: (B,) bool, optional.
        - output: () or (number of anchors,) for ``reduction="none"``.

    Example::

        >>> criterion = ml.CrossBatchMemory(ml.TripletLoss(mining="batch_hard"), 128, memory_size=8192)
        >>> loss = criterion(model(x), y)
    """

    def __init__(self, loss: nn.Module, embedding_dim: int, memory_size: int, *, dtype: torch.dtype = torch.float32,
                 group: Optional[object] = None, num_labels: Optional[int] = None):
        """Build the wrapper; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = "CrossBatchMemory"
        if not _dist._has_loss_terms(loss):
            raise TypeError(f"{where}: `loss` must expose loss_terms(...) and a `reduction` attribute "
                            f"(e.g. metricloss.TripletLoss), got {type(loss).__name__}")
        self.embedding_dim = C.check_positive_int(embedding_dim, "embedding_dim", where)
        self.memory_size = C.check_positive_int(memory_size, "memory_size", where)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{where}: `dtype` must be a floating-point torch.dtype, got {dtype!r}")
        self.loss = loss
        self.group = group
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_dim, dtype=dtype))
        self.num_labels = None if num_labels is None else C.check_positive_int(num_labels, "num_labels", where)
        label_shape = (self.memory_size,) if self.num_labels is None else (self.memory_size, self.num_labels)
        label_dtype = torch.int64 if self.num_labels is None else torch.bool
        self.register_buffer("label_memory", torch.zeros(label_shape, dtype=label_dtype))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.int64))
        # (queue_idx, num_filled) mirrored on the host: each call advances it by the batch size, so a step
        # reads nothing from the device. None after load_state_dict (read once on the next call).
        self._ring_on_host: Optional[Tuple[int, int]] = (0, 0)

    def reset_queue(self) -> None:
        """Empty the memory (the stored rows are zeroed, the ring restarts at slot 0)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx.zero_()
        self.num_filled.zero_()
        self._ring_on_host = (0, 0)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ring_on_host = None  # the loaded ring position is read from the buffers on the next call

    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Write rows into the ring (oldest first overwritten); returns their slots (n,) int64.

        The write position and fill level are mirrored on the host (no device read), except on the first
        call after ``load_state_dict`` (one read). Change the ring through :meth:`reset_queue`,
        :meth:`enqueue`, ``forward`` or ``load_state_dict``: an in-place edit of the ``queue_idx`` /
        ``num_filled`` buffers is not seen by the mirror.
        """
        return self._enqueue(embeddings, labels)[0]

    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 state: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, int]:
        """:meth:`enqueue`, also returning the number of filled slots afterwards (a host int).

        ``state``: ``(queue_idx, num_filled)`` already read from the device (then no read here).
        """
        n = embeddings.shape[0]
        if n > self.memory_size:
            raise ValueError(f"CrossBatchMemory: {n} rows to enqueue in one call exceed memory_size="
                             f"{self.memory_size}; the batch would overwrite itself")
        if state is None:
            state = self._ring_on_host
        if state is None:
            state = tuple(torch.stack([self.queue_idx, self.num_filled]).tolist())
        start, filled = state
        filled = min(filled + n, self.memory_size)
        slots = torch.arange(start, start + n, device=self.embedding_memory.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach().to(self.embedding_memory.dtype)
        self.label_memory[slots] = labels.to(self.label_memory.dtype)
        self.queue_idx.fill_((start + n) % self.memory_size)
        self.num_filled.fill_(filled)
        self._ring_on_host = ((start + n) % self.memory_size, filled)
        return slots, filled

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor, enqueue_mask: Optional[torch.Tensor],
                      allow_empty: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate the forward inputs; returns the labels as int64 and the mask on the embeddings' device."""
        where = "CrossBatchMemory"
        if allow_empty:
            _dist.check_embeddings_may_be_empty(embeddings, "embeddings", where)
        else:
            C.check_embeddings(embeddings, "embeddings", where)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"{where}: `embeddings` must have embedding_dim={self.embedding_dim} columns, "
                             f"got shape {tuple(embeddings.shape)}")
        if embeddings.device != self.embedding_memory.device:
            raise ValueError(f"{where}: `embeddings` is on {embeddings.device} but the memory is on "
                             f"{self.embedding_memory.device}; move the module with .to()")
        C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device,
                       multi_hot=self.num_labels)
        # as the memory stores them (uint64 by its bits: equality kept; multi-hot rows as bool)
        labels = labels.to(torch.int64 if self.num_labels is None else torch.bool)
        if enqueue_mask is not None:
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError(f"{where}: `enqueue_mask` must be a bool tensor, got "
                                f"{getattr(enqueue_mask, 'dtype', type(enqueue_mask).__name__)}")
            if enqueue_mask.shape != labels.shape[:1]:
                raise ValueError(f"{where}: `enqueue_mask` must have shape {tuple(labels.shape[:1])}, "
                                 f"got {tuple(enqueue_mask.shape)}")
            enqueue_mask = enqueue_mask.to(embeddings.device)
        return labels, enqueue_mask

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                enqueue_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Enqueue the batch, then the wrapped loss of its anchors against the filled memory.

        Args:
            embeddings: (B, D) float batch (D = ``embedding_dim``), on the memory's device; stored detached.
            labels: (B,) integer labels, or (B, L) multi-hot rows with ``num_labels=L``.
            enqueue_mask: optional (B,) bool: the rows to enqueue (the others are the anchors, as in PML);
                default every row is enqueued and every row is an anchor (its own slot excluded by index).

        Returns:
            A () loss (fp32, fp64 for fp64 input) with the wrapped loss's reduction, or (anchors,) for
            ``"none"``; 0 (connected, zero gradient) when there is nothing to mine (see the class
            docstring). Under torch.distributed the value is the global one and the gradient exact after
            DDP's averaging.

        Raises:
            TypeError, ValueError: malformed inputs, more rows than ``memory_size`` to enqueue, and under
                torch.distributed ranks that disagree (the same message on every rank; class docstring).
        """
        where = "CrossBatchMemory"
        distributed = _dist.is_distributed(self.group)
        failed: Optional[Exception] = None
        try:
            labels, enqueue_mask = self._check_inputs(embeddings, labels, enqueue_mask, allow_empty=distributed)
        except (TypeError, ValueError) as err:
            if not distributed:
                raise
            failed = err  # raised on this rank by the header exchange; the other ranks raise naming it
        if failed is None and enqueue_mask is not None:
            queued, queued_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        elif failed is None:
            queued, queued_labels, anchors, anchor_labels = embeddings, labels, embeddings, labels

        if distributed:
            # every rank writes the same global batch (rank order), so every rank holds the same memory
            sizes, batch_sizes, state = self._exchange_header(embeddings if failed is None else None,
                                                              queued.shape[0] if failed is None else 0, failed)
            if sum(batch_sizes) == 0:
                raise ValueError(f"{where}: every rank's batch is empty (sizes {batch_sizes}); the global batch "
                                 f"must have at least one row")
            if sum(sizes) > self.memory_size:
                raise ValueError(f"{where}: the global batch enqueues {sum(sizes)} rows in one call (ranks "
                                 f"{sizes}), more than memory_size={self.memory_size}; the batch would "
                                 f"overwrite itself")
            offset = sum(sizes[:torch.distributed.get_rank(self.group)])
            slots, filled = self._enqueue(_dist.all_gather_sized(queued.detach(), sizes, self.group),
                                          _dist.all_gather_sized(queued_labels, sizes, self.group), state)
            own_slots = slots[offset:offset + queued.shape[0]]
        else:
            own_slots, filled = self._enqueue(queued, queued_labels)
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]

        out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        if anchors.shape[0] == 0:  # every row was enqueued (or none on this rank): nothing to mine, a zero
            count = torch.zeros((), dtype=torch.int64, device=embeddings.device)
            terms = LossTerms(embeddings[:0].sum(1).to(out_dtype), count, count)
        elif filled == 0:  # no row enqueued into an empty memory: no reference, no term (a connected zero)
            count = torch.zeros((), dtype=torch.int64, device=embeddings.device)
            per_anchor = mask_nonfinite(anchors[:, :0].sum(1).to(out_dtype), anchors)
            terms = LossTerms(per_anchor, count, count)
        else:
            if enqueue_mask is None:
                self_index = own_slots
            else:  # anchors are the rows not enqueued: none of them has a slot
                self_index = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
            # the reduction of the loss that computes the terms (a MiningSchedule moves on in loss_terms)
            reduction = self.loss.reduction
            terms = self.loss.loss_terms(anchors, anchor_labels, memory.to(anchors.dtype), memory_labels,
                                         ref_self_index=self_index)
            return _dist.reduce_across_ranks(terms, reduction, self.group)
        return _dist.reduce_across_ranks(terms, self.loss.reduction, self.group)

    def _exchange_header(self, embeddings: Optional[torch.Tensor], queued: int, failed: Optional[Exception]):
        """The ranks' sizes, after checking they agree; one all-gather, one host read (which also reads the ring).

        Returns (rows enqueued per rank, batch rows per rank, this ring's (queue_idx, num_filled)).
        """
        where = "CrossBatchMemory"
        ok = embeddings is not None
        fields = [_dist.int_field("the rows to enqueue", queued if ok else None, compare=False),
                  _dist.int_field("the batch rows", embeddings.shape[0] if ok else None, compare=False),
                  _dist.int_field("D (embedding_dim)", self.embedding_dim),
                  _dist.int_field("memory_size", self.memory_size),
                  _dist.dtype_field("the embedding dtype", embeddings if ok else None),
                  _dist.dtype_field("the memory dtype", self.embedding_memory),
                  _dist.name_field("the device type", self.embedding_memory.device.type),
                  _dist.name_field("the reduction", self.loss.reduction)]
        ring = torch.stack([self.queue_idx, self.num_filled])  # read with the header: no extra host sync
        headers = _dist.exchange_header(where, fields, self.embedding_memory.device, self.group, failed,
                                        device_tail=ring)
        states = [h[-1] for h in headers]
        if len(set(states)) > 1:
            raise ValueError(f"{where}: ranks disagree on the memory state (queue_idx, num_filled): "
                             f"{_dist._by_rank([str(st) for st in states])}; every rank must hold the same memory "
                             f"(load the same state_dict, or reset_queue(), on every rank)")
        return [h[0][0] for h in headers], [h[1][0] for h in headers], states[0]

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        extra = "" if self.num_labels is None else f", num_labels={self.num_labels}"
        return (f"embedding_dim={self.embedding_dim}, memory_size={self.memory_size}, "
                f"dtype={self.embedding_memory.dtype}" + extra)
