"""The adversarial review's figures, re-measured: exact ties, cancellation, huge magnitudes, off-centre and
tied retrieval inputs, on the native path, the torch path and the fp64 dense reference.

    python benchmarks/review_figures.py [--skip-slow]

Each line gives the case, then native / torch / reference. Ties and cancellation (batch-all, margin 0):
the number of nonzero hinge terms and the loss summed over anchors; fp32 inputs are compared with the
reference in fp64 on the same values. Retrieval: mAP of embeddings scaled to huge finite magnitudes (must
stay in [0, 1]), the number of queries whose nearest neighbour differs from the exact one on off-centre
2-D points, and the time of ``retrieval_metrics`` on 10000 × 2 tied (all-zero) embeddings against random
ones of the same shape (``--skip-slow`` leaves that out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metricloss.functional as MF  # noqa: E402
from metricloss import reference  # noqa: E402
from metricloss.metrics import retrieval_metrics  # noqa: E402
from tests.losses.test_triplet_ties import make_case  # noqa: E402


@contextmanager
def path(setting: str):
    saved = os.environ.get("METRICLOSS_NATIVE")
    os.environ["METRICLOSS_NATIVE"] = setting
    try:
        yield
    finally:
        if saved is None:
            del os.environ["METRICLOSS_NATIVE"]
        else:
            os.environ["METRICLOSS_NATIVE"] = saved


def triplet_case(label: str, args, mining: str = "batch_all", **opts) -> None:
    x, y = make_case(*args)
    out = []
    for setting in ("1", "0"):
        with path(setting):
            xx = x.clone().requires_grad_()
            t = MF.triplet_loss_terms(xx, y, mining=mining, **opts)
            total = t.per_anchor.sum()
            total.backward()
            out.append((int(t.num_nonzero), float(total), xx.grad.double()))
    xr = x.double().requires_grad_()
    t = reference.triplet_loss_terms(xr, y, mining=mining, tie_dtype=x.dtype, **opts)
    total = t.per_anchor.sum()
    total.backward()
    ref = (int(t.num_nonzero), float(total), xr.grad)
    rel = [abs(o[1] - ref[1]) / max(abs(ref[1]), 1e-300) for o in out]
    grad = [float((o[2] - ref[2]).norm() / ref[2].norm().clamp_min(1e-300)) for o in out]
    print(f"{label}: nonzero {out[0][0]} / {out[1][0]} / {ref[0]}; loss sum {out[0][1]:.7g} / {out[1][1]:.7g} / "
          f"{ref[1]:.7g} (relative error {rel[0]:.1e} / {rel[1]:.1e}); gradient relative error "
          f"{grad[0]:.1e} / {grad[1]:.1e}", flush=True)


def huge_magnitudes() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype, scale in ((torch.float32, 3e19), (torch.float32, 1e20), (torch.float64, 1e30)):
        x = torch.randn(300, 16, generator=g, dtype=torch.float64).mul_(scale).to(dtype)
        y = torch.randint(0, 10, (300,), generator=g)
        vals = []
        for setting in ("1", "0"):
            with path(setting):
                vals.append(retrieval_metrics(x, y, metric="euclidean")["mAP"])
        ref = reference.retrieval_metrics(x.double(), y, metric="euclidean")["mAP"]
        print(f"retrieval euclidean, {str(dtype)[6:]} x {scale:.0e}: mAP {vals[0]:.4f} / {vals[1]:.4f} / {ref:.4f}",
              flush=True)


def off_centre() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2000, 2, generator=g)
    y = torch.randint(0, 50, (2000,), generator=g)
    for offset in (0.0, 10.0, 100.0, 1000.0):
        x = base + offset
        exact = torch.cdist(x.double(), x.double())
        exact.fill_diagonal_(float("inf"))
        want_nn = exact.argmin(1)
        ref = reference.retrieval_metrics(x.double(), y, metric="euclidean")["R@1"]
        parts = []
        for setting in ("1", "0"):
            with path(setting):
                r1 = retrieval_metrics(x, y, metric="euclidean", ks=1)["R@1"]
            parts.append(r1)
        # R@1 counts a query as a hit by its nearest neighbour's label: equal R@1 and equal per-query hits
        wrong = int((y[want_nn] == y).sum()) - round(parts[1] * 2000)
        print(f"retrieval euclidean, offset {offset:g}: R@1 {parts[0]:.4f} / {parts[1]:.4f} / {ref:.4f} "
              f"(hits off the exact nearest neighbour's: {wrong})", flush=True)


def tied_speed() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 100, (10000,), generator=g)
    for metric in ("euclidean", "cosine"):
        times = {}
        for name, x in (("tied (zeros)", torch.zeros(10000, 2)), ("random", torch.randn(10000, 2, generator=g))):
            start = time.perf_counter()
            retrieval_metrics(x, y, metric=metric)
            times[name] = time.perf_counter() - start
        print(f"retrieval {metric}, 10000 x 2: tied {times['tied (zeros)']:.2f} s, random {times['random']:.2f} s",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-slow", action="store_true", help="leave out the 10000 x 2 timing")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("native / torch / reference (fp64)")
    # 1. exact ties in the self-pair op (batch-all over the batch, margin 0)
    triplet_case("1. fp32 cross-class duplicates, N=64, 8 per class", ("dups", 64, 8, 32, torch.float32),
                 margin=0.0, normalize=False)
    triplet_case("1. fp64 three zero rows, N=64, 8 per class, normalised", ("zeros", 64, 8, 32, torch.float64),
                 margin=0.0, normalize=True)
    triplet_case("1. fp64 zero rows, N=223, 8 per class, normalised", ("zeros", 223, 8, 32, torch.float64, 3),
                 margin=0.0, normalize=True)
    # 2. cancellation: near-equidistant simplices
    triplet_case("2. fp32 simplex I + 1e-6 noise, N=512", ("simplex", 512, 8, 512, torch.float32, 0, 1e-6),
                 margin=0.0, normalize=False)
    triplet_case("2. fp32 simplex I + 1e-5 noise, N=256", ("simplex", 256, 8, 256, torch.float32, 0, 1e-5),
                 margin=0.0, normalize=False)
    # 5. the chunked path (14 per class: not the self-pair op), hard and soft margins
    triplet_case("5. fp64 zero rows, 14 per class, normalised", ("zeros", 56, 14, 32, torch.float64),
                 margin=0.0, normalize=True)
    triplet_case("5. fp32 zero rows, 14 per class", ("zeros", 70, 14, 32, torch.float32, 2), margin=0.0,
                 normalize=False)
    triplet_case("5. fp64 zero rows, soft margin, normalised", ("zeros", 64, 8, 32, torch.float64),
                 margin="soft", normalize=True)
    triplet_case("5. fp32 far rows, soft margin", ("far", 64, 8, 32, torch.float32, 0, 0.0, 30.0), margin="soft",
                 normalize=False)
    triplet_case("16. fp32 semi-hard, cross-class duplicates", ("dups", 64, 8, 32, torch.float32),
                 mining="semi_hard", margin=0.2, normalize=True)
    huge_magnitudes()   # 3.
    off_centre()        # 13.
    if not args.skip_slow:
        tied_speed()    # 14.


if __name__ == "__main__":
    main()
