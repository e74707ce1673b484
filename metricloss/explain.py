"""Attention maps for retrieval and classification networks without changing the network: L2-CAF.

L2-CAF, the L2-normalised constrained attention filter (Taha, Yang, Shrivastava, Davis, "A generic
visualization approach for convolutional neural networks", ECCV 2020; see *Retrieval toolbox* in the
docs): a spatial filter f ∈ R^{H×W} is multiplied, as f / ‖f‖₂, into the last convolutional feature map
A (broadcast over the channels), and optimised so that the rest of the network (the *head*) still gives
its output::

    class-oblivious:  minimise mean((head(A) − head(A ⊙ f/‖f‖₂))²)       (any embedding or logits)
    class-specific:   minimise Σ_k w_k · head(A ⊙ f/‖f‖₂)_k,  w = −1 at the target class, +1 elsewhere

The unit-norm constraint makes the filter spend a fixed budget on the locations the output depends on,
so f/‖f‖₂ is the attention map. The network is only read: its weights, gradients and ``requires_grad``
flags are untouched (the filter's gradient comes from ``torch.autograd.grad``), and modules are put in
eval mode for the call and restored afterwards.
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _checks as C

__all__ = ["l2_caf", "L2CAF_OPTIMIZERS"]

L2CAF_OPTIMIZERS = ("sgd", "adam")

Target = Union[None, int, torch.Tensor]


def _check_features(features: object, where: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{where}: `features` must be a torch.Tensor of shape (C, H, W) or (B, C, H, W), "
                        f"got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{where}: `features` must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() not in (3, 4):
        raise ValueError(f"{where}: `features` must have shape (C, H, W) or (B, C, H, W), "
                         f"got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"{where}: `features` is empty (shape {tuple(features.shape)})")
    return features


def _check_target(target: Target, batch: int, where: str) -> Optional[torch.Tensor]:
    if target is None:
        return None
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return torch.full((batch,), int(target), dtype=torch.int64)
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            target = target.reshape(1).expand(batch)
        return C.check_labels(target, batch, "target", where, of="features").to(torch.int64)
    raise TypeError(f"{where}: `target` must be None (class-oblivious), an int class index or a (B,) integer "
                    f"tensor, got {type(target).__name__}")


def _modules_training_flags(head: Callable) -> List[Tuple[nn.Module, bool]]:
    return [(m, m.training) for m in head.modules()] if isinstance(head, nn.Module) else []


def _lr_at(step: int, steps: int, lr: float, min_lr: float) -> float:
    # the authors' polynomial decay (power 1): lr at step 0, min_lr at step `steps`
    return (lr - min_lr) * (1.0 - step / steps) + min_lr


def l2_caf(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], target: Target = None, *,
           steps: int = 500, lr: float = 0.1, optimizer: str = "sgd", min_lr: float = 1e-5, tol: float = 1e-6,
           check_every: int = 50, return_steps: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, int]]:
    """L2-CAF attention map(s) of ``head`` over a last-conv feature map.

    Args:
        features: (C, H, W) or (B, C, H, W) float tensor, the last convolutional output (detached here).
            A batch gets one independent filter per image.
        head: the rest of the network, called as ``head(features_filtered)`` on a (B, C, H, W) tensor of the
            features' dtype and returning (B, K) (an embedding, or logits for ``target``) or any (B, ...)
            output for the class-oblivious loss. An ``nn.Module`` is switched to eval mode for the call and
            restored afterwards; its parameters, their ``.grad`` and ``requires_grad`` are never changed.
        target: ``None`` (default): class-oblivious, keep the whole output (mean squared difference to the
            unfiltered output, per image). An int or a (B,) integer tensor: class-specific, minimise
            Σ_k w_k·logit_k with w = −1 at the target class and +1 elsewhere.
        steps: maximum number of gradient steps, int >= 1 (default 500, the authors' PyTorch port; their
            class-specific examples use 1000).
        lr: initial learning rate (default 0.1, the port's default; its examples use 0.5). It decays
            linearly to ``min_lr`` over ``steps`` (the port's polynomial decay of power 1).
        optimizer: ``"sgd"`` (default, the PyTorch port) or ``"adam"`` (the original TensorFlow code, which
            uses lr 0.5 decaying to 0 over 1000 steps).
        min_lr: final learning rate, 0 <= min_lr <= lr (default 1e-5).
        tol: stop when the loss changed by less than this between two checks (default 1e-6, the port's
            ``min_error``). It is absolute: with a head whose outputs are small (a pooled linear head gives
            squared differences ~1e-4) the rule can stop at step 50 with a nearly uniform map; pass a
            smaller ``tol`` (or 0 to always run ``steps``).
        check_every: steps between two checks of the stopping rule (default 50, as the port). Each check
            reads one scalar from the device.
        return_steps: also return the number of steps taken.

    Returns:
        The map f/‖f‖₂ with unit L2 norm over the H×W grid: (H, W) for (C, H, W) features, (B, H, W) for a
        batch; float32 (float64 for fp64 features), detached. With ``return_steps``, ``(map, steps_taken)``.

    The filter starts at ones (a uniform map, as the authors). Entries may turn negative during the
    optimisation; the map is returned as optimised (no clipping), so its largest entries are the locations
    the output depends on most. SGD's progress scales with the magnitude of the head's output (a map can
    stay close to uniform after 500 steps while already peaking at the right place); Adam is scale-free
    (``optimizer="adam", lr=0.05`` concentrates the map in a few hundred steps).
    """
    where = "l2_caf"
    features = _check_features(features, where)
    if not callable(head):
        raise TypeError(f"{where}: `head` must be callable (an nn.Module or a function), got {type(head).__name__}")
    single = features.dim() == 3
    feats = (features.unsqueeze(0) if single else features).detach()
    batch, _, height, width = feats.shape
    labels = _check_target(target, batch, where)
    steps = C.check_positive_int(steps, "steps", where)
    lr = C.check_positive(lr, "lr", where)
    min_lr = C.check_nonnegative(min_lr, "min_lr", where)
    if min_lr > lr:
        raise ValueError(f"{where}: `min_lr`={min_lr!r} must not exceed `lr`={lr!r}")
    C.check_option(optimizer, "optimizer", L2CAF_OPTIMIZERS, where)
    tol = C.check_nonnegative(tol, "tol", where)
    check_every = C.check_positive_int(check_every, "check_every", where)
    if not isinstance(return_steps, bool):
        raise TypeError(f"{where}: `return_steps` must be a bool, got {type(return_steps).__name__}")

    flags = _modules_training_flags(head)
    try:
        for module, _ in flags:
            module.training = False  # eval(): BatchNorm uses its running statistics and never updates them
        with torch.enable_grad():
            filt, taken = _optimise(feats, head, labels, steps, lr, min_lr, optimizer, tol, check_every, where)
    finally:
        for module, training in flags:
            module.training = training
    amap = _unit(filt).detach()
    amap = amap.reshape(height, width) if single else amap
    return (amap, taken) if return_steps else amap


def _unit(filt: torch.Tensor) -> torch.Tensor:
    # f / ‖f‖₂ per image over the H×W grid (F.normalize's eps floor keeps a zero filter finite)
    return torch.nn.functional.normalize(filt.flatten(1), p=2.0, dim=1).view_as(filt)


def _optimise(feats: torch.Tensor, head: Callable, labels: Optional[torch.Tensor], steps: int, lr: float,
              min_lr: float, optimizer: str, tol: float, check_every: int, where: str) -> Tuple[torch.Tensor, int]:
    batch, _, height, width = feats.shape
    with torch.no_grad():
        reference = head(feats)
    if not isinstance(reference, torch.Tensor) or reference.dim() < 1 or reference.shape[0] != batch:
        raise ValueError(f"{where}: `head` must return a tensor of shape (B, ...) with B={batch}, got "
                         f"{tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference)}")
    weights = None
    if labels is not None:
        if reference.dim() != 2:
            raise ValueError(f"{where}: a class-specific map (`target` given) needs (B, K) logits from `head`, "
                             f"got shape {tuple(reference.shape)}")
        C.check_label_range(labels, reference.shape[1], "target", where)
        weights = torch.ones_like(reference)
        weights[torch.arange(batch), labels.to(reference.device)] = -1.0
    reference = reference.detach()
    dtype = torch.promote_types(feats.dtype, torch.float32)
    filt = torch.ones(batch, height, width, dtype=dtype, device=feats.device, requires_grad=True)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([filt], lr=lr)
    prev = None
    step = 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, min_lr)
        out = head(feats * _unit(filt).to(feats.dtype).unsqueeze(1))
        if weights is None:
            # per-image mean squared difference, summed over the batch so every filter sees its own image's loss
            loss = (out - reference).pow(2).flatten(1).mean(1).sum()
        else:
            loss = (out * weights).sum()
        (grad,) = torch.autograd.grad(loss, [filt])
        filt.grad = grad
        opt.step()
        step += 1
        if step % check_every == 0 or step == 1:
            value = float(loss.detach())
            if prev is not None and abs(value - prev) < tol:
                break
            prev = value
    return filt.detach(), step
