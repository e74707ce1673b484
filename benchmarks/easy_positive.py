#!/usr/bin/env python3
"""The collapse-proof batch-hard variants against plain batch-hard: one training step (forward + backward
w.r.t. the embeddings, normalisation included), in milliseconds.

    flock /tmp/metricloss-bench.lock python benchmarks/easy_positive.py --sizes 4096 16384 --threads 2

fp32, D = 128, P×K labels with K = 4, the batch as its own reference set (the chunked engine: no N×N).
Variants: plain batch-hard (hinge 0.2, Euclidean on normalised rows, the default), the same on cosine
distance (the distance SCT and EPHN mine with), the easy positive with the hinge, :class:`metricloss.SCTLoss`
and :class:`metricloss.EPHNLoss`. Every round runs each variant once in turn (drift hits all alike); each
figure is the median of ``--rounds`` rounds with its interquartile range, and the ratio is the variant's
median over plain batch-hard's, from the same run. The monitor is off (its record costs no kernel between
checks; a check every 10 steps reads a dozen scalars).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variants():
    import metricloss as ml

    return {
        "batch-hard (euclidean)": ml.TripletLoss(margin=0.2, monitor=False),
        "batch-hard (cosine)": ml.TripletLoss(margin=0.2, distance="cosine", monitor=False),
        "easy positive, hinge": ml.TripletLoss(margin=0.2, positive="easiest", monitor=False),
        "SCT": ml.SCTLoss(monitor=False),
        "EPHN": ml.EPHNLoss(monitor=False),
    }


def _step(loss, x, y):
    e = x.clone().requires_grad_(True)
    loss(e, y).backward()


def run(n: int, d: int, rounds: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g)
    y = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    losses = variants()
    for loss in losses.values():  # warm-up (the first call builds nothing native here, but allocates)
        _step(loss, x, y)
    times = {name: [] for name in losses}
    for _ in range(rounds):
        for name, loss in losses.items():
            start = time.perf_counter()
            _step(loss, x, y)
            times[name].append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"D={args.dim}, fp32, K=4, {args.rounds} rounds")
    print("| N | variant | ms (median) | IQR | vs plain batch-hard |\n|---|---|---|---|---|")
    for n in args.sizes:
        times = run(n, args.dim, args.rounds)
        base = statistics.median(times["batch-hard (euclidean)"])
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            med = statistics.median(ts)
            print(f"| {n} | {name} | {med:.1f} | {q[0]:.1f}–{q[2]:.1f} | {med / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
