#!/usr/bin/env python3
"""Time and peak extra memory of :func:`metricloss.retrieval_metrics` as the query set grows.

Leave-one-out retrieval over N × D fp32 embeddings (D = 512 by default), N/50 classes of 50 shuffled
samples, cosine similarity, default chunk budget (64 MiB), 2 threads. Each N runs in its own subprocess
(:mod:`benchmarks.harness`); "peak extra" is the peak RSS above the RSS once the embeddings exist, so it
counts everything ``retrieval_metrics`` allocates: the normalised copy (N·D·4 bytes), the duplicate-row
check (and the deduplicated gallery when rows repeat), the class index, one similarity tile with its
candidate list and one chunk. A dense evaluation would hold an N × N similarity matrix (N²·4 bytes:
149 GiB at N = 200k) before ranking it. ``benchmarks/metrics_speed.py`` compares with PML + faiss and
the bare GEMM floor.

Usage:
    python benchmarks/metrics_memory.py                       # N in 25k, 50k, 100k, 200k
    python benchmarks/metrics_memory.py --sizes 10000 20000   # other sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure  # noqa: E402

CASE = "benchmarks.metrics_memory:case"
SAMPLES_PER_CLASS = 50


def case(n: int, d: int = 512, seed: int = 0):
    """A zero-argument step computing leave-one-out retrieval metrics of n × d random clustered data."""
    import torch

    from metricloss.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(seed)
    n_classes = max(n // SAMPLES_PER_CLASS, 1)
    labels = torch.arange(n, dtype=torch.int64) % n_classes
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.randn(n_classes, d, generator=g)
    emb = centres[labels] + 2.0 * torch.randn(n, d, generator=g)  # overlapping clusters: metrics not 0 or 1
    del centres

    def step():
        return retrieval_metrics(emb, labels)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        res = measure(CASE, {"n": n, "d": args.dim}, warmup_params={"n": 2000, "d": args.dim}, repeats=1,
                      warmup=0, timeout=3600)
        rows.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    import torch

    print(f"retrieval_metrics, leave-one-out, D={args.dim}, fp32, cosine, {SAMPLES_PER_CLASS} per class, "
          f"2 threads, torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| N | time (s) | peak extra (MiB) | N×D copy (MiB) | dense N×N fp32 (GiB) |")
    print("|---:|---:|---:|---:|---:|")
    for n, res in zip(args.sizes, rows):
        copy_mib = n * args.dim * 4 / 2**20
        dense_gib = n * n * 4 / 2**30
        if "error" in res:
            print(f"| {n} | {res['error']} | | {copy_mib:.0f} | {dense_gib:.1f} |")
        else:
            print(f"| {n} | {res['median_s']:.1f} | {res['peak_extra_mib']:.0f} | {copy_mib:.0f} | {dense_gib:.1f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
