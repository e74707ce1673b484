"""What the custom ``autograd.Function`` classes of the ops share: the not-twice-differentiable marker and
the in-place hand-over of a gradient computed in the forward pass.

Every Function of the package is written in the ``setup_context`` form (forward without ``ctx``,
intermediates returned as extra non-differentiable outputs and saved with ``save_for_backward``), so
``torch.func.grad`` and ``torch.compile`` can run them and every saved buffer is released by the backward
pass (a kept loss tensor holds nothing large after ``backward()``).

Second derivatives (issue: silently wrong double backward). A Function whose backward is not itself
differentiable passes its gradients through :func:`not_twice_differentiable`: with ``create_graph=True``
(``torch.autograd.grad(..., create_graph=True)``, ``gradgradcheck``, a Hessian) differentiating them again
raises a ``RuntimeError`` naming the loss, instead of returning a constant's zero or None.
``torch.autograd.function.once_differentiable`` is not enough: it raises only when the upstream gradient
itself requires grad, so ``grad(grad(loss, x, create_graph=True)[0].sum(), x)`` gets an unrelated
"not used in the graph" error, and a weight reached through autograd ops (DGCRL's QR) gets a silently
partial second derivative. A single ``torch.func.grad`` still works (it differentiates once); nested
functorch transforms over these Functions are not supported.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
from torch.autograd.function import _functions

__all__ = ["linked_to_inputs", "not_twice_differentiable", "scaled_saved_gradients"]


def _functorch_level() -> int:
    """The current torch.func transform level (0 outside any; 1 inside one ``torch.func.grad``)."""
    level_of = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    level = level_of() if level_of is not None else None
    return 0 if level is None else level


def _zero_anchor(inputs: Iterable[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """An exact fp64 zero that depends on every input requiring grad (sums of empty slices), or None."""
    anchors = [t.reshape(-1)[:0].sum().to(torch.float64) for t in inputs
               if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.stack(anchors).sum() if anchors else None


def linked_to_inputs(grads: Sequence[Optional[torch.Tensor]],
                     inputs: Iterable[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """For a backward whose gradients are exactly constant in the inputs (piecewise-linear losses): under
    ``create_graph`` add an exact zero that depends on the inputs, so that a second derivative is the
    correct 0 instead of torch's "element 0 of tensors does not require grad". No-op otherwise."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    anchor = _zero_anchor(inputs)
    if anchor is None:
        return tuple(grads)
    return tuple(None if g is None else g + anchor.to(g.dtype) for g in grads)


def not_twice_differentiable(name: str, grads: Sequence[Optional[torch.Tensor]],
                             inputs: Iterable[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """Return ``grads`` so that differentiating them again raises a clear ``RuntimeError``.

    Outside ``create_graph`` (grad mode off in backward) the gradients are returned unchanged, at no cost.
    With grad mode on, each gradient gets an exact zero that depends on every differentiable input (the
    sum of an empty slice of it), so any second derivative with respect to an input walks through a
    ``DelayedError`` node carrying the message.

    Args:
        name: the loss, for the message.
        grads: the backward's outputs (None where an input needs no gradient).
        inputs: the Function's saved tensor inputs (None allowed); those that require grad are linked.
    """
    if not torch.is_grad_enabled():
        return tuple(grads)
    message = (f"{name} is not twice differentiable: its custom backward is not itself differentiable, so a "
               f"second derivative (create_graph=True, gradgradcheck, hessian) would be wrong")
    if _functorch_level() > 1:
        # a backward run for an inner torch.func transform (grad of grad): the outer one would differentiate
        # this backward, which functorch does not route through DelayedError; refuse now
        raise RuntimeError(message + " (nested torch.func transforms)")
    anchor = _zero_anchor(inputs)
    idx = [i for i, g in enumerate(grads) if g is not None]
    if anchor is None or not idx:
        return tuple(grads)
    err = _functions.DelayedError(message.encode(), len(idx))
    linked = err(*[grads[i] + anchor.to(grads[i].dtype) for i in idx])
    linked = linked if isinstance(linked, tuple) else (linked,)
    out = list(grads)
    for i, g in zip(idx, linked):
        out[i] = g
    return tuple(out)


def scaled_saved_gradients(ctx, grads: Sequence[torch.Tensor], grad_out: torch.Tensor
                           ) -> Optional[Tuple[torch.Tensor, ...]]:
    """``grad_out · g`` for each gradient ``g`` computed in the forward pass and saved as an output.

    The first plain backward scales the saved buffers in place (no second copy at the peak; autograd
    releases the saved buffers right after, so ``.grad`` takes them without a copy) and marks ``ctx``; it
    returns None on any later backward through a retained graph, whose caller recomputes the gradients
    (the buffers then hold scaled copies). Under ``create_graph`` (double backward, ``torch.func.grad``)
    or ``torch.compile`` it returns out-of-place products, differentiable in ``grad_out``.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuple(g * grad_out.to(g.dtype) for g in grads)
    if getattr(ctx, "saved_gradients_used", False):
        return None
    ctx.saved_gradients_used = True
    for g in grads:
        # the buffers are outputs of the forward pass that no one else sees; scaling them in place must
        # not trip the saved-tensor version check of a retained second backward (which recomputes)
        with torch.autograd._unsafe_preserve_version_counter(g):
            g.mul_(grad_out.to(g.dtype))
    return tuple(grads)
