#!/usr/bin/env python3
"""L2-CAF attention maps of a retrieval network on images of classes it never saw.

Trains the main job's network (``examples/compare_losses.py``: 3 conv blocks → global pooling → 64-d
embedding) briefly with the batch-hard triplet loss on 60% of the font classes, then computes a
class-oblivious L2-CAF map (:func:`metricloss.explain.l2_caf`) for images of the other 40%: the filter
keeps the embedding unchanged while spending a unit L2 budget over the spatial grid, so it shows where
the embedding reads the image. Nothing is downloaded (the fonts come from the machine, see
``examples/datasets.py``).

The map is taken on the output of conv block ``--split`` (default 2: an 8×8 grid for 32×32 glyphs; 3 is
the last conv block, a 4×4 grid), with the head = the remaining blocks → pooling → embedding. The script
prints how much of the map's positive energy falls on glyph pixels against the glyph's share of the
image area, and the same for the border cells of the grid (a uniform map scores the area shares).

Usage:
    python examples/attention_maps.py                          # ~1-2 min on one core
    python examples/attention_maps.py --epochs 2 --num-images 4 --out /tmp/maps
    python examples/attention_maps.py --split 3 --optimizer sgd --lr 0.5 --steps 500
Outputs: ``<out>/attention_maps.png`` (images, maps, overlays) and ``<out>/attention_maps.json``.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_losses  # noqa: E402

from metricloss.explain import l2_caf  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402

GLYPH_THRESHOLD = 0.25  # a pixel brighter than 25% of white belongs to the glyph


def train_triplet(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
                  seed: int) -> float:
    """Batch-hard triplet training on P×K batches (as the main job's row); returns the wall time."""
    return compare_losses.train_batch_hard(model, x, y, epochs, batch, lr, seed)


def split_network(model: compare_losses.SmallCNN, split: int):
    """(features: image → output of conv block ``split``, head: that output → embedding)."""
    blocks = model.features
    features = blocks[:split]
    rest = blocks[split:]

    def head(f: torch.Tensor) -> torch.Tensor:
        # the L2-normalised embedding: what retrieval compares (the triplet loss normalises too)
        return F.normalize(model.embed(rest(f).mean((2, 3))), dim=1)

    return features, head


def glyph_energy(amap: torch.Tensor, image: torch.Tensor) -> Dict[str, float]:
    """Shares of the map's positive energy on glyph pixels and on the grid's border cells, with the area
    shares of both (a uniform map scores its area shares)."""
    up = F.interpolate(amap[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    energy = up.clamp_min(0).pow(2)
    glyph = (image[0] * 0.5 + 0.5) > GLYPH_THRESHOLD  # back from the [-1, 1] normalisation of to_tensor
    cells = amap.clamp_min(0).pow(2)
    border = torch.ones_like(amap, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return {"on_glyph": float(energy[glyph].sum() / energy.sum().clamp_min(1e-30)),
            "glyph_area": float(glyph.float().mean()),
            "on_border": float(cells[border].sum() / cells.sum().clamp_min(1e-30)),
            "border_area": float(border.float().mean())}


def pick_images(labels: torch.Tensor, count: int, seed: int) -> List[int]:
    """``count`` test images from different classes when possible (seeded)."""
    rng = np.random.RandomState(seed)
    by_class: Dict[int, List[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    classes = rng.permutation(sorted(by_class))
    picks = [int(rng.choice(by_class[c])) for c in classes[:count]]
    while len(picks) < count:
        picks.append(int(rng.randint(len(labels))))
    return picks


def plot(images: torch.Tensor, maps: torch.Tensor, titles: List[str], path: str, suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n + 0.4, 5.2), squeeze=False)
    for k in range(n):
        img = images[k, 0].numpy() * 0.5 + 0.5
        m = maps[k]
        up = F.interpolate(m[None, None], size=img.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        axes[0, k].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(titles[k], fontsize=7)
        axes[1, k].imshow(m.numpy(), cmap="magma")
        axes[2, k].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[2, k].imshow(up, cmap="jet", alpha=0.5)
        for r in range(3):
            axes[r, k].set_xticks([])
            axes[r, k].set_yticks([])
    axes[0, 0].set_ylabel("unseen image", fontsize=8)
    axes[1, 0].set_ylabel("L2-CAF map", fontsize=8)
    axes[2, 0].set_ylabel("overlay", fontsize=8)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> Dict:
    torch.set_num_threads(args.threads)
    data = compare_losses.prepare_data(args)
    torch.manual_seed(args.seed)
    model = compare_losses.SmallCNN(width=args.width)
    seconds = train_triplet(model, data["x_train"], data["y_train"], args.epochs, args.batch, args.lr, args.seed)
    model.eval()
    retrieval = retrieval_metrics(compare_losses.embed(model, data["x_test"]), data["y_test"], ks=(1,))
    print(f"trained {args.epochs} epochs in {seconds:.1f} s; unseen-class retrieval mAP {retrieval['mAP']:.3f}, "
          f"R@1 {retrieval['R@1']:.3f}", flush=True)
    picks = pick_images(data["y_test"], args.num_images, args.seed)
    images = data["x_test"][picks]
    features, head = split_network(model, args.split)
    with torch.no_grad():
        feats = features(images)
    start = time.perf_counter()
    maps, steps = l2_caf(feats, head, steps=args.steps, lr=args.lr_caf, optimizer=args.optimizer, return_steps=True)
    caf_seconds = time.perf_counter() - start
    stats = [glyph_energy(maps[k], images[k]) for k in range(len(picks))]
    on_glyph, area, on_border, border_area = (float(np.mean([s[k] for s in stats]))
                                              for k in ("on_glyph", "glyph_area", "on_border", "border_area"))
    print(f"L2-CAF on a {tuple(feats.shape[1:])} map per image: {steps} steps, {caf_seconds:.2f} s for "
          f"{len(picks)} images; map energy on glyph pixels {on_glyph:.1%} (glyph area {area:.1%}), on the "
          f"grid's border cells {on_border:.1%} (their area {border_area:.1%})", flush=True)
    names = data["names"]
    titles = [names[int(data["y_test"][i])][:18] for i in picks]
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "attention_maps.png")
    plot(images, maps, titles, png, f"L2-CAF (class-oblivious) on unseen fonts, block {args.split} "
         f"({feats.shape[-2]}×{feats.shape[-1]}); energy on glyph {on_glyph:.0%} vs area {area:.0%}")
    result = {"args": vars(args), "train_seconds": seconds, "mAP": retrieval["mAP"], "R@1": retrieval["R@1"],
              "caf_steps": steps, "caf_seconds": caf_seconds, "grid": list(feats.shape[-2:]),
              "energy_on_glyph": on_glyph, "glyph_area": area, "energy_on_border": on_border,
              "border_area": border_area, "per_image": stats, "png": png}
    with open(os.path.join(args.out, "attention_maps.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {png}")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fonts", "digits"), default="fonts")
    ap.add_argument("--epochs", type=int, default=6, help="triplet training epochs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the network's training")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    ap.add_argument("--split", type=int, choices=(1, 2, 3), default=2,
                    help="conv block whose output L2-CAF filters (3 = the last)")
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300, help="L2-CAF steps at most")
    ap.add_argument("--lr-caf", type=float, default=0.05, help="L2-CAF learning rate")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="L2-CAF optimiser")
    ap.add_argument("--renders", type=int, default=3, help="jittered renders per glyph (fonts)")
    ap.add_argument("--size", type=int, default=32, help="glyph image side in pixels (fonts; 32)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the glyph jitter and the class split")
    ap.add_argument("--max-fonts", type=int, default=None)
    ap.add_argument("--font-dir", action="append", default=[], help="extra font directory (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    # one thread: the network's many small ops run ~4x faster than with two on a loaded 2-core machine
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="examples/out")
    args = ap.parse_args(argv)
    if args.epochs < 0 or args.num_images < 1 or args.steps < 1:
        ap.error("--epochs must be >= 0, --num-images and --steps >= 1")
    return args


def main(argv=None) -> Dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
