"""Fused centroid-bound reductions (Triton): per-row sums over all classes, no (B, C) tensor.

The centroid bound (:mod:`metricloss.ops.centroid`) needs, per row i with label y_i and α = 1/(3(C−1)):

* forward:  own_i = ‖x_i − c_{y_i}‖ and S_i = Σ_{m≠y_i} d_im, with d_im = ‖x_i − c_m‖;
* backward: s_i = Σ_{m≠y_i} w_im and v_i = Σ_{m≠y_i} w_im·c_m, with w_im = 1/d_im
  (the Jacobian row is (x_i − c_{y_i})/own_i − α(s_i·x_i − v_i)).

Two kernels, both one program per ``BLOCK_M`` rows streaming the centroids in ``BLOCK_N`` tiles (the
mining kernel's layout), Gram term by ``tl.dot`` over D in ``BLOCK_K`` slices, fp32 accumulation:

* :func:`centroid_distance_sums_kernel` writes own_i (exact: from x_i − c_{y_i} in fp32, not from the Gram
  expansion, because x converges onto its centroid), S_i and the number of *near* pairs;
* :func:`centroid_weighted_sums_kernel` writes s_i and v_i. Its grid has a second axis over D in
  ``BLOCK_D`` slices of v (v does not fit registers for large D); each slice recomputes the distances.

Near pairs (m ≠ y_i with d²_im below the refinement threshold, REFINE_RATIO of the squared norms: x
almost on another class's centroid) are left out of both kernels and counted; the Gram expansion cancels
there. The driver recomputes those rows with the exact torch path.

Cost for B rows, C classes, D features: forward 2·B·C·D FLOPs; backward 2·B·C·D·(⌈D/BLOCK_D⌉ + 1)
FLOPs. Memory O(B·D): the outputs. At B = 65536, C = 1000, D = 512 the forward is 68.7 GFLOP: about 0.14 ms
at the H100's 494.5 TFLOPS TF32 peak. The CUDA-core epilogue (√, reciprocal, masks, about 15
operations per pair) bounds it at about 1 ms, so the kernel is epilogue-bound, as *Kernels › Physical limits and targets (H100)* predicts
below D ≈ 120 to 240.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from ..ops.distance import REFINE_RATIO
from .mining import SMEM_LIMIT_BYTES, _block_k, input_precision_for
from .tiles import POINTER_TYPE, element_bytes, enumerate_configs, gram_tile, target_arch

__all__ = [
    "CentroidConfig",
    "centroid_distance_sums_kernel",
    "centroid_weighted_sums_kernel",
    "centroid_config",
    "all_centroid_configs",
    "centroid_aot_jobs",
    "centroid_sums_triton",
]


@triton.jit
def centroid_sq_distance_tile(X_ptr, X_stride, rm64, row_ok, xn, C_ptr, C_stride, CN_ptr, start_n, n_classes, n_feat,
                              CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """d² (BLOCK_M, BLOCK_N) fp32 = max(‖x‖² + ‖c‖² − 2x·c, 0) of a row block to the class tile at ``start_n``.

    ``xn``: the rows' fp32 squared norms. Returns ``(d2, rn64, col_ok)``: the tile, its int64 class
    indices and their mask. Both centroid kernels walk the classes through this one tile.
    """
    rn = start_n + tl.arange(0, BLOCK_N)
    col_ok = rn < n_classes
    rn64 = rn.to(tl.int64)
    # Gram tile acc = X[rm] · C[rn]ᵀ over D in BLOCK_K slices
    acc = gram_tile(X_ptr, X_stride, rm64, row_ok, C_ptr, C_stride, rn64, col_ok, n_feat, CAST_F32,
                    INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    cn = tl.load(CN_ptr + rn, mask=col_ok, other=0.0)
    return tl.maximum(xn[:, None] + cn[None, :] - 2.0 * acc, 0.0), rn64, col_ok


@triton.jit
def centroid_distance_sums_kernel(
    X_ptr, X_stride, XN_ptr, Y_ptr, THRESH_ptr,
    C_ptr, C_stride, CN_ptr,
    OWN_ptr, SUM_ptr, NEAR_ptr,
    n_rows, n_classes, n_feat,
    CAST_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """own_i = ‖x_i − c_{y_i}‖, S_i = Σ_{m ≠ y_i, not near} ‖x_i − c_m‖, near_i = #{m ≠ y_i : d² < thresh_i}.

    Args:
        X_ptr, X_stride: rows (n_rows, n_feat); XN_ptr: their fp32 squared norms; Y_ptr: int64 labels.
        THRESH_ptr: fp32 per-row threshold on d² below which a pair is near.
        C_ptr, C_stride, CN_ptr: centroids (n_classes, n_feat) and their fp32 squared norms.
        OWN_ptr, SUM_ptr: fp32 outputs (n_rows,); NEAR_ptr: int32 output (n_rows,).
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < n_rows
    rm64 = rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    y = tl.load(Y_ptr + rm, mask=row_ok, other=0)
    xn = tl.load(XN_ptr + rm, mask=row_ok, other=0.0)
    thresh = tl.load(THRESH_ptr + rm, mask=row_ok, other=0.0)

    # 1. own term from the difference x_i − c_{y_i} (gathered centroid rows), fp32: exact near 0
    own_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_k in range(0, n_feat, BLOCK_K):
        kk = start_k + rk
        k_ok = kk < n_feat
        m2 = row_ok[:, None] & k_ok[None, :]
        x = tl.load(X_ptr + rm64[:, None] * X_stride + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        cy = tl.load(C_ptr + y[:, None] * C_stride + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        diff = x - cy
        own_sq += tl.sum(diff * diff, axis=1)
    tl.store(OWN_ptr + rm, tl.sqrt(own_sq), mask=row_ok)

    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    near = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start_n in range(0, n_classes, BLOCK_N):
        # 2. d² = ‖x‖² + ‖c‖² − 2x·c (clamped) to the class tile, by a Gram tile over D
        d2, rn64, col_ok = centroid_sq_distance_tile(X_ptr, X_stride, rm64, row_ok, xn, C_ptr, C_stride, CN_ptr,
                                                     start_n, n_classes, n_feat, CAST_F32, INPUT_PRECISION,
                                                     BLOCK_M, BLOCK_N, BLOCK_K)
        # 3. other classes only; near pairs counted, not summed
        other = col_ok[None, :] & (rn64[None, :] != y[:, None])
        is_near = other & (d2 < thresh[:, None])
        far = other & (d2 >= thresh[:, None])
        total += tl.sum(tl.where(far, tl.sqrt(d2), 0.0), axis=1)
        near += tl.sum(is_near.to(tl.int32), axis=1)
    tl.store(SUM_ptr + rm, total, mask=row_ok)
    tl.store(NEAR_ptr + rm, near, mask=row_ok)


@triton.jit
def centroid_weighted_sums_kernel(
    X_ptr, X_stride, XN_ptr, Y_ptr, THRESH_ptr,
    C_ptr, C_stride, CN_ptr,
    W_SUM_ptr, V_ptr, V_stride,
    n_rows, n_classes, n_feat,
    CAST_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """s_i = Σ w_im and v_i[d-slice] = Σ w_im·c_m[d-slice] over m ≠ y_i that are not near, w = 1/d.

    Grid: (row blocks, D slices of BLOCK_D). Slice 0 also writes s_i. V is fp32 (n_rows, n_feat).
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < n_rows
    rm64 = rm.to(tl.int64)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < n_feat
    y = tl.load(Y_ptr + rm, mask=row_ok, other=0)
    xn = tl.load(XN_ptr + rm, mask=row_ok, other=0.0)
    thresh = tl.load(THRESH_ptr + rm, mask=row_ok, other=0.0)

    w_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, n_classes, BLOCK_N):
        # 1. the distances of the tile, as in the forward kernel
        d2, rn64, col_ok = centroid_sq_distance_tile(X_ptr, X_stride, rm64, row_ok, xn, C_ptr, C_stride, CN_ptr,
                                                     start_n, n_classes, n_feat, CAST_F32, INPUT_PRECISION,
                                                     BLOCK_M, BLOCK_N, BLOCK_K)
        far = col_ok[None, :] & (rn64[None, :] != y[:, None]) & (d2 >= thresh[:, None]) & (d2 > 0.0)
        # 2. w = 1/d on far pairs, 0 elsewhere
        w = tl.where(far, 1.0 / tl.sqrt(tl.where(far, d2, 1.0)), 0.0)
        w_sum += tl.sum(w, axis=1)
        # 3. v[:, slice] += w · C[tile, slice] (fp32 tl.dot)
        c_slice = tl.load(C_ptr + rn64[:, None] * C_stride + rd[None, :], mask=col_ok[:, None] & d_ok[None, :],
                          other=0.0).to(tl.float32)
        v = tl.dot(w, c_slice, v, input_precision=INPUT_PRECISION)
    tl.store(V_ptr + rm64[:, None] * V_stride + rd[None, :], v, mask=row_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(W_SUM_ptr + rm, w_sum, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# tile configuration: named heuristics
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CentroidConfig:
    """Tiles and launch options of the two centroid kernels."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined X and C slices, plus the fp32 C slice of the weighted sum."""
        return self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K * elem_bytes + \
            self.BLOCK_N * self.BLOCK_D * 4


def heuristic_centroid_config_sm90(n_feat: int, elem_bytes: int) -> CentroidConfig:
    """H100: 64-row blocks, 64-class tiles, v slices of 64 features; 4 warps."""
    return CentroidConfig(64, 64, _block_k(n_feat, 64 if elem_bytes == 2 else 32), 64, num_warps=4, num_stages=3)


def heuristic_centroid_config_sm80(n_feat: int, elem_bytes: int) -> CentroidConfig:
    """A100: as sm_90 for 16-bit inputs with K slices up to 32. fp32 uses 16-wide K slices, 32-wide v slices
    and 8 warps: the weighted sum's two tf32x3 dots spill at 4 warps or with 64-wide v slices (measured
    from the cubins, ``benchmarks/kernel_resources.py``)."""
    if elem_bytes == 2:
        return CentroidConfig(64, 64, _block_k(n_feat, 32), 64, num_warps=4, num_stages=3)
    return CentroidConfig(64, 64, _block_k(n_feat, 16), 32, num_warps=8, num_stages=3)


def fit_centroid_config_to_smem(cfg: CentroidConfig, elem_bytes: int, arch: int) -> CentroidConfig:
    """Fewer stages, then shorter K slices, until the target's shared memory holds the tiles."""
    limit = SMEM_LIMIT_BYTES[90 if arch >= 90 else 80]
    while cfg.smem_bytes(elem_bytes) > limit and (cfg.num_stages > 2 or cfg.BLOCK_K > 16):
        if cfg.num_stages > 2:
            cfg = CentroidConfig(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_D, cfg.num_warps, cfg.num_stages - 1)
        else:
            cfg = CentroidConfig(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K // 2, cfg.BLOCK_D, cfg.num_warps,
                                 cfg.num_stages)
    return cfg


def centroid_config(n_feat: int, dtype: torch.dtype, arch: int) -> CentroidConfig:
    """The tile configuration for D = ``n_feat``, input ``dtype`` and compute capability ``arch``."""
    elem = element_bytes(dtype)
    pick = heuristic_centroid_config_sm90 if arch >= 90 else heuristic_centroid_config_sm80
    return fit_centroid_config_to_smem(pick(n_feat, elem), elem, arch)


def all_centroid_configs() -> List[Tuple[int, torch.dtype, CentroidConfig]]:
    """Every (arch, dtype, config) the heuristics can pick."""
    return enumerate_configs(centroid_config, (1, 16, 17, 32, 33, 64, 128, 700))


def centroid_aot_jobs(arch: int, dtype: torch.dtype, cfg: CentroidConfig) -> List[Dict]:
    """Compilation jobs (:func:`metricloss.kernels.aot.inspect_in_subprocess`) for both kernels."""
    ptr = POINTER_TYPE[dtype]
    base = {"X_ptr": ptr, "X_stride": "i32", "XN_ptr": "*fp32", "Y_ptr": "*i64", "THRESH_ptr": "*fp32",
            "C_ptr": ptr, "C_stride": "i32", "CN_ptr": "*fp32", "n_rows": "i32", "n_classes": "i32",
            "n_feat": "i32"}
    common = dict(CAST_F32=False, INPUT_PRECISION=input_precision_for(dtype), BLOCK_M=cfg.BLOCK_M,
                  BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
    fwd = dict(base, OWN_ptr="*fp32", SUM_ptr="*fp32", NEAR_ptr="*i32")
    bwd = dict(base, W_SUM_ptr="*fp32", V_ptr="*fp32", V_stride="i32")
    jobs = []
    for name, types, constexprs in (("centroid_distance_sums_kernel", fwd, common),
                                    ("centroid_weighted_sums_kernel", bwd, dict(common, BLOCK_D=cfg.BLOCK_D))):
        aligned = [k for k, t in types.items() if t.startswith("*")] + [k for k in types if k.endswith("_stride")]
        jobs.append({"kernel": f"{__name__}:{name}", "types": types, "constexprs": constexprs, "arch": arch,
                     "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible_by_16": aligned})
    return jobs


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------

def centroid_sums_triton(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                         with_grad_stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the centroid kernels.

    Args:
        x: (B, D) rows (fp32, fp16 or bf16); labels: (B,) int64 in [0, C); centroids: (C, D), x's dtype.
        with_grad_stats: also compute s_i and v_i (the backward kernel).

    Returns:
        ``(own, sums, near, s, v)``: fp32 (B,), fp32 (B,), int32 (B,), and fp32 (B,), fp32 (B, D) or None.
        Rows with ``near > 0`` have pairs left out of ``sums``, ``s`` and ``v``; recompute them exactly.
    """
    x = x.contiguous()
    centroids = centroids.to(x.dtype).contiguous()
    labels = labels.to(torch.int64).contiguous()
    n, d = x.shape
    num_classes = centroids.shape[0]
    x32 = x.float()
    xn = torch.linalg.vecdot(x32, x32, dim=1)
    cn = torch.linalg.vecdot(centroids.float(), centroids.float(), dim=1)
    # the refinement threshold of GramFactors: REFINE_RATIO of ‖x‖² + max ‖c‖²
    thresh = REFINE_RATIO * (xn + cn.max())
    cfg = centroid_config(d, x.dtype, target_arch(x))
    common = dict(CAST_F32=triton_interpreting(), INPUT_PRECISION=input_precision_for(x.dtype),
                  BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    own = torch.empty(n, dtype=torch.float32, device=x.device)
    sums = torch.empty(n, dtype=torch.float32, device=x.device)
    near = torch.empty(n, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(n, cfg.BLOCK_M),)
    centroid_distance_sums_kernel[grid](x, x.stride(0), xn, labels, thresh, centroids, centroids.stride(0), cn,
                                        own, sums, near, n, num_classes, d, **common)
    s = v = None
    if with_grad_stats:
        s = torch.empty(n, dtype=torch.float32, device=x.device)
        v = torch.empty((n, d), dtype=torch.float32, device=x.device)
        grid2 = (triton.cdiv(n, cfg.BLOCK_M), triton.cdiv(d, cfg.BLOCK_D))
        centroid_weighted_sums_kernel[grid2](x, x.stride(0), xn, labels, thresh, centroids, centroids.stride(0), cn,
                                             s, v, v.stride(0), n, num_classes, d, BLOCK_D=cfg.BLOCK_D, **common)
    return own, sums, near, s, v
