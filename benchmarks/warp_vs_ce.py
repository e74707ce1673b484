#!/usr/bin/env python3
"""Sampled WARP against ``F.cross_entropy`` on CPU, step by step in one process: forward + backward of
(B, C) fp32 logits, in milliseconds.

    flock /tmp/metricloss-bench.lock python benchmarks/warp_vs_ce.py --threads 1 2

Logits ~ N(0, 1) with uniform labels ("random": most negatives violate, the first draw usually hits) or
the same with +3 on each row's positive ("ranked": few violators, so the paper's loop draws many times).
Three steps alternate, so drift on a shared machine hits all alike: ``WARPLoss()`` (sampled, harmonic,
``max_trials=None``) on the native CPU sampler (one label per row: each row's outcome drawn from the
loop's law in two passes, every core), the same on the torch sampler (``METRICLOSS_NATIVE=0``: the loop's
trials drawn in blocks), and cross-entropy. Each figure is the median of ``--steps`` steps with its
interquartile range; the ratio is WARP's median over cross-entropy's, from the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANKED_BOOST = 3.0


def inputs(b: int, c: int, regime: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    if regime == "ranked":
        logits[torch.arange(b), labels] += RANKED_BOOST
    return logits, labels


def run(b: int, c: int, regime: str, steps: int):
    import metricloss as ml

    logits, labels = inputs(b, c, regime)
    warp = ml.WARPLoss(generator=torch.Generator().manual_seed(0))

    def warp_step(native: bool):
        def step():
            os.environ["METRICLOSS_NATIVE"] = "" if native else "0"
            x = logits.clone().requires_grad_(True)
            warp(x, labels).backward()
        return step

    def ce_step():
        x = logits.clone().requires_grad_(True)
        F.cross_entropy(x, labels).backward()

    fns = {"WARP (native sampler)": warp_step(True), "WARP (torch sampler)": warp_step(False),
           "cross-entropy": ce_step}
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    os.environ.pop("METRICLOSS_NATIVE", None)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=51)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, B={args.batch}, "
          f"C={args.classes}, fp32, median of {args.steps} steps")
    print("| threads | logits | step | ms (median) | IQR | vs cross-entropy |\n|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for regime in ("random", "ranked"):
            times = run(args.batch, args.classes, regime, args.steps)
            ce = statistics.median(times["cross-entropy"])
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=4)
                med = statistics.median(ts)
                print(f"| {threads} | {regime} | {name} | {med:.2f} | {q[0]:.2f}–{q[2]:.2f} | {med / ce:.2f}× |",
                      flush=True)


if __name__ == "__main__":
    main()
