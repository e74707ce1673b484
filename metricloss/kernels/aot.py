"""Ahead-of-time compilation for a GPU that is not here, and what the cubin says.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole NVIDIA pipeline
(TTIR → TTGIR → LLVM → PTX → ptxas → cubin) on a CPU-only machine. Triton's wheel bundles
``cuobjdump``, which reads the cubin's resource usage (registers, stack and local memory: where ptxas
puts spilled registers, static shared memory) and its SASS (tensor-core instructions: ``HMMA`` on
sm_80, ``HGMMA`` (wgmma) or ``HMMA`` on sm_90). The AOT tests and ``benchmarks/kernel_resources.py``
both use :func:`compile_and_inspect`.

Compile in a process that has never run the Triton interpreter: with ``TRITON_INTERPRET=1`` set, repeated
compilations of one kernel with different constexprs fail inside Triton's code generator (seen with
triton 3.9.0). :func:`inspect_in_subprocess` does that for the tests, which run under the interpreter.

Pointers and row strides are compiled with the divisibility-by-16 hint that Triton's launcher applies
at run time to 16-byte-aligned contiguous tensors whose row length is a multiple of 16 elements, so the
cubin is the one a real launch with such tensors would build.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["CubinReport", "compile_and_inspect", "inspect_in_subprocess", "cuobjdump_path"]


@dataclass(frozen=True)
class CubinReport:
    """What one compiled kernel uses, read from its cubin."""

    arch: int
    registers: int
    local_bytes: int          # local memory per thread (LOCAL)
    stack_bytes: int          # per-thread stack frame (STACK): where ptxas puts spilled registers
    spill_stores: int         # STL instructions in the SASS
    spill_loads: int          # LDL instructions in the SASS
    shared_bytes: int         # Triton's dynamic shared memory + static shared memory
    mma: Tuple[str, ...]      # distinct tensor-core opcodes found in the SASS
    mma_count: int

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


def cuobjdump_path() -> str:
    """The ``cuobjdump`` bundled with Triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, types: Mapping[str, str], constexprs: Mapping[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else types[name]
    return sig


def _compilable(fn):
    """A real ``JITFunction`` for ``fn``: under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an
    ``InterpretedFunction``, which the compiler cannot take; re-wrap the original Python function."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    if fn.fn not in _COMPILABLE:
        _COMPILABLE[fn.fn] = JITFunction(fn.fn)
    return _COMPILABLE[fn.fn]


_COMPILABLE: Dict[object, object] = {}


def compile_and_inspect(fn, types: Mapping[str, str], constexprs: Mapping[str, object], arch: int,
                        num_warps: int, num_stages: int, divisible_by_16: Iterable[str] = ()) -> CubinReport:
    """Compile ``fn`` for ``sm_<arch>`` and read its resources from the cubin.

    Args:
        fn: a ``@triton.jit`` function.
        types: Triton types of the runtime arguments (``"*fp32"``, ``"i32"``, ...), by name.
        constexprs: values of the compile-time arguments, by name.
        arch: 80 or 90.
        num_warps, num_stages: launch options.
        divisible_by_16: runtime arguments given the ``tt.divisibility=16`` hint (pointers, strides).
    """
    fn = _compilable(fn)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=dict(constexprs), attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump_path(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    mma: List[str] = re.findall(r"\b(HGMMA\.\S+|HMMA\.\S+)", sass)
    return CubinReport(
        arch=arch,
        registers=int(fields["REG"]),
        local_bytes=int(fields.get("LOCAL", 0)),
        stack_bytes=int(fields.get("STACK", 0)),
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
        spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\b", sass)),
        shared_bytes=int(kernel.metadata.shared) + int(fields.get("SHARED", 0)),
        mma=tuple(sorted({m.rstrip(";,") for m in mma})),
        mma_count=len(mma),
    )


def inspect_in_subprocess(jobs: Sequence[Mapping[str, Any]], timeout: int = 1800) -> List[CubinReport]:
    """Run :func:`compile_and_inspect` for each job in a fresh Python without ``TRITON_INTERPRET``.

    Each job is a mapping with ``kernel`` (``"module.path:name"``), ``types``, ``constexprs``, ``arch``,
    ``num_warps``, ``num_stages`` and optionally ``divisible_by_16``. Returns one report per job.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "metricloss.kernels.aot"], input=json.dumps(list(jobs)),
                       capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{p.stderr[-4000:]}")
    return [CubinReport(**{k: tuple(v) if k == "mma" else v for k, v in r.items()})
            for r in json.loads(p.stdout.strip().splitlines()[-1])]


def _main() -> None:
    jobs = json.loads(sys.stdin.read())
    out = []
    for job in jobs:
        module, name = job["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        rep = compile_and_inspect(fn, job["types"], job["constexprs"], job["arch"], job["num_warps"],
                                  job["num_stages"], job.get("divisible_by_16", ()))
        out.append(asdict(rep))
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
