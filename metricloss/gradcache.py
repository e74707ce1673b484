"""Gradient caching: a loss over a batch larger than the network's activations fit, with its exact gradient.

Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021). A metric loss couples every sample of the batch, so the batch cannot simply be split into
micro-batches with their gradients summed; but the loss needs only the embeddings, and the network's
parameter gradient is the chain rule through them:

    ∂L/∂θ = Σ_i (∂L/∂e_i) · ∂e_i/∂θ.

:class:`GradCache` does one training step in three stages:

1. embed the whole batch one sub-batch at a time without a graph (the activations of one sub-batch live at
   a time), saving each sub-batch's RNG state;
2. compute the loss on the (N, D) embeddings and back-propagate it to them: ∂L/∂e (N, D), and the loss's own
   parameters' gradients (NormSoftmax's weight, tensor centroids, DGCRL's centres);
3. re-run the network on each sub-batch with a graph, the RNG state restored (the same dropout masks), and
   back-propagate the cached ∂L/∂e of its rows.

The parameter gradients are those of the same sub-batched forward done with a graph and one loss on the
concatenated embeddings: exactly (up to summation order) the full-batch gradient for a network without
batch coupling, and the sub-batched one with BatchNorm (which normalises each sub-batch by its own statistics,
as any forward of those sub-batches would). The network runs twice (about a third more compute per step);
memory holds one sub-batch's activations plus the (N, D) embeddings and their gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _checks as C

__all__ = ["GradCache"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def _split(inputs: Inputs, size: int, where: str) -> Tuple[List[Tuple[torch.Tensor, ...]], int]:
    """The sub-batches of ``inputs`` (a tensor or a sequence of tensors with the same first dimension)."""
    tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{where}: `inputs` must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
    n = tensors[0].shape[0] if tensors[0].dim() > 0 else -1
    if n < 1 or any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise ValueError(f"{where}: every input must have the same batch size in dimension 0 (>= 1), got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    chunks = [tuple(t[s:s + size] for t in tensors) for s in range(0, n, size)]
    return chunks, n


class _RngState:
    """The CPU and accelerator RNG states at one point, to replay a sub-batch's random draws (dropout)."""

    def __init__(self, devices: Sequence[torch.device]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices if d.type == "cuda"]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


class GradCache:
    """One exact training step of ``loss`` over a batch embedded by ``model`` in sub-batches (gradient caching).

    Args:
        model: the embedding network, an ``nn.Module`` (or ``DistributedDataParallel``) or any callable
            ``model(*sub_batch_inputs) -> (n, D) tensor``.
        loss: any loss of the package or any callable ``loss(embeddings (N, D), labels, **kwargs) -> ()``:
            :class:`~metricloss.TripletLoss` and its variants, :class:`~metricloss.NormSoftmaxLoss`,
            :class:`~metricloss.CentroidTripletLoss`, :class:`~metricloss.WARPLoss` on a head's scores (put
            the head in ``model``), :class:`~metricloss.distributed.DistributedLoss`,
            :class:`~metricloss.CrossBatchMemory`. Its own parameters get their gradients in stage 2.
        sub_batch_size: rows per sub-batch of the network's forward (>= 1): the activation memory of one.
        scaler: optional ``torch.amp.GradScaler``; the loss is scaled before its backward, so every gradient
            (the network's and the loss's) comes out scaled, as with ``scaler.scale(loss).backward()``; then
            call ``scaler.step(optimizer)`` and ``scaler.update()`` as usual.
        restore_buffers: keep the model's buffers (BatchNorm's running statistics) as they were before the
            graph-free pass, so that each sub-batch updates them once, in the re-forward (default True;
            False: they see every sub-batch twice).

    Call :meth:`step` in place of ``loss(model(inputs), labels).backward()``. Autocast: call it inside
    ``torch.autocast(...)``; both passes of the network and the loss run under it. DDP: when ``model`` is a
    ``DistributedDataParallel``, every re-forward but the last runs under ``model.no_sync()``, so the
    gradients are all-reduced once per step.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 16))
        >>> cache = GradCache(model, metricloss.TripletLoss(mining="batch_all"), sub_batch_size=64)
        >>> loss = cache.step(torch.randn(256, 32), torch.arange(64).repeat(4))  # then optimizer.step()
    """

    def __init__(self, model: Callable[..., torch.Tensor], loss: Callable[..., torch.Tensor], sub_batch_size: int,
                 scaler: Optional[Any] = None, restore_buffers: bool = True):
        """Build the step; every argument, its default and its valid range are in the class docstring."""
        where = "GradCache"
        if not callable(model) or not callable(loss):
            raise TypeError(f"{where}: `model` and `loss` must be callable, got {type(model).__name__} and "
                            f"{type(loss).__name__}")
        self.model, self.loss = model, loss
        self.sub_batch_size = C.check_positive_int(sub_batch_size, "sub_batch_size", where)
        if scaler is not None and not (callable(getattr(scaler, "scale", None))):
            raise TypeError(f"{where}: `scaler` must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}")
        if not isinstance(restore_buffers, bool):
            raise TypeError(f"{where}: `restore_buffers` must be a bool, got {type(restore_buffers).__name__}")
        self.scaler, self.restore_buffers = scaler, restore_buffers

    def _no_sync(self, last: bool):
        no_sync = getattr(self.model, "no_sync", None)
        if last or not callable(no_sync) or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return no_sync()

    def _buffers(self) -> List[torch.Tensor]:
        return list(self.model.buffers()) if isinstance(self.model, nn.Module) else []

    def embed(self, inputs: Inputs) -> torch.Tensor:
        """Stage 1 alone: the (N, D) embeddings of ``inputs``, one sub-batch at a time, without a graph."""
        chunks, _ = _split(inputs, self.sub_batch_size, "GradCache.embed")
        with torch.no_grad():
            return torch.cat([self._embed_chunk(c, "GradCache.embed") for c in chunks])

    def _embed_chunk(self, chunk: Tuple[torch.Tensor, ...], where: str) -> torch.Tensor:
        out = self.model(*chunk)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != chunk[0].shape[0]:
            raise ValueError(f"{where}: `model` must return (n, D) embeddings for a sub-batch of n rows, got "
                             f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
        return out

    def step(self, inputs: Inputs, labels: Any, **loss_kwargs: Any) -> torch.Tensor:
        """Forward and backward of ``loss(model(inputs), labels, **loss_kwargs)`` by gradient caching.

        Args:
            inputs: (N, ...) tensor, or a sequence of tensors with the same N, passed as ``model(*sub_batch)``.
            labels: passed to ``loss`` whole (e.g. (N,) integer labels, or multi-hot rows).
            **loss_kwargs: passed to ``loss`` (e.g. ``ref_embeddings``).

        Returns:
            The loss, a detached 0-dim tensor (unscaled). The gradients are accumulated into ``.grad`` of the
            network's and the loss's parameters, as ``loss.backward()`` would; zero them before, step after.

        Raises:
            TypeError: ``inputs`` that are not tensors.
            ValueError: inputs of unequal batch sizes, a model that does not return (n, D) embeddings, a loss
                that does not return a scalar.
        """
        where = "GradCache.step"
        chunks, _ = _split(inputs, self.sub_batch_size, where)
        devices = sorted({c[0].device for c in chunks} | {p.device for p in self._parameters()}, key=str)
        saved = [b.detach().clone() for b in self._buffers()] if self.restore_buffers else []
        # 1. embeddings without a graph, one sub-batch at a time; each sub-batch's RNG state kept for its replay
        states, parts = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_RngState(devices))
                parts.append(self._embed_chunk(chunk, where))
        for buf, old in zip(self._buffers(), saved):
            buf.copy_(old)
        embeddings = torch.cat(parts).detach().requires_grad_(True)
        # 2. the loss and its gradient with respect to the embeddings (and the loss's own parameters)
        loss = self.loss(embeddings, labels, **loss_kwargs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"{where}: `loss` must return a 0-dim tensor (use a reducing `reduction`), got "
                             f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        # the RNG as a plain step leaves it: after one pass of the network and the loss's own draws (sampled WARP)
        after = _RngState(devices)
        cached = embeddings.grad
        if cached is None:
            cached = torch.zeros_like(embeddings)
        # 3. each sub-batch again, with a graph and its RNG state, back-propagating its rows of the cached gradient
        start = 0
        for i, (chunk, state) in enumerate(zip(chunks, states)):
            n = chunk[0].shape[0]
            state.restore()
            with self._no_sync(last=i == len(chunks) - 1):
                out = self._embed_chunk(chunk, where)
                out.backward(cached[start:start + n].to(out.dtype))
            start += n
        after.restore()
        return loss.detach()

    def _parameters(self) -> List[torch.Tensor]:
        return list(self.model.parameters()) if isinstance(self.model, nn.Module) else []

    def __repr__(self) -> str:
        return (f"GradCache(model={type(self.model).__name__}, loss={type(self.loss).__name__}, "
                f"sub_batch_size={self.sub_batch_size}, scaler={self.scaler is not None}, "
                f"restore_buffers={self.restore_buffers})")
