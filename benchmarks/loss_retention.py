"""Memory a kept loss tensor holds after backward: RSS growth over steps, ``losses.append(loss)`` vs
``losses.append(loss.detach())`` (issue 18.11).

    python benchmarks/loss_retention.py [--steps 12] [--n 4096] [--d 128] [--c 1000] [--only dgcrl ...]

Each (loss, mode) runs in its own subprocess: build the inputs, run one warm-up step, read the resident
set size (``/proc/self/statm``, after ``malloc_trim(0)`` so freed heap pages do not count), run ``--steps`` forward+backward steps keeping either the loss tensor or
its detached copy in a list, and read the RSS again. The printed growth is the difference, in MiB, and
the last column the ratio kept / detached (the acceptance is <= 2). fp32 CPU, labels uniform over the
classes. A kept loss holds its autograd graph; the custom Functions save what backward needs with
``save_for_backward``, which backward releases, so only small per-call objects remain.

Losses: ``dgcrl`` (``CentralizedRankingLoss``, penalty since D < C, ``class_chunk`` 512),
``norm_softmax`` (streamed, ``class_chunk`` 512), ``warp_exact`` ((N, C) scores), ``centroid`` (k-means
centroids, tensor path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LOSSES = ("dgcrl", "norm_softmax", "warp_exact", "centroid")


def _rss_mib() -> float:
    # give freed heap pages back first (glibc keeps them otherwise), so RSS counts what is still held
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _step_fn(loss: str, n: int, d: int, c: int):
    import torch

    import metricloss as ml

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    if loss == "warp_exact":
        scores = torch.randn(n, c, generator=g, requires_grad=True)
        module = ml.WARPLoss(mode="exact")
        return lambda: module(scores, labels)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    if loss == "dgcrl":
        module = ml.CentralizedRankingLoss(d, c, class_chunk=512)
    elif loss == "norm_softmax":
        module = ml.NormSoftmaxLoss(d, c, class_chunk=512)
    else:
        module = ml.CentroidTripletLoss(c, d, centroids="kmeans")
    return lambda: module(x, labels)


def _child(loss: str, mode: str, steps: int, n: int, d: int, c: int) -> None:
    import torch

    torch.set_num_threads(2)
    step = _step_fn(loss, n, d, c)
    kept = []
    out = step()
    out.backward()
    kept.append(out if mode == "kept" else out.detach())
    before = _rss_mib()
    for _ in range(steps):
        out = step()
        out.backward()
        kept.append(out if mode == "kept" else out.detach())
    del out
    print(json.dumps({"growth_mib": _rss_mib() - before}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--c", type=int, default=1000)
    parser.add_argument("--only", nargs="*", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--child", nargs=2, metavar=("LOSS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.steps, args.n, args.d, args.c)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"RSS growth over {args.steps} kept steps, N={args.n}, D={args.d}, C={args.c} (MiB)")
    print(f"{'loss':<14}{'kept':>10}{'detached':>10}{'ratio':>8}")
    for loss in args.only:
        growth = {}
        for mode in ("kept", "detached"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", loss, mode, "--steps", str(args.steps),
                   "--n", str(args.n), "--d", str(args.d), "--c", str(args.c)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            growth[mode] = json.loads(res.stdout.strip().splitlines()[-1])["growth_mib"]
        ratio = growth["kept"] / growth["detached"] if growth["detached"] > 0 else float("nan")
        print(f"{loss:<14}{growth['kept']:>10.1f}{growth['detached']:>10.1f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
