#!/usr/bin/env python3
"""Batch-hard with multi-hot labels against one label per sample: time and peak memory of a training step.

    flock /tmp/metricloss-bench.lock python benchmarks/multi_hot.py --sizes 4096 16384

fp32 embeddings, D = 128, the batch as its own reference set, margin 0.2 on normalised embeddings (the
default ``TripletLoss``). Labels: P×K with K = 4 (one label per sample, the single-label engine), or (N, L)
multi-hot rows with L = ``--labels`` (default 32) and each label on with probability ``--density`` (the
multi-hot engine: per chunk the Gram key and a GEMM of the label rows for the relation). Each configuration
runs in its own subprocess (``benchmarks/harness.py``, 2 threads): median of ``--repeats`` steps after one
warm-up, and the peak resident memory above what the process held before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def case(kind: str, n: int, dim: int = 128, labels: int = 32, density: float = 0.06):
    """One forward + backward of batch-hard, ``"single"`` (P×K labels) or ``"multi_hot"`` labels."""
    import metricloss as ml

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g)
    if kind == "single":
        y = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    else:
        y = torch.rand(n, labels, generator=g) < density
    loss = ml.TripletLoss(margin=0.2, monitor=False)

    def step():
        e = x.clone().requires_grad_(True)
        loss(e, y).backward()
    return step


def main() -> None:
    from benchmarks.harness import measure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--labels", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.06)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, fp32, "
          f"D=128, multi-hot L={args.labels}, density {args.density}; median of {args.repeats} after 1 warm-up")
    print("| N | labels | s / step | peak extra MiB | time vs single |\n|---|---|---|---|---|")
    for n in args.sizes:
        res = {}
        for kind in ("single", "multi_hot"):
            res[kind] = measure("benchmarks.multi_hot:case", {"kind": kind, "n": n, "labels": args.labels,
                                                               "density": args.density},
                                repeats=args.repeats, warmup=1, threads=args.threads)
            print(json.dumps(res[kind]), file=sys.stderr, flush=True)
        base = res["single"].get("median_s")
        for kind, name in (("single", "P×K, one per sample"), ("multi_hot", f"multi-hot, L = {args.labels}")):
            r = res[kind]
            if "error" in r:
                print(f"| {n} | {name} | {r['error']} | – | – |")
                continue
            ratio = f"{r['median_s'] / base:.2f}×" if base else "–"
            print(f"| {n} | {name} | {r['median_s']:.3f} | {r['peak_extra_mib']:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
