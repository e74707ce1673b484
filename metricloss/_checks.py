"""Input validation shared by every loss, with messages that name the argument and the expected form.

Every public entry point validates before doing any work (see *Design › Bad input* in the docs): a bad argument raises
``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or option), never a
bare ``IndexError``. Checks of values (label ranges, a degenerate class matrix) read them on the host only
where that stalls nothing (:func:`host_reads_are_free`: CPU tensors, eager); on an accelerator they are
device-side assertions (``torch._assert_async``, as ``F.cross_entropy`` checks its targets), so a training
step never waits for the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "host_reads_are_free",
    "accelerator_rules",
    "check_embeddings",
    "check_labels",
    "check_reference_set",
    "check_option",
    "check_margin",
    "check_positive",
    "check_nonnegative",
    "check_positive_int",
    "check_chunk_bytes",
    "check_label_range",
    "check_scores",
    "check_multi_hot",
    "check_relation",
    "check_option_or_callable",
    "check_generator",
    "check_comparable_labels",
    "WIDE_UNSIGNED",
]


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def _check_float_batch(x: object, name: str, prefix: str, cols: str) -> torch.Tensor:
    """Check a non-empty (B, ``cols``) floating-point tensor (B >= 1); the caller checks the columns."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{prefix}`{name}` must be a torch.Tensor of shape (B, {cols}), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{prefix}`{name}` must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{prefix}`{name}` must be 2-D with shape (B, {cols}), got shape {_shape(x)}")
    if x.shape[0] == 0:
        raise ValueError(f"{prefix}`{name}` is an empty batch (shape {_shape(x)}); B must be >= 1")
    return x


def check_embeddings(x: object, name: str = "embeddings", where: str = "") -> torch.Tensor:
    """Check a (B, D) floating-point tensor with B >= 1 and D >= 1."""
    prefix = f"{where}: " if where else ""
    x = _check_float_batch(x, name, prefix, "D")
    if x.shape[1] == 0:
        raise ValueError(f"{prefix}`{name}` has no features (shape {_shape(x)}); D must be >= 1")
    return x


def check_labels(labels: object, n: int, name: str = "labels", where: str = "",
                 of: str = "embeddings", device: Optional[torch.device] = None,
                 multi_hot: Optional[int] = None, related: bool = False) -> torch.Tensor:
    """Check a 1-D integer tensor of length ``n`` (the number of rows of ``of``) on ``device``; with
    ``multi_hot`` = L, an (n, L) multi-hot matrix instead (:func:`check_multi_hot`); with ``related`` (labels
    compared by a user's relation), any tensor of n rows (its first dimension)."""
    prefix = f"{where}: " if where else ""
    if related:
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0 or labels.shape[0] != n:
            raise ValueError(f"{prefix}`{name}` must be a tensor with {n} rows (its first dimension) to match "
                             f"`{of}`, got {_shape(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if device is not None and labels.device != device:
            raise ValueError(f"{prefix}`{name}` is on {labels.device} but `{of}` is on {device}; "
                             f"move them to the same device")
        return labels
    if multi_hot is not None:
        if isinstance(labels, torch.Tensor) and labels.dim() != 2:
            raise ValueError(f"{prefix}`{name}` must be ({n}, {multi_hot}) multi-hot rows (bool or 0/1), got shape "
                             f"{_shape(labels)}")
        return check_multi_hot(labels, (n, multi_hot), name, where, of=of, device=device)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{prefix}`{name}` must be a 1-D integer torch.Tensor of length {n}, "
                        f"got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{prefix}`{name}` must have an integer dtype (e.g. torch.int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{prefix}`{name}` must have shape ({n},) to match `{of}`.shape[0], "
                         f"got shape {_shape(labels)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{prefix}`{name}` is on {labels.device} but `{of}` is on {device}; "
                         f"move them to the same device")
    return labels


_ACCELERATOR_RULES = [False]


def host_reads_are_free(t: torch.Tensor) -> bool:
    """Whether a check may read values of ``t`` on the host: a CPU tensor in eager mode, where the read waits
    for nothing. On an accelerator a read stalls the stream and forbids CUDA-graph capture; under
    ``torch.compile`` it breaks the graph. There value checks are device-side assertions
    (:func:`device_assert`) or run on a first call only. :func:`accelerator_rules` makes CPU tensors follow
    the accelerator's rules (to count, on CPU, what a GPU step costs)."""
    return t.device.type == "cpu" and not _ACCELERATOR_RULES[0] and not torch.compiler.is_compiling()


@contextlib.contextmanager
def accelerator_rules() -> Iterator[None]:
    """Within it, CPU tensors take the accelerator's path: checks as device-side assertions
    (:func:`host_reads_are_free` is False) and the plain torch ops where a CPU-tuned form exists
    (:func:`metricloss.ops.reduction.row_argmin`): what ``benchmarks/step_costs.py`` and the step-cost tests
    count. Not thread-safe; for measurement."""
    saved = _ACCELERATOR_RULES[0]
    _ACCELERATOR_RULES[0] = True
    try:
        yield
    finally:
        _ACCELERATOR_RULES[0] = saved


def device_assert(ok: torch.Tensor, message: str) -> None:
    """Assert the 0-dim bool ``ok`` without a host read: ``torch._assert_async``. On CUDA a failure is a
    device-side assertion when the kernel runs (its message in the error log, later CUDA calls fail, as with
    ``F.cross_entropy``'s target check; ``CUDA_LAUNCH_BLOCKING=1`` makes it point at the call); on CPU it
    raises ``RuntimeError(message)`` at once; under ``torch.compile`` it is part of the graph."""
    torch._assert_async(ok, message)


def check_label_range(labels: torch.Tensor, num_classes: int, name: str = "labels", where: str = "") -> None:
    """Check ``0 <= labels < num_classes``: a ``ValueError`` with the values found where host reads are free
    (CPU, eager: :func:`host_reads_are_free`), a device-side assertion elsewhere (no sync)."""
    prefix = f"{where}: " if where else ""
    if labels.numel() == 0:
        return
    if not host_reads_are_free(labels):
        # a host read would stall the stream (and break a torch.compile graph): the same test as an
        # asynchronous device-side assertion (it fails when the kernels run)
        # ⌊y / C⌋ = 0 iff 0 <= y < C: four kernels with the assertion (two comparisons and their `and`: five)
        wide = labels.to(torch.int64) if labels.dtype in WIDE_UNSIGNED else labels
        device_assert((torch.div(wide, num_classes, rounding_mode="floor") == 0).all(),
                      f"{prefix}`{name}` must lie in [0, {num_classes}) (num_classes={num_classes})")
        return
    # torch has no aminmax for uint16/32/64; int64 holds uint16/32 exactly, and a uint64 value of 2**63 or
    # more (never a valid class) wraps negative, so it fails the check too
    lo, hi = torch.aminmax(labels.to(torch.int64) if labels.dtype in WIDE_UNSIGNED else labels)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_classes:
        got = (f"values in [{lo}, {hi}]" if labels.dtype != torch.uint64 or lo >= 0 else
               f"uint64 values of 2**63 or more (read as int64: [{lo}, {hi}])")
        raise ValueError(f"{prefix}`{name}` must lie in [0, {num_classes}) (num_classes={num_classes}), got {got}")


# integer dtypes that torch's sort / searchsorted / aminmax / type promotion do not take: labels of these
# dtypes are compared as int64 (exact for uint16 and uint32; uint64 by its bits, which keeps equality)
WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def check_comparable_labels(labels: torch.Tensor, ref_labels: torch.Tensor, names: Tuple[str, str] = ("labels", "ref_labels"),
                            where: str = "") -> None:
    """Two label tensors can be compared by value: refuse uint64 against a signed dtype (no integer dtype
    holds both ranges, so a negative label and a huge unsigned one could not be told apart)."""
    signed = (torch.int8, torch.int16, torch.int32, torch.int64)
    if (labels.dtype == torch.uint64 and ref_labels.dtype in signed) or \
            (ref_labels.dtype == torch.uint64 and labels.dtype in signed):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}`{names[0]}` is {labels.dtype} and `{names[1]}` is {ref_labels.dtype}: uint64 "
                        f"labels can only be compared with unsigned labels; give both the same dtype "
                        f"(e.g. .to(torch.int64))")


def check_reference_set(ref: Optional[torch.Tensor], ref_labels: Optional[torch.Tensor],
                        embeddings: torch.Tensor, where: str = "",
                        names: Tuple[str, str] = ("ref_embeddings", "ref_labels"),
                        multi_hot: Optional[int] = None, related: bool = False) -> bool:
    """Check an optional reference set (M, D) with labels (M,) (or (M, L) multi-hot rows when ``multi_hot``
    is the anchors' L; any tensor of M rows when ``related``). Returns True when one is given."""
    prefix = f"{where}: " if where else ""
    ref_name, lab_name = names
    if ref is None and ref_labels is None:
        return False
    if ref is None or ref_labels is None:
        given, missing = (ref_name, lab_name) if ref is not None else (lab_name, ref_name)
        raise ValueError(f"{prefix}`{given}` was given without `{missing}`; pass both or neither")
    check_embeddings(ref, ref_name, where)
    if ref.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{prefix}`{ref_name}` must have D={embeddings.shape[1]} columns like `embeddings`, "
                         f"got shape {_shape(ref)}")
    if ref.device != embeddings.device:
        raise ValueError(f"{prefix}`{ref_name}` is on {ref.device} but `embeddings` is on {embeddings.device}")
    check_labels(ref_labels, ref.shape[0], lab_name, where, of=ref_name, device=ref.device, multi_hot=multi_hot,
                 related=related)
    return True


def check_relation(relation: object, where: str = "") -> None:
    """Check an optional user relation: None or a callable ``relation(labels_chunk, ref_labels) -> bool``."""
    if relation is not None and not callable(relation):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}`relation` must be None or a callable relation(labels_chunk, ref_labels) -> "
                        f"(c, M) bool tensor, got {type(relation).__name__}")


def check_self_index(index: object, n: int, m: int, name: str = "ref_self_index", where: str = "",
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Check an own-row index: (n,) integer tensor with values in [-1, m) on ``device``; returns it as int64.

    The range check reads two scalars where host reads are free (:func:`host_reads_are_free`), and is a
    device-side assertion elsewhere (no sync).
    """
    prefix = f"{where}: " if where else ""
    check_labels(index, n, name, where, of="embeddings", device=device)  # (n,) integer tensor, same device
    if index.numel() == 0:
        return index.to(torch.int64)
    if not host_reads_are_free(index):
        wide = index.to(torch.int64)
        device_assert(((wide >= -1) & (wide < m)).all(),
                      f"{prefix}`{name}` must hold reference rows in [0, {m}) or -1 (no own row)")
        return wide
    lo, hi = (int(v) for v in torch.aminmax(index.to(torch.int64)))
    if lo < -1 or hi >= m:
        raise ValueError(f"{prefix}`{name}` must hold reference rows in [0, {m}) or -1 (no own row), "
                         f"got values in [{lo}, {hi}]")
    return index.to(torch.int64)


def check_option(value: object, name: str, choices: Sequence[str], where: str = "") -> str:
    """Check that ``value`` is one of the strings in ``choices`` (the message lists them)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{prefix}unknown `{name}`={value!r}; expected one of {valid}")
    return value


def check_margin(margin: object, name: str = "margin", where: str = "",
                 allow_soft: bool = True) -> Union[float, str]:
    """Check a margin: a finite float >= 0, or the string ``"soft"`` when ``allow_soft``."""
    prefix = f"{where}: " if where else ""
    if isinstance(margin, str):
        if allow_soft and margin == "soft":
            return margin
        expected = "a float >= 0 or 'soft'" if allow_soft else "a float >= 0"
        raise ValueError(f"{prefix}`{name}` must be {expected}, got {margin!r}")
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        expected = "a float >= 0 or 'soft'" if allow_soft else "a float >= 0"
        raise TypeError(f"{prefix}`{name}` must be {expected}, got {type(margin).__name__}")
    m = float(margin)
    if not m >= 0 or m == float("inf"):
        raise ValueError(f"{prefix}`{name}` must be a finite float >= 0, got {margin!r}")
    return m


def _real(value: object, name: str, prefix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}`{name}` must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(value: object, name: str, where: str = "") -> float:
    """Check a finite real number > 0 (temperatures, scales)."""
    prefix = f"{where}: " if where else ""
    v = _real(value, name, prefix)
    if not (v > 0) or v == float("inf"):
        raise ValueError(f"{prefix}`{name}` must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative(value: object, name: str, where: str = "") -> float:
    """Check a finite real number >= 0."""
    prefix = f"{where}: " if where else ""
    v = _real(value, name, prefix)
    if not (v >= 0) or v == float("inf"):
        raise ValueError(f"{prefix}`{name}` must be a finite number >= 0, got {value!r}")
    return v


def check_positive_int(value: object, name: str, where: str = "", minimum: int = 1) -> int:
    """Check an integer >= ``minimum`` (bools are rejected)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}`{name}` must be an int >= {minimum}, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{prefix}`{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_chunk_bytes(value: object, where: str = "") -> Optional[int]:
    """Check the ``chunk_bytes`` memory budget: None (the default budget) or an int >= 1."""
    if value is None:
        return None
    return check_positive_int(value, "chunk_bytes", where)


def check_same_device(tensors: Iterable[Tuple[str, torch.Tensor]], where: str = "") -> None:
    """Check that all named tensors live on one device."""
    prefix = f"{where}: " if where else ""
    items = list(tensors)
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{prefix}`{name}` is on {t.device} but `{first_name}` is on {first.device}")


def check_scores(scores: object, name: str = "scores", where: str = "", min_classes: int = 2) -> torch.Tensor:
    """Check a (B, C) floating-point score (logit) matrix with B >= 1 and C >= ``min_classes``."""
    prefix = f"{where}: " if where else ""
    scores = _check_float_batch(scores, name, prefix, "C")
    if scores.shape[1] < min_classes:
        raise ValueError(f"{prefix}`{name}` must have at least {min_classes} columns (classes), "
                         f"got shape {_shape(scores)}")
    return scores


def check_multi_hot(labels: object, shape: Tuple[int, int], name: str = "labels", where: str = "",
                    of: str = "scores", device: Optional[torch.device] = None) -> torch.Tensor:
    """Check a multi-hot (B, C) label matrix: bool, or float/integer holding only 0 and 1.

    Reads one flag from the device (one sync) for non-bool dtypes; the value test walks row blocks of
    at most 16M elements, so it never allocates a full (B, C) temporary.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{prefix}`{name}` must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"{prefix}`{name}` must be bool, float or integer, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{prefix}`{name}` must have shape {tuple(shape)} to match `{of}` (multi-hot), "
                         f"got shape {_shape(labels)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{prefix}`{name}` is on {labels.device} but `{of}` is on {device}; "
                         f"move them to the same device")
    if labels.dtype != torch.bool and labels.numel() > 0:
        rows = max(1, (1 << 24) // max(1, labels.shape[1]))
        bad = torch.zeros((), dtype=torch.bool, device=labels.device)
        for s in range(0, labels.shape[0], rows):
            block = labels[s:s + rows]
            bad |= ((block != 0) & (block != 1)).any()
        if bool(bad):
            raise ValueError(f"{prefix}multi-hot `{name}` must hold only 0 and 1 (or be a bool tensor)")
    return labels


def check_option_or_callable(value: object, name: str, choices: Sequence[str], where: str = "") -> object:
    """Check that ``value`` is one of the strings in ``choices`` or a callable."""
    if callable(value) and not isinstance(value, str):
        return value
    prefix = f"{where}: " if where else ""
    if not isinstance(value, str):
        valid = ", ".join(repr(c) for c in choices)
        raise TypeError(f"{prefix}`{name}` must be one of {valid} or a callable, got {type(value).__name__}")
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{prefix}unknown `{name}`={value!r}; expected one of {valid} or a callable")
    return value


def check_generator(generator: object, device: Optional[torch.device] = None, name: str = "generator",
                    where: str = "", of: str = "scores") -> Optional[torch.Generator]:
    """Check an optional ``torch.Generator`` living on the same device type as ``of``."""
    if generator is None:
        return None
    prefix = f"{where}: " if where else ""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{prefix}`{name}` must be a torch.Generator or None, got {type(generator).__name__}")
    if device is not None and generator.device.type != device.type:
        raise ValueError(f"{prefix}`{name}` is a {generator.device.type} generator but `{of}` is on {device}; "
                         f"create it with torch.Generator(device={device.type!r})")
    return generator


def check_similarity(value: object, name: str, where: str = "", allow_none: bool = True) -> Optional[float]:
    """Check a cosine-similarity threshold: a real number in [-1, 1] (or None when ``allow_none``)."""
    prefix = f"{where}: " if where else ""
    if value is None and allow_none:
        return None
    v = _real(value, name, prefix)
    if not -1.0 <= v <= 1.0:
        raise ValueError(f"{prefix}`{name}` must be a cosine similarity in [-1, 1]"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return v


def check_triplet_form(where: str, mining: str, distance: str, normalize: bool, positive: object, loss: object,
                       temperature: object, hard_threshold: object, hard_weight: object,
                       duplicate_similarity: object, min_similarity: object):
    """Validate batch-hard's positive selection and loss form; returns the
    :class:`~metricloss.ops.triplet.TripletForm` (rules: *Collapse-proof batch-hard* in the docs)."""
    from .ops.mining import POSITIVES
    from .ops.triplet import LOSS_FORMS, TripletForm

    positive = check_option(positive, "positive", POSITIVES, where)
    loss = check_option(loss, "loss", LOSS_FORMS, where)
    form = TripletForm(positive, loss, check_positive(temperature, "temperature", where),
                       check_similarity(hard_threshold, "hard_threshold", where, allow_none=False),
                       check_nonnegative(hard_weight, "hard_weight", where),
                       check_similarity(duplicate_similarity, "duplicate_similarity", where),
                       check_similarity(min_similarity, "min_similarity", where))
    if (positive != "hardest" or loss != "triplet") and mining != "batch_hard":
        raise ValueError(f"{where}: positive={positive!r} and loss={loss!r} select one positive per anchor: they "
                         f"need mining='batch_hard', got mining={mining!r}")
    if loss != "triplet" and distance != "cosine":
        raise ValueError(f"{where}: loss={loss!r} is defined on cosine similarities: pass distance='cosine' "
                         f"(got {distance!r})")
    if positive == "easiest" and form.duplicate_similarity is not None and distance != "cosine" and not normalize:
        raise ValueError(f"{where}: positive='easiest' skips near-duplicate positives by cosine similarity, which "
                         f"needs unit rows: pass normalize=True, distance='cosine', or duplicate_similarity=None")
    return form
