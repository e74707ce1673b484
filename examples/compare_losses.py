#!/usr/bin/env python3
"""The main job: train the same small CNN with each loss and compare them the way the research does.

For every loss the same network (3 conv blocks → global pooling → 64-d embedding) is trained from the same
initialisation on 60% of the classes, then evaluated:

* **retrieval on the unseen 40% of classes** (class-disjoint, leave-one-out within the test set, cosine
  on L2-normalised embeddings): mAP, MAP@R, R@1 (:func:`metricloss.metrics.retrieval_metrics`);
* **classification accuracy** on held-out images of the seen classes, for the losses that have a
  classifier (cross-entropy, cosine cross-entropy, NormSoftmax, WARP);
* **training time** and epochs (wall clock of the training loop, 2 threads).

Losses: batch-hard triplet, batch-all triplet (P×K batches), cross-entropy with a linear head,
cross-entropy with a :class:`~metricloss.CosineClassifier`, :class:`~metricloss.NormSoftmaxLoss`,
:class:`~metricloss.WARPLoss` fine-tuning the cross-entropy model (its time is the fine-tuning's; the
cross-entropy run it starts from is its own row), and :class:`~metricloss.CentroidTripletLoss`.

Data (offline, see ``examples/datasets.py``): font identification on glyphs rendered from the fonts found
on the machine (matplotlib's, system fonts, Debian's fonts-aenigma if installed), or ``--dataset digits``.

Usage:
    python examples/compare_losses.py                      # default run (147 s on 2 CPU cores, torch 2.13.0+cpu)
    python examples/compare_losses.py --dataset digits --epochs 5
    python examples/compare_losses.py --font-dir /usr/share/fonts/truetype/aenigma --epochs 8
Outputs: a markdown table on stdout and in ``<out>/results.md``, ``<out>/results.json``, ``<out>/results.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402

import metricloss as ml  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402

EMBED_DIM = 64


class SmallCNN(nn.Module):
    """3 conv blocks (conv-BN-ReLU ×2, max-pool) → global average pool → linear embedding."""

    def __init__(self, embed_dim: int = EMBED_DIM, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True))

        self.features = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.embed = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x).mean((2, 3)))


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------

def random_batches(n: int, batch: int, rng: np.random.RandomState) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for s in range(0, n - batch + 1, batch):
        yield order[s:s + batch]


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.RandomState) -> Iterator[np.ndarray]:
    """P classes × K samples per batch (with replacement inside small classes), about one epoch's worth."""
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    p = min(p, len(classes))
    for _ in range(max(1, len(labels) // (p * k))):
        chosen = rng.choice(classes, size=p, replace=False)
        yield np.concatenate([rng.choice(members[c], size=k, replace=len(members[c]) < k) for c in chosen])


# ----------------------------------------------------------------------------------------------------
# the losses under comparison
# ----------------------------------------------------------------------------------------------------

@dataclass
class Method:
    """A loss as the comparison trains it.

    ``build(num_classes)`` returns (trainable head or None, loss(embeddings, labels, head), logits(embeddings,
    head) or None for losses without a classifier). ``batches`` is "pk" (metric losses) or "random".
    """

    name: str
    batches: str
    build: Callable[[int], Tuple[Optional[nn.Module], Callable, Optional[Callable]]]
    finetunes: Optional[str] = None


def _triplet(mining: str) -> Callable:
    def build(num_classes: int):
        loss = ml.TripletLoss(margin=0.2, mining=mining, reduction="mean_nonzero")
        return None, lambda emb, y, head: loss(emb, y), None
    return build


def _cross_entropy(num_classes: int):
    head = nn.Linear(EMBED_DIM, num_classes)
    return head, lambda emb, y, h: F.cross_entropy(h(emb), y), lambda emb, h: h(emb)


def _cosine_cross_entropy(num_classes: int):
    head = ml.CosineClassifier(EMBED_DIM, num_classes, scale=16.0)
    return head, lambda emb, y, h: F.cross_entropy(h(emb), y), lambda emb, h: h(emb)


def _norm_softmax(num_classes: int):
    head = ml.NormSoftmaxLoss(EMBED_DIM, num_classes, temperature=0.05)
    return head, lambda emb, y, h: h(emb, y), lambda emb, h: h.get_logits(emb)


def _warp(num_classes: int):
    warp = ml.WARPLoss(margin=1.0)
    head = nn.Linear(EMBED_DIM, num_classes)  # replaced by the cross-entropy model's head before training
    return head, lambda emb, y, h: warp(h(emb), y), lambda emb, h: h(emb)


def _centroid(num_classes: int):
    scheme = "onehot" if EMBED_DIM >= num_classes else "kmeans"
    loss = ml.CentroidTripletLoss(num_classes, EMBED_DIM, centroids=scheme)
    return loss, lambda emb, y, h: h(emb, y), None


METHODS = [
    Method("batch-hard triplet", "pk", _triplet("batch_hard")),
    Method("batch-all triplet", "pk", _triplet("batch_all")),
    Method("cross-entropy", "random", _cross_entropy),
    Method("cross-entropy + cosine", "random", _cosine_cross_entropy),
    Method("NormSoftmax", "random", _norm_softmax),
    Method("WARP (fine-tunes cross-entropy)", "random", _warp, finetunes="cross-entropy"),
    Method("centroid triplet bound", "random", _centroid),
]


# ----------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------

def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div_(255.0).sub_(0.5).div_(0.5).unsqueeze(1)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])


def train(method: Method, model: nn.Module, head: Optional[nn.Module], loss_fn: Callable, x: torch.Tensor,
          y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int, progress: bool) -> float:
    """Train in place; returns the wall time of the training loop in seconds."""
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.RandomState(seed)
    labels = y.numpy()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=f"{method.name:>32s}", unit="epoch", leave=False)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        it = pk_batches(labels, batch // 8, 8, rng) if method.batches == "pk" else random_batches(len(y), batch, rng)
        for idx in it:
            idx = torch.from_numpy(idx)
            loss = loss_fn(model(x[idx]), y[idx], head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if bar is not None:
        bar.close()
    return time.perf_counter() - start


def evaluate(model: nn.Module, head: Optional[nn.Module], logits_fn: Optional[Callable], data: Dict) -> Dict:
    out = retrieval_metrics(embed(model, data["x_test"]), data["y_test"], ks=(1,))
    res = {"mAP": out["mAP"], "MAP@R": out["MAP@R"], "R@1": out["R@1"], "accuracy": None}
    if logits_fn is not None and head is not None and len(data["y_val"]):
        with torch.no_grad():
            head.eval()
            pred = logits_fn(embed(model, data["x_val"]), head).argmax(1)
        res["accuracy"] = float((pred == data["y_val"]).float().mean())
    return res


def prepare_data(args) -> Dict:
    if args.dataset == "digits":
        images, labels, names = datasets.load_digits()
    else:
        images, labels, names = datasets.load_fonts(size=32, renders=args.renders, seed=args.seed,
                                                    max_fonts=args.max_fonts, font_dirs=args.font_dir)
    train_mask, test_mask = datasets.class_split(labels, 0.6, args.seed)
    # held-out images of the seen classes (20%) for classification accuracy
    rng = np.random.RandomState(args.seed)
    train_idx = np.flatnonzero(train_mask)
    val = np.zeros(len(labels), dtype=bool)
    val[rng.choice(train_idx, size=int(0.2 * len(train_idx)), replace=False)] = True
    fit = train_mask & ~val
    seen = np.unique(labels[train_mask])
    remap = {c: i for i, c in enumerate(seen)}  # seen classes -> 0..C-1 for the classifier heads
    return {
        "x_train": to_tensor(images[fit]), "y_train": torch.tensor([remap[c] for c in labels[fit]]),
        "x_val": to_tensor(images[val]), "y_val": torch.tensor([remap[c] for c in labels[val]]),
        "x_test": to_tensor(images[test_mask]), "y_test": torch.from_numpy(labels[test_mask]),
        "num_classes": len(seen), "num_test_classes": len(np.unique(labels[test_mask])),
        "names": names, "num_images": len(labels),
    }


def run(args) -> List[Dict]:
    torch.set_num_threads(args.threads)
    data = prepare_data(args)
    print(f"{args.dataset}: {data['num_images']} images, {len(data['names'])} classes; "
          f"training on {data['num_classes']} classes ({len(data['y_train'])} images), "
          f"retrieval on {data['num_test_classes']} unseen classes ({len(data['y_test'])} images)", flush=True)
    torch.manual_seed(args.seed)
    init = SmallCNN(width=args.width).state_dict()
    rows, trained = [], {}
    untrained = SmallCNN(width=args.width)
    untrained.load_state_dict(init)
    rows.append(dict(loss="(untrained network)", epochs=0, seconds=0.0, **evaluate(untrained, None, None, data)))
    selected = [m for m in METHODS if args.losses is None or m.name in args.losses]
    for method in selected:
        torch.manual_seed(args.seed)
        model = SmallCNN(width=args.width)
        model.load_state_dict(init)
        head, loss_fn, logits_fn = method.build(data["num_classes"])
        epochs = args.epochs
        if method.finetunes is not None:
            if method.finetunes not in trained:
                print(f"skipping {method.name}: needs {method.finetunes} in --losses", flush=True)
                continue
            base_model, base_head = trained[method.finetunes]
            model.load_state_dict(base_model.state_dict())
            head.load_state_dict(base_head.state_dict())
            epochs = args.finetune_epochs
        seconds = train(method, model, head, loss_fn, data["x_train"], data["y_train"], epochs, args.lr, args.batch,
                        args.seed, args.progress)
        trained[method.name] = (model, head)
        row = dict(loss=method.name, epochs=epochs, seconds=seconds, **evaluate(model, head, logits_fn, data))
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: Dict) -> str:
    acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    per_epoch = f"{r['seconds'] / r['epochs']:.1f}" if r["epochs"] else "–"
    return (f"| {r['loss']} | {r['epochs']} | {r['seconds']:.1f} | {per_epoch} | {acc} | {r['mAP']:.3f} | "
            f"{r['MAP@R']:.3f} | {r['R@1']:.3f} |")


HEADER = ("| loss | epochs | training time (s) | s / epoch | accuracy (seen classes) | mAP (unseen) | "
          "MAP@R (unseen) | R@1 (unseen) |\n|---|---|---|---|---|---|---|---|")


def write_outputs(rows: List[Dict], args) -> str:
    os.makedirs(args.out, exist_ok=True)
    table = HEADER + "\n" + "\n".join(format_row(r) for r in rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install '.[examples]')")
        return table
    trained = [r for r in rows if r["epochs"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["loss"] for r in trained]
    axes[0].barh(names, [r["seconds"] for r in trained], color="tab:blue")
    axes[0].set_xlabel("training time (s)")
    axes[0].invert_yaxis()
    width = 0.38
    pos = np.arange(len(trained))
    axes[1].barh(pos - width / 2, [r["mAP"] for r in trained], height=width, label="mAP")
    axes[1].barh(pos + width / 2, [r["MAP@R"] for r in trained], height=width, label="MAP@R")
    base = rows[0]
    axes[1].axvline(base["mAP"], color="tab:blue", ls=":", lw=1, label="untrained mAP")
    axes[1].set_yticks(pos, [])
    axes[1].invert_yaxis()
    axes[1].set_xlabel("retrieval on unseen classes")
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"metricloss loss comparison: {args.dataset}, {args.epochs} epochs")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "results.png"), dpi=110)
    plt.close(fig)
    return table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fonts", "digits"), default="fonts")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of every loss trained from scratch")
    ap.add_argument("--finetune-epochs", type=int, default=4, help="epochs of WARP fine-tuning the CE model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="examples/out")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    ap.add_argument("--renders", type=int, default=3, help="jittered renders per glyph (fonts)")
    ap.add_argument("--max-fonts", type=int, default=None)
    ap.add_argument("--font-dir", action="append", default=[], help="extra font directory (repeatable)")
    ap.add_argument("--losses", nargs="+", default=None, help="subset of losses, by name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args)
    table = write_outputs(rows, args)
    print("\n" + table)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; outputs in {args.out}/")
    if not all(math.isfinite(r[k]) for r in rows for k in ("mAP", "MAP@R", "R@1")):
        raise SystemExit("non-finite metric in the results")
    return rows


if __name__ == "__main__":
    main()
