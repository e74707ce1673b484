#!/usr/bin/env python3
"""The small-batch regime on CPU: one triplet training step (forward + backward w.r.t. the embeddings,
normalisation included) of metricloss against pytorch-metric-learning (PML), in microseconds.

    flock /tmp/metricloss-bench.lock python benchmarks/small_batch.py --sizes 64 256 1024 --threads 1 2

Same inputs as ``benchmarks/peers.py`` (fp32, D = 128, P×K labels with K = 4, euclidean on L2-normalised
embeddings, margin 0.2) and the same pairings: metricloss ``TripletLoss(mining, reduction="mean_nonzero")``
against PML ``TripletMarginLoss`` with ``BatchHardMiner`` (batch-hard) or no miner (batch-all: every
triplet). PML's semi-hard miner is another loss (every triplet with d_ap < d_an <= d_ap + m), so semi-hard is
timed for metricloss alone. At these sizes a step takes tens of microseconds to a few milliseconds, so the
two libraries run in one process, alternating step by step (drift hits both alike), and each figure is the
median of ``--steps`` steps with its interquartile range. Needs PML installed (the peers' venv).
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


def _inputs(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    labels = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    return x, labels


def _steps(mining: str, margin: float):
    import metricloss as ml

    ours = ml.TripletLoss(margin=margin, mining=mining, reduction="mean_nonzero")
    out = {"metricloss": lambda x, y: ours(x, y)}
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        return out
    if mining == "semi_hard":
        return out
    pml_loss = losses.TripletMarginLoss(margin=margin)
    if mining == "batch_hard":
        miner = miners.BatchHardMiner()
        out["PML"] = lambda x, y: pml_loss(x, y, miner(x, y))
    else:
        out["PML"] = lambda x, y: pml_loss(x, y)
    return out


def time_cell(n: int, d: int, mining: str, steps: int, warmup: int, margin: float = 0.2):
    """{library: (median µs, q1 µs, q3 µs)} of one forward + backward, the libraries alternating."""
    x0, labels = _inputs(n, d)
    fns = _steps(mining, margin)
    times = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            x = x0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x, labels).backward()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt * 1e6)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        out[name] = (statistics.median(ts), q[0], q[2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--minings", nargs="+", default=["batch_hard", "batch_all", "semi_hard"])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per library and cell (default 200)")
    ap.add_argument("--warmup", type=int, default=20)
    args = ap.parse_args()
    import metricloss

    print(f"{platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, metricloss from "
          f"{os.path.dirname(metricloss.__file__)}; D={args.dim}, K=4, median [q1, q3] of {args.steps} steps (µs)")
    print("| mining | N | threads | metricloss (µs) | PML (µs) | metricloss / PML |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mining in args.minings:
            for n in args.sizes:
                cell = time_cell(n, args.dim, mining, args.steps, args.warmup)
                ml_t = cell["metricloss"]
                pml = cell.get("PML")
                pml_s = f"{pml[0]:.0f} [{pml[1]:.0f}, {pml[2]:.0f}]" if pml else "– (another loss)"
                ratio = f"{ml_t[0] / pml[0]:.2f}×" if pml else ""
                print(f"| {mining} | {n} | {threads} | {ml_t[0]:.0f} [{ml_t[1]:.0f}, {ml_t[2]:.0f}] | {pml_s} | {ratio} |",
                      flush=True)


if __name__ == "__main__":
    main()
