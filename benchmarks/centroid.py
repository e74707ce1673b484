#!/usr/bin/env python3
"""CentroidTripletLoss: linear time in the batch size, bounded memory, and the speed-up over triplet mining.

Three measurements, CPU fp32, 2 threads, forward+backward w.r.t. the embeddings, each configuration in its
own subprocess (:mod:`benchmarks.harness`: median time, peak RSS above the RSS after setup):

1. **Scaling.** ``ml.CentroidTripletLoss(C=1000, D=128, centroids="kmeans")`` at B in {1024, 4096, 16384,
   65536} with uniform random labels: time per sample should be flat (linear in B). Beside it, at the same B
   and D, metricloss's batch-hard and batch-all triplet losses on P×K batches (K=4, as in
   ``benchmarks/memory_triplet.py``), and a naive dense torch version of the centroid loss (``torch.cdist``
   to all centroids, (B, C) masks), so speed-ups are measured ratios.
2. **Memory.** B=4096, C=100000, D=128 with random unit centroids (K-means at C=100000 would take hours on
   a CPU), metricloss vs the naive dense version. Target: < 256 MiB peak extra for metricloss.
3. **K-means centroids.** Build time and the ratio of the largest to the smallest pairwise centroid
   distance for (C, D) = (100, 128) and (1000, 512), beside random unit vectors (the same measure).

Usage:
    python benchmarks/centroid.py                          # everything, markdown on stdout
    python benchmarks/centroid.py --sizes 1024 4096 --skip-memory --skip-triplet
    python benchmarks/centroid.py --sizes --skip-kmeans    # the memory case only
    python benchmarks/centroid.py --json-out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure  # noqa: E402

D = 128
SCALING_CLASSES = 1000
MEMORY_CLASSES = 100000
MEMORY_BATCH = 4096
CASE = "benchmarks.centroid:case"


def _centroids(num_classes: int, dim: int, scheme: str):
    import torch
    import torch.nn.functional as F

    from metricloss.ops.centroid import build_centroids

    if scheme == "random":
        return F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    return build_centroids(scheme, num_classes, dim)


def naive_centroid_loss(emb, labels, centroids):
    """Dense torch: all (B, C) distances with torch.cdist, own/other split by a (B, C) mask."""
    import torch

    d = torch.cdist(emb, centroids)
    own = torch.nn.functional.one_hot(labels, centroids.shape[0]).bool()
    per_row = d[own] - d.masked_fill(own, 0).sum(1) / (3 * (centroids.shape[0] - 1))
    return per_row.mean()


def case(method: str, n: int, num_classes: int = SCALING_CLASSES, dim: int = D, scheme: str = "kmeans"):
    """Harness case: one forward+backward of the centroid loss (metricloss or naive) on (n, dim) inputs."""
    import torch

    import metricloss as ml

    g = torch.Generator().manual_seed(0)
    emb0 = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centroids = _centroids(num_classes, dim, scheme)
    if method == "metricloss":
        loss_fn = ml.CentroidTripletLoss(num_classes, dim, centroids=centroids, backend="torch")
    elif method == "naive":
        loss_fn = lambda e, y: naive_centroid_loss(e, y, centroids)  # noqa: E731
    else:
        raise ValueError(method)

    def step():
        emb = emb0.clone().requires_grad_()
        loss_fn(emb, labels).backward()

    return step


def pairwise_ratio(c) -> float:
    """max / min pairwise Euclidean distance between distinct rows."""
    import torch

    d = torch.cdist(c.double(), c.double())
    off = ~torch.eye(c.shape[0], dtype=torch.bool)
    return float(d[off].max() / d[off].min())


def kmeans_report(shapes, repeats: int = 3):
    import torch
    import torch.nn.functional as F

    from metricloss.ops.centroid import kmeans_sphere_centroids

    torch.set_num_threads(2)
    rows = []
    for num_classes, dim in shapes:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            c = kmeans_sphere_centroids(num_classes, dim, seed=0)
            times.append(time.perf_counter() - t0)
        same = torch.equal(c, kmeans_sphere_centroids(num_classes, dim, seed=0))
        rnd = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
        d = torch.cdist(c.double(), c.double())[~torch.eye(num_classes, dtype=torch.bool)]
        rows.append({"C": num_classes, "D": dim, "build_s": min(times), "ratio": pairwise_ratio(c),
                     "random_ratio": pairwise_ratio(rnd), "min_d": float(d.min()), "max_d": float(d.max()),
                     "deterministic": same})
    return rows


def fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else r.get("error", "?")


def print_scaling(sizes, results) -> None:
    print(f"Scaling: C={SCALING_CLASSES} (kmeans centroids), D={D}, uniform labels; "
          f"triplet: B/4 classes × 4.\n")
    print("| B | centroid time (s) | µs / sample | naive dense centroid (s) | batch-hard (s) | batch-all (s) "
          "| speed-up vs batch-hard | vs batch-all | centroid peak extra (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_sample = []
    for n in sizes:
        ours = results[("centroid", n)]
        if "median_s" in ours:
            per_sample.append(ours["median_s"] / n * 1e6)
        cells = [str(n), fmt(ours, "median_s", ".4f"),
                 f"{ours['median_s'] / n * 1e6:.2f}" if "median_s" in ours else "–"]
        naive = results.get(("naive", n), {})
        cells.append(fmt(naive, "median_s", ".4f") if naive else "–")
        for mining in ("batch_hard", "batch_all"):
            r = results.get((mining, n), {})
            cells.append(fmt(r, "median_s", ".3f") if r else "–")
        for mining in ("batch_hard", "batch_all"):
            r = results.get((mining, n), {})
            ok = "median_s" in r and "median_s" in ours
            cells.append(f"{r['median_s'] / ours['median_s']:.1f}×" if ok else "–")
        cells.append(fmt(ours, "peak_extra_mib", ".0f"))
        print("| " + " | ".join(cells) + " |")
    if per_sample:
        mean = sum(per_sample) / len(per_sample)
        spread = ", ".join(f"{(p / mean - 1) * 100:+.0f}%" for p in per_sample)
        print(f"\nTime per sample vs its mean over B: {spread}; "
              f"max/min = {max(per_sample) / min(per_sample):.2f}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 16384, 65536],
                    help="batch sizes of the scaling table (none: skip it)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--skip-triplet", action="store_true", help="no batch-hard / batch-all columns")
    ap.add_argument("--skip-naive", action="store_true", help="no naive dense centroid column")
    ap.add_argument("--skip-memory", action="store_true", help="no C=100000 memory case")
    ap.add_argument("--skip-kmeans", action="store_true", help="no K-means centroid report")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    def run(case_name, params, warm_params, reps=args.repeats, warm=args.warmup):
        res = measure(case_name, params, warmup_params=warm_params, repeats=reps, warmup=warm,
                      mem_limit_gb=args.mem_limit_gb)
        print(json.dumps(res), file=sys.stderr, flush=True)
        return res

    results = {}
    for n in args.sizes:
        warm = {"method": "metricloss", "n": 64, "scheme": "random"}
        results[("centroid", n)] = run(CASE, {"method": "metricloss", "n": n}, warm)
        if not args.skip_naive:
            results[("naive", n)] = run(CASE, {"method": "naive", "n": n}, dict(warm, method="naive"))
        if not args.skip_triplet:
            for mining in ("batch_hard", "batch_all"):
                # quadratic in B: one timed run at the largest sizes keeps the script under ~10 minutes
                reps, w = (1, 0) if n > 16384 else (args.repeats, args.warmup)
                results[(mining, n)] = run("benchmarks.memory_triplet:case",
                                           {"method": "metricloss", "mining": mining, "n": n},
                                           {"method": "metricloss", "mining": mining, "n": 64}, reps, w)
    if not args.skip_memory:
        params = {"n": MEMORY_BATCH, "num_classes": MEMORY_CLASSES, "scheme": "random"}
        warm = {"method": "metricloss", "n": 64, "scheme": "random"}
        results[("memory", "metricloss")] = run(CASE, dict(params, method="metricloss"), warm, reps=3, warm=1)
        if not args.skip_naive:
            results[("memory", "naive")] = run(CASE, dict(params, method="naive"), dict(warm, method="naive"),
                                               reps=1, warm=0)
    kmeans = [] if args.skip_kmeans else kmeans_report([(100, 128), (1000, 512)])

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"2 threads, fp32, forward+backward\n")
    if args.sizes:
        print_scaling(args.sizes, results)
    if not args.skip_memory:
        ours, naive = results[("memory", "metricloss")], results.get(("memory", "naive"), {})
        print(f"\nMemory: B={MEMORY_BATCH}, C={MEMORY_CLASSES}, D={D} (random unit centroids, "
              f"{MEMORY_CLASSES * D * 4 / 2**20:.0f} MiB themselves, built before the measurement).\n")
        print("| | time (s) | peak extra (MiB) |")
        print("|---|---|---|")
        print(f"| metricloss | {fmt(ours, 'median_s', '.3f')} | {fmt(ours, 'peak_extra_mib', '.0f')} |")
        if naive:
            print(f"| naive dense (cdist) | {fmt(naive, 'median_s', '.3f')} "
                  f"| {fmt(naive, 'peak_extra_mib', '.0f')} |")
    if kmeans:
        print("\nK-means centroids (seed 0): max/min pairwise distance, beside random unit vectors.\n")
        print("| C | D | build time (s) | max/min distance | min, max distance | random unit vectors max/min "
              "| deterministic |")
        print("|---|---|---|---|---|---|---|")
        for r in kmeans:
            print(f"| {r['C']} | {r['D']} | {r['build_s']:.2f} | {r['ratio']:.3f} "
                  f"| {r['min_d']:.3f}, {r['max_d']:.3f} "
                  f"| {r['random_ratio']:.3f} | {r['deterministic']} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            runs = [dict(v, key=list(map(str, k))) for k, v in results.items()]
            json.dump({"runs": runs, "kmeans": kmeans},
                      f, indent=1)


if __name__ == "__main__":
    main()
