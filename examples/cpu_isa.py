"""The instruction set the main job's numerics use, pinned and recorded.

Convolutions (oneDNN), GEMMs (MKL) and torch's own vectorised kernels round differently on an AVX2 and an
AVX-512 CPU, so an unpinned run's table depends on the CPU it ran on. :func:`pin` limits all of them to one
instruction set through their own environment switches, which must be set before torch is imported:

=========================  ==========================================================
``ATEN_CPU_CAPABILITY``    torch's vectorised CPU kernels (``avx2``)
``MKL_ENABLE_INSTRUCTIONS`` MKL's widest code path (``AVX2``)
``MKL_CBWR``               MKL's conditional bitwise reproducibility branch (``AVX2``)
``ONEDNN_MAX_CPU_ISA``     oneDNN's widest code path, so its convolutions (``AVX2``)
``METRICLOSS_NATIVE_ISA``  metricloss's own native loops (``avx2``)
=========================  ==========================================================

:func:`report` records what the process really uses: the CPU model and its flags, torch's CPU capability,
oneDNN's ISA (from its verbose line, in a child process), the MKL version and the switches as set.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Dict

#: The pins by name. ``native``: no pin, every library takes the widest the CPU has.
PINS: Dict[str, Dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2",
             "ONEDNN_MAX_CPU_ISA": "AVX2", "METRICLOSS_NATIVE_ISA": "avx2"},
    "native": {},
}
SWITCHES = tuple(PINS["avx2"])


def pin(name: str) -> None:
    """Set the environment switches of pin ``name`` (a key of :data:`PINS`) for this process and its children.

    Raises:
        RuntimeError: torch is already imported (its libraries read the switches when they load).
        ValueError: an unknown pin.
    """
    if name not in PINS:
        raise ValueError(f"unknown ISA pin {name!r}; expected one of {sorted(PINS)}")
    if PINS[name] and "torch" in sys.modules:
        raise RuntimeError("the ISA pin must be set before torch is imported")
    os.environ.update(PINS[name])


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> Dict[str, bool]:
    """Whether the CPU has AVX2 and AVX-512F (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags}
    except OSError:
        pass
    return {}


_ONEDNN_PROBE = ("import torch; torch.nn.functional.conv2d(torch.randn(2, 3, 24, 24), torch.randn(8, 3, 3, 3)); "
                 "print(torch.backends.cpu.get_cpu_capability())")


def report() -> Dict[str, object]:
    """What the process's numerics run on: CPU model and flags, the ISA of torch, oneDNN and MKL, the switches."""
    import torch

    out: Dict[str, object] = {"cpu": cpu_model(), "machine": platform.machine(), "cpu_flags": cpu_flags(),
                              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "switches": {k: os.environ.get(k, "") for k in SWITCHES}}
    try:  # oneDNN says its ISA in its first verbose line; a child process, so this one stays quiet
        done = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1"))
        isa = [line.split("isa:", 1)[1].strip() for line in done.stdout.splitlines() if ",isa:" in line]
        out["onednn_isa"] = isa[0] if isa else "unknown (no verbose line)"
    except (OSError, subprocess.SubprocessError) as exc:
        out["onednn_isa"] = f"unknown ({type(exc).__name__})"
    out["mkl"] = _mkl_version()
    return out


def _mkl_version() -> str:
    """MKL's version string where torch links it (it does not say which code path runs: see MKL_* switches)."""
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return "not used"
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, 256)
        return buf.value.decode().strip()
    except (OSError, AttributeError):
        return "available (version unknown)"


def summary(rep: Dict[str, object]) -> str:
    """One line: CPU, flags, torch / oneDNN ISA, and the pin switches."""
    flags = rep["cpu_flags"]
    have = ", ".join(k for k, v in flags.items() if v) or "no AVX2"  # type: ignore[union-attr]
    switches = " ".join(f"{k}={v}" for k, v in rep["switches"].items() if v) or "none"  # type: ignore[union-attr]
    return (f"{rep['cpu']} ({rep['machine']}; {have}); torch CPU capability {rep['torch_cpu_capability']}, "
            f"oneDNN ISA {rep['onednn_isa']}; switches: {switches}")
