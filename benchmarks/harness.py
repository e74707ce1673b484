"""Measure one benchmark case in a fresh subprocess: median time and peak extra memory.

Peak memory is only meaningful per process (``ru_maxrss`` is monotone), so every case runs in its own
``python -m benchmarks.harness`` child. A *case* is a function ``case(**params) -> step`` that builds its
inputs (not timed, not counted) and returns a zero-argument ``step`` callable (timed and counted), e.g.
one forward+backward. The child:

1. sets 2 threads (or ``threads``), applies an address-space limit so an impossible case fails cleanly;
2. calls ``case(**warmup_params)`` and runs that step once, if ``warmup_params`` are given (one-time
   allocations: thread pools, allocator arenas, lazy imports), then builds the real case;
3. records RSS, runs ``warmup`` + ``repeats`` steps, and reports the median and min time of the last
   ``repeats`` and the peak RSS above the recorded RSS ("peak extra", MiB).

Usage from a script or a pytest-benchmark suite::

    from benchmarks.harness import measure
    res = measure("benchmarks.memory_triplet:case", {"method": "metricloss", "mining": "batch_hard", "n": 4096})
    res["median_s"], res["peak_extra_mib"]      # or res["error"] if the child failed / ran out of memory
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["measure", "load_case", "peak_rss_mib", "current_rss_mib"]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Current resident set size, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_case(case: str) -> Callable[..., Callable[[], Any]]:
    """The case function named ``"module.path:function"`` (also used in-process by the pytest suites)."""
    module, func = case.split(":")
    return getattr(importlib.import_module(module), func)


def _run_child(case: str, params: Dict[str, Any], warmup_params: Optional[Dict[str, Any]], repeats: int,
               warmup: int, threads: int) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    build = load_case(case)
    if warmup_params is not None:
        build(**warmup_params)()
    step = build(**params)
    base = current_rss_mib()
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return {"case": case, "params": params, "median_s": statistics.median(times), "min_s": min(times),
            "repeats": repeats, "peak_extra_mib": peak_rss_mib() - base, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def measure(case: str, params: Dict[str, Any], *, warmup_params: Optional[Dict[str, Any]] = None,
            repeats: int = 3, warmup: int = 1, threads: int = 2, mem_limit_gb: float = 20.0,
            timeout: int = 1800) -> Dict[str, Any]:
    """Run ``case(**params)`` in a subprocess; return its timing and memory, or ``{"error": ...}``.

    Args:
        case: ``"module.path:function"``, importable from the repository root.
        params: JSON-serialisable keyword arguments of the case.
        warmup_params: optional parameters of a small run done first, outside the measurement.
        repeats, warmup: timed runs and untimed runs before them.
        threads: torch threads in the child.
        mem_limit_gb: address-space limit of the child; exceeding it reports "out of memory".
        timeout: seconds before the child is killed.
    """
    cmd = [sys.executable, "-m", "benchmarks.harness", "--case", case, "--params", json.dumps(params),
           "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads),
           "--mem-limit-gb", str(mem_limit_gb)]
    if warmup_params is not None:
        cmd += ["--warmup-params", json.dumps(warmup_params)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"case": case, "params": params, "error": f"timeout > {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        if "can't allocate memory" in p.stderr or "MemoryError" in p.stderr:
            tail = f"out of memory (> {mem_limit_gb:g} GB)"
        return {"case": case, "params": params, "error": tail[:120]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="Run one benchmark case (used by measure()).")
    ap.add_argument("--case", required=True)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--warmup-params", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    args = ap.parse_args()
    limit = int(args.mem_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warm = json.loads(args.warmup_params) if args.warmup_params else None
    print(json.dumps(_run_child(args.case, json.loads(args.params), warm, args.repeats, args.warmup,
                                args.threads)))


if __name__ == "__main__":
    main()
