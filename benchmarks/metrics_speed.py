#!/usr/bin/env python3
"""Retrieval metrics side by side: metricloss (full mAP), PML + faiss, and the bare GEMM + row-max floor.

Every method runs in its own subprocess (:mod:`benchmarks.harness`: 2 threads, peak RSS above the RSS once
the embeddings exist), one after the other in one run, on the same data: N × D fp32 embeddings, N/50
classes of 50 shuffled samples around random centres (overlapping clusters), leave-one-out, cosine.

Methods:

* ``metricloss``: :func:`metricloss.retrieval_metrics` with its defaults: R@1/2/4/8, full-ranking mAP,
  MAP@R, R-precision; each similarity tile ranked by the native CPU kernel (``csrc/retrieval_rank.cpp``,
  built before the timed run). The JSON row's ``values["native"]`` is 1 when it served.
* ``metricloss_torch``: the same with ``METRICLOSS_NATIVE=0``: the torch fallback (candidate list,
  ``searchsorted``, ``index_add_``).
* ``floor``: the bare cost of looking at every pair once: normalise, then ``z[s:e] @ z.T`` in chunks of
  :func:`metricloss.metrics.similarity_tile_rows` rows (the tile metricloss uses, about 128 MiB of
  similarities, into one reused buffer) and a row max. No metric comes out of it.
* ``pml_faiss_maxbin``: pytorch-metric-learning's ``AccuracyCalculator`` with its default faiss k-NN on the
  normalised embeddings (L2 order = cosine order), ``k="max_bin_count"``: precision@1, R-precision,
  MAP@R (no full mAP: only the top 49 neighbours are retrieved).
* ``pml_faiss_all``: the same with ``k=None`` (every reference retrieved) and ``mean_average_precision``:
  full mAP. It holds an N × N distance and index array (12·N² bytes), so it runs only where that fits
  the memory limit, and is reported as skipped elsewhere.

PML and faiss are optional: without them their rows say so. The values of each method are printed
beside its time, so that agreement can be read off the same table.

Usage:
    python benchmarks/metrics_speed.py                         # N = 10k and 50k, D = 512
    python benchmarks/metrics_speed.py --sizes 2000 --dim 64   # other sizes
    python benchmarks/metrics_speed.py --sizes 200000 --methods metricloss   # metricloss alone
    python benchmarks/metrics_speed.py --threads 1                           # one thread per method
    python benchmarks/metrics_speed.py --sizes 1000000 --dim 128 --methods metricloss --threads 1 \
        --progress-log /tmp/metrics-1m.progress                              # long: watch the tqdm bar there
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import measure  # noqa: E402

SAMPLES_PER_CLASS = 50
METHODS = ("floor", "metricloss", "metricloss_torch", "pml_faiss_maxbin", "pml_faiss_all")
NEEDS = {"pml_faiss_maxbin": ("pytorch_metric_learning", "faiss"), "pml_faiss_all": ("pytorch_metric_learning", "faiss")}


def make_data(n: int, d: int, seed: int = 0):
    """(n, d) fp32 embeddings and (n,) int64 labels: n/50 classes of 50, shuffled, overlapping clusters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_classes = max(n // SAMPLES_PER_CLASS, 1)
    labels = (torch.arange(n, dtype=torch.int64) % n_classes)[torch.randperm(n, generator=g)]
    emb = torch.randn(n_classes, d, generator=g)[labels]
    emb.add_(torch.randn(n, d, generator=g), alpha=2.0)
    return emb, labels


def case(method: str, n: int, d: int = 512, out: str = "", threads: int = 2, progress_log: str = ""):
    """A zero-argument step running ``method`` on n × d data; it writes its metric values to ``out``.

    ``progress_log``: metricloss methods show their tqdm progress bar in this file (the harness captures
    the child's stderr until it ends), for runs that take long."""
    import torch

    emb, labels = make_data(n, d)

    started = []  # process CPU seconds (all threads) when the step starts: robust to a shared machine's load

    def record(values):
        values = {k: float(v) for k, v in values.items()}
        values["cpu_s"] = time.process_time() - started[0]
        if out:
            with open(out, "w") as f:
                json.dump(values, f)
        return values

    def timed(step):
        def run():
            started[:] = [time.process_time()]
            return step()
        return run

    if method in ("metricloss", "metricloss_torch"):
        from metricloss.metrics import retrieval_metrics
        from metricloss.ops import native

        # the switch is read at every call; "1" makes a failed build an error, not a silent torch run
        setting = "1" if method == "metricloss" else "0"

        def ours():
            saved = os.environ.get(native.ENV_VAR)
            os.environ[native.ENV_VAR] = setting
            log = open(progress_log, "w", buffering=1) if progress_log else None
            stderr, sys.stderr = sys.stderr, (log or sys.stderr)  # tqdm writes to sys.stderr
            try:
                values = retrieval_metrics(emb, labels, progress=bool(progress_log))
            finally:
                sys.stderr = stderr
                if log is not None:
                    log.close()  # restored: the case also runs in-process (tests)
                if saved is None:
                    del os.environ[native.ENV_VAR]
                else:
                    os.environ[native.ENV_VAR] = saved
            values["native"] = float(setting == "1" and native._state["retrieval"]["loaded"])
            return record(values)

        return timed(ours)
    if method == "floor":
        from metricloss.metrics import similarity_tile_rows

        def floor():
            z = torch.nn.functional.normalize(emb, dim=1)
            rows = similarity_tile_rows(n, n)
            best, tile = torch.empty(n), torch.empty(rows, n)  # one tile buffer, reused (as metricloss does)
            for s in range(0, n, rows):
                best[s:s + rows] = torch.mm(z[s:s + rows], z.T, out=tile[:min(rows, n - s)]).amax(1)
            return record({"mean row max": best.mean()})

        return timed(floor)
    if method in ("pml_faiss_maxbin", "pml_faiss_all"):
        import faiss
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        faiss.omp_set_num_threads(threads)
        if method == "pml_faiss_maxbin":
            calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                      k="max_bin_count")
        else:
            calc = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r",
                                               "mean_average_precision"), k=None)

        def pml():
            z = torch.nn.functional.normalize(emb, dim=1)
            return record(calc.get_accuracy(z, labels))

        return timed(pml)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def missing(method: str) -> str:
    """The missing optional packages of a method, '' when it can run."""
    absent = [m for m in NEEDS.get(method, ()) if importlib.util.find_spec(m) is None]
    return ", ".join(absent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space limit of each child")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds before a child is killed")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--progress-log", default="", help="metricloss methods write their tqdm progress bar here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for method in args.methods:
                row = {"n": n, "d": args.dim, "method": method}
                dense_bytes = 12 * n * n  # PML with k = all: an N × N float32 distance + int64 index array
                if missing(method):
                    row["skipped"] = f"needs {missing(method)}"
                elif method == "pml_faiss_all" and dense_bytes > 0.8 * args.mem_limit_gb * 2**30:
                    row["skipped"] = f"an N×N distance+index array needs {dense_bytes / 2**30:.0f} GiB"
                else:
                    out = os.path.join(tmp, f"{method}-{n}.json")
                    res = measure("benchmarks.metrics_speed:case",
                                  {"method": method, "n": n, "d": args.dim, "out": out, "threads": args.threads,
                                   "progress_log": args.progress_log if method.startswith("metricloss") else ""},
                                  warmup_params={"method": method, "n": 1000, "d": args.dim,
                                                 "threads": args.threads},
                                  repeats=1, warmup=0, threads=args.threads, mem_limit_gb=args.mem_limit_gb,
                                  timeout=args.timeout)
                    row.update(res)
                    if os.path.exists(out):
                        with open(out) as f:
                            row["values"] = json.load(f)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    import torch

    print(f"Retrieval metrics, leave-one-out, D={args.dim}, fp32, cosine, {SAMPLES_PER_CLASS} per class, "
          f"{args.threads} threads, one subprocess per method, one run; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}\n")
    print("| N | method | time (s) | × floor | CPU (s) | peak extra (MiB) | R@1 / P@1 | MAP@R | mAP |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        floor = next((r.get("median_s") for r in rows if r["n"] == n and r["method"] == "floor"), None)
        for r in (r for r in rows if r["n"] == n):
            if "median_s" not in r:
                print(f"| {n} | {r['method']} | {r.get('skipped') or r.get('error')} | | | | | | |")
                continue
            v = r.get("values", {})
            p1 = v.get("R@1", v.get("precision_at_1"))
            mapr = v.get("MAP@R", v.get("mean_average_precision_at_r"))
            m_ap = v.get("mAP", v.get("mean_average_precision"))
            ratio = f"{r['median_s'] / floor:.2f}" if floor else ""
            cells = [f"{x:.4f}" if x is not None else "" for x in (p1, mapr, m_ap)]
            cpu = f"{v['cpu_s']:.1f}" if "cpu_s" in v else ""
            print(f"| {n} | {r['method']} | {r['median_s']:.2f} | {ratio} | {cpu} | {r['peak_extra_mib']:.0f} | "
                  + " | ".join(cells) + " |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
