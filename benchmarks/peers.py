#!/usr/bin/env python3
"""metricloss against the triplet losses users reach for today: time, peak extra memory, value agreement.

Peers (each optional; a peer that does not import is reported as "not installed" with the reason):

* ``pml``: pytorch-metric-learning ``losses.TripletMarginLoss(margin)`` with ``miners.BatchHardMiner()``
  (batch-hard), no miner (batch-all: all triplets) or ``miners.TripletMarginMiner(type_of_triplets="semihard")``
  (semi-hard). PML normalises the embeddings itself (``LpDistance(normalize_embeddings=True)``) and
  averages over the nonzero terms (``AvgNonZeroReducer``): metricloss ``reduction="mean_nonzero"``.
  PML's semi-hard miner keeps every triplet with d_ap < d_an <= d_ap + m: a different loss from the
  FaceNet / TF-Addons semi-hard loss (one negative per positive pair), so that row is timed only.
* ``oml``: open-metric-learning ``oml.losses.triplet.TripletLossWithMiner(margin, miner)`` with
  ``oml.miners.inbatch_hard_tri.HardTripletsMiner()`` or ``oml.miners.inbatch_all_tri.AllTripletsMiner()``.
  OML does not normalise (done here, inside the timed step) and takes the plain mean over the mined
  triplets (N for batch-hard, every valid triplet for batch-all): metricloss ``reduction="mean"``. OML has
  no semi-hard miner. ``oml.losses/__init__.py`` imports torchvision (for ArcFace's MLP) while the triplet
  loss does not use it; where torchvision is missing or broken (PyPI's Linux torchvision is a CUDA build
  that does not load next to a CPU torch) the triplet module is imported without running that
  ``__init__`` (:func:`import_oml`).
* ``st``: sentence-transformers ``losses.BatchHardTripletLoss`` / ``BatchAllTripletLoss`` /
  ``BatchSemiHardTripletLoss``, called through their ``batch_*_triplet_loss(labels, embeddings)`` methods
  on a loss built with ``model=None`` (no transformer), ``margin`` and the default
  ``BatchHardTripletLossDistanceFunction.euclidean_distance`` (not squared). ST does not normalise (done
  here). Reductions: batch-hard the mean over all anchors (``mean``), batch-all the sum over the number
  of terms > 1e-16 (``mean_nonzero``), semi-hard the mean over all (a, p) pairs (``mean``, TF-Addons
  semantics as metricloss).
* ``metricloss``: ``metricloss.TripletLoss(margin, mining, reduction=..., backend=--ml-backend)``
  (default backend ``auto``: the native CPU epilogue where it builds).

Inputs: (N, D) standard-normal fp32 embeddings, N/4 shuffled classes of 4 (P×K, K=4; the inputs of
:mod:`benchmarks.memory_triplet`), euclidean distance on L2-normalised embeddings, margin 0.2. A step is
one forward + backward w.r.t. the embeddings, normalisation included.

Each (library, mining, N) runs in its own subprocess (:func:`benchmarks.harness.measure`): the median of
``--repeats`` steps after one warm-up step, and the peak RSS above the RSS after the inputs are built
("peak extra", MiB). A step over ``--step-timeout`` seconds (default 60) or a process over
``--mem-limit-gb`` (address space) is reported as such.

Value agreement: in another subprocess per (peer, mining, N), the peer and metricloss (configured to
the same function) on the same input: the relative difference of the loss values, and the largest
gradient difference relative to the largest gradient entry.

``--ties``: a small check on inputs with exact ties (duplicated embeddings, tied distances): every
library against metricloss's dense fp64 reference (``metricloss.reference``) with the same settings.

Usage:
    python benchmarks/peers.py --threads 2                        # N in {256, 1024, 4096}, all peers
    python benchmarks/peers.py --sizes 256 --repeats 2 --peers st --out /tmp/peers.md
    python benchmarks/peers.py --ties
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import types
from typing import Callable, Dict, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure  # noqa: E402
from benchmarks.memory_triplet import make_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "benchmarks.peers:case"
MARGIN = 0.2
D = 128
MININGS = ("batch_hard", "batch_all", "semi_hard")
PEERS = ("pml", "oml", "st")
LIBRARIES = ("metricloss",) + PEERS
NAMES = {"metricloss": "metricloss", "pml": "PML", "oml": "OML", "st": "sentence-transformers"}
DISTRIBUTIONS = {"metricloss": "metricloss", "pml": "pytorch-metric-learning", "oml": "open-metric-learning",
                 "st": "sentence-transformers"}

# metricloss reduction that makes each peer's loss the same function, or None: the peer defines another loss
MATCH: Dict[Tuple[str, str], Optional[str]] = {
    ("pml", "batch_hard"): "mean_nonzero", ("pml", "batch_all"): "mean_nonzero", ("pml", "semi_hard"): None,
    ("oml", "batch_hard"): "mean", ("oml", "batch_all"): "mean",
    ("st", "batch_hard"): "mean", ("st", "batch_all"): "mean_nonzero", ("st", "semi_hard"): "mean",
}
# (the OML semi-hard entry is absent: OML has no semi-hard miner)
NOTES = {
    ("pml", "semi_hard"): "PML semihard miner: all triplets with d_ap < d_an <= d_ap + m (another loss; timed only)",
    ("st", "semi_hard"): "metricloss fp32 counts d_an within tie_rtol (4e-3 relative at D=128) of d_ap as tied, "
                         "not farther; ST uses strict >",
    ("oml", "batch_all"): "all triplets as Python int lists, then three (T, D) gathers",
}


def import_oml():
    """``(TripletLossWithMiner, HardTripletsMiner, AllTripletsMiner)`` from the installed OML.

    ``oml/losses/__init__.py`` imports ``torchvision.ops.MLP`` (ArcFace); the triplet module does not need
    torchvision. If torchvision does not import, ``oml.losses`` is registered as a bare package so that
    ``oml.losses.triplet`` loads without that ``__init__``; the triplet code is OML's own, unchanged.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a CUDA build next to a CPU torch (RuntimeError / OSError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if "oml.losses" not in sys.modules:
            import oml

            pkg = types.ModuleType("oml.losses")
            pkg.__path__ = [os.path.join(os.path.dirname(oml.__file__), "losses")]
            sys.modules["oml.losses"] = pkg
    from oml.losses.triplet import TripletLossWithMiner
    from oml.miners.inbatch_all_tri import AllTripletsMiner
    from oml.miners.inbatch_hard_tri import HardTripletsMiner

    return TripletLossWithMiner, HardTripletsMiner, AllTripletsMiner


def _st_losses():
    """sentence-transformers' losses module (``sentence_transformer.losses`` from 6.x, ``losses`` before)."""
    try:
        return importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:
        return importlib.import_module("sentence_transformers.losses")


def peer_status(lib: str) -> Optional[str]:
    """None if ``lib`` imports here, else the reason (one line)."""
    try:
        if lib == "metricloss":
            import metricloss  # noqa: F401
        elif lib == "pml":
            from pytorch_metric_learning import losses, miners  # noqa: F401
        elif lib == "oml":
            import_oml()
        elif lib == "st":
            _st_losses()
        else:
            raise ValueError(lib)
    except Exception as e:  # ImportError, or a broken dependency raising something else
        return f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    return None


def version(lib: str) -> str:
    try:
        from importlib.metadata import version as v

        return v(DISTRIBUTIONS[lib])
    except Exception:
        return "?"


def supported(lib: str, mining: str) -> bool:
    return lib == "metricloss" or (lib, mining) in MATCH


def build_loss(lib: str, mining: str, reduction: str = "mean", ml_backend: str = "auto",
               margin: float = MARGIN) -> Callable:
    """A callable ``(embeddings, labels) -> loss`` (normalisation included) for one configuration.

    ``reduction`` and ``ml_backend`` are metricloss's; the peers use their own fixed reductions (:data:`MATCH`).
    """
    import torch.nn.functional as F

    if mining not in MININGS:
        raise ValueError(mining)
    if lib == "metricloss":
        import metricloss as ml

        return ml.TripletLoss(margin=margin, mining=mining, reduction=reduction, backend=ml_backend)
    if not supported(lib, mining):
        raise ValueError(f"{lib} has no {mining}")
    if lib == "pml":
        from pytorch_metric_learning import losses, miners

        loss_fn = losses.TripletMarginLoss(margin=margin)  # LpDistance(normalize_embeddings=True), AvgNonZero
        if mining == "batch_all":
            return lambda e, y: loss_fn(e, y)
        miner = (miners.BatchHardMiner() if mining == "batch_hard"
                 else miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"))
        return lambda e, y: loss_fn(e, y, miner(e, y))
    if lib == "oml":
        TripletLossWithMiner, HardTripletsMiner, AllTripletsMiner = import_oml()
        miner = HardTripletsMiner() if mining == "batch_hard" else AllTripletsMiner()
        loss_fn = TripletLossWithMiner(margin=margin, miner=miner, reduction="mean")
        return lambda e, y: loss_fn(F.normalize(e, dim=1), y)
    if lib == "st":
        losses = _st_losses()
        cls = {"batch_hard": losses.BatchHardTripletLoss, "batch_all": losses.BatchAllTripletLoss,
               "semi_hard": losses.BatchSemiHardTripletLoss}[mining]
        obj = cls(model=None, margin=margin)  # default distance: euclidean_distance (not squared)
        method = getattr(obj, f"{'batch_semi_hard' if mining == 'semi_hard' else mining}_triplet_loss")
        return lambda e, y: method(y, F.normalize(e, dim=1))
    raise ValueError(lib)


def case(lib: str, mining: str, n: int, d: int = D, reduction: str = "mean", ml_backend: str = "auto",
         step_timeout: float = 60.0):
    """Harness case: one forward + backward; a step over ``step_timeout`` seconds (0: no limit) raises
    TimeoutError."""
    emb0, labels = make_inputs(n, d)
    fn = build_loss(lib, mining, reduction, ml_backend)

    def step():
        t0 = time.perf_counter()
        emb = emb0.clone().requires_grad_()
        fn(emb, labels).backward()
        took = time.perf_counter() - t0
        if 0 < step_timeout < took:
            raise TimeoutError(f"step took {took:.0f} s > {step_timeout:g} s")

    return step


def agreement(lib: str, mining: str, n: int, d: int = D, ml_backend: str = "auto", threads: int = 2) -> dict:
    """Peer vs metricloss (matched reduction) on the same input: loss values and gradients (runs here)."""
    import torch

    torch.set_num_threads(threads)
    reduction = MATCH[(lib, mining)]
    emb0, labels = make_inputs(n, d, seed=1)
    out = {}
    fns = (("peer", build_loss(lib, mining)), ("ml", build_loss("metricloss", mining, reduction, ml_backend)))
    for name, fn in fns:
        emb = emb0.clone().requires_grad_()
        loss = fn(emb, labels)
        loss.backward()
        out[name] = (float(loss.detach()), emb.grad)
    (vp, gp), (vm, gm) = out["peer"], out["ml"]
    # fp64 value of the same function: metricloss's chunked path in fp64 (tie band 7e-12 at D=128)
    v64 = float(build_loss("metricloss", mining, reduction, ml_backend)(emb0.double(), labels).detach())
    return {"lib": lib, "mining": mining, "n": n, "peer_value": vp, "ml_value": vm, "fp64_value": v64,
            "reduction": reduction, "value_rel": abs(vp - vm) / max(abs(vm), 1e-30),
            "peer_fp64_rel": abs(vp - v64) / max(abs(v64), 1e-30), "ml_fp64_rel": abs(vm - v64) / max(abs(v64), 1e-30),
            "grad_rel": float((gp - gm).abs().max() / gm.abs().max().clamp_min(1e-30)),
            "grad_finite": bool(torch.isfinite(gp).all())}


def probe(libs, ml_backend: str = "auto") -> dict:
    """Which libraries import, their versions, torch's; builds (or loads) metricloss's native CPU extension
    once, so that no timed process pays for the build. Run in a subprocess (:func:`run_probe`)."""
    import torch

    status = {lib: peer_status(lib) for lib in libs}
    if status.get("metricloss") is None:
        emb, labels = make_inputs(64, 8)
        for mining in ("batch_all", "semi_hard"):
            build_loss("metricloss", mining, "mean", ml_backend)(emb, labels)
    return {"status": status, "versions": {lib: version(lib) for lib in libs}, "torch": torch.__version__}


def _child(code: str, args_list, timeout: float, mem_limit_gb: Optional[float] = None) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter; ``{"error": ...}`` on failure.

    The parent stays small (no torch, no peer imported here): a child's ``ru_maxrss`` starts at the
    high-water RSS of the process it was spawned from, so a large parent would inflate every peak."""
    if mem_limit_gb is not None:
        code = ("import resource; lim = int(%r * 2**30); resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
                % float(mem_limit_gb)) + code
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, "-c", code] + [str(a) for a in args_list], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:g} s"}
    if p.returncode != 0:
        if "can't allocate memory" in p.stderr or "MemoryError" in p.stderr:
            return {"error": f"out of memory (> {mem_limit_gb:g} GB)"}
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:150]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_probe(libs, ml_backend: str) -> dict:
    res = _child("import json, sys; from benchmarks.peers import probe; "
                 "print(json.dumps(probe(sys.argv[2].split(','), sys.argv[1])))", [ml_backend, ",".join(libs)], 900)
    if "error" in res:
        raise RuntimeError(f"probe failed: {res['error']}")
    return res


def run_agreement(lib: str, mining: str, n: int, args) -> dict:
    """:func:`agreement` in a subprocess (with the same address-space limit and a timeout)."""
    code = ("import json, sys; from benchmarks.peers import agreement; "
            "print(json.dumps(agreement(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], "
            "int(sys.argv[6]))))")
    return _child(code, [lib, mining, n, args.dim, args.ml_backend, args.threads], 6 * args.step_timeout + 60,
                  args.mem_limit_gb)


def short_error(err: str) -> str:
    if "TimeoutError" in err or err.startswith("timeout"):
        return "timeout (> 60 s / step)" if "60" in err or err.startswith("timeout") else err
    if "out of memory" in err:
        return err
    return f"error: {err}"


def bench(args) -> Tuple[list, str]:
    """Run the grid; return the raw rows and the markdown. This process imports neither torch nor a peer."""
    libs = ["metricloss"] + [p for p in args.peers if p != "metricloss"]
    info = run_probe(libs, args.ml_backend)
    status = info["status"]
    rows = []
    for n in args.sizes:
        for mining in args.minings:
            for lib in libs:
                row = {"lib": lib, "mining": mining, "n": n}
                if status[lib] is not None:
                    row["error"] = f"not installed ({status[lib]})"
                elif not supported(lib, mining):
                    row["error"] = "n/a"
                else:
                    params = {"lib": lib, "mining": mining, "n": n, "d": args.dim, "ml_backend": args.ml_backend,
                              "step_timeout": args.step_timeout}
                    res = measure(CASE, params, warmup_params=dict(params, n=64, step_timeout=0),
                                  repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                  mem_limit_gb=args.mem_limit_gb,
                                  timeout=int(args.step_timeout * (args.repeats + args.warmup + 1) + 120))
                    row.update({k: res[k] for k in ("median_s", "min_s", "peak_extra_mib", "error") if k in res})
                    if lib != "metricloss" and MATCH.get((lib, mining)) and "error" not in res:
                        row["agree"] = run_agreement(lib, mining, n, args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    cmd = "python benchmarks/peers.py " + " ".join(sys.argv[1:])
    lines = [f"Command: `{cmd}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {info['torch']}, "
             f"{args.threads} thread(s); fp32, D={args.dim}, K=4 samples per class, margin {MARGIN}, euclidean on "
             f"L2-normalised embeddings; forward + backward, median of {args.repeats} after {args.warmup} warm-up "
             f"step(s); peak extra = peak RSS above the RSS with the inputs built, one process per cell; "
             f"metricloss backend `{args.ml_backend}`.", "",
             "Versions: " + ", ".join(f"{NAMES[lib]} {info['versions'][lib]}" if status[lib] is None
                                      else f"{NAMES[lib]}: not installed ({status[lib]})" for lib in libs), "",
             "Loss / grad rel. diff: the peer against metricloss configured as the same function (the reduction "
             "column), same fp32 input; grad: max |g_peer − g_ml| / max |g_ml|. vs fp64: each fp32 loss against "
             "metricloss's chunked path run in fp64 on the same input.", "",
             "| mining | N | library | time (ms) | × metricloss time | peak extra (MiB) | × metricloss memory "
             "| loss rel. diff | grad rel. diff | peer vs fp64 | metricloss vs fp64 | metricloss reduction | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["lib"], r["mining"], r["n"]): r for r in rows}
    for mining in args.minings:
        for n in args.sizes:
            ours = by[("metricloss", mining, n)]
            for lib in libs:
                r = by[(lib, mining, n)]
                if r.get("error") == "n/a":
                    continue
                peer = lib != "metricloss"
                t = f"{1e3 * r['median_s']:.1f}" if "median_s" in r else short_error(r["error"])
                both = peer and "median_s" in r and "median_s" in ours
                tr = f"{r['median_s'] / ours['median_s']:.1f}×" if both else ""
                mem = f"{max(r['peak_extra_mib'], 0.0):.0f}" if "peak_extra_mib" in r else "–"  # RSS can shrink
                mr = (f"{r['peak_extra_mib'] / max(ours['peak_extra_mib'], 1.0):.1f}×"
                      if peer and "peak_extra_mib" in r and "peak_extra_mib" in ours else "")
                a = r.get("agree")
                red = MATCH.get((lib, mining))
                cells = ["", "", "", ""]
                if peer and a is not None and "error" in a:
                    cells = [short_error(a["error"]), "", "", ""]
                elif peer and a is not None:
                    grad = f"{a['grad_rel']:.1e}" + ("" if a["grad_finite"] else " (NaN/Inf)")
                    cells = [f"{a['value_rel']:.1e}", grad,
                             f"{a['peer_fp64_rel']:.1e}", f"{a['ml_fp64_rel']:.1e}"]
                elif peer and "median_s" in r:
                    cells = ["– (another loss)" if red is None else "–", "", "", ""]
                redc = f"`{red}`" if peer and red else ""
                lines.append(f"| {mining} | {n} | {NAMES[lib]} | {t} | {tr} | {mem} | {mr} | " + " | ".join(cells)
                             + f" | {redc} | {NOTES.get((lib, mining), '') if peer else ''} |")
    unsupported = [f"{NAMES[p]} has no {m}" for p in libs for m in args.minings
                   if status[p] is None and not supported(p, m)]
    if unsupported:
        lines += ["", "Not run: " + "; ".join(unsupported) + "."]
    return rows, "\n".join(lines) + "\n"


def tie_inputs(kind: str, seed: int = 0):
    """Small P×K inputs with exact ties: ``onehot`` (one-hot rows from 6 axes: every distance is exactly 0
    or √2, duplicates across and within classes) or ``dup`` (4 random rows repeated: duplicates inside
    each class and negatives identical to the anchor, other distances generic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, d = 64, 16
    labels = torch.arange(n // 4).repeat_interleave(4)
    if kind == "onehot":
        emb = torch.eye(d)[torch.randint(0, 6, (n,), generator=g)]
    else:
        base = torch.randn(8, d, generator=g)
        emb = base[torch.randint(0, 8, (n,), generator=g)]
    return emb, labels


def ties(args) -> str:
    """Every library vs metricloss's dense fp64 reference on tied inputs (values and gradient finiteness)."""
    import torch

    from metricloss import reference

    torch.set_num_threads(args.threads)
    libs = ["metricloss"] + [p for p in args.peers if p != "metricloss" and peer_status(p) is None]
    lines = ["| input | mining | library | reduction | loss | fp64 reference | rel. diff | grad finite |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("onehot", "dup"):
        emb0, labels = tie_inputs(kind)
        for mining in args.minings:
            for lib in libs:
                reductions = ([MATCH[(p, mining)] for p in PEERS if MATCH.get((p, mining))] if lib == "metricloss"
                              else [MATCH.get((lib, mining))])
                for red in dict.fromkeys(reductions):
                    if red is None:
                        continue
                    ref = float(reference.triplet_loss(emb0.double(), labels, margin=MARGIN, mining=mining,
                                                       reduction=red))
                    emb = emb0.clone().requires_grad_()
                    fn = build_loss(lib, mining, red, args.ml_backend)
                    loss = fn(emb, labels)
                    loss.backward()
                    v = float(loss.detach())
                    rel = abs(v - ref) / max(abs(ref), 1e-30)
                    fin = bool(torch.isfinite(emb.grad).all())
                    lines.append(f"| {kind} | {mining} | {NAMES[lib]} | `{red}` | {v:.6f} | {ref:.6f} | {rel:.1e} | "
                                 f"{'yes' if fin else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes N (multiples of 4)")
    ap.add_argument("--dim", type=int, default=D, help="embedding dimension D (default 128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per cell (median reported; default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed full-size steps before them (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess (default 2)")
    ap.add_argument("--minings", nargs="+", default=list(MININGS), choices=MININGS)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, help="peers to run besides metricloss")
    ap.add_argument("--ml-backend", default="auto", choices=["auto", "torch"], help="metricloss backend")
    ap.add_argument("--step-timeout", type=float, default=60.0, help="seconds one step may take (default 60)")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="address-space limit per subprocess, GB (default 16)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    ap.add_argument("--json-out", default=None, help="raw rows as JSON")
    ap.add_argument("--ties", action="store_true", help="only the tied-input check (N=64, in this process)")
    args = ap.parse_args(argv)
    if any(n % 4 for n in args.sizes):
        ap.error("--sizes must be multiples of 4 (K=4 samples per class)")
    if args.ties:
        md = ties(args)
        rows = None
    else:
        rows, md = bench(args)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json_out and rows is not None:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
