#!/usr/bin/env python3
"""The main job: train the same small CNN with each loss, in its paper's recipe, and compare them.

For every loss and every seed the same network (3 conv blocks → global average pooling → 64-d embedding;
NormSoftmax inserts its paper's parameter-free LayerNorm after the pooling) starts from the same
initialisation (per seed) and is trained on 60% of the classes, then evaluated:

* **retrieval on the unseen 40% of classes** (class-disjoint, leave-one-out within the test set, cosine
  on L2-normalised embeddings): mAP, MAP@R, R@1 (:func:`metricloss.metrics.retrieval_metrics`);
* **classification accuracy** on held-out images (20%) of the seen classes, for the losses that have a
  classifier or class centres (cross-entropy, cosine, NormSoftmax, WARP, centroid bound, DGCRL, two-head);
* **convergence**: the mAP on those held-out seen-class images after every epoch, and the first epoch that
  reaches 90% of the last epoch's value (nothing about the unseen classes is used for any choice);
* **cost**: the training loop's wall time, the loss's own forward+backward time on one batch of the row's
  shape, and what pytorch-metric-learning (PML) takes for the same loss on the same batch where it has it.

The recipes (``RECIPES`` below; each row names its source):

=================================  ===================================================================
batch-hard triplet                 Hermans, Beyer & Leibe 2017 (``triplet-reid``): soft margin, non-squared
                                   Euclidean on unnormalised embeddings, P×K batches with K=4, Adam lr 3e-4
                                   constant for 60% of the iterations then decayed exponentially to 3e-7
                                   with β1 0.9 → 0.5 (their t0 = 15k of t1 = 25k iterations).
batch-hard, hinge control          the batch-all row's loss (hinge 0.2, normalised, BA≠0 mean) with batch-hard
                                   mining: tells the soft margin's part in the collapse from the mining's.
batch-hard schedule                :class:`~metricloss.MiningSchedule`: batch-all, semi-hard from 25% of the
                                   steps, batch-hard from 50%; hinge 0.2, normalised, P×K with K=4.
SCT                                Xuan et al. ECCV 2020 (:class:`~metricloss.SCTLoss`, their defaults), P×K
                                   with K=2 as their code.
EPHN                               Xuan et al. WACV 2020 (:class:`~metricloss.EPHNLoss`, σ 0.1), batches of
                                   128 = 8 classes × 16 as their code.
batch-all, 8× batch (GradCache)    the batch-all row with 448 images per step (14 classes × 32), trained with
                                   :class:`~metricloss.GradCache` in sub-batches of 56.
batch-all triplet                  Hermans et al.'s BA≠0 (mean over the non-zero terms) = PML's
                                   ``TripletMarginLoss`` defaults: margin 0.2, normalised embeddings; P×K, K=4.
semi-hard triplet                  FaceNet (Schroff et al. 2015) as TF-Addons ``triplet_semihard_loss``: squared
                                   Euclidean on L2-normalised embeddings, margin 0.2; P×K, K=8.
cross-entropy                      linear classifier on the embedding, random batches of 128.
cross-entropy + cosine             :class:`~metricloss.CosineClassifier` (scale 16), random batches of 128.
NormSoftmax                        Zhai & Wu 2019: GAP → LayerNorm (no affine) → linear → normalise, T = 0.05,
                                   class-balanced batches of 75 (3 classes × 25), as their code.
WARP (fine-tunes cross-entropy)    Saini & Sakla's poster: the cross-entropy model (linear head, no cosine),
                                   fine-tuned with WARP (margin 1, harmonic rank weights) for 4 epochs.
centroid triplet bound             Do et al. 2019: fixed one-hot centroids (D=64 >= C), no margin/hinge,
                                   embeddings as given; random batches of 128.
DGCRL                              Zheng et al. 2019 (:class:`~metricloss.CentralizedRankingLoss`, a
                                   reconstruction): N-S layer (features and centres on the sphere), QR
                                   decorrelated centres; margin chosen on the seen-class validation split.
two-head (CE + semi-hard triplet)  Taha et al. 2020 (:class:`~metricloss.TwoHeadLoss`): a linear classifier and
                                   an L2-normalised :class:`~metricloss.EmbeddingHead` on the network's output,
                                   CE + 1.0 · semi-hard triplet (margin 0.2, squared Euclidean), batches of
                                   32 = 8 classes × 4; retrieval on the embedding head.
semi-hard triplet + SVMax          Taha et al. 2021 (:class:`~metricloss.SVMaxRegularizer`): the semi-hard row
                                   minus λ·s_μ of the normalised batch, λ = margin / (U − L) of the batch.
=================================  ===================================================================

All rows use Adam at lr 1e-3 except batch-hard (Hermans' schedule) and WARP (1e-4, fine-tuning); the
papers' backbones are ImageNet-pretrained ResNets, whose optimiser settings do not carry over to a small CNN
trained from scratch, so the shared optimiser is the research's small-CNN recipe.

Data (offline, ``examples/datasets.py``): font identification on the 24 fonts matplotlib 3.11.2 ships
(pinned in the ``examples`` extra); the run prints a fingerprint of the rendered arrays and warns loudly if
it differs from the one the docs' table was made from. ``--dataset digits`` is a quick check.
The data and the class split are the same for every seed; a seed sets the initialisation and the batches.

Usage:
    python examples/compare_losses.py                      # default: 3 seeds, 8 epochs, AVX2 pinned (332 s wall on a shared 2-core CPU)
    python examples/compare_losses.py --full               # 5 seeds, 20 epochs
    python examples/compare_losses.py --seeds 0 1 2 3 --epochs 12 --losses "batch-hard triplet" NormSoftmax
Outputs: a markdown table on stdout and in ``<out>/results.md``, ``<out>/results.json``, ``<out>/results.png``,
and ``<out>/monitor.png`` (what the triplet losses' collapse monitors saw per epoch).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu_isa  # noqa: E402

#: The instruction-set pin the docs' table was made under (``--isa``; :mod:`cpu_isa`).
TABLE_ISA = "avx2"


def _requested_isa(argv: List[str]) -> str:
    """``--isa`` from the command line, read before argparse runs (the pin must precede ``import torch``)."""
    for i, arg in enumerate(argv):
        if arg == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--isa="):
            return arg.split("=", 1)[1]
    return TABLE_ISA


if __name__ == "__main__" and _requested_isa(sys.argv[1:]) in cpu_isa.PINS:
    cpu_isa.pin(_requested_isa(sys.argv[1:]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import datasets  # noqa: E402

import metricloss as ml  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402

EMBED_DIM = 64

#: Fingerprint of the default dataset (fonts, 24 px, 3 renders, jitter seed 0) the docs' table was made
#: from (matplotlib 3.11.2, Pillow 13.0.0, numpy 2.4.6). A different value means different pixels.
EXPECTED_FINGERPRINT = {"sha256": "90474f5c73b221806e0060bd7eeb8f64a85440b1076cb1eb2008c9d59db39bad",
                        "classes": 24, "images": 4464}


class SmallCNN(nn.Module):
    """3 conv blocks (conv-BN-ReLU ×2, max-pool) → global average pool → [LayerNorm] → linear embedding.

    ``layer_norm=True`` is NormSoftmax's featuriser (a LayerNorm without affine parameters after the
    pooling); it has no parameters, so both variants share one ``state_dict`` and one initialisation.
    """

    def __init__(self, embed_dim: int = EMBED_DIM, width: int = 16, layer_norm: bool = False):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True))

        self.features = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.norm = nn.LayerNorm(4 * width, elementwise_affine=False) if layer_norm else nn.Identity()
        self.embed = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.norm(self.features(x).mean((2, 3))))


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------

def random_batches(n: int, batch: int, rng: np.random.RandomState) -> Iterator[np.ndarray]:
    order = rng.permutation(n)
    for s in range(0, n - batch + 1, batch):
        yield order[s:s + batch]


def pk_sampler(labels: np.ndarray, p: int, k: int, seed: int) -> ml.PKSampler:
    """P classes × K samples per batch (:class:`metricloss.PKSampler`): every sample at least once per epoch,
    classes with fewer than K samples completed by resampling; ``set_epoch`` draws each epoch anew."""
    p = min(p, len(np.unique(labels)))
    return ml.PKSampler(torch.from_numpy(labels), p, k, seed=seed, num_replicas=1, rank=0)


def train_batch_hard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
                     seed: int) -> float:
    """Batch-hard triplet training (margin 0.2, mean over non-zero terms) on P×K batches of K = 8 with a
    fresh Adam optimiser, in place; returns the wall time. Shared by the toolbox examples."""
    criterion = ml.TripletLoss(margin=0.2, mining="batch_hard", reduction="mean_nonzero")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = y.numpy()
    start = time.perf_counter()
    sampler = pk_sampler(labels, batch // 8, 8, seed)
    for epoch in range(epochs):
        model.train()
        sampler.set_epoch(epoch)
        for idx in sampler:
            idx = torch.tensor(idx)
            loss = criterion(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# the losses under comparison
# ----------------------------------------------------------------------------------------------------

@dataclass
class Method:
    """A loss as the comparison trains it.

    ``build(num_classes)`` returns (trainable head or None, loss(embeddings, labels, head), logits(embeddings,
    head) or None for losses without classes to predict). ``sampler`` is ``("random", batch)`` or
    ``("pk", P, K)``. ``schedule`` is ``"adam"`` (constant ``lr``) or ``"hermans"``. ``pml(num_classes)``
    builds PML's version of the same loss, ``loss(embeddings, labels)``, or is None where PML has none.
    ``recipe`` is the one-line source of the row's choices. ``retrieval(network output, head)`` gives the
    embeddings retrieval is evaluated on, where they are not the network's output (the two-head model).
    """

    name: str
    sampler: Tuple
    build: Callable[[int], Tuple[Optional[nn.Module], Callable, Optional[Callable]]]
    recipe: str
    lr: float = 1e-3
    schedule: str = "adam"
    layer_norm: bool = False
    finetunes: Optional[str] = None
    pml: Optional[Callable[[int], Callable]] = None
    pml_name: str = "n/a"
    retrieval: Optional[Callable[[torch.Tensor, nn.Module], torch.Tensor]] = None
    stage_fractions: Optional[Tuple[float, ...]] = None  # a MiningSchedule's stage starts, as fractions of the steps
    grad_cache: Optional[int] = None  # train with metricloss.GradCache, this many images per sub-batch


def _metric_loss(loss: nn.Module) -> Callable:
    """A loss module as a row's ``build``: a fresh copy per seed (its collapse monitor starts anew), reachable
    as ``loss_fn.module`` for the monitor's record."""
    def build(num_classes: int):
        fresh = copy.deepcopy(loss)

        def loss_fn(emb, y, head):
            return fresh(emb, y)

        loss_fn.module = fresh
        return None, loss_fn, None
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
    warp = ml.WARPLoss(margin=1.0, rank_weight="harmonic")
    head = nn.Linear(EMBED_DIM, num_classes)  # replaced by the cross-entropy model's head before training
    return head, lambda emb, y, h: warp(h(emb), y), lambda emb, h: h(emb)


def _centroid(num_classes: int):
    scheme = "onehot" if EMBED_DIM >= num_classes else "kmeans"
    loss = ml.CentroidTripletLoss(num_classes, EMBED_DIM, centroids=scheme)
    # nearest fixed centroid is the classifier the bound trains
    return loss, lambda emb, y, h: h(emb, y), lambda emb, h: -torch.cdist(emb, h.centroids.to(emb.dtype))


DGCRL_MARGIN = 1.0  # chosen on the seen-class validation split among {0.2, 0.5, 1.0}: mAP 0.384, 0.392, 0.407


def _dgcrl(num_classes: int):
    loss = ml.CentralizedRankingLoss(EMBED_DIM, num_classes, margin=DGCRL_MARGIN, scale=1.0, decorrelation="auto")
    # nearest N-S centre on the sphere
    return loss, lambda emb, y, h: h(emb, y), lambda emb, h: F.normalize(emb, dim=1) @ h.centres().t()


def _two_head(num_classes: int):
    head = nn.ModuleDict({"classifier": nn.Linear(EMBED_DIM, num_classes),
                          "embedding": ml.EmbeddingHead(EMBED_DIM, EMBED_DIM)})
    loss = ml.TwoHeadLoss(triplet="semi_hard", triplet_weight=1.0)
    return (head, lambda emb, y, h: loss(h["classifier"](emb), h["embedding"](emb), y),
            lambda emb, h: h["classifier"](emb))


SVMAX_P, SVMAX_K = 16, 8


def svmax_weight(batch: int, dim: int, margin: float) -> float:
    """λ of the SVMax row: the ranking loss's scale (its margin) over the range of s_μ, U − L = √(b/d) − √b/d
    (our reading of the paper's rule that λ relates the ranking loss's range to the bounds')."""
    return margin / (math.sqrt(batch / dim) - math.sqrt(batch) / dim)


def _svmax_triplet(num_classes: int):
    triplet = ml.TripletLoss(margin=0.2, mining="semi_hard", distance="squared_euclidean", normalize=True)
    batch = min(SVMAX_P, num_classes) * SVMAX_K
    svmax = ml.SVMaxRegularizer(weight=svmax_weight(batch, EMBED_DIM, 0.2), normalize=True)
    return None, lambda emb, y, h: triplet(emb, y) + svmax(emb), None


def _pml_batch_hard(num_classes: int) -> Callable:
    from pytorch_metric_learning import distances, losses, miners

    dist = distances.LpDistance(normalize_embeddings=False)
    miner = miners.BatchHardMiner(distance=dist)
    loss = losses.TripletMarginLoss(margin=0.0, smooth_loss=True, distance=dist)
    return lambda emb, y: loss(emb, y, miner(emb, y))


def _pml_batch_all(num_classes: int) -> Callable:
    from pytorch_metric_learning import losses

    return losses.TripletMarginLoss(margin=0.2)


def _pml_norm_softmax(num_classes: int) -> Callable:
    from pytorch_metric_learning import losses

    return losses.NormalizedSoftmaxLoss(num_classes, EMBED_DIM, temperature=0.05)


def _pml_cosine(num_classes: int) -> Callable:
    from pytorch_metric_learning import losses

    return losses.CosFaceLoss(num_classes, EMBED_DIM, margin=0.0, scale=16.0)


HERMANS_K = 4
METHODS = [
    Method("batch-hard triplet", ("pk", 32, HERMANS_K),
           _metric_loss(ml.TripletLoss(margin="soft", mining="batch_hard", distance="euclidean", normalize=False,
                                       reduction="mean")),
           "Hermans et al. 2017: soft margin, Euclidean, unnormalised, PxK K=4, Adam 3e-4 then exp. decay",
           lr=3e-4, schedule="hermans", pml=_pml_batch_hard, pml_name="BatchHardMiner + TripletMarginLoss(soft)"),
    Method("batch-hard triplet (hinge 0.2, normalised)", ("pk", 32, HERMANS_K),
           _metric_loss(ml.TripletLoss(margin=0.2, mining="batch_hard", reduction="mean_nonzero")),
           "control for the batch-hard row: the batch-all row's loss (hinge 0.2, normalised, BA!=0 mean) with "
           "batch-hard mining, PxK K=4"),
    Method("batch-hard, schedule all -> semi-hard -> hard", ("pk", 32, HERMANS_K),
           _metric_loss(ml.MiningSchedule([(0, "batch_all"), (1, "semi_hard"), (2, "batch_hard")], margin=0.2,
                                          reduction="mean_nonzero")),
           "OML's remedy for a plateau at the margin: batch-all, then semi-hard from 25% of the steps, then "
           "batch-hard from 50%; hinge 0.2, normalised, PxK K=4", stage_fractions=(0.0, 0.25, 0.5)),
    Method("SCT (easy positive, selective)", ("pk", 32, 2), _metric_loss(ml.SCTLoss()),
           "Xuan et al. ECCV 2020 and their code: cosine, easiest positive, hardest negative, lambda 1, "
           "threshold 0.8, T 0.1; PxK K=2 (their N_size)"),
    Method("EPHN (easy positive, NCA)", ("pk", 8, 16), _metric_loss(ml.EPHNLoss()),
           "Xuan et al. WACV 2020 and their code: cosine, easiest positive, hardest negative, sigma 0.1, "
           "S > 0 only; batches of 128 = 8 classes x 16 (their nsize)"),
    Method("batch-all triplet", ("pk", 32, HERMANS_K),
           _metric_loss(ml.TripletLoss(margin=0.2, mining="batch_all", reduction="mean_nonzero")),
           "Hermans et al.'s BA!=0 = PML TripletMarginLoss defaults: margin 0.2, normalised, PxK K=4",
           pml=_pml_batch_all, pml_name="TripletMarginLoss(0.2)"),
    Method("batch-all triplet, 8x batch (GradCache)", ("pk", 32, 4 * 8),
           _metric_loss(ml.TripletLoss(margin=0.2, mining="batch_all", reduction="mean_nonzero")),
           "the batch-all row with 8x the batch (14 classes x 32 = 448 images per step), trained with GradCache in "
           "sub-batches of 56 (the batch-all row's batch): same epochs, 8x fewer steps", grad_cache=56),
    Method("semi-hard triplet", ("pk", 16, 8),
           _metric_loss(ml.TripletLoss(margin=0.2, mining="semi_hard", distance="squared_euclidean",
                                       normalize=True, reduction="mean")),
           "FaceNet / TF-Addons: squared Euclidean on normalised embeddings, margin 0.2, PxK K=8"),
    Method("cross-entropy", ("random", 128), _cross_entropy, "linear head, batches of 128"),
    Method("cross-entropy + cosine", ("random", 128), _cosine_cross_entropy,
           "CosineClassifier scale 16, batches of 128", pml=_pml_cosine, pml_name="CosFaceLoss(margin 0, scale 16)"),
    Method("NormSoftmax", ("pk", 3, 25), _norm_softmax,
           "Zhai & Wu 2019: GAP-LayerNorm-linear-normalise, T=0.05, 3 classes x 25", layer_norm=True,
           pml=_pml_norm_softmax, pml_name="NormalizedSoftmaxLoss(T=0.05)"),
    Method("WARP (fine-tunes cross-entropy)", ("random", 128), _warp,
           "Saini & Sakla: fine-tunes the cross-entropy model, margin 1, harmonic weights, lr 1e-4",
           lr=1e-4, finetunes="cross-entropy"),
    Method("centroid triplet bound", ("random", 128), _centroid,
           "Do et al. 2019: fixed one-hot centroids, no margin, batches of 128"),
    Method("DGCRL", ("random", 128), _dgcrl,
           f"Zheng et al. 2019 (reconstruction): N-S layer, QR-decorrelated centres, margin {DGCRL_MARGIN} "
           "(seen-class validation)"),
    Method("two-head (CE + semi-hard triplet)", ("pk", 8, 4), _two_head,
           "Taha et al. 2020: CE head + L2-normalised embedding head, semi-hard triplet margin 0.2, lambda 1, "
           "32 = 8 x 4", retrieval=lambda emb, h: h["embedding"](emb)),
    Method("semi-hard triplet + SVMax", ("pk", SVMAX_P, SVMAX_K), _svmax_triplet,
           "Taha et al. 2021: the semi-hard row plus SVMax (normalised rows), lambda = margin / (U - L)"),
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


@torch.no_grad()
def retrieval_embeddings(method: Optional[Method], model: nn.Module, head: Optional[nn.Module],
                         x: torch.Tensor) -> torch.Tensor:
    """The embeddings retrieval is evaluated on: the network's output, or the method's embedding head's."""
    emb = embed(model, x)
    if method is None or method.retrieval is None:
        return emb
    head.eval()
    return method.retrieval(emb, head)


def batches(method: Method, labels: np.ndarray, rng: np.random.RandomState, seed: int,
            epoch: int) -> Iterator[np.ndarray]:
    if method.sampler[0] == "pk":
        sampler = pk_sampler(labels, method.sampler[1], method.sampler[2], seed)
        sampler.set_epoch(epoch)
        return (np.asarray(idx) for idx in sampler)
    return random_batches(len(labels), method.sampler[1], rng)


def iterations_per_epoch(method: Method, labels: np.ndarray, seed: int = 0) -> int:
    if method.sampler[0] == "pk":
        return len(pk_sampler(labels, method.sampler[1], method.sampler[2], seed))
    return len(labels) // method.sampler[1]


def hermans_lr(step: int, total: int, lr0: float) -> Tuple[float, float]:
    """Hermans et al.'s schedule: lr0 and β1 = 0.9 up to t0 = 0.6·total, then lr0·0.001^((t−t0)/(total−t0)), β1 0.5.

    (Their code: t0 = 15,000 and t1 = 25,000 iterations; the same proportions here.)
    """
    t0 = int(0.6 * total)
    if step < t0:
        return lr0, 0.9
    return lr0 * 0.001 ** ((step - t0) / max(1, total - t0)), 0.5


def train(method: Method, model: nn.Module, head: Optional[nn.Module], loss_fn: Callable, data: Dict,
          epochs: int, seed: int, progress: bool) -> Dict:
    """Train in place. Returns the training loop's wall time (evaluation excluded), iterations, the
    seen-class validation mAP after every epoch and every epoch's mean training loss."""
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.Adam(params, lr=method.lr)
    rng = np.random.RandomState(seed)
    x, y = data["x_train"], data["y_train"]
    labels = y.numpy()
    total = epochs * iterations_per_epoch(method, labels, seed)
    module = getattr(loss_fn, "module", None)
    cache = (ml.GradCache(model, lambda emb, yy: loss_fn(emb, yy, head), method.grad_cache)
             if method.grad_cache is not None else None)
    if method.stage_fractions is not None:
        module.starts = [int(f * total) for f in method.stage_fractions]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=f"{method.name:>32s} seed {seed}", unit="epoch", leave=False)
    seconds, step, images, curve, losses = 0.0, 0, 0, [], []
    for epoch in range(epochs):
        model.train()
        if head is not None:
            head.train()
        start = time.perf_counter()
        epoch_loss = torch.zeros(())
        for idx in batches(method, labels, rng, seed, epoch):
            if method.schedule == "hermans":
                lr, beta1 = hermans_lr(step, total, method.lr)
                for group in opt.param_groups:
                    group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
            idx = torch.from_numpy(idx)
            opt.zero_grad(set_to_none=True)
            if cache is not None:
                loss = cache.step(x[idx], y[idx])  # the batch embedded in sub-batches, its exact gradient
            else:
                loss = loss_fn(model(x[idx]), y[idx], head)
                loss.backward()
            opt.step()
            epoch_loss += loss.detach()
            step += 1
            images += len(idx)
        seconds += time.perf_counter() - start
        losses.append(float(epoch_loss) / iterations_per_epoch(method, labels, seed))
        val = retrieval_embeddings(method, model, head, data["x_val"])
        curve.append(retrieval_metrics(val, data["y_val"], ks=(1,))["mAP"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_mAP=f"{curve[-1]:.3f}")
    if bar is not None:
        bar.close()
    out = {"seconds": seconds, "iterations": step, "images": images, "val_curve": curve, "train_loss": losses}
    out.update(monitor_record(module, iterations_per_epoch(method, labels, seed)))
    return out


def monitor_record(module: Optional[nn.Module], per_epoch: int) -> Dict:
    """What the loss's collapse monitor saw (metricloss.CollapseMonitor): the step and epoch (1-based) at which
    it warned (None: silent), and per epoch the mean of its checks' d_ap, d_an and active fraction."""
    monitors = []
    if isinstance(module, ml.MiningSchedule):
        monitors = [m.monitor for m in module.stages if getattr(m, "monitor", None) is not None]
    elif getattr(module, "monitor", None) is not None:
        monitors = [module.monitor]
    if not monitors:
        return {}
    fired = [m.collapsed_at for m in monitors if m.collapsed_at is not None]
    # a schedule's stages count their own steps: their checks are placed at the schedule's steps in order
    history, offset = [], 0
    for m in monitors:
        history += [dict(h, step=h["step"] + offset) for h in m.history]
        offset += m.step
    epochs: Dict[int, List[Dict]] = {}
    for h in history:
        epochs.setdefault((h["step"] - 1) // per_epoch, []).append(h)
    def epoch_mean(values):  # NaN where the stage keeps no distances (a schedule's batch-all / semi-hard epochs)
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    curve = {key: [epoch_mean([h[key] for h in epochs[e]]) for e in sorted(epochs)]
             for key in ("d_ap_mean", "d_an_mean", "active_fraction", "hard_negative_ratio", "relative_gap")}
    step = fired[0] if fired else None
    return {"collapse_step": step, "collapse_epoch": None if step is None else (step - 1) // per_epoch + 1,
            "monitor_curve": curve}


def evaluate(method: Optional[Method], model: nn.Module, head: Optional[nn.Module], logits_fn: Optional[Callable],
             data: Dict) -> Dict:
    out = retrieval_metrics(retrieval_embeddings(method, model, head, data["x_test"]), data["y_test"], ks=(1,))
    res = {"mAP": out["mAP"], "MAP@R": out["MAP@R"], "R@1": out["R@1"], "accuracy": None}
    if logits_fn is not None and head is not None:
        with torch.no_grad():
            head.eval()
            pred = logits_fn(embed(model, data["x_val"]), head).argmax(1)
        res["accuracy"] = float((pred == data["y_val"]).float().mean())
    return res


def batch_shape(method: Method, num_classes: int) -> Tuple[int, int]:
    """(batch size, classes in the batch) of the row's sampler on the seen classes."""
    if method.sampler[0] == "pk":
        p = min(method.sampler[1], num_classes)
        return p * method.sampler[2], p
    return method.sampler[1], num_classes


def time_call(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def loss_cost(method: Method, num_classes: int, seed: int, repeats: int) -> Dict:
    """The loss's own forward+backward on one batch of the row's shape (embeddings from N(0, 1)), and PML's.

    Returns milliseconds (median of ``repeats``) and both loss values on that batch (PML's should match).
    """
    b, p = batch_shape(method, num_classes)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, EMBED_DIM, generator=g).requires_grad_(True)
    classes = torch.randperm(num_classes, generator=g)[:p]
    labels = classes.repeat_interleave(b // p) if method.sampler[0] == "pk" else torch.randint(
        0, num_classes, (b,), generator=g)
    head, loss_fn, _ = method.build(num_classes)

    def ours():
        emb.grad = None
        loss_fn(emb, labels, head).backward()

    out = {"batch": b, "loss_ms": time_call(ours, repeats), "loss_value": float(loss_fn(emb, labels, head).detach()),
           "pml_ms": None, "pml_value": None}
    if method.pml is not None:
        try:
            pml_loss = method.pml(num_classes)
        except ImportError:
            out["pml_ms"] = "not installed"
            return out
        if hasattr(pml_loss, "W") and head is not None:  # same class weights, so the two values must agree
            with torch.no_grad():
                pml_loss.W.copy_(head.weight.t())

        def theirs():
            emb.grad = None
            pml_loss(emb, labels).backward()

        out["pml_ms"] = time_call(theirs, repeats)
        out["pml_value"] = float(pml_loss(emb, labels).detach())
    return out


def prepare_data(args) -> Dict:
    if args.dataset == "digits":
        images, labels, names = datasets.load_digits()
    else:
        images, labels, names = datasets.load_fonts(size=args.size, renders=args.renders, seed=args.data_seed,
                                                    max_fonts=args.max_fonts, font_dirs=args.font_dir)
    fp = datasets.fingerprint(images, labels)
    train_mask, test_mask = datasets.class_split(labels, 0.6, args.data_seed)
    # held-out images of the seen classes (20%): classification accuracy, convergence, and any choice of a recipe
    rng = np.random.RandomState(args.data_seed)
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
        "names": names, "num_images": len(labels), "fingerprint": fp,
    }


def is_default_data(args) -> bool:
    return (args.dataset == "fonts" and args.size == 24 and args.renders == 3 and args.data_seed == 0 and args.max_fonts is None
            and not args.font_dir)


def check_fingerprint(fp: Dict, args) -> Optional[str]:
    """A loud warning if the default data's fingerprint is not the docs' table's; None if it is (or not default)."""
    if not is_default_data(args) or fp == EXPECTED_FINGERPRINT:
        return None
    bar = "!" * 100
    return (f"{bar}\nDATASET FINGERPRINT DIFFERS from the one the docs' table was made from:\n"
            f"  this run: {fp}\n  docs:     {EXPECTED_FINGERPRINT}\n"
            f"  The glyph pixels differ (other Pillow/FreeType or matplotlib fonts than the pinned ones?):\n"
            f"  the table below is NOT comparable to the docs' table.\n{bar}")


def run_seed(args, data: Dict, seed: int, selected: List[Method]) -> List[Dict]:
    torch.manual_seed(seed)
    init = SmallCNN(width=args.width).state_dict()
    untrained = SmallCNN(width=args.width)
    untrained.load_state_dict(init)
    rows = [dict(loss="(untrained network)", seed=seed, epochs=0, seconds=0.0, iterations=0, images=0,
                 val_curve=[], train_loss=[],
                 **evaluate(None, untrained, None, None, data))]
    trained = {}
    for method in selected:
        torch.manual_seed(seed)
        model = SmallCNN(width=args.width, layer_norm=method.layer_norm)
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
        fit = train(method, model, head, loss_fn, data, epochs, seed, args.progress)
        trained[method.name] = (model, head)
        row = dict(loss=method.name, seed=seed, epochs=epochs, **fit, **evaluate(method, model, head, logits_fn, data))
        rows.append(row)
        print(f"  seed {seed} | {method.name} | {fit['seconds']:.1f} s | mAP {row['mAP']:.3f} | "
              f"MAP@R {row['MAP@R']:.3f} | R@1 {row['R@1']:.3f}", flush=True)
    return rows


METRICS = ("accuracy", "mAP", "MAP@R", "R@1")


def epochs_to_90(curve: List[float]) -> Optional[int]:
    """First epoch (1-based) whose seen-class validation mAP reaches 90% of the last epoch's."""
    if not curve:
        return None
    target = 0.9 * curve[-1]
    return next(i + 1 for i, v in enumerate(curve) if v >= target)


def mean_std(values: List[float]) -> Tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(rows: List[Dict], costs: Dict[str, Dict]) -> List[Dict]:
    """One summary per loss: mean and sample standard deviation over the seeds of every metric."""
    out = []
    for name in dict.fromkeys(r["loss"] for r in rows):
        group = [r for r in rows if r["loss"] == name]
        s = {"loss": name, "seeds": len(group), "epochs": group[0]["epochs"], "images": group[0]["images"]}
        for key in METRICS:
            vals = [r[key] for r in group if r[key] is not None]
            s[key] = mean_std(vals) if vals else None
        s["seconds"] = mean_std([r["seconds"] for r in group])
        s["step_ms"] = (mean_std([1e3 * r["seconds"] / r["iterations"] for r in group])
                        if group[0]["iterations"] else None)
        e90 = [epochs_to_90(r["val_curve"]) for r in group]
        s["epochs_to_90"] = mean_std(e90) if e90[0] is not None else None
        s["val_mAP_curve"] = [float(np.mean(c)) for c in zip(*[r["val_curve"] for r in group])]
        s["train_loss_curve"] = [float(np.mean(c)) for c in zip(*[r["train_loss"] for r in group])]
        if "monitor_curve" in group[0]:
            # the collapse monitor: the epoch it warned at per seed (None: silent), its figures per epoch (seed mean)
            s["collapse_epochs"] = [r.get("collapse_epoch") for r in group]
            s["monitor_curve"] = {k: [float(np.nanmean(c)) if not all(np.isnan(c)) else float("nan")
                                      for c in zip(*[r["monitor_curve"][k] for r in group])]
                                  for k in group[0]["monitor_curve"]}
        s.update(costs.get(name, {}))
        out.append(s)
    return out


def _ms(v) -> str:
    if v is None:
        return "–"
    return f"{v[0]:.3f} ± {v[1]:.3f}" if isinstance(v, tuple) else str(v)


def format_row(s: Dict) -> str:
    def num(v, digits=1):
        return "–" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

    def ms(v):
        return "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    pml = ms(s.get("pml_ms")) if s.get("pml_name", "n/a") != "n/a" else "n/a"
    batch = s.get("batch", "–")
    return (f"| {s['loss']} | {s['epochs']} | {s['images']} | {num(s['seconds'])} | {num(s['step_ms'])} | {batch} | "
            f"{ms(s.get('loss_ms'))} | "
            f"{pml} | {num(s['epochs_to_90'])} | {_ms(s['accuracy'])} | {_ms(s['mAP'])} | {_ms(s['MAP@R'])} | "
            f"{_ms(s['R@1'])} |")


HEADER = ("| loss | epochs | images trained on | training time (s) | ms / step | batch | loss fwd+bwd (ms / batch) | "
          "PML, same loss (ms) | epochs to 90% val mAP | accuracy (seen) | mAP (unseen) | MAP@R (unseen) | "
          "R@1 (unseen) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# ----------------------------------------------------------------------------------------------------
# the research's claims, judged on the seeds' spread
# ----------------------------------------------------------------------------------------------------

def compare(a: Optional[Tuple[float, float]], b: Optional[Tuple[float, float]]) -> str:
    """Verdict on "a > b": supported if a − b exceeds the spread (sum of the two standard deviations),
    contradicted if b − a does, else within the spread."""
    if a is None or b is None:
        return "not measured"
    diff, spread = a[0] - b[0], a[1] + b[1]
    if diff > spread:
        return "supported"
    if -diff > spread:
        return "contradicted"
    return "within the spread"


def comparable(a, b) -> bool:
    """a is at least b within the spread (a − b > −(σa + σb))."""
    return a is not None and b is not None and a[0] - b[0] > -(a[1] + b[1])


def claims(summary: List[Dict]) -> List[Dict]:
    by = {s["loss"]: s for s in summary}
    out = []

    def f(v):
        return "–" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"

    warp, ce = by.get("WARP (fine-tunes cross-entropy)"), by.get("cross-entropy")
    for trip in ("batch-hard triplet", "batch-all triplet"):
        t = by.get(trip)
        if warp and t and ce:
            # the CNN's cost (95%+ of a step) is proportional to the images trained on, which is deterministic;
            # wall times on a shared machine are not
            ratio = warp["images"] / t["images"]
            total = (warp["images"] + ce["images"]) / t["images"]
            ok = ratio < 1 and comparable(warp["mAP"], t["mAP"])
            out.append({"claim": f"WARP fine-tuning is faster than {trip} training at comparable mAP",
                        "measured": (f"WARP trains on {ratio:.2f}x the images ({f(warp['seconds'])} s vs "
                                     f"{f(t['seconds'])} s; counting the cross-entropy run it starts from "
                                     f"{total:.2f}x); mAP {f(warp['mAP'])} vs {f(t['mAP'])} "
                                     f"({compare(warp['mAP'], t['mAP'])} for WARP > triplet)"),
                        "verdict": ("supported" if ok and total < 1 else
                                    "supported for the fine-tuning alone" if ok else "not supported")})
    cos, ns = by.get("cross-entropy + cosine"), by.get("NormSoftmax")
    for name, c in (("cosine classifier", cos), ("NormSoftmax", ns)):
        if c and ce:
            v_acc, v_map = compare(c["accuracy"], ce["accuracy"]), compare(c["mAP"], ce["mAP"])
            verdict = "supported" if v_acc == v_map == "supported" else (
                "contradicted" if "contradicted" in (v_acc, v_map) else "not supported (within the spread)")
            if verdict != "supported" and "supported" in (v_acc, v_map):
                verdict = "partly supported"
            out.append({"claim": f"a cosine layer ({name}) raises accuracy and mAP over cross-entropy",
                        "measured": (f"accuracy {f(c['accuracy'])} vs {f(ce['accuracy'])} ({v_acc}); mAP "
                                     f"{f(c['mAP'])} vs {f(ce['mAP'])} ({v_map})"),
                        "verdict": verdict})
    cen = by.get("centroid triplet bound")
    for trip in ("batch-hard triplet", "batch-all triplet"):
        t = by.get(trip)
        if cen and t and isinstance(cen.get("loss_ms"), float) and isinstance(t.get("loss_ms"), float):
            per_sample = (cen["loss_ms"] / cen["batch"]) / (t["loss_ms"] / t["batch"])
            faster = cen["seconds"][0] + cen["seconds"][1] < t["seconds"][0] - t["seconds"][1]
            competitive = comparable(cen["mAP"], t["mAP"]) and comparable(cen["R@1"], t["R@1"])
            verdict = ("supported" if faster and competitive else
                       "loss cheaper, training not faster; accuracy competitive" if competitive and per_sample < 1 else
                       "loss cheaper, training not faster; accuracy not competitive" if per_sample < 1 else
                       "not supported")
            out.append({"claim": f"the centroid bound trains faster than {trip} at competitive accuracy",
                        "measured": (f"training {f(cen['seconds'])} vs {f(t['seconds'])} s on {cen['images']} vs "
                                     f"{t['images']} images; loss fwd+bwd per sample {per_sample:.2f}x "
                                     f"({cen['loss_ms']:.2f} ms / {cen['batch']} vs {t['loss_ms']:.2f} ms / "
                                     f"{t['batch']}); mAP {f(cen['mAP'])} vs {f(t['mAP'])}; R@1 {f(cen['R@1'])} vs "
                                     f"{f(t['R@1'])}"),
                        "verdict": verdict})
    for trip in ("batch-hard triplet", "batch-all triplet", "semi-hard triplet"):
        t = by.get(trip)
        if t and isinstance(t.get("loss_ms"), float) and t["step_ms"] is not None:
            share = t["loss_ms"] / t["step_ms"][0]
            out.append({"claim": f"mining dominates {trip} training time",
                        "measured": (f"loss (mining included) fwd+bwd {t['loss_ms']:.2f} ms of a {t['step_ms'][0]:.1f} ms "
                                     f"training step ({100 * share:.1f}%)"),
                        "verdict": "supported" if share > 0.5 else "not supported"})
    plain, ba = by.get("batch-hard triplet"), by.get("batch-all triplet")
    for name in ("batch-hard triplet (hinge 0.2, normalised)", "batch-hard, schedule all -> semi-hard -> hard",
                 "SCT (easy positive, selective)", "EPHN (easy positive, NCA)"):
        r = by.get(name)
        if r and plain and ba:
            above, vs_ba = compare(r["mAP"], plain["mAP"]), compare(r["mAP"], ba["mAP"])
            out.append({"claim": f"{name} makes the batch-hard family train here",
                        "measured": (f"mAP {f(r['mAP'])} vs plain batch-hard {f(plain['mAP'])} ({above} for higher) "
                                     f"and batch-all {f(ba['mAP'])} ({vs_ba} for higher); collapse warning at epoch "
                                     f"{r.get('collapse_epochs')} per seed (None: silent)"),
                        "verdict": ("trains, as well as batch-all" if above == "supported" and vs_ba != "contradicted"
                                    else "trains better than batch-hard, below batch-all" if above == "supported"
                                    else "does not train better than batch-hard")})
    for name, s_ in by.items():
        if s_.get("collapse_epochs") is not None:
            fired = [e for e in s_["collapse_epochs"] if e is not None]
            out.append({"claim": f"the collapse monitor on {name}",
                        "measured": f"warned at epoch {s_['collapse_epochs']} per seed (None: silent); mAP {f(s_['mAP'])}",
                        "verdict": f"warned on {len(fired)} of {len(s_['collapse_epochs'])} seeds"})
    dg = by.get("DGCRL")
    if dg and dg["epochs_to_90"] is not None:
        # rows trained from scratch that learned (seen-class validation mAP rose by >= 0.1): a flat curve
        # "reaches 90%" at once
        others = [s for s in summary if s["epochs_to_90"] is not None and s["loss"] != "DGCRL"
                  and s["epochs"] == dg["epochs"] and s["val_mAP_curve"][-1] - s["val_mAP_curve"][0] >= 0.1]
        fewer = [s["loss"] for s in others if compare(s["epochs_to_90"], dg["epochs_to_90"]) == "supported"]
        more = [s["loss"] for s in others if compare(dg["epochs_to_90"], s["epochs_to_90"]) == "supported"]
        out.append({"claim": "DGCRL converges in few epochs",
                    "measured": (f"epochs to 90% of its final seen-class validation mAP: {f(dg['epochs_to_90'])} "
                                 f"of {dg['epochs']}; beyond the spread, fewer than {fewer or 'none'}, more than "
                                 f"{more or 'none'}; unseen mAP {f(dg['mAP'])}"),
                    "verdict": "supported" if fewer and not more else "not supported"})
    return out


def plot_results(plt, summary: List[Dict], args) -> Dict[str, List[str]]:
    """``results.png``: training time, retrieval on the unseen classes, and the seen-class validation mAP per
    epoch, from scratch and (on its own axis) for the rows that fine-tune another row's model.

    Every row keeps one colour and line style in every panel (a qualitative palette, 10 colours, cycled
    with 4 line styles), and the legend sits outside the curves, at the right. Returns the rows drawn on
    each curve panel (``{"convergence": [...], "fine-tuning": [...]}``) and the figure's title (``"title"``).
    """
    trained = [s for s in summary if s["epochs"]]
    finetuned = {m.name for m in METHODS if m.finetunes is not None}
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
    palette = plt.get_cmap("tab10").colors
    look = {s["loss"]: dict(color=palette[i % 10], ls=styles[(i // 10 + i) % 4], marker=markers[i % len(markers)])
            for i, s in enumerate(trained)}
    hatch = {s["loss"]: ("//" if i >= 10 else "") for i, s in enumerate(trained)}  # a colour's second use
    fig = plt.figure(figsize=(19, 5.4))
    grid = fig.add_gridspec(1, 4, width_ratios=[1.0, 1.0, 1.25, 0.55], wspace=0.35)
    ax_time, ax_ret, ax_curve, ax_ft = (fig.add_subplot(grid[0, c]) for c in range(4))
    names = [s["loss"] for s in trained]
    pos = np.arange(len(trained))
    bars = ax_time.barh(pos, [s["seconds"][0] for s in trained], xerr=[s["seconds"][1] for s in trained],
                        color=[look[n]["color"] for n in names], edgecolor="white")
    for bar, n in zip(bars, names):
        bar.set_hatch(hatch[n])
    ax_time.set_yticks(pos, names, fontsize=8)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("training time (s)")
    ax_time.set_title("cost", fontsize=10)
    width = 0.4
    ax_ret.barh(pos - width / 2, [s["mAP"][0] for s in trained], xerr=[s["mAP"][1] for s in trained],
                height=width, color="0.35", label="mAP")
    ax_ret.barh(pos + width / 2, [s["MAP@R"][0] for s in trained], xerr=[s["MAP@R"][1] for s in trained],
                height=width, color="0.7", label="MAP@R")
    ax_ret.axvline(summary[0]["mAP"][0], color="k", ls=":", lw=1, label="untrained mAP")
    ax_ret.set_yticks(pos, [])
    ax_ret.invert_yaxis()
    ax_ret.set_xlabel("unseen classes")
    ax_ret.set_title("retrieval", fontsize=10)
    ax_ret.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    drawn: Dict[str, List[str]] = {"convergence": [], "fine-tuning": []}
    for s in trained:
        ax = ax_ft if s["loss"] in finetuned else ax_curve
        drawn["fine-tuning" if s["loss"] in finetuned else "convergence"].append(s["loss"])
        curve = s["val_mAP_curve"]
        ax.plot(np.arange(1, len(curve) + 1), curve, label=s["loss"], lw=1.6, ms=4, **look[s["loss"]])
    ax_curve.set_xlabel("epoch (trained from scratch)")
    ax_curve.set_ylabel("seen-class validation mAP")
    ax_curve.set_title("convergence", fontsize=10)
    ax_ft.set_xlabel("fine-tuning epoch")
    ax_ft.set_title("fine-tuning", fontsize=10)
    ax_ft.sharey(ax_curve)
    if not any(s["loss"] in finetuned for s in trained):
        ax_ft.text(0.5, 0.5, "no fine-tuned row", ha="center", va="center", transform=ax_ft.transAxes, fontsize=8)
    for ax, epochs in ((ax_curve, args.epochs), (ax_ft, args.finetune_epochs)):
        ax.set_xticks(range(1, epochs + 1, max(1, epochs // 8)))
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in (ax_curve, ax_ft):
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.825, 0.5), fontsize=8, frameon=False)
    seeds = ", ".join(str(seed) for seed in args.seeds)
    title = (f"{args.dataset}: {args.epochs} epochs from scratch, {args.finetune_epochs} fine-tuning; "
             f"mean ± std over seeds {seeds}")
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.11, right=0.815, bottom=0.17, top=0.86)
    fig.savefig(os.path.join(args.out, "results.png"), dpi=110)
    plt.close(fig)
    return {**drawn, "title": [title]}


def write_outputs(rows: List[Dict], summary: List[Dict], claim_rows: List[Dict], meta: Dict, args) -> str:
    os.makedirs(args.out, exist_ok=True)
    table = HEADER + "\n" + "\n".join(format_row(s) for s in summary)
    claim_text = "\n".join(f"- {c['claim']}: **{c['verdict']}** ({c['measured']})" for c in claim_rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{meta['describe']}\n\n{meta['warning'] or ''}\n\n{table}\n\n{claim_text}\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "meta": meta, "summary": summary, "claims": claim_rows, "rows": rows}, f,
                  indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install '.[examples]')")
        return table
    plot_results(plt, summary, args)
    plot_monitor(plt, summary, args)
    return table


def plot_monitor(plt, summary: List[Dict], args) -> Optional[str]:
    """``monitor.png``: what the collapse monitor saw per epoch (seed means): d_ap and d_an of the plain
    batch-hard row with the epochs it warned at, its active fraction and hard-negative ratio, and the
    hard-negative ratio of every batch-hard-family row. Returns the path, or None without such rows."""
    rows = [s for s in summary if s.get("monitor_curve") and not all(
        math.isnan(v) for v in s["monitor_curve"]["d_ap_mean"])]
    plain = next((s for s in rows if s["loss"] == "batch-hard triplet"), None)
    if plain is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    epochs = np.arange(1, len(plain["monitor_curve"]["d_ap_mean"]) + 1)
    c = plain["monitor_curve"]
    axes[0].plot(epochs, c["d_ap_mean"], "o-", label="d_ap (hardest positive)")
    axes[0].plot(epochs, c["d_an_mean"], "s--", label="d_an (hardest negative)")
    for e in sorted({e for e in plain["collapse_epochs"] if e is not None}):
        axes[0].axvline(e, color="red", alpha=0.4, lw=1)
    axes[0].set(title="plain batch-hard: selected distances\n(red: the monitor warned, per seed)", xlabel="epoch",
                ylabel="mean distance (Euclidean, unnormalised)")
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, c["active_fraction"], "o-", label="active fraction (terms > 0)")
    axes[1].plot(epochs, c["hard_negative_ratio"], "s--", label="hard-negative ratio (d_an < d_ap)")
    axes[1].set(title="plain batch-hard: terms", xlabel="epoch", ylim=(0, 1.05))
    axes[1].legend(fontsize=8)
    for s_ in rows:
        curve = s_["monitor_curve"]["hard_negative_ratio"]
        axes[2].plot(np.arange(1, len(curve) + 1), curve, "o-", label=s_["loss"])
    axes[2].set(title="hard-negative ratio, batch-hard family", xlabel="epoch", ylim=(0, 1.05))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, "monitor.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fonts", "digits"), default="fonts")
    ap.add_argument("--full", action="store_true", help="longer run: 5 seeds, 20 epochs, 8 fine-tuning epochs")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every loss trained from scratch (8)")
    ap.add_argument("--finetune-epochs", type=int, default=None, help="epochs of WARP fine-tuning the CE model (4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the glyph jitter and the class split")
    ap.add_argument("--out", default="examples/out")
    ap.add_argument("--width", type=int, default=8, help="channels of the first conv block (8)")
    ap.add_argument("--size", type=int, default=24, help="glyph image side in pixels (fonts; 24)")
    ap.add_argument("--renders", type=int, default=3, help="renders per glyph (fonts)")
    ap.add_argument("--max-fonts", type=int, default=None)
    ap.add_argument("--font-dir", action="append", default=[],
                    help="extra font directory (repeatable; changes the dataset and its fingerprint)")
    ap.add_argument("--losses", nargs="+", default=None, help="subset of losses, by name")
    ap.add_argument("--timing-repeats", type=int, default=20, help="repeats of the per-batch loss timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran 3-8x slower, waiting on each other)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    ap.add_argument("--isa", choices=sorted(cpu_isa.PINS), default=TABLE_ISA,
                    help="instruction set of torch, MKL, oneDNN and metricloss's native loops, pinned before torch "
                         f"loads ({TABLE_ISA}: the docs' table; native: the widest the CPU has). Only takes effect "
                         "when the script is run, not imported")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.full else 8
    if args.finetune_epochs is None:
        args.finetune_epochs = 8 if args.full else 4
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3, 4] if args.full else [0, 1, 2]
    known = {m.name for m in METHODS}
    if args.losses is not None and not set(args.losses) <= known:
        ap.error(f"--losses: unknown {sorted(set(args.losses) - known)}; choose from {sorted(known)}")
    return args


def check_isa(rep: Dict, args) -> Optional[str]:
    """A loud warning if this run's numerics do not run on the instruction set the docs' table was made on
    (the pin not in effect, or a CPU without AVX2); None if they do."""
    pinned = all(os.environ.get(k) == v for k, v in cpu_isa.PINS[TABLE_ISA].items())
    avx2 = rep["torch_cpu_capability"] == "AVX2" and rep["onednn_isa"] == "Intel AVX2"
    if args.isa == TABLE_ISA and pinned and avx2:
        return None
    bar = "!" * 100
    why = (f"--isa {args.isa}" if args.isa != TABLE_ISA else
           "the pin is not in effect (torch was imported before the script set it)" if not pinned else
           "this CPU does not run the AVX2 code paths")
    return (f"{bar}\nINSTRUCTION SET DIFFERS from the one the docs' table was made on ({TABLE_ISA} pinned): {why}.\n"
            f"  this run: {cpu_isa.summary(rep)}\n"
            f"  Convolutions and GEMMs round differently, so the metrics match the docs' table only up to the\n"
            f"  seed-to-seed spread: judge the verdicts on the spread, not on the third decimal.\n{bar}")


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = prepare_data(args)
    fp, vers = data["fingerprint"], datasets.versions()
    isa = cpu_isa.report()
    warning = "\n".join(w for w in (check_fingerprint(fp, args), check_isa(isa, args)) if w) or None
    describe = (f"{args.dataset}: {data['num_images']} images, {len(data['names'])} classes; training on "
                f"{data['num_classes']} classes ({len(data['y_train'])} images, {len(data['y_val'])} held out), "
                f"retrieval on {data['num_test_classes']} unseen classes ({len(data['y_test'])} images)\n"
                f"dataset fingerprint: sha256 {fp['sha256']}, {fp['classes']} classes, {fp['images']} images"
                + (f" (font set {datasets.FONT_SET_VERSION})" if args.dataset == "fonts" else "") + "\n"
                "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items())
                + f"; {os.cpu_count()} CPUs, {args.threads} threads\n"
                f"instruction set: {cpu_isa.summary(isa)}; {isa['mkl']}")
    print(describe, flush=True)
    if warning:
        print(warning, flush=True)
    selected = [m for m in METHODS if args.losses is None or m.name in args.losses]
    rows = []
    for seed in args.seeds:
        rows += run_seed(args, data, seed, selected)
    costs = {}
    for m in selected:
        costs[m.name] = {"pml_name": m.pml_name, **loss_cost(m, data["num_classes"], 0, args.timing_repeats)}
    summary = aggregate(rows, costs)
    claim_rows = claims(summary)
    wall = time.perf_counter() - start
    meta = {"describe": describe, "fingerprint": fp, "expected_fingerprint": EXPECTED_FINGERPRINT,
            "fingerprint_matches": check_fingerprint(fp, args) is None, "isa": isa, "isa_pin": args.isa,
            "isa_matches": check_isa(isa, args) is None, "warning": warning, "versions": vers, "wall_seconds": wall,
            "recipes": {m.name: m.recipe for m in selected}}
    table = write_outputs(rows, summary, claim_rows, meta, args)
    print("\n" + table + "\n")
    for c in claim_rows:
        print(f"- {c['claim']}: {c['verdict']} ({c['measured']})")
    if warning:
        print("\n" + warning)
    print(f"\ntotal wall time {wall:.0f} s; outputs in {args.out}/")
    if not all(math.isfinite(r[k]) for r in rows for k in ("mAP", "MAP@R", "R@1")):
        raise SystemExit("non-finite metric in the results")
    return rows


if __name__ == "__main__":
    main()
