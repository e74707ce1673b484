#!/usr/bin/env python3
"""Timings of the retrieval toolbox: SVMax routes, L2-CAF, and the two-head loss's training-time overhead.

1. **SVMax**: ``mean_singular_value`` forward and forward+backward, ``method="gram"`` (fp64 eigenvalues of
   the smaller Gram matrix) vs ``method="svd"`` (``torch.linalg.svdvals``), fp32, at b × d in
   {4096 × 512, 512 × 4096, 256 × 128} (the issue's size first).
2. **L2-CAF**: :func:`metricloss.explain.l2_caf` on one (1024, 7, 7) feature map with a GoogLeNet-like head
   (global average pool → Linear(1024, 1000)): the defaults (SGD, ≤ 500 steps, early stop) and a fixed
   300 Adam steps (``tol=0``).
3. **Two-head overhead**: training steps of a small CNN (the main job's 3 conv blocks, 32×32 inputs,
   batch 32 = 8 classes × 4, as the authors) with cross-entropy alone (linear classifier on the pooled
   features) vs :class:`~metricloss.TwoHeadLoss` (the same classifier + an :class:`~metricloss.EmbeddingHead`
   and the semi-hard triplet term). The two are timed in alternating blocks so drift hits both alike; the
   overhead is the median of the per-block ratios, with their min–max, in wall-clock and in process CPU
   time (with one thread, CPU time is the least disturbed by other processes on a shared machine).

Every time is the median of ``--repeats`` runs after a warm-up, on ``--threads`` threads. Run it under
``flock /tmp/metricloss-bench.lock`` on a shared machine and compare only figures from one run.

Usage:
    python benchmarks/toolbox.py                 # ~1-2 min
    python benchmarks/toolbox.py --quick         # tiny sizes (the smoke test)
    python benchmarks/toolbox.py --json-out toolbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `metricloss` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metricloss as ml  # noqa: E402
import metricloss.functional as MF  # noqa: E402
from metricloss.explain import l2_caf  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int) -> Dict[str, float]:
    """Wall-clock median/min/max and the median process CPU time (less sensitive to other processes)."""
    fn()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu)}


def bench_svmax(shapes, repeats: int) -> List[Dict]:
    rows = []
    for b, d in shapes:
        x = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
        for method in ("gram", "svd"):
            def forward():
                return MF.mean_singular_value(x, method=method)

            def forward_backward():
                xg = x.detach().requires_grad_()
                MF.mean_singular_value(xg, method=method).backward()

            rows.append({"b": b, "d": d, "method": method, "forward": median_time(forward, repeats),
                         "forward_backward": median_time(forward_backward, repeats)})
    return rows


class _PoolHead(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def bench_l2_caf(channels: int, grid: int, classes: int, repeats: int) -> List[Dict]:
    torch.manual_seed(0)
    feats = torch.randn(channels, grid, grid).relu()
    head = _PoolHead(channels, classes).eval()
    rows = []
    for label, kwargs in (("defaults (SGD, <= 500 steps, early stop)", {}),
                          ("Adam lr 0.05, 300 steps, tol=0", {"optimizer": "adam", "lr": 0.05, "steps": 300,
                                                               "tol": 0.0})):
        steps = l2_caf(feats, head, return_steps=True, **kwargs)[1]
        timing = median_time(lambda: l2_caf(feats, head, **kwargs), repeats)
        rows.append({"setting": label, "features": [channels, grid, grid], "steps": steps, **timing,
                     "per_step_ms": 1e3 * timing["median_s"] / steps})
    return rows


class _Backbone(nn.Module):
    """The main job's network body (``examples/compare_losses.py`` ``SmallCNN.features``: 3 conv blocks,
    conv-BN-ReLU ×2 and max-pool each), then global average pooling."""

    def __init__(self, width: int):
        super().__init__()
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
        import compare_losses

        self.body = compare_losses.SmallCNN(width=width).features
        self.out_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def bench_two_head(width: int, classes: int, batch: int, steps: int, blocks: int) -> Dict:
    torch.manual_seed(0)
    backbone = _Backbone(width)
    classifier = nn.Linear(backbone.out_features, classes)
    head = ml.EmbeddingHead(backbone.out_features, 128)
    two_head = ml.TwoHeadLoss()
    k = 4
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        chosen = torch.randperm(classes, generator=g)[: batch // k]
        batches.append((torch.randn(batch, 1, 32, 32, generator=g), chosen.repeat_interleave(k)))
    ce_params = list(backbone.parameters()) + list(classifier.parameters())
    ce_opt = torch.optim.SGD(ce_params, lr=0.01, momentum=0.9)
    th_opt = torch.optim.SGD(ce_params + list(head.parameters()), lr=0.01, momentum=0.9)

    def run_ce():
        for x, y in batches:
            loss = F.cross_entropy(classifier(backbone(x)), y)
            ce_opt.zero_grad(set_to_none=True)
            loss.backward()
            ce_opt.step()

    def run_two_head():
        for x, y in batches:
            feats = backbone(x)
            loss = two_head(classifier(feats), head(feats), y)
            th_opt.zero_grad(set_to_none=True)
            loss.backward()
            th_opt.step()

    run_ce()
    run_two_head()
    ce_times, th_times, ce_cpu, th_cpu = [], [], [], []
    for _ in range(blocks):  # alternate, so drift of the shared machine hits both
        for fn, wall, cpu in ((run_ce, ce_times, ce_cpu), (run_two_head, th_times, th_cpu)):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    ratios = [b / a for a, b in zip(ce_times, th_times)]
    cpu_ratios = [b / a for a, b in zip(ce_cpu, th_cpu)]
    return {"width": width, "batch": batch, "classes": classes, "steps_per_block": steps, "blocks": blocks,
            "ce_median_s": statistics.median(ce_times), "two_head_median_s": statistics.median(th_times),
            "overhead_median": statistics.median(ratios) - 1.0, "overhead_min": min(ratios) - 1.0,
            "overhead_max": max(ratios) - 1.0, "cpu_overhead_median": statistics.median(cpu_ratios) - 1.0,
            "cpu_overhead_min": min(cpu_ratios) - 1.0, "cpu_overhead_max": max(cpu_ratios) - 1.0}


def report(res: Dict) -> str:
    lines = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{res['threads']} thread(s); median of {res['repeats']} runs", "",
             "### SVMax: mean_singular_value, fp32", "",
             "| b × d | method | forward (ms) | forward + backward (ms) | CPU time fwd / fwd+bwd (ms) |",
             "|---|---|---|---|---|"]
    for r in res["svmax"]:
        lines.append(f"| {r['b']} × {r['d']} | {r['method']} | {1e3 * r['forward']['median_s']:.1f} | "
                     f"{1e3 * r['forward_backward']['median_s']:.1f} | {1e3 * r['forward']['cpu_median_s']:.1f} / "
                     f"{1e3 * r['forward_backward']['cpu_median_s']:.1f} |")
    lines += ["", "### L2-CAF: one feature map, pool → linear head", "",
              "| features | setting | steps | time (s) | per step (ms) |", "|---|---|---|---|---|"]
    for r in res["l2_caf"]:
        lines.append(f"| {tuple(r['features'])} | {r['setting']} | {r['steps']} | {r['median_s']:.2f} | "
                     f"{r['per_step_ms']:.2f} |")
    lines += ["", "### Two-head loss: training-time overhead over cross-entropy alone", "",
              "| network width | batch | CE block (s) | two-head block (s) | wall-clock overhead (median, min–max) | "
              "CPU-time overhead (median, min–max) |", "|---|---|---|---|---|---|"]
    for r in res["two_head"]:
        lines.append(f"| {r['width']} | {r['batch']} | {r['ce_median_s']:.3f} | {r['two_head_median_s']:.3f} | "
                     f"{100 * r['overhead_median']:+.1f}% ({100 * r['overhead_min']:+.1f}% … "
                     f"{100 * r['overhead_max']:+.1f}%) | {100 * r['cpu_overhead_median']:+.1f}% "
                     f"({100 * r['cpu_overhead_min']:+.1f}% … {100 * r['cpu_overhead_max']:+.1f}%) |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes, caf, widths, repeats, steps, blocks = [(64, 16), (16, 64)], (32, 4, 10), (4,), 1, 2, 2
    else:
        shapes, caf, widths, repeats, steps, blocks = [(4096, 512), (512, 4096), (256, 128)], (1024, 7, 1000), \
            (16, 64), args.repeats, 20, 7
    res = {"threads": args.threads, "repeats": repeats, "torch": torch.__version__,
           "svmax": bench_svmax(shapes, repeats), "l2_caf": bench_l2_caf(*caf, repeats=repeats),
           "two_head": [bench_two_head(w, classes=64, batch=32, steps=steps, blocks=blocks) for w in widths]}
    print(report(res))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
