#!/usr/bin/env python3
"""Cross-batch memory at scale: one training step of metricloss vs pytorch-metric-learning (PML).

A step is ``loss = memory(embeddings, labels); loss.backward()`` on a batch of 256 × D=128 fp32 (64 classes
× 4, P×K) against a full memory of 65536 rows with ``--classes`` classes (default 1000, ~65 rows each),
2 threads:

* metricloss: ``CrossBatchMemory(TripletLoss(margin=0.2, mining=..., reduction="mean_nonzero"), 128, 65536)``;
* PML: ``CrossBatchMemory(TripletMarginLoss(margin=0.2), 128, memory_size=65536, miner=...)`` with
  ``BatchHardMiner()`` for batch-hard and no miner (all triplets) for batch-all: the same losses.

Each configuration runs in its own subprocess (:mod:`benchmarks.harness`): the memory is filled before
the measurement, so "peak extra" is the step's own peak RSS above the RSS after setup (the 32 MiB
memory bank itself is not counted). A configuration that needs more than ``--mem-limit-gb`` of address
space reports "out of memory" instead of swapping the machine.

Usage:
    python benchmarks/cross_batch_memory.py                    # markdown table on stdout
    python benchmarks/cross_batch_memory.py --repeats 5 --json-out xbm.json
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

CASE = "benchmarks.cross_batch_memory:case"
MARGIN = 0.2
MININGS = ("batch_hard", "batch_all")
METHODS = ("metricloss", "pml")


def build_memory(method: str, mining: str, dim: int, memory: int):
    """The cross-batch-memory module of one configuration (both: AvgNonZero over the triplets)."""
    if method == "metricloss":
        import metricloss as ml

        return ml.CrossBatchMemory(ml.TripletLoss(margin=MARGIN, mining=mining, reduction="mean_nonzero"), dim,
                                   memory)
    if method == "pml":
        from pytorch_metric_learning import losses, miners

        miner = miners.BatchHardMiner() if mining == "batch_hard" else None
        return losses.CrossBatchMemory(losses.TripletMarginLoss(margin=MARGIN), dim, memory_size=memory, miner=miner)
    raise ValueError(f"unknown method {method!r}")


def case(method: str, mining: str, batch: int = 256, dim: int = 128, memory: int = 65536, classes: int = 1000,
         k: int = 4, seed: int = 0):
    """Fill the memory (not measured); return one step: forward + backward of a fresh P×K batch."""
    import torch

    if classes < batch // k:
        raise ValueError(f"a P×K batch of {batch} with K={k} needs >= {batch // k} classes, got classes={classes}")
    g = torch.Generator().manual_seed(seed)
    module = build_memory(method, mining, dim, memory)
    fill_x = torch.randn(memory, dim, generator=g)
    fill_y = torch.randint(0, classes, (memory,), generator=g)
    for s in range(0, memory, batch):  # enqueue through the modules' own forward (no grad)
        with torch.no_grad():
            if method == "metricloss":
                module.enqueue(fill_x[s:s + batch], fill_y[s:s + batch])
            else:
                module.add_to_memory(fill_x[s:s + batch], fill_y[s:s + batch], len(fill_y[s:s + batch]))
    labels = torch.randperm(classes, generator=g)[:batch // k].repeat_interleave(k)
    x = torch.randn(batch, dim, generator=g).requires_grad_()

    def step():
        x.grad = None
        loss = module(x, labels)
        loss.backward()
        return loss

    return step


def run(args) -> list:
    rows = []
    for mining in MININGS:
        for method in METHODS:
            params = {"method": method, "mining": mining, "batch": args.batch, "dim": args.dim,
                      "memory": args.memory, "classes": args.classes}
            warm = dict(params, memory=2 * args.batch, classes=args.batch // 4)
            res = measure(CASE, params, warmup_params=warm, repeats=args.repeats, warmup=1,
                          mem_limit_gb=args.mem_limit_gb, timeout=args.timeout)
            rows.append(res)
            shown = res.get("error") or f"{res['median_s'] * 1e3:.0f} ms, {res['peak_extra_mib']:.0f} MiB"
            print(f"  {mining:>10s} {method:>10s}: {shown}", file=sys.stderr, flush=True)
    return rows


def table(rows: list, args) -> str:
    lines = [f"batch {args.batch}, D={args.dim}, memory {args.memory} ({args.classes} classes), fp32, 2 threads, "
             f"forward+backward per step, median of {args.repeats} ({platform.processor() or platform.machine()})",
             "", "| mining | library | time / step | peak extra memory |", "|---|---|---:|---:|"]
    for r in rows:
        p = r["params"]
        if "error" in r:
            lines.append(f"| {p['mining']} | {p['method']} | — | {r['error']} |")
        else:
            lines.append(f"| {p['mining']} | {p['method']} | {r['median_s'] * 1e3:.0f} ms "
                         f"(min {r['min_s'] * 1e3:.0f}) | {r['peak_extra_mib']:.0f} MiB |")
    return "\n".join(lines)


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--memory", type=int, default=65536)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-limit-gb", type=float, default=6.0, help="address-space limit of each case")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    rows = run(args)
    print(table(rows, args))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
