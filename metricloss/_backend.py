"""Backend selection shared by every op (see *Design › Backends* in the docs).

``backend="auto" | "torch" | "triton" | "reference"``:

* ``"auto"`` picks Triton when the op has a Triton implementation, the tensor is on CUDA and Triton
  imports; the chunked-torch path otherwise. The environment variable ``METRICLOSS_BACKEND`` overrides
  what ``"auto"`` resolves to. A fallback from ``"auto"`` is silent.
* One rule whatever is installed: an explicitly requested backend that cannot serve the call falls back
  to the chunked-torch path with a ``UserWarning`` issued once per (op, requested backend, reason).
  Fallbacks are loud and tested. ``"triton"`` cannot serve a call when the op has no Triton kernel, when
  Triton is not installed, or when the tensors are not on CUDA and ``TRITON_INTERPRET`` is not set.
* The interpreter is the only CPU Triton: ``"triton"`` on CPU tensors runs the kernels only under
  ``TRITON_INTERPRET=1`` (the test-suite), which is orders of magnitude slower than the torch path and is
  never chosen implicitly.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence, Set, Tuple

import torch

from ._checks import check_option

__all__ = ["BACKENDS", "MIN_TRITON_VERSION", "resolve_backend", "triton_available", "triton_interpreting"]

BACKENDS = ("auto", "torch", "triton", "reference")

_warned: Set[Tuple[str, str, str]] = set()


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is enabled (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The kernels call ``tl.dot(..., input_precision=...)``, which Triton 2.x lacks (it has ``allow_tf32``);
# torch 2.3 pins Triton 2.3, torch >= 2.4 pins Triton >= 3.0.
MIN_TRITON_VERSION = (3, 0)


def _version_tuple(version: str) -> Tuple[int, ...]:
    """``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``: the leading numeric fields of a version string."""
    parts = []
    for field in version.split("+")[0].split("."):
        digits = "".join(ch for ch in field if ch.isdigit()) if field[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def triton_available() -> bool:
    """True when ``import triton`` succeeds and its version is at least :data:`MIN_TRITON_VERSION`.

    An older Triton (torch 2.3 ships 2.3) counts as absent: ``"auto"`` then uses the torch path and an
    explicit ``"triton"`` warns once and falls back, instead of failing when the first kernel compiles.
    """
    try:
        import triton
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return _version_tuple(getattr(triton, "__version__", "0")) >= MIN_TRITON_VERSION


def _warn_once(op: str, requested: str, reason: str) -> None:
    key = (op, requested, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"metricloss.{op}: backend={requested!r} is not available ({reason}); "
                  f"falling back to the chunked torch backend", UserWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, op: str, implemented: Sequence[str]) -> str:
    """Return the backend that will run ``op`` on tensors living on ``device``.

    Args:
        backend: what the caller asked for, one of :data:`BACKENDS`.
        device: the device of the op's main input.
        op: the op's public name, used in messages.
        implemented: the backends this op has (always includes ``"torch"``).

    Returns:
        One of ``"torch"``, ``"triton"`` or ``"reference"``. An explicit ``"triton"`` that cannot serve the
        call (no kernel for this op, Triton not installed, or non-CUDA tensors without ``TRITON_INTERPRET=1``)
        returns ``"torch"`` after a ``UserWarning`` issued once per (op, backend, reason).

    Raises:
        ValueError: ``backend`` or ``METRICLOSS_BACKEND`` is not one of :data:`BACKENDS`.
    """
    check_option(backend, "backend", BACKENDS, op)
    if backend == "auto":
        env = os.environ.get("METRICLOSS_BACKEND", "").strip()
        if env and env != "auto":
            check_option(env, "METRICLOSS_BACKEND (environment variable)", BACKENDS, op)
            backend = env
        else:
            use_triton = ("triton" in implemented and device.type == "cuda" and triton_available())
            return "triton" if use_triton else "torch"
    if backend == "reference":
        return "reference"
    if backend == "torch":
        return "torch"
    # backend == "triton", explicitly requested
    if "triton" not in implemented:
        _warn_once(op, backend, "this op has no Triton kernel")
        return "torch"
    if not triton_available():
        _warn_once(op, backend, "triton >= 3.0 is not installed")
        return "torch"
    if device.type != "cuda" and not triton_interpreting():
        # the same outcome as a missing install, so a CPU call behaves alike with or without Triton
        _warn_once(op, backend, f"the tensors are on {device.type}, not CUDA; Triton runs on CPU only under "
                                f"TRITON_INTERPRET=1, for testing")
        return "torch"
    return "triton"
