"""Sampled WARP for one label per row (Triton): the whole forward in one kernel, the backward in another.

The paper's loop draws a row's negatives uniformly with replacement until one violates (z_j = s_j + (m − s_y)
> 0, strict), at most ``max_trials`` times. With r violators among the row's n = C − 1 negatives its outcome
has a known law: the first violator's trial N is geometric with p = r / n, truncated at ``max_trials``, and
the violator is uniform among the r, independent of N. :func:`warp_sample_kernel` draws that outcome from
two fp64 uniforms per row (drawn by the caller from its generator, so the kernel holds no RNG state) and
writes the row's loss term; it computes what :func:`metricloss.ops.warp.single_violators_by_law` (the
torch path) and the native CPU sampler compute. One program per ``BLOCK_R`` rows, streamed in
``BLOCK_C``-column tiles, two passes over them:

1. r = #{j ≠ y : s_j + (m − s_y) > 0} in the accumulation dtype (fp32; fp64 for fp64 scores), and whether
   the row holds a NaN (then it has no violator) or an infinity;
2. N = 1 + ⌊log(1 − u_trial) / log1p(−p)⌋, N = 1 when every negative violates, nothing drawn when
   N > ``max_trials``; log1p(−p) = log(q)·(−p)/(q − 1) with q = 1 − p (exact to a few ulps; the
   interpreter has no log1p);
3. the k-th violator in column order, k = ⌊u_pick·r⌋: a running count over the tiles (a ``cumsum`` within
   each), taken where it reaches k + 1;
4. the weight w = L(⌊n / N⌋) (harmonic: from the fp64 table L(0..n); log: min(log(max(k, 1)), 10)) and the
   term ℓ = scale·w·(s_chosen + m − s_y); NaN for a row holding a NaN or an infinity (the loss of such scores
   is NaN on every path), 0 where nothing was drawn.

:func:`warp_grad_kernel` writes the whole (B, C) gradient: ∂ℓ/∂s_chosen = g·scale·w, ∂ℓ/∂s_y = −g·scale·w,
0 elsewhere, with g the row's upstream gradient (a stride-0 scalar for the reducing modes).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .tiles import POINTER_TYPE

__all__ = ["warp_sample_kernel", "warp_grad_kernel", "warp_block_c", "warp_block_r", "warp_num_warps", "warp_sample_triton",
           "warp_grad_triton", "warp_aot_jobs"]


@triton.jit
def warp_sample_kernel(
    S_ptr, S_stride, Y_ptr, U_ptr, H_ptr, P_ptr,
    TRIALS_ptr, CHOSEN_ptr, W_ptr, TERM_ptr,
    n_rows, n_cols, max_trials,
    ACC_F64: tl.constexpr,
    LOG_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``BLOCK_R`` rows of sampled WARP, each streamed in ``BLOCK_C``-column tiles.

    Args:
        S_ptr, S_stride: scores (n_rows, n_cols), unit column stride, any float dtype.
        Y_ptr: int64 positive column per row. U_ptr: (n_rows, 2) fp64 uniforms (u_trial, u_pick).
        H_ptr: fp64 harmonic table L(0..n_cols − 1) (unused with ``LOG_WEIGHT``).
        P_ptr: fp64 (margin, scale).
        TRIALS_ptr, CHOSEN_ptr: int64 outputs, N and the violator's column ((0, −1): none drawn).
        W_ptr: accumulation-dtype output scale·w (0 where none drawn), for the backward.
        TERM_ptr: accumulation-dtype output, the row's loss term.
    """
    ACC = tl.float64 if ACC_F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    s_rows = S_ptr + rows64 * S_stride                         # (BLOCK_R,) row pointers
    y = tl.load(Y_ptr + rows64, mask=row_ok, other=0)
    margin = tl.load(P_ptr).to(ACC)
    scale = tl.load(P_ptr + 1).to(ACC)
    base = margin - tl.load(s_rows + y, mask=row_ok, other=0.0).to(ACC)  # m − s_y
    num_neg = n_cols - 1

    # 1. the violators' count r, and whether the row holds a NaN or an infinity
    count = tl.zeros((BLOCK_R,), dtype=tl.int32)
    nans = tl.zeros((BLOCK_R,), dtype=tl.int32)
    infs = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        v = tl.load(s_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
        viol = (v + base[:, None] > 0) & ok & (cols[None, :] != y[:, None])
        count += tl.sum(viol.to(tl.int32), axis=1)
        nans += tl.sum((v != v).to(tl.int32), axis=1)
        infs += tl.sum((tl.abs(v) == float("inf")).to(tl.int32), axis=1)
    has_nan = nans > 0
    nonfinite = has_nan | (infs > 0)
    r = tl.where(has_nan, 0, count)

    # 2. the first violator's trial: N − 1 = ⌊log(1 − u) / log1p(−p)⌋, geometric(p = r / n), truncated
    u_trial = tl.load(U_ptr + 2 * rows64, mask=row_ok, other=0.0)
    u_pick = tl.load(U_ptr + 2 * rows64 + 1, mask=row_ok, other=0.0)
    p = r.to(tl.float64) / num_neg
    q = 1.0 - p
    log1p_neg_p = tl.where(q == 1.0, -p, tl.log(tl.where(q > 0.0, q, 1.0)) * (-p) / (q - 1.0))  # q = 0: all violate
    steps = tl.floor(tl.log(1.0 - u_trial) / tl.where(r > 0, log1p_neg_p, -1.0))  # r = 0: nothing to draw
    all_violate = r == num_neg
    found = (r > 0) & (all_violate | (steps < max_trials))
    n_trial = tl.where(all_violate, 1, tl.minimum(tl.maximum(steps, 0.0), max_trials).to(tl.int64) + 1)

    # 3. the k-th violator in column order, k = ⌊u_pick·r⌋ < r: a running count over the tiles
    k = tl.minimum((u_pick * r).to(tl.int32), r - 1)
    seen = tl.zeros((BLOCK_R,), dtype=tl.int32)
    chosen = tl.full((BLOCK_R,), -1, dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        v = tl.load(s_rows[:, None] + cols[None, :], mask=ok, other=0.0).to(ACC)
        viol = ((v + base[:, None] > 0) & ok & (cols[None, :] != y[:, None])).to(tl.int32)
        running = tl.cumsum(viol, axis=1) + seen[:, None]
        hit = (viol > 0) & (running == k[:, None] + 1)
        chosen = tl.maximum(chosen, tl.max(tl.where(hit, cols[None, :], -1), axis=1))
        seen += tl.sum(viol, axis=1)
    found = found & (chosen >= 0)

    # 4. w = L(⌊n / N⌋) and ℓ = scale·w·(s_chosen + m − s_y)
    # int32 division (a 64-bit one is a called subroutine with a stack frame); N > n gives rank 0 either way
    rank = num_neg // tl.minimum(n_trial, num_neg + 1).to(tl.int32)
    if LOG_WEIGHT:
        w = tl.minimum(tl.log(tl.maximum(rank, 1).to(ACC)), 10.0)
    else:
        w = tl.load(H_ptr + tl.where(found, rank, 0), mask=row_ok, other=0.0).to(ACC)
    s_chosen = tl.load(s_rows + tl.maximum(chosen, 0), mask=row_ok, other=0.0).to(ACC)
    w = tl.where(found, w, 0.0)
    term = tl.where(found, w * (s_chosen + base), 0.0) * scale
    tl.store(TERM_ptr + rows64, tl.where(nonfinite, float("nan"), term), mask=row_ok)
    tl.store(W_ptr + rows64, w * scale, mask=row_ok)
    tl.store(TRIALS_ptr + rows64, tl.where(found, n_trial, 0), mask=row_ok)
    tl.store(CHOSEN_ptr + rows64, tl.where(found, chosen, -1).to(tl.int64), mask=row_ok)


@triton.jit
def warp_grad_kernel(
    G_ptr, G_stride, Y_ptr, CHOSEN_ptr, W_ptr,
    DS_ptr, DS_stride,
    n_rows, n_cols,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``BLOCK_R`` rows of the gradient: DS[row] = g·w at the chosen column, −g·w at the positive, 0 elsewhere.

    Args:
        G_ptr, G_stride: the upstream gradient per row (stride 0: one scalar for every row).
        Y_ptr, CHOSEN_ptr: int64 positive and chosen columns (chosen −1: none, the row's w is 0).
        W_ptr: scale·w per row (accumulation dtype). DS_ptr, DS_stride: the output (n_rows, n_cols).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    y = tl.load(Y_ptr + rows64, mask=row_ok, other=0)
    chosen = tl.load(CHOSEN_ptr + rows64, mask=row_ok, other=-1)
    g = tl.load(G_ptr + rows64 * G_stride, mask=row_ok, other=0.0).to(W_ptr.dtype.element_ty)
    gw = g * tl.load(W_ptr + rows64, mask=row_ok, other=0.0)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        val = (tl.where(cols[None, :] == chosen[:, None], gw[:, None], 0.0)
               - tl.where(cols[None, :] == y[:, None], gw[:, None], 0.0))
        tl.store(DS_ptr + rows64[:, None] * DS_stride + cols[None, :], val.to(DS_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < n_cols)[None, :])


# ----------------------------------------------------------------------------------------------------
# launch configuration: named heuristics
# ----------------------------------------------------------------------------------------------------

def warp_block_c(n_cols: int) -> int:
    """Columns per tile: the whole row up to 2048 (one tile per pass at C = 1000), 2048 beyond (a row of
    C = 10⁵ is then 49 tiles per pass)."""
    return max(16, min(2048, triton.next_power_of_2(n_cols)))


def warp_block_r(block_c: int) -> int:
    """Rows per program: tiles of about 2048 scores (at most 64 rows: narrow rows share a program, so
    C = 10 costs B/64 programs instead of B)."""
    return max(1, min(64, 2048 // block_c))


def warp_num_warps(block_c: int) -> int:
    """Warps per program: 8 scores of a 2048-score tile per thread at most (8 warps for 2048: with 4, the
    fp32 harmonic kernel spills on sm_80), at least 2 warps."""
    return max(2, min(8, block_c // 256))


# ----------------------------------------------------------------------------------------------------
# drivers
# ----------------------------------------------------------------------------------------------------

def warp_sample_triton(scores: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor, params: torch.Tensor,
                       table: Optional[torch.Tensor], max_trials: int,
                       log_weight: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch :func:`warp_sample_kernel` over the rows.

    Args:
        scores: (B, C) with unit column stride. labels: (B,) int64. uniforms: (B, 2) fp64, contiguous.
        params: fp64 (margin, scale). table: fp64 harmonic table (C,), or None with ``log_weight``.
        max_trials: the cap on N (>= 1).

    Returns:
        ``(term, weight, trials, chosen)``: (B,) accumulation-dtype terms and scale·w, (B,) int64 N and
        columns.
    """
    B, C = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    term = torch.empty(B, dtype=acc, device=scores.device)
    weight = torch.empty(B, dtype=acc, device=scores.device)
    trials = torch.empty(B, dtype=torch.int64, device=scores.device)
    chosen = torch.empty(B, dtype=torch.int64, device=scores.device)
    if B == 0:
        return term, weight, trials, chosen
    block_c = warp_block_c(C)
    block_r = warp_block_r(block_c)
    warp_sample_kernel[(triton.cdiv(B, block_r),)](
        scores, scores.stride(0), labels, uniforms, params if table is None else table, params,
        trials, chosen, weight, term,
        B, C, max_trials,
        ACC_F64=acc == torch.float64, LOG_WEIGHT=log_weight, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warp_num_warps(block_c),
    )
    return term, weight, trials, chosen


def warp_grad_triton(grad_rows: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor, weight: torch.Tensor,
                     like: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Launch :func:`warp_grad_kernel`: the (B, C) = ``shape`` gradient, contiguous, in ``like``'s dtype and
    device (``like`` may be empty).

    Args:
        grad_rows: (B,) upstream gradient per row (any strides along B, stride 0 included).
    """
    B, C = shape
    grad = torch.empty((B, C), dtype=like.dtype, device=like.device)
    if B == 0:
        return grad
    block_c = warp_block_c(C)
    block_r = warp_block_r(block_c)
    warp_grad_kernel[(triton.cdiv(B, block_r),)](
        grad_rows, grad_rows.stride(0), labels, chosen, weight,
        grad, grad.stride(0),
        B, C,
        BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warp_num_warps(block_c),
    )
    return grad


def warp_aot_jobs(arch: int) -> List[Dict]:
    """Compilation jobs for :func:`metricloss.kernels.aot.inspect_in_subprocess`: both kernels for each
    scores dtype and weight kind, at C = 10 (64 rows per program), C = 1000 (one tile per pass) and beyond
    2048 columns (a tile loop), as real launches with 16-byte-aligned contiguous tensors would build them."""
    jobs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        ptr = POINTER_TYPE.get(dtype, "*fp64")
        for block_c in sorted({warp_block_c(10), warp_block_c(1000), warp_block_c(100000)}):
            for log_weight in (False, True):
                jobs.append(dict(
                    kernel="metricloss.kernels.warp:warp_sample_kernel", arch=arch,
                    types={"S_ptr": ptr, "S_stride": "i32", "Y_ptr": "*i64", "U_ptr": "*fp64", "H_ptr": "*fp64",
                           "P_ptr": "*fp64", "TRIALS_ptr": "*i64", "CHOSEN_ptr": "*i64", "W_ptr": acc,
                           "TERM_ptr": acc, "n_rows": "i32", "n_cols": "i32", "max_trials": "i32"},
                    constexprs={"ACC_F64": dtype == torch.float64, "LOG_WEIGHT": log_weight,
                                "BLOCK_R": warp_block_r(block_c), "BLOCK_C": block_c},
                    num_warps=warp_num_warps(block_c), num_stages=1,
                    divisible_by_16=["S_ptr", "S_stride", "U_ptr"]))
            jobs.append(dict(
                kernel="metricloss.kernels.warp:warp_grad_kernel", arch=arch,
                types={"G_ptr": acc, "G_stride": "i32", "Y_ptr": "*i64", "CHOSEN_ptr": "*i64", "W_ptr": acc,
                       "DS_ptr": ptr, "DS_stride": "i32", "n_rows": "i32", "n_cols": "i32"},
                constexprs={"BLOCK_R": warp_block_r(block_c), "BLOCK_C": block_c}, num_warps=warp_num_warps(block_c), num_stages=1,
                divisible_by_16=["DS_ptr", "DS_stride"]))
    return jobs
