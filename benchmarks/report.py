#!/usr/bin/env python3
"""The benchmark report: time and peak memory of every loss family over a grid of sizes.

Writes ``RESULTS.md`` (markdown tables with the machine, CPU count, torch version, threads, date and the
exact command) and ``results.png`` (time and peak memory against the size, log-log, one pair of panels per
family, one line per implementation). Every point runs in its own subprocess through
:func:`benchmarks.harness.measure`, on the harness cases the other benchmark files define:

=============  =========================================  =============================================
family         implementations                            case
=============  =========================================  =============================================
batch_hard     metricloss, dense reference, PML, matmul   :func:`benchmarks.memory_triplet.case`
batch_all      metricloss, dense reference, PML           :func:`benchmarks.memory_triplet.case`
semi_hard      metricloss, dense reference, PML (a        :func:`benchmarks.memory_triplet.case`
               different loss: timing only)
warp           sampled, exact, F.cross_entropy            :func:`benchmarks.bench_warp.case`
centroid       metricloss, naive dense (cdist)            :func:`benchmarks.centroid.case`
norm_softmax   streamed, unchunked, dense reference, PML  :func:`benchmarks.norm_softmax.case`
dgcrl          streamed, unchunked                        :func:`benchmarks.bench_centralized.case`
=============  =========================================  =============================================

Each point: median (and min) of ``--repeats`` forward+backward runs after one warm-up run, 2 threads,
fp32, after a tiny run of the same method in the same process (thread pools, allocator, lazy imports).
Slow baselines (PML's all-triplets paths at N=4096, PML batch-hard at N=16384, the dense references at
their largest size) get one run and no warm-up, marked † in the tables. Dense references whose memory
would exceed ``DENSE_MAX_GIB`` are skipped and listed as such. Peak extra memory is the peak RSS above the
RSS once the inputs exist.

Usage (wrap it in ``flock /tmp/metricloss-bench.lock ...`` on a shared machine):

    python benchmarks/report.py                          # the full grid, about 9 minutes on 2 cores
    python benchmarks/report.py --only batch_hard warp   # some families
    python benchmarks/report.py --quick --out /tmp/r     # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `metricloss` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_centralized, memory_triplet  # noqa: E402
from benchmarks.harness import measure  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2
NORM_SOFTMAX_BLOCK = 4_000_000  # class_chunk = this // B (README: NormSoftmax, "Choosing class_chunk")

# role of an implementation: "ours" is the headline metricloss path, "baseline" what it is compared with,
# "variant" another metricloss path, "floor" a lower bound that is not a loss
OURS, BASELINE, VARIANT, FLOOR = "ours", "baseline", "variant", "floor"


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    role: str


@dataclass
class Point:
    """One measurement: an implementation of a family at one size."""

    family: str
    impl: str
    x: int
    case: str = ""
    params: Dict[str, Any] = field(default_factory=dict)
    warmup_params: Optional[Dict[str, Any]] = None
    slow: bool = False          # one run, no warm-up
    skip: str = ""              # reason the point is not measured
    result: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Family:
    key: str
    title: str
    setting: str
    x_name: str
    impls: Tuple[Impl, ...]
    note: str = ""

    def impl(self, key: str) -> Impl:
        return next(i for i in self.impls if i.key == key)

    @property
    def ours(self) -> Impl:
        return next(i for i in self.impls if i.role == OURS)


# the grid: the full report, and --quick (tiny sizes, one of each implementation per family)
SIZES = {
    "full": {"hard_n": [256, 1024, 4096, 16384], "all_n": [256, 512, 1024, 4096], "warp_b": 4096,
             "warp_c": [1000, 10000, 100000], "centroid_b": [1024, 4096, 16384, 65536], "cos_b": 1024,
             "cos_d": 512, "norm_softmax_c": [10000, 100000], "dgcrl_c": [10000, 30000]},
    "quick": {"hard_n": [64], "all_n": [64], "warp_b": 64, "warp_c": [100], "centroid_b": [256], "cos_b": 64,
              "cos_d": 32, "norm_softmax_c": [1000], "dgcrl_c": [200]},
}

TRIPLET_IMPLS = (Impl("metricloss", "metricloss", OURS), Impl("dense", "dense reference", BASELINE),
                 Impl("pml", "PML", BASELINE))
TRIPLET_SETTING = "D=128, N/4 classes × 4, margin 0.2, `reduction=\"mean_nonzero\"`; "
FAMILIES = {f.key: f for f in [
    Family("batch_hard", "triplet batch-hard",
           TRIPLET_SETTING + "PML: `TripletMarginLoss` + `BatchHardMiner` (the same loss)", "N",
           TRIPLET_IMPLS + (Impl("matmul", "one N×N×D matmul (no grad)", FLOOR),)),
    Family("batch_all", "triplet batch-all",
           TRIPLET_SETTING + "PML: `TripletMarginLoss`, no miner (the same loss)", "N", TRIPLET_IMPLS),
    Family("semi_hard", "triplet semi-hard",
           TRIPLET_SETTING + "PML: `TripletMarginMiner(type_of_triplets=\"semihard\")` + `TripletMarginLoss`",
           "N", TRIPLET_IMPLS,
           note="PML's semi-hard keeps every triplet with d_ap < d_an < d_ap + m, a different loss from the "
                "TF-Addons semi-hard metricloss implements: its column is the cost of PML's path, not of the "
                "same loss."),
    Family("warp", "WARP", "B={warp_b} rows, fp32 logits ~ N(0, 1), uniform labels; `WARPLoss()` (sampled, "
           "`max_trials=None`) and `WARPLoss(mode=\"exact\")`", "C",
           (Impl("warp", "metricloss WARP sampled", OURS),
            Impl("warp_exact", "metricloss WARP exact", VARIANT),
            Impl("cross_entropy", "F.cross_entropy", BASELINE)),
           note="`F.cross_entropy` is a different loss on the same logits: the cost of the usual "
                "alternative."),
    Family("centroid", "centroid bound",
           "`CentroidTripletLoss`, C=1000 random unit centroids, D=128, uniform labels", "B",
           (Impl("metricloss", "metricloss", OURS), Impl("naive", "naive dense (cdist)", BASELINE)),
           note="PML 2.9.0 has no centroid loss. The naive version is `torch.cdist` to all centroids with "
                "(B, C) masks (`benchmarks/centroid.py`); `metricloss.reference` builds (B, C, D) "
                "differences and is the tests' ground truth, not a baseline."),
    Family("norm_softmax", "NormSoftmax",
           "B={cos_b}, D={cos_d}, T=0.05, gradients w.r.t. the embeddings and the (C, D) weights; streamed: "
           "`class_chunk = 4_000_000 // B`; unchunked: `class_chunk=None`", "C",
           (Impl("chunked", "metricloss streamed", OURS), Impl("dense", "metricloss unchunked", BASELINE),
            Impl("reference", "dense reference", BASELINE), Impl("pml", "PML", BASELINE)),
           note="Peak memory includes the (C, D) weight gradient every method produces (C·D·4 bytes)."),
    Family("dgcrl", "DGCRL (CentralizedRankingLoss)", "B={cos_b}, D={cos_d}, defaults (the orthogonality "
           "penalty when D < C), gradients w.r.t. the embeddings and the (C, D) weights; streamed: "
           "`class_chunk = 4_000_000 // B`; unchunked: `class_chunk=None`", "C",
           (Impl("streamed", "metricloss streamed", OURS),
            Impl("unchunked", "metricloss unchunked", BASELINE)),
           note="PML 2.9.0 has no DGCRL; its dense reference builds (B, C, D) differences (tens of GiB "
                "here)."),
]}

# one colour per implementation label, so a line means the same thing in every panel
COLOURS = {"metricloss": "C0", "metricloss streamed": "C0", "metricloss WARP sampled": "C0",
           "dense reference": "C1", "naive dense (cdist)": "C1", "metricloss unchunked": "C4",
           "PML": "C2", "F.cross_entropy": "C3", "metricloss WARP exact": "C9",
           "one N×N×D matmul (no grad)": "0.5"}


def triplet_points(mining: str, sizes: Sequence[int], quick: bool) -> List[Point]:
    family = FAMILIES[mining]
    points = []
    for n in sizes:
        for impl in family.impls:
            p = Point(mining, impl.key, n, memory_triplet.CASE,
                      {"method": impl.key, "mining": "-" if impl.key == "matmul" else mining, "n": n})
            p.warmup_params = dict(p.params, n=64)
            if impl.key == "dense":
                gib = memory_triplet.dense_gib(mining, n)
                if gib > memory_triplet.DENSE_MAX_GIB:
                    p.skip = f"needs ~{gib:.0f} GiB"
                # the largest dense size that runs takes 3-10 s per call
                p.slow = not quick and memory_triplet.dense_gib(mining, 2 * n) > memory_triplet.DENSE_MAX_GIB
            if impl.key == "pml":
                # ~5 s (all triplets, N=4096) and ~20 s (batch-hard, N=16384) per call
                p.slow = n >= (16384 if mining == "batch_hard" else 4096)
            points.append(p)
    return points


def build_grid(quick: bool) -> List[Point]:
    """Every point of the report (``SIZES["quick"]`` with ``quick``)."""
    size = SIZES["quick" if quick else "full"]
    points = triplet_points("batch_hard", size["hard_n"], quick)
    for mining in ("batch_all", "semi_hard"):
        points += triplet_points(mining, size["all_n"], quick)

    for c in size["warp_c"]:
        for impl in FAMILIES["warp"].impls:
            points.append(Point("warp", impl.key, c, "benchmarks.bench_warp:case",
                                {"method": impl.key, "b": size["warp_b"], "c": c},
                                {"method": impl.key, "b": 64, "c": 100}))

    for n in size["centroid_b"]:
        for impl in FAMILIES["centroid"].impls:
            points.append(Point("centroid", impl.key, n, "benchmarks.centroid:case",
                                {"method": impl.key, "n": n, "scheme": "random"},
                                {"method": impl.key, "n": 64, "scheme": "random"}))

    b, d = size["cos_b"], size["cos_d"]
    for c in size["norm_softmax_c"]:
        for impl in FAMILIES["norm_softmax"].impls:
            chunk = NORM_SOFTMAX_BLOCK // b if impl.key == "chunked" else 0
            points.append(Point("norm_softmax", impl.key, c, "benchmarks.norm_softmax:case",
                                {"method": impl.key, "b": b, "d": d, "c": c, "chunk": chunk},
                                {"method": impl.key, "b": 64, "d": 32, "c": 1000, "chunk": min(chunk, 256)}))

    for c in size["dgcrl_c"]:
        for impl in FAMILIES["dgcrl"].impls:
            chunk = bench_centralized.default_chunk(b) if impl.key == "streamed" else None
            warm = {"method": impl.key, "b": 64, "d": 32, "c": 100, "chunk": 16 if chunk else None}
            points.append(Point("dgcrl", impl.key, c, bench_centralized.CASE,
                                {"method": impl.key, "b": b, "d": d, "c": c, "chunk": chunk}, warm))
    return points


def run_grid(points: List[Point], repeats: int, jobs: int, mem_limit_gb: float, quick: bool) -> None:
    """Measure every point that is not skipped (in parallel when ``jobs`` > 1: only for ``--quick``, since
    concurrent runs slow each other down), storing the harness result in ``point.result``."""
    todo = [p for p in points if not p.skip]

    def one(p: Point) -> Dict[str, Any]:
        reps, warm = (1, 0) if (p.slow or quick) else (repeats, 1)
        # --quick runs points side by side: one thread each, so they do not oversubscribe the cores
        res = measure(p.case, p.params, warmup_params=None if quick else p.warmup_params, repeats=reps,
                      warmup=warm, threads=1 if quick else THREADS, mem_limit_gb=mem_limit_gb)
        print(json.dumps(dict(res, family=p.family, impl=p.impl)), file=sys.stderr, flush=True)
        return res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for p, res in zip(todo, pool.map(one, todo)):
            p.result = res


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------

def ok(p: Optional[Point]) -> bool:
    return p is not None and "median_s" in p.result


def time_cell(p: Point) -> str:
    if p.skip:
        return f"skipped ({p.skip})"
    if not ok(p):
        return p.result.get("error", "?")
    mark = " †" if p.result.get("repeats") == 1 and p.slow else ""
    return f"{p.result['median_s']:.4g} ({p.result['min_s']:.4g}){mark}"


def mem_cell(p: Point) -> str:
    return f"{p.result['peak_extra_mib']:.0f}" if ok(p) else "–"


def ratio(num: float, den: float) -> str:
    return f"{num / den:.3g}×" if den > 0 else "–"


def mem_ratio(num: float, den: float) -> str:
    # peak extra memory of a tiny case can be ~0 MiB: compare against at least 1 MiB
    return ratio(max(num, 1.0), max(den, 1.0))


def family_table(family: Family, points: List[Point]) -> List[str]:
    by_key = {(p.impl, p.x): p for p in points}
    lines = [f"| {family.x_name} | implementation | time (s), median (min) | peak extra (MiB) "
             f"| time ÷ {family.ours.label} | memory ÷ {family.ours.label} |", "|---|---|---|---|---|---|"]
    for x in sorted({p.x for p in points}):
        ours = by_key.get((family.ours.key, x))
        for impl in family.impls:
            p = by_key.get((impl.key, x))
            if p is None:
                continue
            t_r = m_r = "–"
            if ok(p) and ok(ours) and impl.role != FLOOR:
                t_r = ratio(p.result["median_s"], ours.result["median_s"])
                m_r = mem_ratio(p.result["peak_extra_mib"], ours.result["peak_extra_mib"])
            lines.append(f"| {x} | {impl.label} | {time_cell(p)} | {mem_cell(p)} | {t_r} | {m_r} |")
    return lines


def matmul_table(points: List[Point]) -> List[str]:
    by_key = {(p.impl, p.x): p for p in points}
    lines = ["| N | batch-hard forward+backward (s) | one N×N×D matmul (s) | ratio |", "|---|---|---|---|"]
    for x in sorted({p.x for p in points}):
        ours, floor = by_key.get(("metricloss", x)), by_key.get(("matmul", x))
        if ok(ours) and ok(floor):
            lines.append(f"| {x} | {ours.result['median_s']:.4g} | {floor.result['median_s']:.4g} "
                         f"| {ours.result['median_s'] / floor.result['median_s']:.2f} |")
    return lines


def headline(family: Family, points: List[Point]) -> Optional[str]:
    """The largest size where ours and at least one baseline ran: ours vs the fastest baseline there."""
    by_key = {(p.impl, p.x): p for p in points}
    baselines = [i for i in family.impls if i.role == BASELINE]
    for x in sorted({p.x for p in points}, reverse=True):
        ours = by_key.get((family.ours.key, x))
        ran = [(by_key[(i.key, x)], i) for i in baselines if ok(by_key.get((i.key, x)))]
        if not ok(ours) or not ran:
            continue
        best, impl = min(ran, key=lambda pi: pi[0].result["median_s"])
        larger = [f"{i.label} at {family.x_name}={p.x}: {time_cell(p)}" for p in points for i in baselines
                  if p.impl == i.key and p.x > x and not ok(p)]
        return (f"| {family.title} | {family.x_name}={x} | {ours.result['median_s']:.4g} | {mem_cell(ours)} "
                f"| {impl.label} | {best.result['median_s']:.4g} | {mem_cell(best)} "
                f"| {ratio(best.result['median_s'], ours.result['median_s'])} "
                f"| {mem_ratio(best.result['peak_extra_mib'], ours.result['peak_extra_mib'])} "
                f"| {'; '.join(larger) or '–'} |")
    return None


def machine_lines(command: str, started: float, elapsed: float, load: Tuple[float, float],
                  threads: int) -> List[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version

        pml = f"pytorch-metric-learning {version('pytorch-metric-learning')}"
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        pml = "pytorch-metric-learning not installed (its columns are errors)"
    date = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Command: `{command}` ({elapsed / 60:.1f} min), {date}.",
        f"- Machine: {platform.machine()}, {cpu}, {os.cpu_count()} CPUs visible, {platform.system()} "
        f"{platform.release()}; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end.",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, {pml}.",
        f"- {threads} thread{'s' if threads > 1 else ''} per point (`torch.set_num_threads`), CPU, fp32, "
        "forward+backward.",
    ]


def write_markdown(path: str, families: List[Family], points: List[Point], header: List[str],
                   repeats: int, quick: bool, png: Optional[str]) -> None:
    size = SIZES["quick" if quick else "full"]
    runs = "1 run, no warm-up (`--quick`)" if quick else f"median (min) of {repeats} runs after 1 warm-up run"
    out = ["# metricloss benchmark results", "",
           "Generated by `benchmarks/report.py`; ratios compare figures from this one run. Absolute times "
           "depend on the machine and its load.", ""] + header + [
        f"- Each point runs in its own subprocess (`benchmarks/harness.py`): {runs}; † marks slow "
        "baselines timed once without a warm-up. Peak extra memory is the peak RSS above the RSS once the "
        "inputs exist.",
        "- Ratios are the implementation's figure divided by metricloss's at the same size (above 1: "
        "metricloss is faster or leaner).", ""]
    rows = [r for r in (headline(f, [p for p in points if p.family == f.key]) for f in families) if r]
    if rows:
        out += ["## Headline", "",
                "Each family at the largest size where metricloss and a baseline both ran, against the "
                "fastest baseline there.", "",
                "| family | size | metricloss (s) | metricloss peak (MiB) | best baseline | baseline (s) "
                "| baseline peak (MiB) | speed-up | memory ratio | baselines that failed at larger sizes |",
                "|---|---|---|---|---|---|---|---|---|---|"] + rows + [""]
    for family in families:
        pts = [p for p in points if p.family == family.key]
        out += [f"## {family.title}", "", family.setting.format(**size) + ".", ""]
        if family.note:
            out += [family.note, ""]
        out += family_table(family, pts) + [""]
        if family.key == "batch_hard":
            out += ["Batch-hard forward+backward against one bare N×N×D matmul (`x @ x.T` of the "
                    "normalised embeddings, no grad) at the same N:", ""] + matmul_table(pts) + [""]
    if png:
        out += [f"![time and peak memory against the size]({os.path.basename(png)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


# ----------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------

def compact(x: float) -> str:
    """Tick label of a size: 100000 -> "100k", 16384 -> "16384"."""
    x = int(round(x))
    return f"{x // 1000}k" if x >= 10000 and x % 1000 == 0 else str(x)


def write_png(path: str, families: List[Family], points: List[Point], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    cols = 2 if len(families) == 1 else 4
    rows = math.ceil(2 * len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = axes.ravel()
    for k, family in enumerate(families):
        ax_t, ax_m = flat[2 * k], flat[2 * k + 1]
        for impl in family.impls:
            pts = sorted((p for p in points if p.family == family.key and p.impl == impl.key and ok(p)),
                         key=lambda p: p.x)
            if not pts:
                continue
            style = dict(color=COLOURS.get(impl.label), marker="o", markersize=4, label=impl.label,
                         linestyle="--" if impl.role == FLOOR else "-")
            xs = [p.x for p in pts]
            ax_t.plot(xs, [p.result["median_s"] for p in pts], **style)
            if impl.role != FLOOR:
                ax_m.plot(xs, [max(p.result["peak_extra_mib"], 1.0) for p in pts], **style)
        sizes = sorted({p.x for p in points if p.family == family.key and ok(p)})
        for ax, what in ((ax_t, "time (s)"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(family.x_name)
            ax.set_ylabel(what)
            ax.set_title(f"{family.title}: {what.split(' (')[0]}", fontsize=9)
            ax.grid(True, which="both", linewidth=0.3)
            # x: a tick at each measured size; y: plain numbers, denser ticks on a narrow range
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
            ax.xaxis.set_minor_locator(NullLocator())
            lo, hi = ax.get_ylim()
            decades = math.log10(hi / lo) if lo > 0 else 3.0
            subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 0.8 else tuple(range(1, 10))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax_t.legend(fontsize=7)
    for ax in flat[2 * len(families):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes, one run each, points in parallel: checks that the script and the "
                         "plot work")
    ap.add_argument("--only", nargs="+", choices=list(FAMILIES), metavar="FAMILY",
                    help=f"families to run, among: {', '.join(FAMILIES)}")
    ap.add_argument("--out", default=HERE,
                    help="directory of RESULTS.md and results.png (default: benchmarks/)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per point (slow baselines: 1)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="points measured at once (default 1; with --quick 2-4, by the CPU count). Above 1 "
                         "the timings interfere.")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space limit of each subprocess")
    ap.add_argument("--json-out", default=None, help="also write every raw result to this JSON file")
    args = ap.parse_args(argv)

    started = time.time()
    load_start = os.getloadavg()[0]
    families = [FAMILIES[k] for k in (args.only or FAMILIES)]
    points = [p for p in build_grid(args.quick) if p.family in {f.key for f in families}]
    jobs = args.jobs
    if jobs is None:
        jobs = max(2, min(4, os.cpu_count() or 2)) if args.quick else 1
    run_grid(points, args.repeats, jobs, args.mem_limit_gb, args.quick)

    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/report.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None
                                                                       else argv))
    threads = 1 if args.quick else THREADS
    header = machine_lines(command, started, time.time() - started, (load_start, os.getloadavg()[0]), threads)
    png: Optional[str] = os.path.join(args.out, "results.png")
    try:
        write_png(png, families, points, f"metricloss vs baselines: CPU, {threads} thread(s), fp32, "
                  "forward+backward (memory floored at 1 MiB)")
    except ImportError:
        print("matplotlib is not installed: no results.png (pip install matplotlib)", file=sys.stderr)
        png = None
    md = os.path.join(args.out, "RESULTS.md")
    write_markdown(md, families, points, header, args.repeats, args.quick, png)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump([dict(p.result, family=p.family, impl=p.impl, x=p.x, skip=p.skip) for p in points], f,
                      indent=1)
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
