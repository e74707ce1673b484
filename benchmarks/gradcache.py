#!/usr/bin/env python3
"""What gradient caching buys: a batch-all triplet step of a CNN over a batch of 1k to 64k images, on CPU,
with :class:`metricloss.GradCache` and without it (one forward with a graph).

    flock /tmp/metricloss-bench.lock python benchmarks/gradcache.py

The network is the main job's small CNN (``examples/compare_losses.py``'s ``SmallCNN``: 3 conv blocks, global
average pooling, a 64-d embedding) at width 16 on 24×24 one-channel images; the loss is batch-all (margin 0.2,
mean over the non-zero terms, the chunked engine: O(chunk·N) memory), P×K labels with K = 4. A step is
forward, loss and backward (no optimiser). Each configuration runs in its own subprocess
(``benchmarks/harness.py``: 2 threads, an address-space limit of ``--mem-limit-gb``; over it the step "runs
out of memory"); time is the median of ``--repeats`` steps after one warm-up, peak memory the process's peak
resident memory above what it held before the step.
The CNN has BatchNorm, so the cached step normalises each sub-batch by its own statistics where the plain
step uses the whole batch's: the two steps cost what they cost, their gradients are not the same function
(the exactness of the cached step against the same sub-batched forward is ``tests/test_gradcache.py``'s;
``--equality`` prints its errors per loss, network and dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


def _setup(n: int, width: int, seed: int = 0):
    from compare_losses import SmallCNN

    import metricloss as ml

    torch.manual_seed(seed)
    model = SmallCNN(width=width)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 24, 24, generator=g)
    y = (torch.arange(n) // 4)[torch.randperm(n, generator=g)]
    loss = ml.TripletLoss(margin=0.2, mining="batch_all", reduction="mean_nonzero", monitor=False)
    return model, x, y, loss


def case(method: str, n: int, width: int = 16, sub: int = 512):
    """One training step (forward, loss, backward) of ``n`` images, ``"cached"`` or ``"plain"``."""
    import metricloss as ml

    model, x, y, loss = _setup(n, width)
    cache = ml.GradCache(model, loss, sub)

    def step():
        model.zero_grad(set_to_none=True)
        if method == "cached":
            cache.step(x, y)
        else:
            loss(model(x), y).backward()
    return step


def equality_table() -> None:
    """Max abs and relative error of GradCache's parameter gradients against the plain step, per loss, network
    kind and dtype (the plain step of ``tests/test_gradcache.py``: the same sub-batches forwarded with a graph
    and one loss; for the network without dropout or BatchNorm, one forward of the whole batch)."""
    from tests.test_gradcache import LOSSES, _compare

    print("| loss | network | dtype | reference | max abs error | max relative error |\n|---|---|---|---|---|---|")
    for name in ("batch_hard", "batch_all", "semi_hard", "norm_softmax", "centroid"):
        for kind in ("plain", "dropout", "batchnorm"):
            for dtype in (torch.float64, torch.float32):
                full = kind == "plain"
                _, _, ga, gb, *_ = _compare(kind, name, dtype, full_batch=full)
                abs_err = max(float((b - a).abs().max()) for a, b in zip(ga, gb))
                rel_err = max(float((b - a).norm() / a.norm().clamp_min(1e-300)) for a, b in zip(ga, gb))
                print(f"| {name} | {kind} | {str(dtype)[6:]} | {'whole batch' if full else 'sub-batched'} | "
                      f"{abs_err:.1e} | {rel_err:.1e} |", flush=True)


def main() -> None:
    from benchmarks.harness import measure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--sub-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gb", type=float, default=16.0)
    ap.add_argument("--equality", action="store_true", help="print the gradient-equality table instead")
    args = ap.parse_args()
    if args.equality:
        equality_table()
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"SmallCNN width {args.width}, 24x24 images, batch-all, sub-batch {args.sub_batch}, "
          f"limit {args.mem_limit_gb:g} GB, median of {args.repeats} after 1 warm-up")
    print("| images per step | plain: s / step | plain: peak MiB | GradCache: s / step | GradCache: peak MiB | "
          "time ratio |\n|---|---|---|---|---|---|")
    for n in args.sizes:
        res = {}
        for method in ("plain", "cached"):
            res[method] = measure("benchmarks.gradcache:case", {"method": method, "n": n, "width": args.width,
                                                                "sub": args.sub_batch},
                                  repeats=args.repeats, warmup=1, threads=args.threads,
                                  mem_limit_gb=args.mem_limit_gb, timeout=3600)
            print(json.dumps(res[method]), file=sys.stderr, flush=True)

        def cell(r, key, spec):
            return r["error"] if "error" in r else format(r[key], spec)

        ratio = (f"{res['cached']['median_s'] / res['plain']['median_s']:.2f}×"
                 if "median_s" in res["cached"] and "median_s" in res["plain"] else "–")
        print(f"| {n} | {cell(res['plain'], 'median_s', '.2f')} | {cell(res['plain'], 'peak_extra_mib', '.0f')} | "
              f"{cell(res['cached'], 'median_s', '.2f')} | {cell(res['cached'], 'peak_extra_mib', '.0f')} | "
              f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
