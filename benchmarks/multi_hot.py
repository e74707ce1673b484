#!/usr/bin/env python3
"""Triplet mining with multi-hot labels against one label per sample: time and peak memory of a training step.

    flock /tmp/metricloss-bench.lock python benchmarks/multi_hot.py --sizes 4096 16384

fp32 embeddings, D = 128, the batch as its own reference set, margin 0.2 on normalised embeddings (the
default ``TripletLoss``), for each of ``--minings`` (default batch-hard, batch-all, semi-hard, and ``metrics``:
``retrieval_metrics`` of the N embeddings against themselves, leave-one-out, cosine). Labels:

* ``single``: P×K with K = 4, one integer label per sample (the single-label engine);
* ``multi_hot``: (N, L) rows with L = ``--labels`` (default 32), each label on with probability
  ``--density`` (default 0.06: about 11% of the batch are an anchor's positives, a far larger problem);
* ``single_wide``: one integer label per sample again, in classes as large as ``multi_hot``'s mean number of
  positives plus one: the same size of problem on the single-label engine, so ``multi_hot`` against it is
  the cost of the relation itself.

The multi-hot engine computes, per anchor chunk, the relation as a GEMM of the label rows: O(N·M·L), so for
L well above D it costs more than the distances. Each configuration
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


KINDS = ("single", "multi_hot", "single_wide")


def case(kind: str, n: int, dim: int = 128, labels: int = 32, density: float = 0.06, mining: str = "batch_hard"):
    """One forward + backward of ``mining`` with labels of ``kind`` (one of :data:`KINDS`), or with
    ``mining="metrics"`` one ``retrieval_metrics`` call."""
    import metricloss as ml

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g)
    y = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    if kind == "multi_hot":
        y = torch.rand(n, labels, generator=g) < density
    elif kind == "single_wide":
        y = (torch.arange(n) // _wide_class_size(n, labels, density))[torch.randperm(n, generator=g)]
    if mining == "metrics":
        from metricloss.metrics import retrieval_metrics

        def evaluate():
            retrieval_metrics(x, y)
        return evaluate
    loss = ml.TripletLoss(margin=0.2, mining=mining, monitor=False)

    def step():
        e = x.clone().requires_grad_(True)
        loss(e, y).backward()
    return step


def _wide_class_size(n: int, labels: int, density: float) -> int:
    """Class size of ``single_wide``: multi-hot's mean number of positives per anchor plus the anchor."""
    return max(2, round(mean_positives("multi_hot", n, labels, density)) + 1)


def mean_positives(kind: str, n: int, labels: int, density: float) -> float:
    """Mean number of positives (references sharing a label, self excluded) per anchor of :func:`case`'s
    labels: the size of the problem, which multi-hot labels change (batch-all and semi-hard scale with it)."""
    if kind == "single":
        return 3.0
    if kind == "single_wide":
        size = _wide_class_size(n, labels, density)
        return float(sum(min(size, n - s) * (min(size, n - s) - 1) for s in range(0, n, size)) / n)
    g = torch.Generator().manual_seed(n)
    torch.randn(n, 128, generator=g)
    torch.randperm(n, generator=g)
    y = (torch.rand(n, labels, generator=g) < density).float()
    shares = 0
    for s in range(0, n, 1024):
        shares += int(((y[s:s + 1024] @ y.T) > 0).sum())
    return (shares - int((y.sum(1) > 0).sum())) / n


def main() -> None:
    from benchmarks.harness import measure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--minings", nargs="+", default=["batch_hard", "batch_all", "semi_hard", "metrics"],
                    choices=["batch_hard", "batch_all", "semi_hard", "metrics"],
                    help="the losses' minings, and 'metrics': retrieval_metrics of the N embeddings (leave-one-out)")
    ap.add_argument("--labels", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.06)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, fp32, "
          f"D=128, multi-hot L={args.labels}, density {args.density}; median of {args.repeats} after 1 warm-up")
    print("| mining | N | labels | positives per anchor | s / step | peak extra MiB | time vs single |\n"
          "|---|---|---|---|---|---|---|")
    names = {"single": "P×K, one per sample", "multi_hot": f"multi-hot, L = {args.labels}",
             "single_wide": "one per sample, classes as large"}
    for mining in args.minings:
        for n in args.sizes:
            res = {}
            for kind in KINDS:
                res[kind] = measure("benchmarks.multi_hot:case", {"kind": kind, "n": n, "labels": args.labels,
                                                                   "density": args.density, "mining": mining},
                                    repeats=args.repeats, warmup=1, threads=args.threads)
                print(json.dumps(res[kind]), file=sys.stderr, flush=True)
            base = res["single"].get("median_s")
            for kind in KINDS:
                r = res[kind]
                pos = mean_positives(kind, n, args.labels, args.density)
                if "error" in r:
                    print(f"| {mining} | {n} | {names[kind]} | {pos:.1f} | {r['error']} | – | – |")
                    continue
                ratio = f"{r['median_s'] / base:.2f}×" if base else "–"
                print(f"| {mining} | {n} | {names[kind]} | {pos:.1f} | {r['median_s']:.3f} | {r['peak_extra_mib']:.0f} | "
                      f"{ratio} |", flush=True)

if __name__ == "__main__":
    main()
