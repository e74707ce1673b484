"""Backend selection shared by every op (docs/design.md §4).

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

__all__ = ["BACKENDS", "resolve_backend", "triton_available", "triton_interpreting"]

BACKENDS = ("auto", "torch", "triton", "reference")

_warned: Set[Tuple[str, str, str]] = set()


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is enabled (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


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
        _warn_once(op, backend, "triton is not installed")
        return "torch"
    if device.type != "cuda" and not triton_interpreting():
        # the same outcome as a missing install, so a CPU call behaves alike with or without Triton
        _warn_once(op, backend, f"the tensors are on {device.type}, not CUDA; Triton runs on CPU only under "
                                f"TRITON_INTERPRET=1, for testing")
        return "torch"
    return "triton"
