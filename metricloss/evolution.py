"""Knowledge Evolution (Taha, Shrivastava, Davis, CVPR 2021): train, keep a fit-hypothesis, re-initialise the rest.

KE trains a network for several *generations*. The network is split once into a **fit-hypothesis** H_fit
and a **reset-hypothesis** H_reset by a binary mask per layer; after each generation H_fit keeps its
weights and H_reset is re-initialised randomly, then the whole network is trained again. Knowledge
accumulates in H_fit, which at the end can be cut out as a **slim network** (fewer channels, same depth).

The split is KELS, the kernel-level convolution-aware split (as the authors' ``split_mode="kels"``): for
a split rate s (default 0.5),

* a convolution with weight (C_out, C_in, k…) keeps its first ⌈s·C_out⌉ kernels and, inside them, their
  first ⌈s·C_in⌉ input channels: mask[:⌈s·C_out⌉, :⌈s·C_in⌉] = 1 (and its bias the first ⌈s·C_out⌉);
* a linear layer (out, in) alike: mask[:⌈s·out⌉, :⌈s·in⌉] = 1;
* the first layer keeps all its input channels (the image), and the last layer (the classifier or the
  embedding) keeps all its outputs and splits its inputs only;
* a BatchNorm layer's fit part is its first ⌈s·C⌉ channels (the kernels of the layer before it).

Because every layer keeps the *leading* channels of its inputs, which are the leading kernels of the
layer before it, H_fit is a network of its own: with the reset part zeroed, the dense network computes
exactly what the slim network computes (:func:`extract_slim`). This needs a network whose layers read the
previous layer's channels in order (sequential CNNs, ResNets whose shortcuts add equal-width maps);
concatenations (DenseNet, Inception; the authors' ``in_channels_order``) and a linear layer reading a
flattened spatial map are not covered.

Re-initialisation follows the authors' ``evolve_mode="rand"``: the reset part of each conv/linear weight
is redrawn with PyTorch's default init (Kaiming-uniform, a = √5) and of its bias with U(±1/√fan_in);
BatchNorm layers are not re-initialised (the authors' code leaves them alone). The authors also start a
new optimiser (and learning-rate schedule) every generation: do the same.

Typical loop::

    masks = kels_masks(model, split_rate=0.5)
    for generation in range(G):
        if generation:
            reinitialize_reset_hypothesis(model, masks)
        train(model)                       # a fresh optimiser each generation
    slim = extract_slim(model, masks)      # the fit-hypothesis alone
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import _checks as C

__all__ = ["kels_masks", "reinitialize_reset_hypothesis", "zero_reset_hypothesis", "extract_slim",
           "fit_hypothesis_size"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SPLIT = _CONVS + (nn.Linear,)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Masks = Dict[str, torch.Tensor]


def _split_layers(model: nn.Module, where: str) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]:
    """(split layers, norm layers) in module order; a loud error for any other module holding parameters."""
    split, norms = [], []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, _SPLIT):
            if isinstance(module, _CONVS) and module.groups != 1:
                raise ValueError(f"{where}: grouped convolution `{name}` (groups={module.groups}) is not supported "
                                 f"by the KELS split")
            split.append((name, module))
        elif isinstance(module, _NORMS):
            norms.append((name, module))
        elif own:
            raise ValueError(f"{where}: module `{name}` ({type(module).__name__}) holds parameters but is not a "
                             f"Conv1d/2d/3d, Linear or BatchNorm1d/2d/3d layer; KELS cannot split it")
    if not split:
        raise ValueError(f"{where}: `model` has no Conv or Linear layer to split")
    return split, norms


def _check_names(names: Optional[Iterable[str]], default: str, valid: Dict[str, nn.Module], arg: str,
                 where: str) -> set:
    if names is None:
        return {default}
    if isinstance(names, str):
        names = [names]
    names = set(names)
    unknown = sorted(names - set(valid))
    if unknown:
        raise ValueError(f"{where}: `{arg}` names {unknown}, which are not Conv/Linear layers of `model` "
                         f"(those are {sorted(valid)})")
    return names


def _keep(n: int, split_rate: float) -> int:
    # ⌈s·n⌉ as the authors' math.ceil, and at least one unit so a layer never vanishes
    return max(1, math.ceil(n * split_rate))


def kels_masks(model: nn.Module, split_rate: float = 0.5, *, keep_all_inputs: Optional[Iterable[str]] = None,
               keep_all_outputs: Optional[Iterable[str]] = None) -> Masks:
    """KELS fit-hypothesis masks of every Conv/Linear/BatchNorm parameter of ``model``.

    Args:
        model: the network (Conv1d/2d/3d with groups=1, Linear and BatchNorm1d/2d/3d layers hold all its
            parameters; anything else raises ``ValueError``).
        split_rate: s in (0, 1] (default 0.5, the authors' default): the fraction of kernels (and of input
            channels) kept in the fit-hypothesis, rounded up.
        keep_all_inputs: names of layers that keep all their input channels (default: the first Conv/Linear
            layer in module order, which reads the image).
        keep_all_outputs: names of layers that keep all their outputs (default: the last Conv/Linear layer in
            module order, the classifier or embedding).

    Returns:
        ``{parameter name: bool mask}`` with each mask of its parameter's shape and device, True on the
        fit-hypothesis: for a conv weight (C_out, C_in, k…), ``mask[:⌈s·C_out⌉, :⌈s·C_in⌉] = True``; for a
        linear weight (out, in), ``mask[:⌈s·out⌉, :⌈s·in⌉]``; biases and BatchNorm weight/bias keep their
        first ⌈s·C⌉ entries.
    """
    where = "kels_masks"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: `model` must be an nn.Module, got {type(model).__name__}")
    if isinstance(split_rate, bool) or not isinstance(split_rate, numbers.Real):
        raise TypeError(f"{where}: `split_rate` must be a float in (0, 1], got {type(split_rate).__name__}")
    split_rate = float(split_rate)
    if not 0.0 < split_rate <= 1.0:
        raise ValueError(f"{where}: `split_rate` must lie in (0, 1], got {split_rate!r}")
    split, norms = _split_layers(model, where)
    by_name = dict(split)
    all_in = _check_names(keep_all_inputs, split[0][0], by_name, "keep_all_inputs", where)
    all_out = _check_names(keep_all_outputs, split[-1][0], by_name, "keep_all_outputs", where)
    masks: Masks = {}
    prefix = lambda name: f"{name}." if name else ""  # noqa: E731
    for name, layer in split:
        w = layer.weight
        n_out = w.shape[0] if name in all_out else _keep(w.shape[0], split_rate)
        n_in = w.shape[1] if name in all_in else _keep(w.shape[1], split_rate)
        mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        mask[:n_out, :n_in] = True
        masks[prefix(name) + "weight"] = mask
        if layer.bias is not None:
            bias = torch.zeros(layer.bias.shape, dtype=torch.bool, device=w.device)
            bias[:n_out] = True
            masks[prefix(name) + "bias"] = bias
    for name, norm in norms:
        n = _keep(norm.num_features, split_rate)
        for pname in ("weight", "bias"):
            p = getattr(norm, pname)
            if p is not None:
                mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                mask[:n] = True
                masks[prefix(name) + pname] = mask
    return masks


def _check_masks(model: nn.Module, masks: object, where: str) -> Dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: `model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(masks, dict):
        raise TypeError(f"{where}: `masks` must be the dict kels_masks returns, got {type(masks).__name__}")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"{where}: `masks` has an entry for `{name}`, which is not a parameter of `model`")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(f"{where}: the mask of `{name}` must be a bool tensor of shape "
                             f"{tuple(params[name].shape)}")
    return params


def reinitialize_reset_hypothesis(model: nn.Module, masks: Masks, generator: Optional[torch.Generator] = None) -> None:
    """Redraw the reset-hypothesis of every Conv/Linear layer in place; the fit-hypothesis stays bitwise.

    Weights outside the mask get a fresh Kaiming-uniform draw (a = √5, PyTorch's default init of these
    layers), biases outside it U(−1/√fan_in, 1/√fan_in); entries inside the mask are kept exactly
    (``torch.where``). BatchNorm layers are not touched (as the authors' ``split_reinitialize``).

    Args:
        model: the network the masks were made for.
        masks: :func:`kels_masks`'s result.
        generator: optional ``torch.Generator`` on the parameters' device, for reproducible draws.
    """
    where = "reinitialize_reset_hypothesis"
    _check_masks(model, masks, where)
    generator = C.check_generator(generator, None, "generator", where, of="model")
    prefix = lambda name: f"{name}." if name else ""  # noqa: E731
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, _SPLIT):
                continue
            w_key, b_key = prefix(name) + "weight", prefix(name) + "bias"
            if w_key in masks:
                fresh = torch.empty_like(layer.weight)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                layer.weight.copy_(torch.where(masks[w_key], layer.weight, fresh))
            if layer.bias is not None and b_key in masks:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                fresh = torch.empty_like(layer.bias)
                nn.init.uniform_(fresh, -bound, bound, generator=generator)
                layer.bias.copy_(torch.where(masks[b_key], layer.bias, fresh))


def zero_reset_hypothesis(model: nn.Module, masks: Masks) -> None:
    """Set the reset-hypothesis of every masked parameter to 0 in place (the fit-hypothesis stays bitwise).

    The dense network then computes what :func:`extract_slim`'s network computes (in eval mode).
    """
    params = _check_masks(model, masks, "zero_reset_hypothesis")
    with torch.no_grad():
        for name, mask in masks.items():
            p = params[name]
            p.copy_(torch.where(mask, p, torch.zeros_like(p)))


def _leading_block(mask: torch.Tensor, name: str, where: str) -> Tuple[int, ...]:
    """The extents of the leading block a KELS mask holds (one host read); ValueError for any other mask."""
    extents = []
    for dim in range(min(mask.dim(), 2)):
        other = tuple(d for d in range(mask.dim()) if d != dim)
        extents.append(int(mask.any(dim=other).sum()) if other else int(mask.sum()))
    block = torch.zeros_like(mask)
    block[tuple(slice(0, n) for n in extents)] = True
    if not torch.equal(block, mask) or 0 in extents:
        raise ValueError(f"{where}: the mask of `{name}` is not a non-empty leading block "
                         f"(mask[:n_out, :n_in] = True) as kels_masks gives; cannot slim it")
    return tuple(extents)


def _slim_layer(layer: nn.Module, name: str, masks: Masks, where: str,
                channels: Optional[int] = None) -> nn.Module:
    """The slim twin of one Conv/Linear/BatchNorm layer. ``channels``: the kept output channels of the
    split layer before a BatchNorm, which decide its width when it has no weight of its own to carry a mask
    (``affine=False``)."""
    prefix = f"{name}." if name else ""
    w, w_key = layer.weight, prefix + "weight"
    if isinstance(layer, _SPLIT):
        n_out, n_in = _leading_block(masks[w_key], w_key, where) if w_key in masks else tuple(w.shape[:2])
        if isinstance(layer, nn.Linear):
            slim = nn.Linear(n_in, n_out, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        else:
            cls = next(c for c in _CONVS if isinstance(layer, c))
            slim = cls(n_in, n_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, groups=1, bias=layer.bias is not None,
                       padding_mode=layer.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            slim.weight.copy_(w[:n_out, :n_in])
            if layer.bias is not None:
                slim.bias.copy_(layer.bias[:n_out])
        slim.train(layer.training)
        return slim
    # BatchNorm: the first n channels, parameters and running statistics
    if w_key in masks:
        n = _leading_block(masks[w_key], w_key, where)[0]
    else:  # no mask of its own (affine=False): it normalises the channels the layer before it kept
        n = layer.num_features if channels is None else min(channels, layer.num_features)
    cls = next(c for c in _NORMS if isinstance(layer, c))
    ref = layer.weight if layer.weight is not None else layer.running_mean
    slim = cls(n, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
               track_running_stats=layer.track_running_stats,
               device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    with torch.no_grad():
        if layer.affine:
            slim.weight.copy_(layer.weight[:n])
            slim.bias.copy_(layer.bias[:n])
        if layer.track_running_stats:
            slim.running_mean.copy_(layer.running_mean[:n])
            slim.running_var.copy_(layer.running_var[:n])
            slim.num_batches_tracked.copy_(layer.num_batches_tracked)
    slim.train(layer.training)
    return slim


def extract_slim(model: nn.Module, masks: Masks) -> nn.Module:
    """The fit-hypothesis alone as a new, slimmer network (``model`` is not changed).

    A deep copy of ``model`` in which every Conv/Linear layer is replaced by one with ⌈s·C_out⌉ kernels
    over ⌈s·C_in⌉ input channels holding the fit-hypothesis weights, and every BatchNorm layer by one over
    its first ⌈s·C⌉ channels (parameters and running statistics). Its output equals ``model``'s output
    with the reset-hypothesis zeroed (:func:`zero_reset_hypothesis`), in eval mode, for networks whose
    layers read the previous layer's channels in order (see the module docstring); a ``forward`` that
    hard-codes channel counts (``view(-1, 512)``) must be adapted by hand.

    Args:
        model: the trained network.
        masks: :func:`kels_masks`'s result (each mask must be a leading block).

    Returns:
        A new ``nn.Module`` of ``model``'s class, in ``model``'s training mode.
    """
    where = "extract_slim"
    _check_masks(model, masks, where)
    _split_layers(model, where)
    slim = copy.deepcopy(model)
    kept: Optional[int] = None  # output channels kept by the last Conv/Linear seen, in module order
    for name, layer in list(slim.named_modules()):
        if not isinstance(layer, _SPLIT + _NORMS) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = slim.get_submodule(parent_name) if parent_name else slim
        new = _slim_layer(layer, name, masks, where, channels=kept)
        if isinstance(layer, _SPLIT):
            kept = new.weight.shape[0]
        setattr(parent, child, new)
    if isinstance(slim, _SPLIT + _NORMS):  # a bare layer as the model
        slim = _slim_layer(slim, "", masks, where)
    return slim


def fit_hypothesis_size(model: nn.Module, masks: Masks) -> Tuple[int, int]:
    """``(fit, total)`` numbers of parameter entries: how big the slim network is relative to the dense one.

    Parameters without a mask (none with :func:`kels_masks`) count as fit. One host read per mask.
    """
    params = _check_masks(model, masks, "fit_hypothesis_size")
    total = sum(p.numel() for p in params.values())
    fit = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
    return fit, total
