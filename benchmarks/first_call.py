"""First-call latency of the native CPU ops, as a new user meets it: a fresh process, a fresh extension cache.

For each op (batch-all and semi-hard triplet losses over a P×K batch, ``retrieval_metrics``, sampled
WARP on (256, 1000) scores) it runs, in a
new Python process with its own empty ``TORCH_EXTENSIONS_DIR``: ``import metricloss``, then the op's first
call (which compiles the extension that op needs), then a second call. Then again in a new process over
the now-filled cache (the first call only loads the build). It prints the seconds and what the process
wrote to standard error, and, last, ``python -m metricloss.native build`` on a fresh cache (every
extension).

    python benchmarks/first_call.py [--repeats 1] [--ops batch_all semi_hard retrieval_metrics warp]

Times include the compiler's start-up; on a shared machine they drift (run it under
``flock /tmp/metricloss-bench.lock``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OPS = ("batch_all", "semi_hard", "retrieval_metrics", "warp")

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import metricloss as ml
t1 = time.perf_counter()
op = sys.argv[1]
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 128, generator=g)
y = torch.arange(64).repeat_interleave(4)
def call():
    if op == "retrieval_metrics":
        ml.metrics.retrieval_metrics(x, y)
    elif op == "warp":
        s = torch.randn(256, 1000, generator=g).requires_grad_()
        ml.WARPLoss()(s, torch.arange(256) % 1000).backward()
    else:
        e = x.clone().requires_grad_()
        ml.TripletLoss(margin=0.2, mining=op)(e, y).backward()
t2 = time.perf_counter(); call(); t3 = time.perf_counter(); call(); t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_s": t3 - t2, "second_s": t4 - t3}))
"""


def _run_child(op: str, cache: str) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache)
    env.pop("METRICLOSS_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", _CHILD, op], env=env, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["stderr"] = done.stderr.strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-cache runs per op (default 1)")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print("| op | first call, fresh cache (s) | first call, cached build (s) | second call (s) | import metricloss (s) |")
    print("|---|---|---|---|---|")
    messages = {}
    for op in args.ops:
        fresh, cached = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                fresh.append(_run_child(op, cache))
                cached.append(_run_child(op, cache))
        messages[op] = fresh[0]["stderr"]

        def fmt(runs, key):
            vals = [r[key] for r in runs]
            return f"{statistics.median(vals):.2f}" + (f" ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else "")

        print(f"| {op} | {fmt(fresh, 'first_s')} | {fmt(cached, 'first_s')} | {fmt(cached, 'second_s')} | "
              f"{fmt(cached, 'import_s')} |", flush=True)
    for op, text in messages.items():
        print(f"\n--- standard error of {op}'s first call on a fresh cache:\n{text}")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "metricloss.native", "build"], capture_output=True, text=True,
                              env=dict(os.environ, TORCH_EXTENSIONS_DIR=cache), check=True)
        print(f"\n--- python -m metricloss.native build, fresh cache: {time.perf_counter() - start:.1f} s\n"
              f"{done.stdout.strip()}")


if __name__ == "__main__":
    main()
