#!/usr/bin/env python3
"""Time and peak extra memory of NormSoftmax: class-streamed vs dense (and PML), forward+backward.

Default size: B=1024 rows, D=512, C=100000 classes, fp32, 2 threads, labels uniform over the classes;
gradients w.r.t. the embeddings and the (C, D) class weights. Configurations:

* ``dense``: ``metricloss.NormSoftmaxLoss(D, C)`` with ``class_chunk=None``: the (B, C) cosine logits and
  ``F.cross_entropy``, the way one writes it by hand;
* ``chunked``: the same module with ``class_chunk=k`` (online logsumexp over class chunks, forward and
  backward; no (B, C) tensor) for each k in ``--chunks``;
* ``reference``: :func:`metricloss.reference.norm_softmax_loss` on the same weight (dense (B, C) cosine logits
  and an explicit logsumexp);
* ``pml``: pytorch-metric-learning's ``NormalizedSoftmaxLoss(C, D, temperature=0.05)`` (the same loss);
* ``matmul``: one bare (B, D)×(D, C) GEMM without grad, the floor of any exact method (forward+backward of
  an exact method needs about 3 of these dense, 4 streamed: the softmax needs the final logsumexp, so the
  streamed backward recomputes each chunk's logits).

Each configuration runs in its own subprocess (:mod:`benchmarks.harness`); times are the median (and the
minimum) of ``--repeats`` runs after ``--warmup`` runs, ratios use the medians. With ``--rounds N`` the grid
is measured N times, interleaved, and the median of the N medians is reported (the shared 2-core machine's
load comes in bursts). Peak extra memory is the peak
RSS above the RSS once the inputs and the module exist. It includes the (C, D) weight gradient
(C·D·4 bytes = 195 MiB at the default size), which every method must produce; the gradients are reset
to None before every step, as ``optimizer.zero_grad()`` does.

Usage:
    python benchmarks/norm_softmax.py                       # default grid, markdown table on stdout
    python benchmarks/norm_softmax.py --chunks 4096 --no-pml
    python benchmarks/norm_softmax.py --rounds 3              # on a noisy machine
    python benchmarks/norm_softmax.py --classes 20000 --json-out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure  # noqa: E402

CASE = "benchmarks.norm_softmax:case"
TEMPERATURE = 0.05


def case(method: str, b: int, d: int, c: int, chunk: int = 0):
    """Build inputs and a loss; return the timed step (one forward+backward)."""
    import torch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    emb0 = torch.randn(b, d, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    if method in ("dense", "chunked", "matmul", "reference"):
        import metricloss as ml

        module = ml.NormSoftmaxLoss(d, c, temperature=TEMPERATURE, class_chunk=chunk if method == "chunked" else None)
        weight = module.weight
        if method == "reference":
            from metricloss import reference

            def module(e, y):  # the same weight, through the dense reference formula
                return reference.norm_softmax_loss(e, y, weight, temperature=TEMPERATURE)
    elif method == "pml":
        from pytorch_metric_learning import losses

        module = losses.NormalizedSoftmaxLoss(c, d, temperature=TEMPERATURE)
        weight = module.W
    else:
        raise ValueError(method)

    if method == "matmul":
        def step():
            with torch.no_grad():
                emb0 @ weight.T
        return step

    def step():
        weight.grad = None
        emb = emb0.clone().requires_grad_()
        module(emb, labels).backward()

    return step


def combine(rounds: list) -> dict:
    """One configuration over several rounds: median of the medians, min of the mins, max of the peaks."""
    ok = [r for r in rounds if "median_s" in r]
    if not ok:
        return rounds[0]
    return {"median_s": statistics.median(r["median_s"] for r in ok), "min_s": min(r["min_s"] for r in ok),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in ok), "rounds": len(ok),
            "round_medians_s": [r["median_s"] for r in ok]}


def fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else r.get("error", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--no-pml", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the whole grid this many times, interleaved (a fresh subprocess per "
                         "configuration and round), so a burst of load on a shared machine hits every "
                         "configuration alike; reports the median over rounds of the per-round medians")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    size = {"b": args.batch, "d": args.dim, "c": args.classes}
    configs = [("matmul", 0), ("dense", 0)] + [("chunked", k) for k in args.chunks]
    if not args.no_pml:
        configs.append(("pml", 0))
    runs = {config: [] for config in configs}
    for _ in range(args.rounds):
        for method, chunk in configs:
            res = measure(CASE, dict(size, method=method, chunk=chunk),
                          warmup_params={"method": method, "b": 64, "d": 32, "c": 1000, "chunk": min(chunk, 256)},
                          repeats=args.repeats, warmup=args.warmup, mem_limit_gb=args.mem_limit_gb)
            runs[(method, chunk)].append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    results = {config: combine(rs) for config, rs in runs.items()}

    import torch

    dense = results[("dense", 0)]
    floor = results[("matmul", 0)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, 2 threads, "
          f"fp32, B={args.batch}, D={args.dim}, C={args.classes}, T={TEMPERATURE}, forward+backward, "
          f"{args.repeats} repeats × {args.rounds} round(s)\n")
    print("| method | class_chunk | time (s), median (min) | time / dense | peak extra (MiB) | memory / dense "
          "| time / one GEMM |")
    print("|---|---|---|---|---|---|---|")
    for (method, chunk), r in results.items():
        if method == "matmul":
            continue
        t_ratio = f"{r['median_s'] / dense['median_s']:.2f}" if "median_s" in r and "median_s" in dense else "–"
        m_ratio = (f"{r['peak_extra_mib'] / dense['peak_extra_mib']:.3f}"
                   if "peak_extra_mib" in r and "peak_extra_mib" in dense else "–")
        g_ratio = f"{r['median_s'] / floor['median_s']:.2f}" if "median_s" in r and "median_s" in floor else "–"
        name = {"dense": "metricloss dense", "chunked": "metricloss streamed", "pml": "PML"}[method]
        print(f"| {name} | {chunk or '–'} | {fmt(r, 'median_s', '.2f')} ({fmt(r, 'min_s', '.2f')}) | {t_ratio} | "
              f"{fmt(r, 'peak_extra_mib', '.0f')} | {m_ratio} | {g_ratio} |")
    print(f"| one GEMM (B×D)·(D×C), no grad | – | {fmt(floor, 'median_s', '.2f')} ({fmt(floor, 'min_s', '.2f')}) | | "
          f"{fmt(floor, 'peak_extra_mib', '.0f')} | | 1.00 |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([dict(v, method=k[0], class_chunk=k[1]) for k, v in results.items()], f, indent=1)


if __name__ == "__main__":
    main()
