#!/usr/bin/env python3
"""Knowledge Evolution on the main job's retrieval task: a few generations, dense and slim mAP per generation.

The main job's network (``examples/compare_losses.py``) is split by KELS (:mod:`metricloss.evolution`,
split rate 0.5: the first half of every layer's kernels and input channels form the fit-hypothesis). Each
generation trains the whole network with the batch-hard triplet loss for ``--epochs`` epochs (a fresh
optimiser each generation, as the authors), then is evaluated on the unseen 40% of the font classes
(retrieval, cosine, leave-one-out) twice: the dense network, and the slim network cut out of it (the
fit-hypothesis alone, about a quarter of the weights). Then the reset-hypothesis is re-initialised and the
next generation starts. A control run trains the same network for the same total number of epochs
without re-initialisation (``--no-baseline`` skips it).

Usage:
    python examples/knowledge_evolution.py                       # 4 generations x 2 epochs, ~1.5 min on one core
    python examples/knowledge_evolution.py --generations 6 --epochs 3 --split-rate 0.5
    python examples/knowledge_evolution.py --dataset digits --generations 3 --epochs 2
Outputs: a markdown table on stdout and in ``<out>/knowledge_evolution.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_losses  # noqa: E402

from metricloss import evolution  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
                 rng: np.random.RandomState) -> float:
    """Batch-hard triplet training on P×K batches with a fresh Adam optimiser; returns the wall time."""
    # each call (generation) draws its own epochs: the sampler's seed comes from the caller's RandomState
    return compare_losses.train_batch_hard(model, x, y, epochs, batch, lr, int(rng.randint(2 ** 31 - 1)))


def evaluate(model: nn.Module, data: Dict) -> Dict[str, float]:
    out = retrieval_metrics(compare_losses.embed(model, data["x_test"]), data["y_test"], ks=(1,))
    return {"mAP": out["mAP"], "MAP@R": out["MAP@R"], "R@1": out["R@1"]}


def run(args) -> Dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = compare_losses.prepare_data(args)
    print(f"{args.dataset}: training on {data['num_classes']} classes ({len(data['y_train'])} images), "
          f"retrieval on {data['num_test_classes']} unseen classes ({len(data['y_test'])} images)", flush=True)
    torch.manual_seed(args.seed)
    init = compare_losses.SmallCNN(width=args.width).state_dict()
    model = compare_losses.SmallCNN(width=args.width)
    model.load_state_dict(init)
    masks = evolution.kels_masks(model, args.split_rate)
    fit, total = evolution.fit_hypothesis_size(model, masks)
    print(f"KELS split rate {args.split_rate}: fit-hypothesis {fit} of {total} parameters ({fit / total:.1%})",
          flush=True)
    rng = np.random.RandomState(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows: List[Dict] = []
    seconds = 0.0
    for g in range(args.generations):
        if g:
            evolution.reinitialize_reset_hypothesis(model, masks, generator=gen)
        seconds += train_epochs(model, data["x_train"], data["y_train"], args.epochs, args.batch, args.lr, rng)
        dense = evaluate(model, data)
        slim = evaluate(evolution.extract_slim(model, masks), data)
        rows.append({"generation": g, "epochs": (g + 1) * args.epochs, "seconds": seconds,
                     **{f"dense_{k}": v for k, v in dense.items()}, **{f"slim_{k}": v for k, v in slim.items()}})
        print(format_row(rows[-1]), flush=True)
    baseline = None
    if args.baseline:
        torch.manual_seed(args.seed)
        control = compare_losses.SmallCNN(width=args.width)
        control.load_state_dict(init)
        control_rng = np.random.RandomState(args.seed)
        control_seconds = 0.0
        for _ in range(args.generations):  # same epochs and optimiser restarts, no re-initialisation
            control_seconds += train_epochs(control, data["x_train"], data["y_train"], args.epochs, args.batch,
                                            args.lr, control_rng)
        baseline = {"epochs": args.generations * args.epochs, "seconds": control_seconds, **evaluate(control, data)}
        print(f"control (no re-initialisation, {baseline['epochs']} epochs): mAP {baseline['mAP']:.3f}, "
              f"MAP@R {baseline['MAP@R']:.3f}, R@1 {baseline['R@1']:.3f}", flush=True)
    table = HEADER + "\n" + "\n".join(format_row(r) for r in rows)
    if baseline is not None:
        table += (f"\n| control: no re-init | {baseline['epochs']} | {baseline['seconds']:.1f} | "
                  f"{baseline['mAP']:.3f} | {baseline['MAP@R']:.3f} | {baseline['R@1']:.3f} | – | – | – |")
    wall = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "knowledge_evolution.md"), "w") as f:
        f.write(table + "\n")
    result = {"args": vars(args), "fit_parameters": fit, "total_parameters": total, "rows": rows,
              "baseline": baseline, "wall_seconds": wall}
    with open(os.path.join(args.out, "knowledge_evolution.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n" + table + f"\n\ntotal wall time {wall:.0f} s; outputs in {args.out}/")
    return result


HEADER = ("| generation | epochs (total) | training time (s) | dense mAP | dense MAP@R | dense R@1 | slim mAP | "
          "slim MAP@R | slim R@1 |\n|---|---|---|---|---|---|---|---|---|")


def format_row(r: Dict) -> str:
    return (f"| {r['generation']} | {r['epochs']} | {r['seconds']:.1f} | {r['dense_mAP']:.3f} | "
            f"{r['dense_MAP@R']:.3f} | {r['dense_R@1']:.3f} | {r['slim_mAP']:.3f} | {r['slim_MAP@R']:.3f} | "
            f"{r['slim_R@1']:.3f} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fonts", "digits"), default="fonts")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per generation")
    ap.add_argument("--split-rate", type=float, default=0.5, help="KELS split rate s in (0, 1]")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    ap.add_argument("--renders", type=int, default=3, help="jittered renders per glyph (fonts)")
    ap.add_argument("--size", type=int, default=32, help="glyph image side in pixels (fonts; 32)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the glyph jitter and the class split")
    ap.add_argument("--max-fonts", type=int, default=None)
    ap.add_argument("--font-dir", action="append", default=[], help="extra font directory (repeatable)")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the control run without re-initialisation")
    ap.add_argument("--seed", type=int, default=0)
    # one thread: the network's many small ops run ~4x faster than with two on a loaded 2-core machine
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="examples/out")
    args = ap.parse_args(argv)
    if args.generations < 1 or args.epochs < 1:
        ap.error("--generations and --epochs must be >= 1")
    if not 0.0 < args.split_rate <= 1.0:
        ap.error("--split-rate must lie in (0, 1]")
    return args


def main(argv=None) -> Dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
