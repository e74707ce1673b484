#!/usr/bin/env python3
"""WARP forward+backward vs ``F.cross_entropy`` on the same logits, and vs the paper's sequential loop.

Inputs: fp32 logits (B, C) ~ N(0, 1) and uniform integer labels ("random" regime: a fresh classifier),
or the same logits with +3 added to each row's positive ("ranked" regime: most negatives no longer
violate, so sampling needs more trials per row). 2 threads, CPU.

* ``warp``: ``metricloss.WARPLoss()`` (sampled, harmonic, max_trials=None = C − 1), forward+backward.
* ``warp_exact``: ``WARPLoss(mode="exact")``.
* ``cross_entropy``: ``F.cross_entropy(logits, labels)``, forward+backward.
* ``dense``: ``metricloss.reference.warp_loss`` (exact WARP from a (B, C, C) cube), small B only.
* ``loop``: ``metricloss.reference.warp_loss_loop`` (one example and one draw at a time), small B only.

Two ways to run it:

    pytest benchmarks/bench_warp.py --benchmark-only --benchmark-group-by=group
                                                          # pytest-benchmark timings (in-process,
                                                          # C <= 10000; --bench-memory adds memory)
    python benchmarks/bench_warp.py                       # markdown table: time and peak extra memory,
                                                          # one fresh subprocess per case (harness.py)

Wrap either in ``flock /tmp/metricloss-bench.lock ...`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `metricloss` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CASE = "benchmarks.bench_warp:case"
THREADS = 2
RANKED_BOOST = 3.0


def make_inputs(b: int, c: int, regime: str = "random", seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (b, c) and int64 labels (b,), see the module docstring for the regimes."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    if regime == "ranked":
        logits[torch.arange(b), labels] += RANKED_BOOST
    elif regime != "random":
        raise ValueError(f"unknown regime {regime!r}")
    return logits, labels


def build_loss(method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import metricloss as ml
    from metricloss import reference

    if method == "warp":
        return ml.WARPLoss(generator=torch.Generator().manual_seed(1))
    if method == "warp_exact":
        return ml.WARPLoss(mode="exact")
    if method == "cross_entropy":
        return F.cross_entropy
    if method == "dense":
        return reference.warp_loss
    if method == "loop":
        gen = torch.Generator().manual_seed(1)
        return lambda s, y: reference.warp_loss_loop(s, y, generator=gen)
    raise ValueError(f"unknown method {method!r}")


def case(method: str, b: int, c: int, regime: str = "random") -> Callable[[], None]:
    """Harness case: the step is one forward+backward on a leaf (its previous gradient dropped first)."""
    logits, labels = make_inputs(b, c, regime)
    logits.requires_grad_()
    fn = build_loss(method)

    def step() -> None:
        logits.grad = None
        fn(logits, labels).backward()

    return step


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark suite (the run_case fixture of benchmarks/conftest.py times case(**params))
# ----------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode does not need pytest
    pytest = None

if pytest is not None:

    def _group(b: int, c: int, regime: str = "random") -> str:
        logits = "random logits" if regime == "random" else f"ranked logits (positive +{RANKED_BOOST:g})"
        return f"warp B={b} C={c} {logits}"

    @pytest.mark.parametrize("method", ["warp", "warp_exact", "cross_entropy"])
    @pytest.mark.parametrize("c", [1000, 10000])
    def test_warp_vs_cross_entropy(run_case, c, method):
        run_case(CASE, {"method": method, "b": 4096, "c": c}, group=_group(4096, c), rounds=5)

    @pytest.mark.parametrize("method", ["warp", "cross_entropy"])
    def test_ranked_logits(run_case, method):
        params = {"method": method, "b": 4096, "c": 10000, "regime": "ranked"}
        run_case(CASE, params, group=_group(4096, 10000, "ranked"), rounds=5)

    @pytest.mark.parametrize("method", ["warp", "warp_exact", "dense", "loop"])
    def test_warp_vs_reference(run_case, method):
        """The dense (B, C, C) reference and the paper's sequential loop need a small batch."""
        run_case(CASE, {"method": method, "b": 64, "c": 1000}, group=_group(64, 1000), rounds=3)


# ----------------------------------------------------------------------------------------------------
# script: time and peak extra memory, one subprocess per case
# ----------------------------------------------------------------------------------------------------

def fmt(r: dict, key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else r.get("error", "?")


def main() -> None:
    from benchmarks.harness import measure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--loop-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch threads of each case (default {THREADS})")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    warm = {"method": "warp", "b": 64, "c": 100}
    grid = []
    for c in args.classes:
        for regime in ("random", "ranked"):
            grid += [("warp", args.batch, c, regime), ("cross_entropy", args.batch, c, regime)]
        grid.append(("warp_exact", args.batch, c, "random"))
    grid += [("loop", args.loop_batch, 1000, "random"), ("warp", args.loop_batch, 1000, "random")]
    results = {}
    for method, b, c, regime in grid:
        params = {"method": method, "b": b, "c": c, "regime": regime}
        warm_params = dict(warm, method=method) if method != "loop" else dict(warm, method=method, b=2)
        res = measure(CASE, params, warmup_params=warm_params, repeats=args.repeats, warmup=1,
                      threads=args.threads, mem_limit_gb=args.mem_limit_gb)
        results[(method, b, c, regime)] = res
        print(json.dumps(res), file=sys.stderr, flush=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"{args.threads} thread(s), fp32, forward+backward, median of {args.repeats} after 1 warm-up\n")
    print("| B | C | logits | WARP sampled (s) | cross-entropy (s) | WARP / CE time | WARP exact (s) "
          "| WARP peak extra (MiB) | CE peak extra (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.classes:
        for regime in ("random", "ranked"):
            w = results[("warp", args.batch, c, regime)]
            ce = results[("cross_entropy", args.batch, c, regime)]
            ex = results[("warp_exact", args.batch, c, "random")] if regime == "random" else {}
            ratio = f"{w['median_s'] / ce['median_s']:.2f}" if "median_s" in w and "median_s" in ce else "–"
            label = "N(0,1)" if regime == "random" else f"N(0,1), positive +{RANKED_BOOST:g}"
            exact = fmt(ex, "median_s", ".3f") if ex else "–"
            print(f"| {args.batch} | {c} | {label} | {fmt(w, 'median_s', '.3f')} | {fmt(ce, 'median_s', '.3f')} | "
                  f"{ratio} | {exact} | {fmt(w, 'peak_extra_mib', '.0f')} | {fmt(ce, 'peak_extra_mib', '.0f')} |")
    loop = results[("loop", args.loop_batch, 1000, "random")]
    vec = results[("warp", args.loop_batch, 1000, "random")]
    speed = f"{loop['median_s'] / vec['median_s']:.0f}×" if "median_s" in loop and "median_s" in vec else "–"
    print(f"\nB={args.loop_batch}, C=1000, N(0,1) logits: reference loop {fmt(loop, 'median_s', '.3f')} s, "
          f"vectorised WARP {fmt(vec, 'median_s', '.4f')} s ({speed} faster).")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([dict(v, method=k[0], B=k[1], C=k[2], regime=k[3]) for k, v in results.items()], f, indent=1)


if __name__ == "__main__":
    main()
