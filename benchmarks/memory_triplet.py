#!/usr/bin/env python3
"""Time and peak extra memory of metricloss vs pytorch-metric-learning (PML) triplet losses.

For N in {4096, 16384}, D=128, fp32, N/4 classes × 4 samples (shuffled), 2 threads, forward+backward
w.r.t. the embeddings:

* batch-hard: ``metricloss.BatchHardTripletLoss(margin=0.2, reduction="mean_nonzero")`` vs PML
  ``TripletMarginLoss(margin=0.2)`` + ``BatchHardMiner()`` (the same loss; see tests/losses);
* batch-all: ``metricloss.BatchAllTripletLoss(margin=0.2, reduction="mean_nonzero")`` vs PML
  ``TripletMarginLoss(margin=0.2)`` without a miner (all triplets; the same loss);
* the floor: one bare ``x @ x.T`` (N×N×D matmul) at the same size.

Every configuration runs in its own subprocess, so peak RSS (``ru_maxrss``, monotone per process) is
per configuration; "peak extra" is peak RSS minus RSS after the inputs are built and torch is warm.
The child gets an address-space limit (``--mem-limit-gb``) so a PML configuration that cannot fit
fails cleanly instead of swapping the machine; that row then says so.

Usage:
    python benchmarks/memory_triplet.py                  # full grid, markdown table on stdout
    python benchmarks/memory_triplet.py --sizes 4096     # one size
    python benchmarks/memory_triplet.py --json-out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

D = 128
MARGIN = 0.2
SAMPLES_PER_CLASS = 4


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_inputs(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, D, generator=g)
    labels = torch.arange(n // SAMPLES_PER_CLASS).repeat_interleave(SAMPLES_PER_CLASS)
    return emb, labels[torch.randperm(n, generator=g)]


def build(method: str, mining: str):
    """A callable (embeddings, labels) -> loss for one configuration."""
    if method == "matmul":
        import torch.nn.functional as F

        def floor(e, _labels):
            x = F.normalize(e.detach(), dim=1)
            return x @ x.T

        return floor
    if method == "metricloss":
        import metricloss as ml

        cls = ml.BatchHardTripletLoss if mining == "batch_hard" else ml.BatchAllTripletLoss
        return cls(margin=MARGIN, reduction="mean_nonzero", backend="torch")
    if method == "pml":
        from pytorch_metric_learning import losses, miners

        loss_fn = losses.TripletMarginLoss(margin=MARGIN)
        if mining == "batch_hard":
            miner = miners.BatchHardMiner()
            return lambda e, y: loss_fn(e, y, miner(e, y))
        return lambda e, y: loss_fn(e, y)
    raise ValueError(method)


def run_one(method: str, mining: str, n: int, repeats: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(2)
    emb0, labels = make_inputs(n)
    fn = build(method, mining)
    # warm torch up on a tiny input so one-time allocations do not count as the loss's memory
    tiny, tiny_labels = make_inputs(64)
    out = fn(tiny.clone().requires_grad_(), tiny_labels)
    if out.requires_grad:
        out.backward()
    base = _current_rss_mib()
    times, value = [], None
    for i in range(warmup + repeats):
        emb = emb0.clone().requires_grad_(method != "matmul")
        t0 = time.perf_counter()
        out = fn(emb, labels)
        if method != "matmul":
            out.backward()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        value = float(out.detach().reshape(-1)[0])
        del out, emb
    return {"method": method, "mining": mining, "N": n, "D": D, "threads": torch.get_num_threads(),
            "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "peak_extra_mib": _rss_mib() - base, "value": value, "torch": torch.__version__}


def run_subprocess(method: str, mining: str, n: int, repeats: int, warmup: int, mem_limit_gb: float,
                   timeout: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, mining, str(n), "--repeats", str(repeats),
           "--warmup", str(warmup), "--mem-limit-gb", str(mem_limit_gb)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "mining": mining, "N": n, "error": f"timeout > {timeout} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        if "can't allocate memory" in p.stderr or "MemoryError" in p.stderr:
            tail = f"out of memory (> {mem_limit_gb:g} GB)"
        return {"method": method, "mining": mining, "N": n, "error": tail[:80]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else r.get("error", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "MINING", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--minings", nargs="+", default=["batch_hard", "batch_all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    if args.one:
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        method, mining, n = args.one
        print(json.dumps(run_one(method, mining, int(n), args.repeats, args.warmup)))
        return

    results = []
    for n in args.sizes:
        floor = run_subprocess("matmul", "-", n, 5, 1, args.mem_limit_gb, args.timeout)
        results.append(floor)
        for mining in args.minings:
            for method in ("metricloss", "pml"):
                # PML's all-triplets path at N=16384 holds ~800M int64 triplets (>19 GB): one run only
                reps, warm = (1, 0) if (method == "pml" and n > 4096) else (args.repeats, args.warmup)
                res = run_subprocess(method, mining, n, reps, warm, args.mem_limit_gb, args.timeout)
                results.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"torch {torch.__version__}, 2 threads, fp32, D={D}, {SAMPLES_PER_CLASS} samples per class\n")
    print("| loss | N | metricloss time (s) | PML time (s) | speed-up | metricloss peak extra (MiB) "
          "| PML peak extra (MiB) | memory ratio | metricloss / matmul time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        floor = next(r for r in results if r["method"] == "matmul" and r["N"] == n)
        for mining in args.minings:
            ours = next(r for r in results if r["method"] == "metricloss" and r["mining"] == mining and r["N"] == n)
            theirs = next(r for r in results if r["method"] == "pml" and r["mining"] == mining and r["N"] == n)

            speed = f"{theirs['median_s'] / ours['median_s']:.1f}×" if "median_s" in theirs and "median_s" in ours \
                else "–"
            mem = (f"{theirs['peak_extra_mib'] / max(ours['peak_extra_mib'], 1):.1f}×"
                   if "peak_extra_mib" in theirs and "peak_extra_mib" in ours else "–")
            ratio = f"{ours['median_s'] / floor['median_s']:.2f}" if "median_s" in ours and "median_s" in floor \
                else "–"
            print(f"| {mining} | {n} | {fmt(ours, 'median_s', '.3f')} | {fmt(theirs, 'median_s', '.3f')} | {speed} | "
                  f"{fmt(ours, 'peak_extra_mib', '.0f')} | {fmt(theirs, 'peak_extra_mib', '.0f')} | {mem} | {ratio} |")
        print(f"| matmul floor (x @ x.T) | {n} | {fmt(floor, 'median_s', '.3f')} | | | "
              f"{fmt(floor, 'peak_extra_mib', '.0f')} | | | 1.00 |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
