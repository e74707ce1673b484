#!/usr/bin/env python3
"""One GPU check for every metricloss loss and kernel: correctness, speed, memory, host syncs.

Run it on a machine with one CUDA GPU, from the checkout (no install needed)::

    PYTHONPATH=. python benchmarks/gpu_check.py --quick --out gpu_out    # < 2 min on an H100/H200
    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_out            # full run, < 6 min
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_dry          # CPU tensors + Triton interpreter (CI)

It writes ``REPORT.md`` (also printed) and ``report.json`` into ``--out``.

**Correctness.** Every public loss and miner, with each backend that can serve it (``"auto"``,
``"triton"``, ``"torch"``), in fp32/bf16/fp16, on odd and large shapes and several label patterns, is
compared with the CPU fp64 reference (:mod:`metricloss.reference`), or where that is too large with
the CPU torch path in fp64 or, for batch-hard at large N, with an fp64 recomputation at the selected
indices plus an fp64 check of sampled rows. Tolerances (relative norm errors ‖got − want‖ / ‖want‖
unless stated):

* mined indices: identical to the fp64 reference on every *tie-free* row (the fp64 gap between the best
  and the second-best candidate exceeds the dtype's mining tolerance: squared-distance error
  :data:`MINING_TOL` × the largest squared norm); on the other rows the chosen candidate's fp64 value is
  within that tolerance of the best;
* losses and gradients computed in fp32 (every 16-bit input is upcast first): :data:`LOSS_TOL`;
* batch-hard with a 16-bit Triton miner (mines in bf16/fp16): loss and gradient vs the fp64 loss at
  the indices it chose (:data:`LOSS_TOL`), and vs the full reference within 2 × the mining tolerance.

A failed check is listed and the run continues. **Speed and memory**: CUDA events around each step
(forward+backward), warm-up, median; peak extra memory is ``torch.cuda.max_memory_allocated`` above the
memory held before the step. Batch-hard (Triton vs chunked torch vs PML vs a dense ``torch.compile``d
version vs one bare matmul) at N = 4096, 16384, 65536 and D = 128, 512, and the other losses at their
headline sizes; achieved TFLOP/s of the mining Gram work (2·N·M·D) against the GPU's peak
(:data:`PEAK_TFLOPS`). **Host syncs**: every loss once under ``torch.cuda.set_sync_debug_mode("warn")``
(warnings counted), and with :class:`SyncCounter` at a tiny and a large chunk budget (the counts must
be equal: no sync inside a chunk loop). Every case has its own time budget; a case that exceeds it
skips the rest of its sub-cases and says so.

**pytorch-metric-learning** (PML) is imported only if present. The GPU machine has no registry access,
so carry its pure-Python wheel in the ignored ``.wheels/`` folder of the checkout::

    pip download --no-deps pytorch-metric-learning==2.9.0 -d .wheels

Every ``*.whl`` in ``.wheels/`` is put on ``sys.path`` (a pure-Python wheel is importable as a zip).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import glob
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".wheels")

# Relative loss / gradient tolerance for fp32 computation (16-bit inputs are upcast before any arithmetic).
LOSS_TOL = {"fp32": 2e-4, "bf16": 2e-4, "fp16": 2e-4}
# Semi-hard selects "the nearest negative farther than the positive": an fp32 rounding at a near-tie can
# choose another negative, so its loss/gradient tolerance is looser (still far below any real bug).
SEMI_HARD_TOL = 3e-3
# Squared-distance error of mining in each dtype, relative to the largest squared norm: tf32x3/fp32
# Gram expansion, and bf16/fp16 operands (8 / 11 significant bits) with fp32 accumulation.
MINING_TOL = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 4e-3}
# Rounding of a result returned in the input dtype (16-bit gradients, NormalizeScale's output): relative.
ROUNDING_TOL = {"fp32": 0.0, "bf16": 1e-2, "fp16": 1.5e-3}
METRIC_TOL = 2e-3  # absolute, retrieval metrics (ranks may differ at fp32 near-ties between devices)

# Dense peak TFLOP/s (vendor datasheets; dense, no sparsity): bf16/fp16 tensor cores, tf32, plain fp32.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0},
}

DTYPE_NAMES = ("fp32", "bf16", "fp16")


def add_wheels_to_path(folder: str = WHEELS) -> List[str]:
    """Put every ``*.whl`` in ``folder`` on ``sys.path`` (pure-Python wheels import from the zip)."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    for w in wheels:
        if w not in sys.path:
            sys.path.append(w)
    return wheels


def peak_for(device_name: str) -> Optional[Dict[str, float]]:
    """The :data:`PEAK_TFLOPS` row of a ``torch.cuda.get_device_name()``, or None for an unknown GPU."""
    if "H100" in device_name and "PCIe" in device_name:
        return PEAK_TFLOPS["H100 PCIe"]
    for key in ("H200", "H100", "A100"):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


# ----------------------------------------------------------------------------------------------------
# host-sync counter (also used by tests/test_sync.py)
# ----------------------------------------------------------------------------------------------------

def _sync_functions():
    import torch

    T = torch.Tensor
    always = [T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.cpu, T.numpy, T.nonzero,
              torch.nonzero, T.argwhere, torch.argwhere, T.masked_select, torch.masked_select, T.unique,
              torch.unique, T.unique_consecutive, torch.unique_consecutive, T.bincount, torch.bincount, T.equal,
              torch.equal, T.allclose, torch.allclose, T.__repr__, T.__format__]
    return {f: getattr(f, "__name__", str(f)) for f in always}


def _has_mask(index: Any) -> bool:
    import torch

    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _library_site() -> str:
    """``file:line`` of the innermost metricloss frame on the stack (where a counted call was made)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if os.sep + "metricloss" + os.sep in name:
            return f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside metricloss"


def make_sync_counter():
    """A ``TorchFunctionMode`` that counts the calls which synchronise a GPU with the host.

    Counted: ``item``, ``tolist``, ``bool()``/``int()``/``float()``/``index`` of a tensor (Python branching on
    values), ``cpu``/``numpy``, ``nonzero``/``argwhere``/``masked_select``/``unique``/``bincount``
    (data-dependent output sizes), ``equal``/``allclose``, printing, boolean-mask indexing and assignment,
    one-argument ``torch.where``, ``repeat_interleave`` with tensor repeats and no ``output_size``, and
    ``.to()`` a CPU device from another device. Works on CPU tensors, so the count of the CPU path is the
    count a GPU would see. Use as ``with make_sync_counter() as c: ...; c.total, c.counts`` (by call) and
    ``c.sites`` (by ``file:line`` of the innermost metricloss frame).
    """
    import torch
    from torch.overrides import TorchFunctionMode

    funcs = _sync_functions()

    class SyncCounter(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.counts: collections.Counter = collections.Counter()
            self.sites: collections.Counter = collections.Counter()

        @property
        def total(self) -> int:
            return sum(self.counts.values())

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = funcs.get(func)
            if name is None:
                if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 \
                        and _has_mask(args[1]):
                    name = f"{func.__name__}[mask]"
                elif func in (torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put) and len(args) > 1 \
                        and _has_mask(args[1]):
                    name = "index_put[mask]"
                elif func is torch.where and len(args) + len(kwargs) == 1:
                    name = "where(cond)"
                elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) \
                        and "output_size" not in kwargs and len(args) > 1 and isinstance(args[1], torch.Tensor):
                    name = "repeat_interleave(tensor)"
                elif func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                    target = kwargs.get("device", args[1] if len(args) > 1 else None)
                    if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                        name = "to(cpu)"
            if name is not None:
                self.counts[name] += 1
                self.sites[f"{name} @ {_library_site()}"] += 1
            return func(*args, **kwargs)

    return SyncCounter()


# ----------------------------------------------------------------------------------------------------
# run state: results, budgets, timing
# ----------------------------------------------------------------------------------------------------

class CaseTimeout(Exception):
    """Raised by :meth:`Run.tick` when a case has used up its time budget."""


class Run:
    """What one run of the check collects, and its mode (dry / quick / full)."""

    def __init__(self, mode: str, device: str):
        import torch

        self.mode = mode
        self.dry = mode == "dry-run"
        self.quick = mode == "quick"
        self.device = torch.device(device)
        self.checks: List[Dict[str, Any]] = []
        self.timings: List[Dict[str, Any]] = []
        self.syncs: List[Dict[str, Any]] = []
        self.cases: List[Dict[str, Any]] = []
        self.deadline = math.inf
        self.case_name = ""
        self.peak: Optional[Dict[str, float]] = None

    # -- budgets ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Raise :class:`CaseTimeout` when the current case is past its budget (call between sub-cases)."""
        if time.perf_counter() > self.deadline:
            raise CaseTimeout()

    # -- records ---------------------------------------------------------------------------------------
    def check(self, name: str, params: Dict[str, Any], err: float, tol: float, note: str = "") -> bool:
        ok = bool(err <= tol)  # NaN fails
        self.checks.append({"case": self.case_name, "check": name, "params": params, "err": float(err),
                            "tol": tol, "ok": ok, "note": note})
        return ok

    @contextlib.contextmanager
    def subcase(self, params: Dict[str, Any]):
        """Run one sub-case: an exception (a kernel that does not compile, out of memory, …) is recorded as a
        failure with ``params`` and the case goes on with the next sub-case."""
        try:
            yield
        except CaseTimeout:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()
            self.fail("sub-case raised", params, f"{type(exc).__name__}: {text[0][:300] if text else ''}")

    def fail(self, name: str, params: Dict[str, Any], note: str) -> None:
        self.checks.append({"case": self.case_name, "check": name, "params": params, "err": math.nan,
                            "tol": 0.0, "ok": False, "note": note})

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def rel_err(got, want) -> float:
    """‖got − want‖ / max(‖want‖, 1e-6·√numel) in fp64 on the CPU; inf on a NaN/Inf or shape mismatch.

    The floor makes a result that should be 0 (e.g. the gradient through normalisation at D = 1) pass when
    its entries are below 1e-6, instead of dividing rounding noise by rounding noise."""
    import torch

    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    g = got.detach().double().cpu()
    w = want.detach().double().cpu()
    if g.shape != w.shape:
        return math.inf
    if not torch.equal(torch.isfinite(g), torch.isfinite(w)):
        return math.inf
    fin = torch.isfinite(w)
    return float((g[fin] - w[fin]).norm() / max(float(w[fin].norm()), 1e-6 * math.sqrt(max(w.numel(), 1))))


def to_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[name]


def loss_and_grads(fn: Callable, tensors: Sequence, device, dtype) -> Tuple[Any, List[Any]]:
    """``fn(*leaves)`` and the gradients of its sum w.r.t. the float leaves (copies on ``device``/``dtype``;
    integer tensors are moved only)."""
    import torch

    leaves = []
    for t in tensors:
        if t.is_floating_point():
            leaves.append(t.detach().to(device=device, dtype=dtype).requires_grad_(True))
        else:
            leaves.append(t.to(device))
    out = fn(*leaves)
    floats = [x for x in leaves if x.is_floating_point()]
    grads = torch.autograd.grad(out.sum(), floats, allow_unused=True)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def quantise(t, dtype_name: str):
    """``t`` rounded to the dtype (the values the device sees), as fp64 on the CPU."""
    return t.to(to_dtype(dtype_name)).double().cpu() if t.is_floating_point() else t.cpu()


def compare_losses(run: Run, name: str, params: Dict[str, Any], fn_dev: Callable, fn_ref: Callable,
                   tensors: Sequence, dtype_name: str, tol: float, grads: bool = True,
                   cache: Optional[Dict] = None, key: Any = None) -> bool:
    """Loss and gradients of ``fn_dev`` on the device in ``dtype_name`` vs ``fn_ref`` on fp64 CPU copies of the
    same (rounded) values. Gradients (returned in the input dtype) get ``max(10·tol, ROUNDING_TOL)``. The
    reference's result is kept in ``cache[key]`` when given (it does not depend on the backend)."""
    import torch

    got, g_grads = loss_and_grads(fn_dev, tensors, run.device, to_dtype(dtype_name))
    if cache is not None and key in cache:
        want, w_grads = cache[key]
    else:
        ref_tensors = [quantise(t, dtype_name) for t in tensors]
        want, w_grads = loss_and_grads(fn_ref, ref_tensors, "cpu", torch.float64)
        if cache is not None:
            cache[key] = (want, w_grads)
    ok = run.check(name + " loss", params, rel_err(got, want), tol)
    for i, (g, w) in enumerate(zip(g_grads, w_grads)):
        if grads:
            ok &= run.check(name + f" grad[{i}]", params, rel_err(g, w), max(10 * tol, ROUNDING_TOL[dtype_name]))
    return ok


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def make_labels(n: int, pattern: str, gen):
    """(n,) int64 labels: ``"pk"`` (classes of 4, shuffled), ``"imbalanced"`` (Zipf-like sizes, some
    singletons), ``"few"`` (3 classes)."""
    import torch

    if pattern == "pk":
        lab = torch.arange(n) // 4
    elif pattern == "imbalanced":
        lab = (torch.rand(n, generator=gen) ** 3 * max(n // 3, 1)).long()
    elif pattern == "few":
        lab = torch.arange(n) % 3
    else:
        raise ValueError(pattern)
    return lab[torch.randperm(n, generator=gen)]


def gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# correctness: batch-hard mining (indices) and batch-hard loss
# ----------------------------------------------------------------------------------------------------

def _fp64_sq_dists(a, r, distance: str):
    """fp64 squared Euclidean (or cosine 1 − cos) distances of prepared rows, CPU; (S, M)."""
    if distance == "cosine":
        return 1.0 - a @ r.T
    return ((a * a).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * a @ r.T).clamp_min(0.0)


def check_mined_indices(run: Run, name: str, params, pos, neg, a64, r64, labels, ref_labels, self_ref: bool,
                        distance: str, dtype_name: str, rows=None) -> None:
    """Indices ``pos``/``neg`` (N,) vs fp64 distances of prepared ``a64``/``r64`` (CPU) on ``rows`` (all by
    default): identical on tie-free rows, within the mining tolerance on near-tie rows."""
    import torch

    rows = torch.arange(a64.shape[0]) if rows is None else rows
    d = _fp64_sq_dists(a64[rows], r64, distance)
    same = labels[rows][:, None] == ref_labels[None, :]
    is_self = torch.zeros_like(same)
    if self_ref:
        is_self[torch.arange(len(rows)), rows] = True
    pos_ok, neg_ok = same & ~is_self, ~same
    scale = float(max((a64 * a64).sum(1).max(), (r64 * r64).sum(1).max(), 1.0)) if distance != "cosine" else 1.0
    tol = MINING_TOL[dtype_name] * scale
    worst, mismatched_tie_free, n_rows = 0.0, 0, len(rows)
    for kind, idx, ok_mask, largest in (("pos", pos, pos_ok, True), ("neg", neg, neg_ok, False)):
        idx = idx.cpu()[rows]
        fill = -math.inf if largest else math.inf
        masked = d.masked_fill(~ok_mask, fill)
        top = masked.topk(min(2, masked.shape[1]), dim=1, largest=largest)
        has = ok_mask.any(1)
        if not torch.equal(idx >= 0, has):
            run.fail(f"{name} {kind} presence", params, "an anchor with (without) a candidate got -1 (an index)")
            continue
        if not has.any():
            continue
        best = top.values[:, 0][has]
        chosen = d[torch.arange(n_rows)[has], idx[has]]
        valid_choice = ok_mask[torch.arange(n_rows)[has], idx[has]]
        if not valid_choice.all():
            run.fail(f"{name} {kind} label", params,
                     f"{int((~valid_choice).sum())} chosen indices break the label rule")
            continue
        worst = max(worst, float((chosen - best).abs().max()))
        second = top.values[:, 1][has] if top.values.shape[1] > 1 else torch.full_like(best, fill)
        tie_free = (best - second).abs() > tol
        mismatched_tie_free += int((tie_free & (idx[has] != top.indices[:, 0][has])).sum())
    run.check(f"{name} value gap", params, worst, tol, note=f"{n_rows} rows checked")
    run.check(f"{name} tie-free mismatches", params, mismatched_tie_free, 0)


def _ref_batch_hard_at(x, labels, pos, neg, distance: str, margin: float, normalize: bool, r=None):
    """fp64 batch-hard loss (mean over valid anchors) at given indices: O(N·D) (no mining)."""
    import torch
    import torch.nn.functional as F

    from metricloss import reference

    a = reference._prepare(x, distance, normalize)
    rr = a if r is None else reference._prepare(r, distance, normalize)
    valid = (pos >= 0) & (neg >= 0)

    def dist(u, v):
        if distance == "cosine":
            return 1.0 - (u * v).sum(1)
        sq = ((u - v) ** 2).sum(1)
        if distance == "squared_euclidean":
            return sq
        pos_ = sq > 0  # √ with gradient 0 at 0, as the library
        return torch.where(pos_, torch.sqrt(torch.where(pos_, sq, torch.ones_like(sq))), torch.zeros_like(sq))

    d_ap = dist(a, rr[pos.clamp_min(0)])
    d_an = dist(a, rr[neg.clamp_min(0)])
    terms = torch.where(valid, F.relu(margin + d_ap - d_an), torch.zeros_like(d_ap))
    return terms.sum() / valid.sum().clamp_min(1)


def case_batch_hard(run: Run) -> None:
    """TripletLoss(batch_hard) and mine_batch_hard: every backend × distance × dtype × shape × labels."""
    import torch

    import metricloss as ml
    import metricloss.functional as MF
    from metricloss.ops import distance as mdist
    from metricloss.ops.mining import batch_hard_indices_triton, kernel_dtype

    if run.dry:
        shapes = [(64, 64, 3), (37, 37, 1), (50, 29, 33)]
    elif run.quick:  # the headline size first: a budget overrun skips the small shapes, not it
        shapes = [(65536, 65536, 512), (1000, 1000, 3), (2049, 1000, 257)]
    else:
        shapes = [(65536, 65536, 512), (65536, 65536, 128), (16384, 16384, 512), (1000, 1000, 1), (1000, 1000, 3),
                  (4097, 4097, 128), (3000, 5000, 257)]
    distances = ("euclidean", "cosine") if run.quick else ("euclidean", "squared_euclidean", "cosine")
    margin = 0.2
    for si, (n, m, d) in enumerate(shapes):
        for distance in distances:
            for dtype_name in DTYPE_NAMES:
                pattern = ("pk", "imbalanced", "few")[si % 3]
                self_ref = n == m
                g = gen(1000 + si)
                x = torch.randn(n, d, generator=g)
                labels = make_labels(n, pattern, g)
                r = None if self_ref else torch.randn(m, d, generator=g)
                r_labels = labels if self_ref else make_labels(m, pattern, g) + 1
                big = n * m > 2**24
                sample = torch.randperm(n, generator=g)[:256] if big else None
                xq, rq = quantise(x, dtype_name), (None if r is None else quantise(r, dtype_name))
                # at D = 1 normalised rows are ±1 and every gradient through the normalisation is 0: use raw rows
                # (cosine normalises anyway: compare its loss only)
                normalize, grads = d > 1, d > 1 or distance != "cosine"
                a64 = mdist.prepare_embeddings(xq, distance, normalize)
                r64 = a64 if self_ref else mdist.prepare_embeddings(rq, distance, normalize)
                # "auto" runs what "triton" runs on CUDA (what "torch" runs on CPU): checked once where it duplicates
                auto_dup = big or (run.device.type != "cuda" and si > 0)
                for backend in (("triton", "torch") if auto_dup else ("auto", "triton", "torch")):
                    run.tick()
                    params = dict(N=n, M=m, D=d, distance=distance, dtype=dtype_name, labels=pattern, backend=backend)
                    with run.subcase(params):
                        dev_x = x.to(run.device, to_dtype(dtype_name))
                        dev_l = labels.to(run.device)
                        dev_r = None if self_ref else r.to(run.device, to_dtype(dtype_name))
                        dev_rl = None if self_ref else r_labels.to(run.device)
                        triton_used = backend == "triton" or (backend == "auto" and run.device.type == "cuda")
                        # the miner as the loss runs it: prepared fp32 rows, cast to the mining dtype (Triton)
                        with torch.no_grad():
                            a = mdist.prepare_embeddings(dev_x, distance, normalize)
                            rr = a if self_ref else mdist.prepare_embeddings(dev_r, distance, normalize)
                            if triton_used:
                                kd = kernel_dtype(dev_x.dtype)
                                pos, neg = batch_hard_indices_triton(a.to(kd), dev_l, rr.to(kd),
                                                                     dev_l if self_ref else dev_rl, self_ref, distance)
                            else:
                                pos, neg = MF.mine_batch_hard(a, dev_l, None if self_ref else rr, dev_rl,
                                                              distance=distance, backend="torch")
                        mine_dtype = dtype_name if triton_used else "fp32"
                        check_mined_indices(run, "batch-hard mining", params, pos, neg, a64, r64, labels, r_labels,
                                            self_ref, distance, mine_dtype, rows=sample)
                        # the public miner on raw rows (small shapes: its own fp64 check)
                        if not big and distance != "squared_euclidean":
                            p2, n2 = MF.mine_batch_hard(dev_x, dev_l, dev_r, dev_rl, distance=distance, backend=backend)
                            raw64 = mdist.prepare_embeddings(xq, distance, False)
                            rraw64 = raw64 if self_ref else mdist.prepare_embeddings(rq, distance, False)
                            check_mined_indices(run, "mine_batch_hard", params, p2, n2, raw64, rraw64, labels,
                                                r_labels, self_ref, distance, mine_dtype)
                        crit = ml.TripletLoss(margin=margin, mining="batch_hard", distance=distance,
                                              normalize=normalize, backend=backend)
                        tensors = [x, labels] if self_ref else [x, labels, r, r_labels]
                        pos_c, neg_c = pos.cpu(), neg.cpu()
                        compare_losses(run, "batch-hard at chosen indices", params, crit,
                                       lambda xx, ll, rr_=None, rl=None: _ref_batch_hard_at(
                                           xx, ll, pos_c, neg_c, distance, margin, normalize, rr_),
                                       tensors, dtype_name, LOSS_TOL[dtype_name], grads=grads)
                        if not big and n * m * d <= 2**25:
                            got = crit(dev_x, dev_l, dev_r, dev_rl).detach().double().cpu()
                            want = ml.reference.triplet_loss(xq, labels, rq, None if self_ref else r_labels,
                                                             margin=margin, mining="batch_hard", distance=distance,
                                                             normalize=normalize)
                            tol = 2 * MINING_TOL[mine_dtype] + LOSS_TOL[dtype_name] * float(want.abs())
                            run.check("batch-hard vs reference (abs)", params, float((got - want).abs()), tol)
                        del dev_x, dev_r


# ----------------------------------------------------------------------------------------------------
# correctness: the other losses
# ----------------------------------------------------------------------------------------------------

def case_block_triplets(run: Run) -> None:
    """Batch-all and semi-hard (chunked torch; ``"auto"`` and ``"torch"``) vs the fp64 reference, with tiny and
    default chunk budgets, and vs the CPU torch path in fp64 at sizes the dense reference cannot hold."""
    import torch

    import metricloss as ml

    if run.dry:
        shapes = [(32, 32, 3), (30, 19, 17)]
    elif run.quick:
        shapes = [(257, 257, 128), (300, 200, 3), (1024, 1024, 64)]
    else:
        shapes = [(257, 257, 1), (257, 257, 128), (300, 200, 257), (512, 512, 512), (4096, 4096, 128)]
    for si, (n, m, d) in enumerate(shapes):
        g = gen(2000 + si)
        self_ref = n == m
        pattern = ("pk", "imbalanced", "few")[si % 3]
        x = torch.randn(n, d, generator=g)
        labels = make_labels(n, pattern, g)
        r = None if self_ref else torch.randn(m, d, generator=g)
        r_labels = None if self_ref else make_labels(m, pattern, g)
        tensors = [x, labels] if self_ref else [x, labels, r, r_labels]
        dense_ok = n * m * m <= 2**25
        cache: Dict = {}
        for mining in ("batch_all", "semi_hard"):
            for distance in ("euclidean", "cosine"):
                for dtype_name in DTYPE_NAMES:
                    for backend, chunk in (("auto", None), ("torch", 4096 if run.dry else 1 << 20)):
                        run.tick()
                        params = dict(N=n, M=m, D=d, mining=mining, distance=distance, dtype=dtype_name,
                                      labels=pattern, backend=backend, chunk_bytes=chunk)
                        with run.subcase(params):
                            crit = ml.TripletLoss(margin=0.2, mining=mining, distance=distance, backend=backend,
                                                  chunk_bytes=chunk)
                            if dense_ok:
                                def ref(*t, _mining=mining, _distance=distance):
                                    # semi-hard's tie band is the one of the device's fp32 computation
                                    return ml.reference.triplet_loss(*t, margin=0.2, mining=_mining, distance=_distance,
                                                                     tie_dtype=torch.float32)
                            else:
                                ref = ml.TripletLoss(margin=0.2, mining=mining, distance=distance, backend="torch")
                            tol = SEMI_HARD_TOL if mining == "semi_hard" else LOSS_TOL[dtype_name]
                            compare_losses(run, f"{mining}" + ("" if dense_ok else " vs CPU torch fp64"), params,
                                           crit, ref, tensors, dtype_name, tol, cache=cache,
                                           key=(mining, distance, dtype_name))


def case_warp(run: Run) -> None:
    """WARPLoss exact (vs the fp64 reference) and sampled (on rows whose draw is decided: every negative
    violates with equal scores, or none does; plus reproducibility under a generator)."""
    import torch

    import metricloss as ml

    shapes = [(33, 7), (64, 100)] if run.dry else ([(257, 61), (1000, 1000)] if run.quick else
                                                   [(257, 61), (1000, 1000), (777, 5003), (2048, 50000)])
    for si, (b, c) in enumerate(shapes):
        g = gen(3000 + si)
        scores = torch.randn(b, c, generator=g)
        labels = torch.randint(0, c, (b,), generator=g)
        for dtype_name in DTYPE_NAMES:
            run.tick()
            params = dict(B=b, C=c, dtype=dtype_name)
            with run.subcase(params):
                if b * c * c <= 2**26:
                    compare_losses(run, "WARP exact", params, ml.WARPLoss(mode="exact"),
                                   lambda s, y: ml.reference.warp_loss(s, y), [scores, labels], dtype_name,
                                   LOSS_TOL[dtype_name])
                else:
                    compare_losses(run, "WARP exact vs CPU torch fp64", params, ml.WARPLoss(mode="exact"),
                                   ml.WARPLoss(mode="exact"), [scores, labels], dtype_name, LOSS_TOL[dtype_name])
                # decided draws: row i has all negatives equal to v_i and the positive at v_i - 2 (all violate,
                # margin 1) or v_i + 2 (none violates): sampled == exact == reference
                v = torch.randn(b, 1, generator=g).expand(b, c).clone()
                decided = torch.rand(b, generator=g) < 0.5
                v[torch.arange(b), labels] = torch.where(decided, v[:, 0] - 2.0, v[:, 0] + 2.0)
                want_fn = ml.reference.warp_loss if b * c * c <= 2**26 else ml.WARPLoss(mode="exact")
                # the sampled gradient reaches one drawn violator, the exact one all of them: losses only
                compare_losses(run, "WARP sampled (decided rows)", params, ml.WARPLoss(mode="sampled"), want_fn,
                               [v, labels], dtype_name, LOSS_TOL[dtype_name], grads=False)
                dev = scores.to(run.device, to_dtype(dtype_name))
                l1 = ml.functional.warp_loss(dev, labels.to(run.device),
                                             generator=torch.Generator(run.device).manual_seed(5))
                l2 = ml.functional.warp_loss(dev, labels.to(run.device),
                                             generator=torch.Generator(run.device).manual_seed(5))
                run.check("WARP sampled reproducible", params, float((l1 - l2).abs()), 0.0)


def case_centroid(run: Run) -> None:
    """CentroidTripletLoss with one-hot (auto/torch) and tensor centroids (auto/triton/torch) vs the fp64
    reference."""
    import torch

    import metricloss as ml

    shapes = [(50, 5, 7), (40, 3, 3)] if run.dry else ([(1000, 100, 128), (8192, 1000, 128)] if run.quick else
                                                       [(1000, 100, 128), (777, 3, 3), (4097, 257, 257),
                                                        (65536, 1000, 128), (4096, 10000, 512)])
    for si, (b, c, d) in enumerate(shapes):
        g = gen(4000 + si)
        x = torch.randn(b, d, generator=g) * 0.3
        labels = torch.randint(0, c, (b,), generator=g)
        cents = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
        dense_ok = b * c * d <= 2**26
        cache: Dict = {}
        for scheme in ("onehot", "tensor"):
            if scheme == "onehot" and d < c:
                continue
            for dtype_name in DTYPE_NAMES:
                for backend in (("auto", "torch") if scheme == "onehot" else ("auto", "triton", "torch")):
                    run.tick()
                    params = dict(B=b, C=c, D=d, centroids=scheme, dtype=dtype_name, backend=backend)
                    with run.subcase(params):
                        cen = "onehot" if scheme == "onehot" else cents.to(run.device, to_dtype(dtype_name))
                        cen_ref = "onehot" if scheme == "onehot" else quantise(cents, dtype_name)

                        def dev_fn(xx, ll, _c=cen, _b=backend):
                            return ml.functional.centroid_triplet_loss(xx, ll, _c, num_classes=c, backend=_b)

                        if dense_ok:
                            def ref_fn(xx, ll, _c=cen_ref):
                                return ml.reference.centroid_triplet_loss(xx, ll, _c, num_classes=c)
                        else:
                            def ref_fn(xx, ll, _c=cen_ref):
                                return ml.functional.centroid_triplet_loss(xx, ll, _c, num_classes=c, backend="torch")
                        compare_losses(run, "centroid" + ("" if dense_ok else " vs CPU torch fp64"), params, dev_fn,
                                       ref_fn, [x, labels], dtype_name, LOSS_TOL[dtype_name], cache=cache,
                                       key=(scheme, dtype_name))


def case_cosine(run: Run) -> None:
    """NormalizeScale, CosineClassifier, NormSoftmaxLoss (dense and streamed), CentralizedRankingLoss
    (dense and streamed) vs the fp64 reference."""
    import torch

    import metricloss as ml

    shapes = [(16, 9, 5)] if run.dry else ([(1024, 512, 10000)] if run.quick else
                                           [(1024, 512, 10000), (333, 3, 1001), (1024, 257, 30000)])
    for si, (b, d, c) in enumerate(shapes):
        g = gen(5000 + si)
        x = torch.randn(b, d, generator=g)
        w = torch.randn(c, d, generator=g) / math.sqrt(d)
        labels = torch.randint(0, c, (b,), generator=g)
        chunk = max(1, c // 7)
        cache: Dict = {}
        for dtype_name in DTYPE_NAMES:
            run.tick()
            params = dict(B=b, D=d, C=c, dtype=dtype_name)
            with run.subcase(params):
                # NormalizeScale returns the input dtype: its output is rounded to it
                compare_losses(run, "NormalizeScale", params, lambda xx: ml.functional.normalize_scale(xx, 20.0),
                               lambda xx: ml.reference.normalize_scale(xx, 20.0), [x], dtype_name,
                               max(LOSS_TOL[dtype_name], ROUNDING_TOL[dtype_name]))
                compare_losses(run, "CosineClassifier (margin 0.1)", params,
                               lambda xx, ww, ll: ml.functional.cosine_logits(xx, ww, ll, scale=20.0, margin=0.1),
                               lambda xx, ww, ll: ml.reference.cosine_logits(xx, ww, ll, scale=20.0, margin=0.1),
                               [x, w, labels], dtype_name, LOSS_TOL[dtype_name])
                for cc in (None, chunk):
                    p = dict(params, class_chunk=cc)
                    compare_losses(run, "NormSoftmax" + (" streamed" if cc else " dense"), p,
                                   lambda xx, ll, ww, _cc=cc: ml.functional.norm_softmax_loss(xx, ll, ww,
                                                                                              class_chunk=_cc),
                                   lambda xx, ll, ww: ml.reference.norm_softmax_loss(xx, ll, ww),
                                   [x, labels, w], dtype_name, LOSS_TOL[dtype_name], cache=cache,
                                   key=("ns", dtype_name))
                    if b * c * d <= 2**27:
                        ref = ml.reference.centralized_ranking_loss
                    else:
                        ref = functools.partial(ml.functional.centralized_ranking_loss, class_chunk=chunk)
                    compare_losses(run, "CentralizedRanking" + (" streamed" if cc else " dense"), p,
                                   lambda xx, ll, ww, _cc=cc: ml.functional.centralized_ranking_loss(xx, ll, ww,
                                                                                                     class_chunk=_cc),
                                   ref, [x, labels, w], dtype_name, LOSS_TOL[dtype_name], cache=cache,
                                   key=("dgcrl", dtype_name))


def case_toolbox(run: Run) -> None:
    """SVMaxRegularizer (Gram and SVD routes), TwoHeadLoss with EmbeddingHead, CrossBatchMemory and PKSampler
    batches, vs fp64 CPU computations of the same definitions."""
    import torch
    import torch.nn.functional as F

    import metricloss as ml

    shapes = [(24, 8)] if run.dry else ([(4096, 512)] if run.quick else [(4096, 512), (512, 4096), (333, 3)])
    for si, (b, d) in enumerate(shapes):
        g = gen(7000 + si)
        x = torch.randn(b, d, generator=g)
        labels = make_labels(b, "pk", g)
        n_cls = int(labels.max()) + 1
        logits = torch.randn(b, n_cls, generator=g)
        for dtype_name in DTYPE_NAMES:
            run.tick()
            params = dict(B=b, D=d, dtype=dtype_name)
            with run.subcase(params):
                for method in ("gram", "svd"):
                    # s_mu from the definition: the mean singular value of the normalised rows (fp64 SVD)
                    compare_losses(run, f"SVMaxRegularizer ({method})", dict(params, method=method),
                                   lambda xx, _m=method: ml.SVMaxRegularizer(weight=0.5, method=_m)(xx),
                                   lambda xx: -0.5 * torch.linalg.svdvals(F.normalize(xx, dim=1)).mean(),
                                   [x], dtype_name, LOSS_TOL[dtype_name])
                compare_losses(run, "TwoHeadLoss (semi-hard)", params,
                               lambda lg, xx, ll: ml.TwoHeadLoss()(lg, xx, ll),
                               lambda lg, xx, ll: F.cross_entropy(lg, ll) + ml.reference.triplet_loss(
                                   xx, ll, margin=0.2, mining="semi_hard", distance="squared_euclidean",
                                   tie_dtype=torch.float32)
                               if b <= 1024 else F.cross_entropy(lg, ll) + ml.functional.triplet_loss(
                                   xx, ll, margin=0.2, mining="semi_hard", distance="squared_euclidean"),
                               [logits, x, labels], dtype_name, LOSS_TOL[dtype_name])
                head = ml.EmbeddingHead(d, 16)
                out = head.to(run.device, to_dtype(dtype_name))(x.to(run.device, to_dtype(dtype_name)))
                run.check("EmbeddingHead unit rows", params, float((out.float().norm(dim=1) - 1).abs().max()),
                          max(ROUNDING_TOL[dtype_name], 1e-6))
        # CrossBatchMemory: two batches into a memory of 2b; the second call equals the loss against the
        # memory with the batch's own slots excluded by index (fp32 only: the memory keeps fp32 rows)
        params = dict(B=b, D=d, dtype="fp32", memory=2 * b)
        with run.subcase(params):
            mem = ml.CrossBatchMemory(ml.TripletLoss(mining="batch_all"), d, 2 * b).to(run.device)
            first = torch.randn(b, d, generator=g)
            mem(first.to(run.device), labels.to(run.device))
            got = mem(x.to(run.device), labels.to(run.device))
            bank = torch.cat([first, x]).double()
            bank_labels = torch.cat([labels, labels])
            want = ml.functional.triplet_loss(x.double(), labels, bank, bank_labels, mining="batch_all",
                                              ref_self_index=torch.arange(b, 2 * b))
            run.check("CrossBatchMemory loss", params, rel_err(got, want), LOSS_TOL["fp32"])
            sampler = ml.PKSampler(labels, p=max(1, min(4, n_cls)), k=4, seed=0, num_replicas=1, rank=0)
            seen = torch.zeros(b, dtype=torch.bool)
            for idx in sampler:
                seen[torch.as_tensor(idx)] = True
            run.check("PKSampler covers every sample", params, int((~seen).sum()), 0)


def case_collapse_proof(run: Run) -> None:
    """SCTLoss, EPHNLoss and the easy positive with the hinge on the device (the one-block and the chunked
    miners) vs the fp64 CPU dense reference; MiningSchedule's stages; TripletStats and CollapseMonitor read
    on the device vs the same figures computed on the CPU; multi-hot labels; a GradCache step's gradient."""
    import torch

    import metricloss as ml
    from metricloss.ops.triplet import TripletForm

    shapes = [(32, 8)] if run.dry else ([(1024, 128)] if run.quick else [(256, 64), (1024, 128), (4096, 128)])
    forms = {"SCTLoss": (ml.SCTLoss, TripletForm("easiest", "sct"), "cosine"),
             "EPHNLoss": (ml.EPHNLoss, TripletForm("easiest", "nca", min_similarity=0.0), "cosine"),
             "TripletLoss (positive='easiest')": (lambda **kw: ml.TripletLoss(positive="easiest", **kw),
                                                  TripletForm("easiest"), "euclidean")}
    for si, (b, d) in enumerate(shapes):
        g = gen(7500 + si)
        x = torch.randn(b, d, generator=g)
        labels = make_labels(b, "pk", g)
        for dtype_name in ("fp32",):
            run.tick()
            for chunk in (None, 1 << 16):  # the one-block path, then the chunked engine
                params = dict(B=b, D=d, dtype=dtype_name, chunk_bytes=chunk or "default")
                with run.subcase(params):
                    for name, (cls, form, distance) in forms.items():
                        ref = (lambda xx, _f=form, _d=distance: ml.reference.triplet_loss(
                            xx, labels, margin=0.2, distance=_d, form=_f)) if b <= 1024 else \
                            (lambda xx, _c=cls: _c(chunk_bytes=1 << 22, monitor=False)(xx, labels))
                        compare_losses(run, name, params,
                                       lambda xx, _c=cls, _ch=chunk: _c(chunk_bytes=_ch, monitor=False)(
                                           xx, labels.to(xx.device)),
                                       ref, [x], dtype_name, LOSS_TOL[dtype_name])
        params = dict(B=b, D=d, dtype="fp32")
        with run.subcase(params):
            crit = ml.TripletLoss(monitor=ml.CollapseMonitor(check_every=1))
            crit(x.to(run.device), labels.to(run.device))
            on_device = crit.last_stats.as_dict()
            cpu = ml.TripletLoss(monitor=False)
            cpu(x.double(), labels)
            on_cpu = cpu.last_stats.as_dict()
            run.check("TripletStats on the device", params,
                      max(abs(on_device[k] - on_cpu[k]) / max(abs(on_cpu[k]), 1e-12)
                          for k in ("loss", "d_ap_mean", "d_an_mean", "hard_negative_ratio")), LOSS_TOL["fp32"])
            run.check("CollapseMonitor read its record", params, abs(len(crit.monitor.history) - 1), 0)
            schedule = ml.MiningSchedule([(0, "batch_all"), (1, "batch_hard")]).to(run.device)
            first = schedule(x.to(run.device), labels.to(run.device))
            second = schedule(x.to(run.device), labels.to(run.device))
            want = [ml.functional.triplet_loss(x.double(), labels, mining=m) for m in ("batch_all", "batch_hard")]
            run.check("MiningSchedule stages", params, max(rel_err(first, want[0]), rel_err(second, want[1])),
                      LOSS_TOL["fp32"])
            # multi-hot labels (positive iff a label in common) on the device vs the fp64 CPU dense reference
            multi = torch.rand(b, 6, generator=g) < 0.3
            if b <= 1024:
                for mining in ("batch_hard", "batch_all", "semi_hard"):
                    compare_losses(run, f"TripletLoss (multi-hot labels, {mining})", params,
                                   lambda xx, _m=mining: ml.TripletLoss(mining=_m, monitor=False)(
                                       xx, multi.to(xx.device)),
                                   lambda xx, _m=mining: ml.reference.triplet_loss(xx, multi, margin=0.2, mining=_m),
                                   [x], "fp32", LOSS_TOL["fp32"])
                sampler = ml.MultiLabelPKSampler(multi, p=2, k=4, seed=0, num_replicas=1, rank=0)
                seen = torch.zeros(b, dtype=torch.bool)
                for idx in sampler:
                    seen[torch.as_tensor(idx)] = True
                run.check("MultiLabelPKSampler covers every labelled sample", params,
                          int((~seen & multi.any(1)).sum()), 0)
            # GradCache: a linear network's parameter gradient on the device vs one full-batch fp64 CPU step
            torch.manual_seed(0)
            net = torch.nn.Linear(d, 32)
            ref_net = torch.nn.Linear(d, 32).double()
            ref_net.load_state_dict(net.state_dict())
            net = net.to(run.device)
            ml.GradCache(net, ml.TripletLoss(mining="batch_all", monitor=False), max(1, b // 4)).step(
                x.to(run.device), labels.to(run.device))
            ml.TripletLoss(mining="batch_all", monitor=False)(ref_net(x.double()), labels).backward()
            run.check("GradCache parameter gradient", params, rel_err(net.weight.grad, ref_net.weight.grad),
                      10 * LOSS_TOL["fp32"])


def case_metrics(run: Run) -> None:
    """retrieval_metrics on the device vs the CPU (fp32 input; tiny and default chunk budgets)."""
    import torch

    import metricloss as ml

    # the CPU reference is a full ranking per (metric, dtype): sizes it computes in about a second on 16 cores
    shapes = [(60, 8)] if run.dry else ([(2048, 128)] if run.quick else [(8192, 128), (4097, 3)])
    for si, (n, d) in enumerate(shapes):
        g = gen(6000 + si)
        x = torch.randn(n, d, generator=g)
        labels = make_labels(n, "imbalanced", g)
        for metric in ("cosine", "euclidean"):
            for dtype_name in DTYPE_NAMES:
                run.tick()
                ref = ml.metrics.retrieval_metrics(quantise(x, dtype_name).float(), labels, metric=metric)
                for chunk in (None, 1 << 16):
                    params = dict(N=n, D=d, metric=metric, dtype=dtype_name, chunk_bytes=chunk)
                    with run.subcase(params):
                        got = ml.metrics.retrieval_metrics(x.to(run.device, to_dtype(dtype_name)),
                                                           labels.to(run.device), metric=metric, chunk_bytes=chunk)
                        err = max(abs(got[k] - ref[k]) for k in ref)
                        run.check("retrieval_metrics vs CPU", params, err, METRIC_TOL)


# ----------------------------------------------------------------------------------------------------
# speed and memory
# ----------------------------------------------------------------------------------------------------

def measure(run: Run, step: Callable[[], Any], warmup: int, repeats: int, budget_s: float) -> Dict[str, Any]:
    """Median time (CUDA events on a GPU, the host clock on CPU) and peak extra memory of ``step``.

    Stops repeating once ``budget_s`` is spent (at least one timed run after the warm-up).
    """
    import torch

    cuda = run.device.type == "cuda"
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    run.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
        base = torch.cuda.memory_allocated(run.device)
    times = []
    for _ in range(repeats):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            step()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    res = {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
    if cuda:
        res["peak_extra_mib"] = (torch.cuda.max_memory_allocated(run.device) - base) / 2**20
    return res


def _time(run: Run, family: str, method: str, params: Dict[str, Any], make_step: Callable[[], Callable],
          flops: Optional[float] = None, peak_key: Optional[str] = None, repeats: int = 10,
          warmup: int = 2) -> None:
    """Build and measure one (family, method, params) point; errors (e.g. out of memory) are recorded."""
    import torch

    run.tick()
    row = dict(family=family, method=method, **params)
    try:
        step = make_step()
        per_point = 1.0 if run.dry else (8.0 if run.quick else 15.0)
        row.update(measure(run, step, 0 if run.dry else warmup, 1 if run.dry else repeats, per_point))
        if flops is not None:
            row["tflops"] = flops / row["median_s"] / 1e12
            peak = run.peak.get(peak_key) if run.peak and peak_key else None
            if peak:
                row["share_of_peak"] = row["tflops"] / peak
    except CaseTimeout:
        raise
    except Exception as exc:  # out of memory, a missing optional package, a compile failure: keep going
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    run.timings.append(row)


def _fwd_bwd(loss_fn: Callable, *inputs) -> Callable[[], None]:
    """A step running ``loss_fn(*inputs).backward()`` (float inputs are leaves requiring grad)."""
    leaves = [t.requires_grad_(True) if t.is_floating_point() else t for t in inputs]

    def step():
        for t in leaves:
            if t.is_floating_point():
                t.grad = None
        loss_fn(*leaves).backward()

    return step


def _pml_loss(mining: str) -> Optional[Callable]:
    """PML's version of a triplet loss (``benchmarks.memory_triplet.build_loss``: the same definitions as the CPU
    benchmarks, margin 0.2), or None when pytorch-metric-learning does not import."""
    try:
        import pytorch_metric_learning  # noqa: F401
    except Exception:
        return None
    from benchmarks.memory_triplet import build_loss

    return build_loss("pml", mining)


def dense_batch_hard(x, labels, margin: float = 0.2):
    """Batch-hard with the full N×N distance matrix (the textbook version, for ``torch.compile``)."""
    import torch
    import torch.nn.functional as F

    xc = F.normalize(x.float(), dim=1).to(x.dtype)  # the Gram product in the input dtype (tensor cores)
    x = xc.float()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T).float()).clamp_min(0.0)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d_ap = torch.where(same & ~eye, d2, float("-inf")).amax(1).clamp_min(0.0)
    d_an = torch.where(~same, d2, float("inf")).amin(1)
    return F.relu(margin + d_ap.clamp_min(1e-12).sqrt() - d_an.clamp_min(1e-12).sqrt()).mean()


def case_speed_batch_hard(run: Run) -> None:
    """Batch-hard forward+backward: Triton vs chunked torch vs PML vs compiled dense vs one bare matmul."""
    import torch

    import metricloss as ml
    from metricloss.ops.mining import batch_hard_indices_triton

    if run.dry:
        sizes, dims, dtypes = [64], [16], ["fp32"]
    elif run.quick:  # largest first: the headline is measured before any budget overrun
        sizes, dims, dtypes = [65536, 16384, 4096], [512], ["bf16"]
    else:
        sizes, dims, dtypes = [65536, 16384, 4096], [512, 128], ["bf16", "fp32"]
    pml = _pml_loss("batch_hard")
    free = torch.cuda.mem_get_info(run.device)[0] if run.device.type == "cuda" else 8 * 2**30
    for n in sizes:
        for d in dims:
            for dtype_name in dtypes:
                dt = to_dtype(dtype_name)
                g = gen(7000 + n + d)
                x = torch.randn(n, d, generator=g).to(run.device, dt)
                labels = make_labels(n, "pk", g).to(run.device)
                flops = 2.0 * n * n * d
                pk = dtype_name if dtype_name != "fp32" else "tf32"
                params = dict(N=n, D=d, dtype=dtype_name)
                a = torch.nn.functional.normalize(x.float(), dim=1).to(dt)
                _time(run, "batch-hard", "triton miner only", params,
                      lambda: (lambda: batch_hard_indices_triton(a, labels, a, labels, True, "euclidean")),
                      flops=flops, peak_key=pk)
                for backend in ("triton", "torch"):
                    _time(run, "batch-hard", f"metricloss {backend} (fwd+bwd)", params,
                          lambda b=backend: _fwd_bwd(ml.TripletLoss(margin=0.2, backend=b), x.detach().clone(),
                                                     labels), flops=flops, peak_key=pk)
                dense_bytes = 6.0 * n * n * 4
                if pml is None:
                    run.timings.append(dict(family="batch-hard", method="PML (fwd+bwd)", **params,
                                            error="pytorch-metric-learning not importable (carry .wheels/)"))
                elif dense_bytes > 0.7 * free:
                    run.timings.append(dict(family="batch-hard", method="PML (fwd+bwd)", **params,
                                            error=f"skipped: ~{dense_bytes / 2**30:.0f} GiB of N×N tensors"))
                else:
                    _time(run, "batch-hard", "PML (fwd+bwd)", params,
                          lambda: _fwd_bwd(pml, x.detach().float().clone(), labels), repeats=3, warmup=1)
                # compiling takes tens of seconds per shape: full runs only, up to N = 16384 (N×N tensors)
                if run.dry or run.quick or n > 16384 or dense_bytes > 0.7 * free:
                    reason = ("dry run" if run.dry else "quick run" if run.quick
                              else f"~{dense_bytes / 2**30:.0f} GiB of N×N tensors")
                    run.timings.append(dict(family="batch-hard", method="dense torch.compile (fwd+bwd)", **params,
                                            error=f"skipped: {reason}"))
                else:
                    compiled = torch.compile(dense_batch_hard, dynamic=False)
                    _time(run, "batch-hard", "dense torch.compile (fwd+bwd)", params,
                          lambda: _fwd_bwd(compiled, x.detach().clone(), labels), repeats=5, warmup=2)
                _time(run, "batch-hard", f"bare matmul x @ x.T ({dtype_name})", params,
                      lambda: (lambda: a @ a.T), flops=flops, peak_key=pk)


def case_speed_others(run: Run) -> None:
    """Batch-all, semi-hard, centroid, streamed NormSoftmax, DGCRL and WARP at their headline sizes."""
    import torch
    import torch.nn.functional as F

    import metricloss as ml

    def s(full, dry):
        return dry if run.dry else full

    n = s(4096, 64)
    g = gen(8000)
    x = torch.randn(n, 128 if not run.dry else 8, generator=g).to(run.device)
    labels = make_labels(n, "pk", g).to(run.device)
    for mining in ("batch_all", "semi_hard"):
        _time(run, mining, "metricloss torch (fwd+bwd)", dict(N=n, D=x.shape[1], dtype="fp32"),
              lambda m=mining: _fwd_bwd(ml.TripletLoss(margin=0.2, mining=m, reduction="mean_nonzero"),
                                        x.detach().clone(), labels))
        pml = _pml_loss(mining)
        if pml is not None:
            _time(run, mining, "PML (fwd+bwd)" + (" (a different loss)" if mining == "semi_hard" else ""),
                  dict(N=n, D=x.shape[1], dtype="fp32"), lambda f=pml: _fwd_bwd(f, x.detach().clone(), labels),
                  repeats=3, warmup=1)
    b, c, d = s(65536, 64), s(1000, 10), s(128, 16)
    xc = (torch.randn(b, d, generator=g) * 0.3).to(run.device)
    yc = torch.randint(0, c, (b,), generator=g).to(run.device)
    cents = F.normalize(torch.randn(c, d, generator=g), dim=1).to(run.device)
    for backend in ("triton", "torch"):
        _time(run, "centroid", f"metricloss {backend} (fwd+bwd)", dict(B=b, C=c, D=d, dtype="fp32"),
              lambda bk=backend: _fwd_bwd(lambda e, y: ml.functional.centroid_triplet_loss(e, y, cents, backend=bk),
                                          xc.detach().clone(), yc), flops=2.0 * b * c * d, peak_key="tf32")
    _time(run, "centroid", "dense cdist (fwd+bwd)", dict(B=b, C=c, D=d, dtype="fp32"),
          lambda: _fwd_bwd(lambda e, y: _dense_centroid(e, y, cents), xc.detach().clone(), yc))
    b, d, c = s(1024, 16), s(512, 8), s(100000, 100)
    xs = torch.randn(b, d, generator=g).to(run.device)
    ys = torch.randint(0, c, (b,), generator=g).to(run.device)
    ws = (torch.randn(c, d, generator=g) / math.sqrt(d)).to(run.device)
    for cc in (max(1, 4_000_000 // b), None):
        _time(run, "NormSoftmax", f"class_chunk={cc}" + (" (dense)" if cc is None else " (streamed)"),
              dict(B=b, D=d, C=c, dtype="fp32"),
              lambda k=cc: _fwd_bwd(lambda e, y, w: ml.functional.norm_softmax_loss(e, y, w, class_chunk=k),
                                    xs.detach().clone(), ys, ws.detach().clone()), flops=6.0 * b * c * d,
              peak_key="fp32")
    c2 = s(30000, 50)
    w2 = (torch.randn(c2, d, generator=g) / math.sqrt(d)).to(run.device)
    y2 = torch.randint(0, c2, (b,), generator=g).to(run.device)
    for cc in (max(1, 4_000_000 // b), None):
        _time(run, "DGCRL", f"class_chunk={cc}" + (" (dense)" if cc is None else " (streamed)"),
              dict(B=b, D=d, C=c2, dtype="fp32"),
              lambda k=cc: _fwd_bwd(lambda e, y, w: ml.functional.centralized_ranking_loss(e, y, w, class_chunk=k),
                                    xs.detach().clone(), y2, w2.detach().clone()))
    b, c = s(4096, 32), s(100000, 100)
    sc = torch.randn(b, c, generator=g).to(run.device)
    yw = torch.randint(0, c, (b,), generator=g).to(run.device)
    for mode in ("sampled", "exact"):
        _time(run, "WARP", f"metricloss {mode} (fwd+bwd)", dict(B=b, C=c, dtype="fp32"),
              lambda md=mode: _fwd_bwd(ml.WARPLoss(mode=md), sc.detach().clone(), yw))
    _time(run, "WARP", "F.cross_entropy (fwd+bwd)", dict(B=b, C=c, dtype="fp32"),
          lambda: _fwd_bwd(F.cross_entropy, sc.detach().clone(), yw))


def cuda_graphed(step: Callable[[], None], device) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (warm-up on a side stream, then one capture); returns its replay.
    Raises where the step cannot be captured (a host sync, a data-dependent shape): the reason is recorded."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def case_small_batch(run: Run) -> None:
    """The regime users train in: every loss at N in {128, 256, 512, 1024, 4096} (D = 128, fp32), eager and
    CUDA-graphed, against PML and against a dense torch version and its torch.compile'd form."""
    import torch
    import torch.nn.functional as F

    import metricloss as ml

    sizes = [64] if run.dry else ([256, 1024] if run.quick else [128, 256, 512, 1024, 4096])
    d = 16 if run.dry else 128
    cuda = run.device.type == "cuda"
    for n in sizes:
        g = gen(9100 + n)
        x = torch.randn(n, d, generator=g).to(run.device)
        labels = make_labels(n, "pk", g).to(run.device)
        classes = max(2, n // 4)
        scores = torch.randn(n, 1000 if not run.dry else 20, generator=g).to(run.device)
        score_labels = torch.randint(0, scores.shape[1], (n,), generator=g).to(run.device)
        params = dict(N=n, D=d, dtype="fp32")
        norm_softmax = ml.NormSoftmaxLoss(d, classes).to(run.device)
        losses = {
            "batch-hard (auto)": (lambda: ml.TripletLoss(margin=0.2), x),
            "batch-hard (torch one-block)": (lambda: ml.TripletLoss(margin=0.2, backend="torch"), x),
            "batch-all": (lambda: ml.TripletLoss(margin=0.2, mining="batch_all", reduction="mean_nonzero"), x),
            "semi-hard": (lambda: ml.TripletLoss(margin=0.2, mining="semi_hard"), x),
            "NormSoftmax": (lambda: norm_softmax, x),
            "WARP exact, (N, 1000)": (lambda: ml.WARPLoss(mode="exact"), scores),
            "WARP sampled, (N, 1000)": (lambda: ml.WARPLoss(), scores),
            "F.cross_entropy, (N, 1000)": (lambda: F.cross_entropy, scores),
        }
        for name, (make, inputs) in losses.items():
            y = score_labels if inputs is scores else labels
            lib = "torch" if name.startswith("F.") else "metricloss"
            _time(run, "small batch", f"{name}: {lib} eager", params,
                  lambda mk=make, t=inputs, yy=y: _fwd_bwd(mk(), t.detach().clone(), yy), repeats=50, warmup=3)
            if not cuda:
                run.timings.append(dict(family="small batch", method=f"{name}: CUDA-graphed", **params,
                                        error="skipped: no CUDA device"))
                continue
            _time(run, "small batch", f"{name}: CUDA-graphed", params,
                  lambda mk=make, t=inputs, yy=y: cuda_graphed(_fwd_bwd(mk(), t.detach().clone(), yy), run.device),
                  repeats=50, warmup=3)
        for mining in ("batch_hard", "batch_all"):
            pml = _pml_loss(mining)
            if pml is None:
                run.timings.append(dict(family="small batch", method=f"{mining}: PML eager", **params,
                                        error="pytorch-metric-learning not importable (carry .wheels/)"))
            else:
                _time(run, "small batch", f"{mining}: PML eager", params,
                      lambda f=pml: _fwd_bwd(f, x.detach().clone(), labels), repeats=20, warmup=2)
        _time(run, "small batch", "batch_hard: dense torch eager", params,
              lambda: _fwd_bwd(dense_batch_hard, x.detach().clone(), labels), repeats=50, warmup=3)
        if run.dry or run.quick:  # compiling takes tens of seconds per shape: full runs only
            run.timings.append(dict(family="small batch", method="batch_hard: dense torch.compile", **params,
                                    error=f"skipped: {'dry' if run.dry else 'quick'} run"))
            continue
        compiled = torch.compile(dense_batch_hard, dynamic=False, mode="reduce-overhead" if cuda else "default")
        _time(run, "small batch", "batch_hard: dense torch.compile" + (" (reduce-overhead)" if cuda else ""),
              params, lambda: _fwd_bwd(compiled, x.detach().clone(), labels), repeats=50, warmup=3)


def _dense_centroid(x, labels, centroids):
    """The naive centroid bound: the full (B, C) ``torch.cdist`` matrix."""
    import torch

    d = torch.cdist(x, centroids)
    own = d.gather(1, labels[:, None]).squeeze(1)
    return (own - (d.sum(1) - own) / (3 * (centroids.shape[0] - 1))).mean()


# ----------------------------------------------------------------------------------------------------
# host syncs
# ----------------------------------------------------------------------------------------------------

def sync_workloads(device, tiny: bool):
    """(name, fn(chunk_budget) -> None) for every loss: one forward+backward; ``chunk_budget`` is ``"tiny"``
    (many chunks) or ``"large"`` (one chunk). Shared by the check and ``tests/test_sync.py``."""
    import torch

    import metricloss as ml
    import metricloss.functional as MF

    g = gen(9000)
    n, d, c = (48, 8, 40) if tiny else (512, 32, 1000)
    x = torch.randn(n, d, generator=g).to(device)
    labels = make_labels(n, "pk", g).to(device)
    scores = torch.randn(n, c, generator=g).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    w = torch.randn(c, d, generator=g).to(device)
    cents = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1).to(device)
    ycent = torch.randint(0, c, (n,), generator=g).to(device)
    chunk = {"tiny": 512, "large": 1 << 30}
    cls = {"tiny": 3, "large": None}

    def bwd(loss):
        loss.backward()

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    # batch-hard's "large" budget holds the batch in one chunk but not in the dense one-block path (which has
    # no chunks; its syncs are the step-cost test's, tests/test_step_costs.py)
    hard_chunk = {"tiny": 512, "large": 30_000 if tiny else 4 << 20}

    def triplet(mining, backend="torch"):
        budget = hard_chunk if mining == "batch_hard" and backend == "torch" else chunk
        return lambda b: bwd(MF.triplet_loss(leaf(x), labels, mining=mining, backend=backend, chunk_bytes=budget[b]))

    def warp(mode):
        def run_(b):
            old = os.environ.get("METRICLOSS_CHUNK_BYTES")
            os.environ["METRICLOSS_CHUNK_BYTES"] = str(chunk[b])
            try:
                bwd(MF.warp_loss(leaf(scores), y, mode=mode, generator=torch.Generator(device).manual_seed(0)))
            finally:
                if old is None:
                    del os.environ["METRICLOSS_CHUNK_BYTES"]
                else:
                    os.environ["METRICLOSS_CHUNK_BYTES"] = old
        return run_

    on_gpu = []
    if torch.device(device).type == "cuda":  # the default (auto = Triton) paths a GPU user gets
        on_gpu = [("triplet batch_hard (auto: Triton)", triplet("batch_hard", "auto")),
                  ("centroid (tensor, auto: Triton)",
                   lambda b: bwd(MF.centroid_triplet_loss(leaf(x), ycent, cents, backend="auto",
                                                          chunk_bytes=chunk[b])))]
    return on_gpu + [
        ("triplet batch_hard (torch)", triplet("batch_hard")),
        ("triplet batch_all", triplet("batch_all")),
        ("triplet semi_hard", triplet("semi_hard")),
        ("WARP sampled", warp("sampled")),
        ("WARP exact", warp("exact")),
        ("centroid (tensor, torch)",
         lambda b: bwd(MF.centroid_triplet_loss(leaf(x), ycent, cents, backend="torch", chunk_bytes=chunk[b]))),
        ("centroid (onehot)",
         lambda b: bwd(MF.centroid_triplet_loss(leaf(x), labels % d, "onehot", num_classes=d,
                                                chunk_bytes=chunk[b]))),
        ("NormSoftmax streamed",
         lambda b: bwd(MF.norm_softmax_loss(leaf(x), y, leaf(w), class_chunk=cls[b] or c))),
        ("DGCRL streamed",
         lambda b: bwd(MF.centralized_ranking_loss(leaf(x), y, leaf(w), class_chunk=cls[b] or c))),
        ("retrieval_metrics", lambda b: ml.metrics.retrieval_metrics(x, labels, chunk_bytes=chunk[b])),
    ]


def case_syncs(run: Run) -> None:
    """Each loss once under the sync counter with a tiny and a large chunk budget, and (CUDA) under
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    import torch

    for name, fn in sync_workloads(run.device, tiny=run.dry):
        run.tick()
        row: Dict[str, Any] = {"loss": name}
        try:
            for budget in ("tiny", "large"):
                with make_sync_counter() as counter:
                    fn(budget)
                row[f"count_{budget}"] = counter.total
                row[f"calls_{budget}"] = dict(counter.counts)
            if run.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        fn("tiny")
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                row["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        row["ok"] = "error" not in row and row.get("count_tiny") == row.get("count_large")
        run.syncs.append(row)


# ----------------------------------------------------------------------------------------------------
# driver and report
# ----------------------------------------------------------------------------------------------------

# Time budget of each case, seconds, per mode. The dry run (CI, a shared CPU) gets DRY_RUN_BUDGET_S for every
# case: there the budgets only guard against a hang, and a loaded machine must not skip sub-cases.
DRY_RUN_BUDGET_S = 300.0
CASES: List[Tuple[str, Callable[[Run], None], Dict[str, float]]] = [
    ("batch-hard mining and loss", case_batch_hard, {"quick": 40, "full": 110}),
    ("batch-all / semi-hard", case_block_triplets, {"quick": 10, "full": 45}),
    ("WARP", case_warp, {"quick": 6, "full": 25}),
    ("centroid", case_centroid, {"quick": 8, "full": 30}),
    ("cosine family", case_cosine, {"quick": 5, "full": 20}),
    ("retrieval metrics", case_metrics, {"quick": 5, "full": 20}),
    ("toolbox and wrappers", case_toolbox, {"quick": 6, "full": 20}),
    ("collapse-proof batch-hard", case_collapse_proof, {"quick": 6, "full": 20}),
    ("speed: batch-hard", case_speed_batch_hard, {"quick": 22, "full": 90}),
    ("speed: other losses", case_speed_others, {"quick": 8, "full": 30}),
    ("host syncs", case_syncs, {"quick": 6, "full": 10}),
    ("speed: small batches", case_small_batch, {"quick": 12, "full": 90}),
]

# Every public name the check covers (the test asserts the report names each).
PUBLIC_COVERED = ("TripletLoss", "BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss",
                  "mine_batch_hard", "WARPLoss", "CentroidTripletLoss", "NormSoftmaxLoss",
                  "CentralizedRankingLoss", "CosineClassifier", "NormalizeScale", "retrieval_metrics",
                  "SVMaxRegularizer", "TwoHeadLoss", "EmbeddingHead", "CrossBatchMemory", "PKSampler", "MultiLabelPKSampler",
                  "SCTLoss", "EPHNLoss", "MiningSchedule", "CollapseMonitor", "TripletStats", "GradCache")


def environment(run: Run) -> Dict[str, Any]:
    import torch

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "mode": run.mode, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform(), "device": str(run.device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({type(exc).__name__})"
    try:
        import pytorch_metric_learning

        env["pml"] = pytorch_metric_learning.__version__
    except Exception:
        env["pml"] = "not importable"
    if run.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(run.device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(run.device)))
        env["memory_gib"] = round(torch.cuda.get_device_properties(run.device).total_memory / 2**30, 1)
    else:
        env["device_name"] = "CPU (dry run: Triton interpreter)" if run.dry else "CPU"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    env["allow_tf32 (torch matmul)"] = torch.backends.cuda.matmul.allow_tf32
    return env


def _timing(run: Run, method: str, **params) -> Optional[Dict[str, Any]]:
    for t in run.timings:
        if t["family"] == "batch-hard" and t["method"] == method and all(t.get(k) == v for k, v in params.items()):
            return t
    return None


def targets(run: Run) -> List[Dict[str, Any]]:
    """The acceptance targets of the GPU work, read off the timings: (target, measured, met) rows; met is None
    when the figures are missing (not measured, skipped, or no peak for this GPU)."""
    rows = []
    big = dict(N=65536, D=512, dtype="bf16")
    miner, matmul = _timing(run, "triton miner only", **big), _timing(run, "bare matmul x @ x.T (bf16)", **big)
    peak = (run.peak or {}).get("bf16")
    if miner and "median_s" in miner and peak:
        bound = 2.0 * 65536**2 * 512 / (peak * 1e12)
        rows.append({"target": "Triton batch-hard miner, N=M=65536, D=512, bf16: within 2.5x of the matmul bound "
                               f"({bound * 1e3:.2f} ms at the {peak:.0f} TFLOP/s peak)",
                     "measured": f"{miner['median_s'] * 1e3:.2f} ms = {miner['median_s'] / bound:.2f}x the bound"
                                 + (f", {miner['median_s'] / matmul['median_s']:.2f}x the measured bare matmul"
                                    if matmul and "median_s" in matmul else ""),
                     "met": miner["median_s"] <= 2.5 * bound})
    else:
        rows.append({"target": "Triton batch-hard miner, N=M=65536, D=512, bf16: within 2.5x of the matmul bound",
                     "measured": "not measured", "met": None})
    if miner and "median_s" in miner:
        rows.append({"target": "the same: <= 10 ms (the H100 target)", "measured": f"{miner['median_s'] * 1e3:.2f} ms",
                     "met": miner["median_s"] <= 0.010})
    mid = dict(N=16384, D=512, dtype="bf16")
    ours, pml = _timing(run, "metricloss triton (fwd+bwd)", **mid), _timing(run, "PML (fwd+bwd)", **mid)
    if ours and pml and "median_s" in ours and "median_s" in pml:
        rows.append({"target": "batch-hard fwd+bwd, N=16384, D=512: Triton >= 20x faster than PML on the same GPU",
                     "measured": f"{pml['median_s'] / ours['median_s']:.1f}x ({ours['median_s'] * 1e3:.1f} vs "
                                 f"{pml['median_s'] * 1e3:.1f} ms)", "met": pml["median_s"] / ours["median_s"] >= 20})
    else:
        rows.append({"target": "batch-hard fwd+bwd, N=16384: Triton >= 20x faster than PML", "measured":
                     (pml or {}).get("error", "not measured"), "met": None})
    fb = _timing(run, "metricloss triton (fwd+bwd)", **big)
    if fb and "peak_extra_mib" in fb:
        rows.append({"target": "batch-hard Triton fwd+bwd at N=65536, D=512: peak extra memory O(N·D), <= 512 MiB",
                     "measured": f"{fb['peak_extra_mib']:.0f} MiB (N·D·2 B = {65536 * 512 * 2 / 2**20:.0f} MiB)",
                     "met": fb["peak_extra_mib"] <= 512})
    return rows


def _fmt(v: Any, spec: str = ".3g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def render(run: Run, env: Dict[str, Any], wall_s: float) -> str:
    lines = [f"# metricloss GPU check ({run.mode})", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += [f"| wall time | {wall_s:.0f} s |", ""]
    fails = [c for c in run.checks if not c["ok"]]
    lines += ["## Correctness", "",
              f"{len(run.checks)} checks, **{len(fails)} failed**. Covered: {', '.join(PUBLIC_COVERED)}.", ""]
    per = collections.OrderedDict()
    for c in run.checks:
        key = (c["case"], c["check"])
        n, f, worst = per.get(key, (0, 0, 0.0))
        ratio = c["err"] / c["tol"] if c["tol"] else (0.0 if c["err"] == 0 else math.inf)
        per[key] = (n + 1, f + (not c["ok"]), max(worst, ratio) if not math.isnan(ratio) else math.inf)
    lines += ["| case | check | runs | failed | worst err / tol |", "|---|---|---|---|---|"]
    lines += [f"| {k[0]} | {k[1]} | {n} | {f} | {w:.2g} |" for k, (n, f, w) in per.items()]
    if fails:
        lines += ["", "### Failures", ""]
        lines += [f"- {c['case']} / {c['check']} {json.dumps(c['params'])}: err {_fmt(c['err'])} > tol "
                  f"{_fmt(c['tol'])} {c['note']}" for c in fails[:200]]
    lines += ["", "## Speed and memory", "",
              f"Medians of CUDA-event timings after warm-up (host clock in a dry run); peak extra = "
              f"max_memory_allocated above the memory held before the step. Peak TFLOP/s table: {run.peak}.", "",
              "| family | method | shape | dtype | median ms | runs | peak extra MiB | TFLOP/s | share of peak |"
              " note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in run.timings:
        shape = ", ".join(f"{k}={v}" for k, v in t.items() if k in ("N", "B", "C", "D"))
        ms = t["median_s"] * 1e3 if "median_s" in t else ""
        lines.append(f"| {t['family']} | {t['method']} | {shape} | {t.get('dtype', '')} | {_fmt(ms, '.4g')} | "
                     f"{t.get('runs', '')} | {_fmt(t.get('peak_extra_mib', ''), '.0f')} | "
                     f"{_fmt(t.get('tflops', ''), '.1f')} | {_fmt(t.get('share_of_peak', ''), '.0%')} | "
                     f"{t.get('error', '')} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'–' if t['met'] is None else ('yes' if t['met'] else 'NO')} |"
              for t in targets(run)]
    lines += ["", "## Host syncs", "",
              "Synchronising calls of one forward+backward (function-mode counter) with a tiny and a large chunk "
              "budget; they must be equal. On CUDA also the warnings of set_sync_debug_mode('warn').", "",
              "| loss | tiny budget | large budget | CUDA sync warnings | equal | calls (tiny) |",
              "|---|---|---|---|---|---|"]
    for s in run.syncs:
        lines.append(f"| {s['loss']} | {s.get('count_tiny', '')} | {s.get('count_large', '')} | "
                     f"{s.get('cuda_sync_warnings', '')} | {'yes' if s['ok'] else 'NO'} | "
                     f"{s.get('calls_tiny', s.get('error', ''))} |")
    lines += ["", "## Cases and budgets", "", "| case | budget s | used s | status |", "|---|---|---|---|"]
    lines += [f"| {c['case']} | {c['budget_s']} | {c['used_s']:.1f} | {c['status']} |" for c in run.cases]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short run (< 2 min on an H100/H200)")
    mode.add_argument("--dry-run", action="store_true", help="CPU tensors, Triton interpreter, tiny sizes (CI)")
    ap.add_argument("--out", default="gpu_check_out", help="folder for REPORT.md and report.json")
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every case's time budget")
    args = ap.parse_args(argv)
    run_mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: read when kernels are decorated
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    wheels = add_wheels_to_path()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    torch.set_num_threads(min(os.cpu_count() or 1, 2 if args.dry_run else 16))
    run = Run(run_mode, "cpu" if args.dry_run else "cuda")
    env = environment(run)
    env["wheels"] = [os.path.basename(w) for w in wheels]
    run.peak = peak_for(env["device_name"]) if run.device.type == "cuda" else None
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    for name, fn, budgets in CASES:
        if args.only and not any(o in name for o in args.only):
            continue
        budget = budgets.get(run_mode, DRY_RUN_BUDGET_S) * args.budget_scale
        run.case_name, t0 = name, time.perf_counter()
        run.deadline = t0 + budget
        status = "done"
        try:
            fn(run)
        except CaseTimeout:
            status = "time budget exceeded: the remaining sub-cases were skipped"
        except Exception:
            status = "crashed: " + traceback.format_exc().strip().splitlines()[-1]
            run.fail("case crashed", {}, traceback.format_exc()[-1500:])
        run.deadline = math.inf
        used = time.perf_counter() - t0
        run.cases.append({"case": name, "budget_s": budget, "used_s": used, "status": status})
        print(f"[gpu_check] {name}: {status} ({used:.1f} s)", file=sys.stderr, flush=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    md = render(run, env, wall)
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"environment": env, "wall_s": wall, "covered": PUBLIC_COVERED, "cases": run.cases,
                   "checks": run.checks, "timings": run.timings, "syncs": run.syncs, "peak_tflops": run.peak,
                   "targets": targets(run)},
                  f, indent=1, default=str)
    print(md)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
