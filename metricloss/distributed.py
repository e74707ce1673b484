"""Losses over the global batch of a torch.distributed job, exact after DDP's gradient averaging.

Two pieces, both on plain ``torch.distributed`` collectives (any backend: gloo, NCCL, …):

* :func:`all_gather_with_grad`: every rank's tensor concatenated in rank order, differentiable: the
  backward pass sums, over the ranks, the gradient each one computed for a slice and hands every rank
  the sum for its own slice. Ranks may hold different batch sizes, 0 included.
* :class:`DistributedLoss`: wraps a loss that exposes ``loss_terms`` (e.g. :class:`~metricloss.TripletLoss`)
  so that each rank mines its own anchors against the whole global batch and returns a per-rank loss
  whose gradient, once DDP has averaged the ranks' gradients, is exactly the gradient of the same loss
  computed in one process on the concatenated global batch (see *Design › Semantics and defaults* in the docs for the reductions).

Why the scaling (the derivation, once): with a differentiable gather in rank order and a per-rank loss
L_r, DDP's averaged parameter gradient is (1/W)·Σ_r ∂L_r/∂θ. It equals the global loss's gradient when
(1/W)·Σ_r L_r *is* the global loss as a function of every embedding. With the global loss
Σ_{all anchors} term(a) / count, the choice L_r = W · Σ_{a on rank r} term(a) / count_global does it,
with count_global all-reduced (valid terms for ``"mean"``, terms > 0 for ``"mean_nonzero"``, 1 for
``"sum"``). Each rank's terms see the other ranks' embeddings as references, so their gradients reach
those ranks through the gather's backward.

Agreement: the batch sizes travel in a small fixed-length int64 header (:func:`exchange_header`, one
all-gather and one host read, as the sizes alone did), together with what every rank must agree on
(dtypes, widths, device type, reduction). Every rank checks every header, so a disagreement raises the
same ``ValueError`` on every rank before any data collective: the collectives themselves compare
nothing and would read one dtype's bits as another's, or abort on mismatched buffer sizes.
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import _checks as C
from .ops.reduction import REDUCTIONS, LossTerms, reduce_loss

__all__ = ["is_distributed", "all_gather_with_grad", "DistributedLoss", "exchange_header", "HeaderField"]


def is_distributed(group: Optional[object] = None) -> bool:
    """True inside an initialised torch.distributed process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# ----------------------------------------------------------------------------------------------------
# the header: sizes and the facts every rank must agree on, in one small all-gather
# ----------------------------------------------------------------------------------------------------

HEADER_LEN = 24
"""int64 entries of every header (fixed, so that a header never makes the collective itself fail)."""

_NAMES: Dict[int, str] = {}


def _code(name: str) -> int:
    """A stable int code for a name (the same in every process), remembered for the messages."""
    code = zlib.crc32(name.encode())
    _NAMES.setdefault(code, name)
    return code


def _name(code: int) -> str:
    return _NAMES.get(code, f"#{code}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


for _d in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
    _code(_dtype_name(_d))
for _n in ("cpu", "cuda", "xpu", "mps", "hpu", "meta", "mtia", "xla", "lazy", "ipu", "ve", "vulkan", "hip",
           "maia", "privateuseone") + tuple(REDUCTIONS) + ("all_gather_with_grad", "DistributedLoss",
                                                           "CrossBatchMemory", "gather_sizes"):
    _code(_n)


class HeaderField(NamedTuple):
    """One fact in a rank's header.

    Attributes:
        what: how a message names it, e.g. ``"the embedding dtype"``.
        values: its int64 encoding (the same length on every rank for a given call site).
        show: turns ``values`` back into words for the message (must not depend on the rank).
        compare: False for facts that may differ between ranks (the row counts).
    """

    what: str
    values: Tuple[int, ...]
    show: Callable[[Tuple[int, ...]], str]
    compare: bool = True


def _show_name(values: Tuple[int, ...]) -> str:
    return _name(values[0])


def _show_int(values: Tuple[int, ...]) -> str:
    return str(values[0])


def name_field(what: str, name: Optional[str]) -> HeaderField:
    """A field holding a name (a dtype, a device type, a reduction), compared across ranks."""
    return HeaderField(what, (0 if name is None else _code(name),), _show_name)


def dtype_field(what: str, tensor: Optional[torch.Tensor]) -> HeaderField:
    """The dtype of ``tensor`` (None: a placeholder, for a rank whose inputs failed their checks)."""
    return name_field(what, None if tensor is None else _dtype_name(tensor.dtype))


def int_field(what: str, value: Optional[int], compare: bool = True) -> HeaderField:
    """An integer (None: a placeholder)."""
    return HeaderField(what, (0 if value is None else int(value),), _show_int, compare)


_SHAPE_SLOTS = 6  # trailing dims sent one by one; a 7th slot holds the product of any beyond


def _show_shape(values: Tuple[int, ...]) -> str:
    ndim, dims = values[0], values[1:]
    if ndim <= _SHAPE_SLOTS + 1:
        return str(tuple(dims[:max(ndim - 1, 0)]))
    return f"{tuple(dims[:-1])} then dims of product {dims[-1]}"


def shape_field(what: str, tensor: Optional[torch.Tensor]) -> HeaderField:
    """The trailing shape (every dim after the first) of ``tensor``; exact up to 7-D, then by product."""
    if tensor is None:
        return HeaderField(what, (0,) * (_SHAPE_SLOTS + 2), _show_shape)
    trailing = list(tensor.shape[1:])
    slots = trailing[:_SHAPE_SLOTS] + [0] * max(_SHAPE_SLOTS - len(trailing), 0)
    rest = 1
    for d in trailing[_SHAPE_SLOTS:]:
        rest *= d
    slots.append(rest if len(trailing) > _SHAPE_SLOTS else 0)
    return HeaderField(what, (tensor.dim(),) + tuple(slots), _show_shape)


def _by_rank(shown: Sequence[str]) -> str:
    """'rank 0 float32, rank 1 float64' (grouped by value for more than 8 ranks)."""
    if len(shown) <= 8:
        return ", ".join(f"rank {r} {v}" for r, v in enumerate(shown))
    groups: Dict[str, List[int]] = {}
    for r, v in enumerate(shown):
        groups.setdefault(v, []).append(r)
    parts = []
    for v, ranks in groups.items():
        listed = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
        parts.append(f"{v} on {len(ranks)} rank(s) ({listed})")
    return "; ".join(parts)


def fallback_device(group: Optional[object] = None) -> torch.device:
    """Where a header goes when a rank has no valid tensor to take the device from (NCCL: the GPU)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_header(where: str, fields: Sequence[HeaderField], device: torch.device,
                    group: Optional[object] = None, failed: Optional[BaseException] = None,
                    device_tail: Optional[torch.Tensor] = None) -> List[List[Tuple[int, ...]]]:
    """Every rank's header, after checking that the ranks agree: one all-gather, one host read.

    The header is an int64 tensor of :data:`HEADER_LEN` entries: a tag naming the call site, a flag for a
    rank whose own inputs failed their checks, then the ``fields`` (row counts, dtypes, widths, ...). Every
    rank sees every header, so every rank takes the same decision before any data collective runs:

    * a rank whose inputs failed (``failed`` is its exception) re-raises its own error; every other rank
      raises ``ValueError("<where>: rank(s) [r] failed their input checks (that rank raised the error
      saying why); no data was exchanged")``;
    * a field with ``compare=True`` that differs raises, on every rank, the same
      ``ValueError("<where>: ranks disagree on <what>: rank 0 <value>, rank 1 <value>")``.

    Args:
        where: the caller's name, for the messages and the call-site tag (ranks at different call sites
            disagree on "the call").
        fields: this rank's facts, the same count and lengths on every rank for a given call site.
        device: where the header tensor lives (the data's device; a GPU for NCCL).
        group: the process group (default: the world).
        failed: this rank's input-check exception, or None; its fields are then placeholders.
        device_tail: optional 1-D int64 tensor, already on ``device``, written after the fields without a
            host read (e.g. buffers such as a ring's write position); its entries are returned as the last
            "field" of each rank's header and are not compared here.

    Returns:
        ``headers[rank][i]``: the values of field ``i`` on each rank (group rank order); with
        ``device_tail``, ``headers[rank][-1]`` holds its entries.
    """
    flat = [_code(where), 0 if failed is None else 1]
    for f in fields:
        flat.extend(int(v) for v in f.values)
    n_tail = 0 if device_tail is None else device_tail.numel()
    if len(flat) + n_tail > HEADER_LEN:
        raise AssertionError(f"{where}: header of {len(flat) + n_tail} entries exceeds {HEADER_LEN}")
    mine = torch.tensor(flat + [0] * (HEADER_LEN - len(flat)), dtype=torch.int64, device=device)
    if device_tail is not None:
        mine[len(flat):len(flat) + n_tail] = device_tail.reshape(-1).to(device=device, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    rows = torch.stack(out).tolist()  # the one host read

    tags = [row[0] for row in rows]
    if len(set(tags)) > 1:
        raise ValueError(f"{where}: ranks disagree on the call: {_by_rank([_name(t) for t in tags])}; every "
                         f"rank must make the same collective calls in the same order")
    bad = [r for r, row in enumerate(rows) if row[1]]
    if bad:
        if failed is not None:
            raise failed
        raise ValueError(f"{where}: rank(s) {bad} failed their input checks (that rank raised the error saying "
                         f"why); no data was exchanged")
    headers: List[List[Tuple[int, ...]]] = []
    for row in rows:
        pos, per_field = 2, []
        for f in fields:
            per_field.append(tuple(row[pos:pos + len(f.values)]))
            pos += len(f.values)
        if device_tail is not None:
            per_field.append(tuple(row[pos:pos + n_tail]))
        headers.append(per_field)
    for i, f in enumerate(fields):
        if f.compare and len({h[i] for h in headers}) > 1:
            raise ValueError(f"{where}: ranks disagree on {f.what}: {_by_rank([f.show(h[i]) for h in headers])}")
    return headers


def gather_sizes(n: int, device: torch.device, group: Optional[object] = None) -> List[int]:
    """Every rank's ``n`` (its batch size), in rank order. One small all-gather and one host read.

    Kept for callers of the sizes alone: it checks nothing else (prefer :func:`exchange_header`).
    """
    headers = exchange_header("gather_sizes", [int_field("the rows", n, compare=False)], device, group)
    return [h[0][0] for h in headers]


def all_gather_sized(tensor: torch.Tensor, sizes: List[int], group: Optional[object] = None) -> torch.Tensor:
    """Concatenation in rank order of every rank's ``tensor`` (rank r holds ``sizes[r]`` rows); no gradient.

    Unequal sizes are padded to the largest into contiguous buffers, gathered, then sliced back: the
    collectives need equal, contiguous buffers (non-contiguous inputs lost their gradients in pytorch
    #120386). Bool tensors travel as uint8 (not every backend gathers bool). ``sizes`` must come from a
    header exchange that checked the dtypes and trailing shapes agree (:func:`exchange_header`): the
    collective itself compares nothing. When every buffer is empty (all sizes 0, or a trailing dim of 0,
    the same on every rank) no collective runs.
    """
    is_bool = tensor.dtype == torch.bool
    send = tensor.to(torch.uint8) if is_bool else tensor
    largest = max(sizes)
    if send.shape[0] != largest:
        padded = send.new_zeros((largest,) + tuple(send.shape[1:]))
        padded[:send.shape[0]] = send
        send = padded
    send = send.contiguous()
    if send.numel() == 0:  # nothing to send on any rank (the sizes and trailing shape are the same everywhere)
        out = send.new_zeros((sum(sizes),) + tuple(send.shape[1:]))
        return out.bool() if is_bool else out
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
        if total.numel():  # every rank's gradient has the same (empty or not) shape
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        n = ctx.sizes[dist.get_rank(ctx.group)]
        return total[ctx.start:ctx.start + n], None, None


def all_gather_with_grad(tensor: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Differentiable all-gather: every rank's ``tensor`` concatenated along dim 0 in rank order.

    Args:
        tensor: (B_r, ...) this rank's rows, any dtype; ranks may hold different B_r, including 0 (an
            empty rank contributes no rows and gets a (0, ...) gradient). The dtype, the trailing dims and
            the device type must agree across ranks.
        group: the process group (default: the world).

    Returns:
        (Σ_r B_r, ...) the same tensor on every rank, rank 0's rows first. Its backward pass sends each
        rank the sum over all ranks of the gradient of that rank's slice, so a loss on the gathered
        tensor trains every rank's embeddings. Every rank must run the backward pass (it is a
        collective). Outside an initialised process group (or with one rank) it returns ``tensor``.

    Raises:
        TypeError, ValueError: ``tensor`` is not a tensor or is 0-dim. Inside a process group the rank at
            fault raises that error and every other rank raises ``ValueError("all_gather_with_grad:
            rank(s) [r] failed their input checks ...")``, so that no rank waits in a collective.
        ValueError: on every rank, the same message, when the ranks disagree on the dtype, the trailing
            shape or the device type, e.g. ``"all_gather_with_grad: ranks disagree on the dtype: rank 0
            float16, rank 1 bfloat16"`` (the bits of one dtype are never read as another's).

    Cost: one all-gather of a small int64 header (the sizes and the facts above, :func:`exchange_header`)
    with one host read, one all-gather of the data; backward one all-reduce of (Σ_r B_r, ...) per rank.
    There is no option to pass the sizes and skip the header: the sizes are always exchanged, and the
    checks ride in the same collective at no extra cost.
    """
    where = "all_gather_with_grad"
    failed: Optional[Exception] = None
    try:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: `tensor` must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ValueError(f"{where}: `tensor` must have at least one dimension (rows to gather)")
    except (TypeError, ValueError) as err:
        if not is_distributed(group):
            raise
        failed = err
    if not is_distributed(group):
        return tensor
    ok = tensor if failed is None else None
    fields = [int_field("the rows", None if ok is None else ok.shape[0], compare=False),
              shape_field("the trailing shape (the dims after the first)", ok),
              dtype_field("the dtype", ok),
              name_field("the device type", None if ok is None else ok.device.type)]
    device = ok.device if ok is not None else fallback_device(group)
    headers = exchange_header(where, fields, device, group, failed)
    sizes = [h[0][0] for h in headers]
    return _AllGatherWithGrad.apply(tensor, sizes, group)


def check_embeddings_may_be_empty(x: object, name: str, where: str) -> torch.Tensor:
    """:func:`metricloss._checks.check_embeddings`, except that B = 0 rows is allowed (a rank's empty batch)."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 0:
        # the dtype and width checks, on a stand-in row that allocates nothing
        C.check_embeddings(torch.empty((1, x.shape[1]), dtype=x.dtype, device="meta"), name, where)
        return x
    return C.check_embeddings(x, name, where)


def empty_terms(reference: torch.Tensor, dtype: torch.dtype) -> LossTerms:
    """The terms of a rank without anchors: (0,) per-anchor sums connected to ``reference`` and zero counts.

    Connected, so that this rank's backward pass still reaches (and runs) the gather's collective.
    """
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=torch.int64, device=reference.device)
    return LossTerms(reference[:0].flatten(1).sum(1).to(out_dtype), zero, zero)


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

    * a rank may hold an **empty batch** (B_r = 0, e.g. an uneven last step): it takes part in every
      collective, contributes no anchor and no reference, returns the global loss of the other ranks'
      union (``"none"``: a (0,) tensor) and gets a zero gradient of shape (0, D). If **every** rank is
      empty the global batch has no rows and every rank raises ``ValueError("DistributedLoss: every
      rank's batch is empty (sizes [0, 0]); the global batch must have at least one row")``, as one
      process raises on an empty batch.

    Outside an initialised process group (or with one rank) it is exactly the plain ``loss``.

    Agreement across ranks: before any data collective, the ranks exchange a small int64 header (the
    same single all-gather that exchanges the batch sizes, one host read; :func:`exchange_header`) with D,
    the embedding dtype, the label dtype, the device type and the reduction. When they differ, every rank
    raises the same ``ValueError`` naming each rank's value, e.g. ``"DistributedLoss: ranks disagree on the
    embedding dtype: rank 0 float16, rank 1 bfloat16"`` (mixed float dtypes are refused, not promoted:
    cast on every rank to one dtype). When a rank's own inputs fail their checks, that rank raises its
    error and every other rank raises ``ValueError("DistributedLoss: rank(s) [r] failed their input checks
    (that rank raised the error saying why); no data was exchanged")``: no rank aborts or waits in a
    collective. The sizes are always exchanged (there is no option to skip the header).

    Cost per rank and step: mining B_r anchors against Σ B references, O(B·W·B) distance work in
    chunks of the wrapped loss's ``chunk_bytes`` ((chunk, Σ B) blocks), never a (W·B)² matrix.
    Communication: one all-gather of the header (with the sizes), all-gathers of the embeddings and
    labels, one all-reduce of three scalars; backward one all-reduce of the (Σ B, D) gradient. Every rank
    must call forward and backward the same number of times (they are collectives).

    Shapes:
        - embeddings: (B_r, D) float, B_r >= 0; labels: (B_r,) int (this rank's batch).
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
            embeddings: (B, D) float rows of this rank (B may differ between ranks, and may be 0 inside a
                process group; D, the dtype and the device type must agree).
            labels: (B,) integer labels (the same dtype on every rank).

        Returns:
            A () loss in fp32 (fp64 for fp64 input) whose value is the global loss on every rank, and whose
            gradient, after DDP's averaging, is that of one process on the concatenated batch; or (B,)
            per-anchor losses of this rank for ``reduction="none"``. Outside a process group: the plain loss.

        Raises:
            TypeError, ValueError: this rank's inputs are malformed (the other ranks raise ValueError
                naming this rank), the ranks disagree (the same ValueError on every rank), or every
                rank's batch is empty (see the class docstring for the messages).
        """
        where = "DistributedLoss"
        if not is_distributed(self.group):
            return self.loss(embeddings, labels)
        failed: Optional[Exception] = None
        try:
            check_embeddings_may_be_empty(embeddings, "embeddings", where)
            # multi-hot rows (n, L): every rank must give the same L (checked in the header below)
            width = labels.shape[1] if isinstance(labels, torch.Tensor) and labels.dim() == 2 else None
            C.check_labels(labels, embeddings.shape[0], "labels", where, device=embeddings.device, multi_hot=width)
        except (TypeError, ValueError) as err:
            failed = err
        ok = failed is None
        fields = [int_field("the rows", embeddings.shape[0] if ok else None, compare=False),
                  int_field("D (the embedding width)", embeddings.shape[1] if ok else None),
                  dtype_field("the embedding dtype", embeddings if ok else None),
                  dtype_field("the label dtype", labels if ok else None),
                  int_field("the multi-hot label width (0: one label per row)",
                            (labels.shape[1] if labels.dim() == 2 else 0) if ok else None),
                  name_field("the device type", embeddings.device.type if ok else None),
                  name_field("the reduction", self.loss.reduction)]
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else fallback_device(self.group)
        headers = exchange_header(where, fields, device, self.group, failed)
        sizes = [h[0][0] for h in headers]
        if sum(sizes) == 0:
            raise ValueError(f"{where}: every rank's batch is empty (sizes {sizes}); the global batch must have "
                             f"at least one row")
        global_embeddings = _AllGatherWithGrad.apply(embeddings, sizes, self.group)
        global_labels = all_gather_sized(labels, sizes, self.group)
        # the reduction of the loss that computes the terms, read first (a MiningSchedule moves on in loss_terms)
        reduction = self.loss.reduction
        if embeddings.shape[0] == 0:  # no anchors here; the loss is the other ranks' (a zero share, grad (0, D))
            terms = empty_terms(global_embeddings, embeddings.dtype)
        else:
            start = sum(sizes[:dist.get_rank(self.group)])
            self_index = torch.arange(start, start + embeddings.shape[0], device=embeddings.device)
            terms = self.loss.loss_terms(embeddings, labels, global_embeddings, global_labels,
                                         ref_self_index=self_index)
        return reduce_across_ranks(terms, reduction, self.group)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        return "group=default" if self.group is None else f"group={self.group!r}"
