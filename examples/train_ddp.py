#!/usr/bin/env python3
"""Train the main job's network with a triplet loss mined across ranks (DDP on CPU, gloo).

The network (``SmallCNN``) and the data (font identification, or sklearn's digits) are those of
``examples/compare_losses.py``. Each rank draws its own P×K batches from one shared epoch
(:class:`metricloss.PKSampler` with the process group's rank), and the loss is
:class:`metricloss.distributed.DistributedLoss`: every rank's anchors are mined against the global
batch (all ranks' embeddings, gathered with gradients), and the per-rank loss is scaled so that DDP's
gradient averaging yields exactly the gradient of the same loss on the concatenated global batch.
The printed loss is that global loss (identical on every rank). After training, rank 0 reports
retrieval on the unseen classes (mAP, MAP@R, R@1), next to the untrained network's.

Usage:
    torchrun --nproc_per_node 2 examples/train_ddp.py                                  # fonts, 2 ranks
    torchrun --nproc_per_node 2 examples/train_ddp.py --dataset digits --epochs 1       # a few seconds
    python examples/train_ddp.py --dataset digits                                      # one process

BatchNorm statistics stay per rank (as with plain DDP); the loss, not the normalisation, is global.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare_losses  # noqa: E402  (the main job: its network, data preparation and embedding)

import metricloss as ml  # noqa: E402
from metricloss.distributed import DistributedLoss  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("fonts", "digits"), default="fonts")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--p", type=int, default=8, help="classes per rank's batch")
    ap.add_argument("--k", type=int, default=4, help="samples per class in a batch")
    ap.add_argument("--mining", choices=("batch_hard", "batch_all", "semi_hard"), default="batch_hard")
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    ap.add_argument("--renders", type=int, default=2, help="jittered renders per glyph (fonts)")
    ap.add_argument("--size", type=int, default=32, help="glyph image side in pixels (fonts; 32)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the glyph jitter and the class split")
    ap.add_argument("--max-fonts", type=int, default=24)
    ap.add_argument("--font-dir", action="append", default=[], help="extra font directory (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return ap.parse_args(argv)


def metrics_line(name: str, out: dict) -> str:
    return f"{name}: mAP {out['mAP']:.4f}  MAP@R {out['MAP@R']:.4f}  R@1 {out['R@1']:.4f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    launched = "WORLD_SIZE" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    if launched:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    lead = rank == 0

    data = compare_losses.prepare_data(args)
    x, y = data["x_train"], data["y_train"]
    if lead:
        print(f"{args.dataset}: {world} rank(s), training on {data['num_classes']} classes ({len(y)} images), "
              f"retrieval on {data['num_test_classes']} unseen classes ({len(data['y_test'])} images)", flush=True)

    torch.manual_seed(args.seed)  # the same initialisation on every rank (DDP also broadcasts rank 0's)
    model = compare_losses.SmallCNN(width=args.width)
    untrained = retrieval_metrics(compare_losses.embed(model, data["x_test"]), data["y_test"], ks=(1,))
    net = DistributedDataParallel(model) if launched else model
    criterion = DistributedLoss(ml.TripletLoss(margin=args.margin, mining=args.mining, reduction="mean_nonzero"))
    sampler = ml.PKSampler(y, min(args.p, data["num_classes"]), args.k, seed=args.seed)  # rank from the group
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        net.train()
        total, steps = torch.zeros((), dtype=torch.float64), 0
        for idx in sampler:
            idx = torch.tensor(idx)
            loss = criterion(net(x[idx]), y[idx])  # the global batch's loss, on every rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        if lead:
            print(f"epoch {epoch + 1}/{args.epochs}: {steps} steps of {world} x {sampler.p * sampler.k} images, "
                  f"mean global loss {float(total) / max(steps, 1):.4f}", flush=True)
    elapsed = time.perf_counter() - start

    result = {}
    if lead:
        trained = retrieval_metrics(compare_losses.embed(model, data["x_test"]), data["y_test"], ks=(1,))
        print(metrics_line("untrained", untrained))
        print(metrics_line(f"trained ({args.mining}, {world} rank(s), {elapsed:.1f} s)", trained), flush=True)
        result = {"untrained": untrained, "trained": trained, "world_size": world, "seconds": elapsed}
    if launched:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
