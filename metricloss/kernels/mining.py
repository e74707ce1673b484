"""Fused distance + batch-hard mining kernel (Triton): indices out, no N×M tensor.

One program owns ``BLOCK_M`` anchors and streams the reference set in ``BLOCK_N`` column tiles
(FlashAssign pattern, see *Kernels › The kernels* in the docs). For each tile it forms the Gram block with ``tl.dot`` over ``D``
in ``BLOCK_K`` slices (fp32 accumulation), turns it into a distance key, applies the label masks and
self-exclusion by index, and merges the tile's hardest positive (max) and hardest negative (min) into
running ``(value, index)`` pairs. Only two int32 indices per anchor are written. The loss recomputes the
selected distances exactly in torch (:mod:`metricloss.ops.triplet`), so backward is O(N·D) and the
same for every backend.

Inputs and outputs (driver :func:`mine_batch_hard_triton`):

========== =============================== ============================================================
tensor     shape / dtype                   meaning
========== =============================== ============================================================
X          (N, D) fp32 / fp16 / bf16       anchors (unit rows for cosine)
XN         (N,) fp32                       ‖x‖² (unused for cosine)
LX         (N,) int64                      anchor labels
Y, YN, LY  (M, D), (M,), (M,)              the reference set (the same tensors when self-referenced)
POS, NEG   (N,) int32                      hardest positive / negative index, -1 if none
========== =============================== ============================================================

Cost per call (N anchors, M references, D features, b bytes per element):

* FLOPs: 2·N·M·D for the Gram blocks, plus about 15 CUDA-core operations per (anchor, reference)
  element for the epilogue (norm adds, FMA, two compares, selects, two value/index reductions).
* Bytes: the minimum HBM traffic is (N + M)·D·b + 8·(N + M) (labels) + 4·(N + M) (norms) + 8·N
  (indices). Each row block re-reads Y, so L2 traffic is ⌈N/BLOCK_M⌉·M·D·b.

**H100 at N = M = 65536, D = 512.** The Gram work is 2·65536²·512 = 4.40 TFLOP.

* bf16 inputs on dense tensor cores (989 TFLOPS SXM) need at least 4.45 ms. With the epilogue to
  overlap and FA-style Triton efficiency (41–60% of peak, *Kernels › Physical limits and targets (H100)*), the expected time is
  7.5–10 ms. The sm_90 16-bit configuration (``BLOCK_M=128, BLOCK_N=128, BLOCK_K=64``, 8 warps,
  3 stages) targets this.
* fp32 inputs use 3-pass TF32 (``tf32x3``: about fp32-accurate mining, 3× the TF32 work): ≥ 26.7 ms
  at the 494.5 TFLOPS TF32 peak, 35–45 ms expected; single-pass TF32 would be 8.9 ms at peak but
  mines on 10-bit mantissas.
* The minimum HBM traffic is ≈ 130 MiB for bf16 (≈ 41 µs at 3.35 TB/s). The kernel is compute-bound:
  about 32,000 FLOP/B against a ridge of about 295.

Under ``TRITON_INTERPRET=1`` (the CPU tests) tiles are cast to fp32 before ``tl.dot``
(``CAST_F32``), because the interpreter computes bf16 dots wrongly (see *Kernels › Testing Triton without a GPU* in the docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .tiles import POINTER_TYPE, element_bytes, enumerate_configs, gram_tile, target_arch

__all__ = [
    "MiningConfig",
    "SMEM_LIMIT_BYTES",
    "batch_hard_mining_kernel",
    "mining_config",
    "heuristic_mining_config_sm80",
    "heuristic_mining_config_sm90",
    "fit_mining_config_to_smem",
    "all_mining_configs",
    "aot_job",
    "mine_batch_hard_triton",
]


@triton.jit
def batch_hard_mining_kernel(
    X_ptr, X_stride, XN_ptr, LX_ptr,
    Y_ptr, Y_stride, YN_ptr, LY_ptr,
    POS_ptr, NEG_ptr,
    n_rows, n_cols, n_feat,
    COSINE: tl.constexpr,
    SELF_REF: tl.constexpr,
    CAST_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Hardest positive and negative per anchor.

    Args:
        X_ptr, X_stride: anchors (n_rows, n_feat), row stride in elements (unit column stride).
        XN_ptr: fp32 squared norms of the anchors (ignored when COSINE).
        LX_ptr: int64 anchor labels.
        Y_ptr, Y_stride, YN_ptr, LY_ptr: the same for the references (n_cols rows).
        POS_ptr, NEG_ptr: int32 outputs, -1 where the anchor has no positive / no negative.
        n_rows, n_cols, n_feat: N, M, D.
        COSINE: key = 1 − x·y on unit rows; otherwise key = ‖x‖² + ‖y‖² − 2x·y.
        SELF_REF: the references are the anchors; reference i is never a positive of anchor i.
        CAST_F32: cast tiles to fp32 before tl.dot (interpreter only).
        INPUT_PRECISION: tl.dot precision for fp32 tiles ("ieee", "tf32", "tf32x3").
        BLOCK_M, BLOCK_N, BLOCK_K: anchor rows per program, reference rows per tile, features per slice.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < n_rows
    rm64 = rm.to(tl.int64)  # offsets in int64: N·D can exceed 2³¹ (triton #1058)

    # 1. per-anchor constants: label and ‖x‖² (fp32, precomputed by the driver)
    lx = tl.load(LX_ptr + rm, mask=row_ok, other=0)
    if COSINE:
        xn = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        xn = tl.load(XN_ptr + rm, mask=row_ok, other=0.0)

    best_pos = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_neg = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    idx_pos = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    idx_neg = tl.full((BLOCK_M,), -1, dtype=tl.int32)

    for start_n in range(0, n_cols, BLOCK_N):
        rn = start_n + tl.arange(0, BLOCK_N)
        col_ok = rn < n_cols
        rn64 = rn.to(tl.int64)

        # 2. Gram tile: acc = X[rm] · Y[rn]ᵀ, over D in BLOCK_K slices (split-D), fp32 accumulation
        acc = gram_tile(X_ptr, X_stride, rm64, row_ok, Y_ptr, Y_stride, rn64, col_ok, n_feat, CAST_F32,
                        INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

        # 3. distance key, monotone in the distance: d² = ‖x‖² + ‖y‖² − 2x·y, or 1 − x·y (cosine)
        if COSINE:
            key = 1.0 - acc
        else:
            yn = tl.load(YN_ptr + rn, mask=col_ok, other=0.0)
            key = xn[:, None] + yn[None, :] - 2.0 * acc

        # 4. label masks; self is excluded by index, never by value
        ly = tl.load(LY_ptr + rn, mask=col_ok, other=0)
        same = lx[:, None] == ly[None, :]
        pos_ok = same & col_ok[None, :]
        if SELF_REF:
            pos_ok = pos_ok & (rm[:, None] != rn[None, :])
        neg_ok = (lx[:, None] != ly[None, :]) & col_ok[None, :]

        # 5. the tile's hardest positive (max key) and hardest negative (min key), first index on ties
        tile_pos, tile_pos_idx = tl.max(tl.where(pos_ok, key, float("-inf")), axis=1, return_indices=True,
                                        return_indices_tie_break_left=True)
        tile_neg, tile_neg_idx = tl.min(tl.where(neg_ok, key, float("inf")), axis=1, return_indices=True,
                                        return_indices_tie_break_left=True)

        # 6. merge into the running best; strict comparisons keep the earlier tile on ties
        take_pos = tile_pos > best_pos
        idx_pos = tl.where(take_pos, tile_pos_idx + start_n, idx_pos)
        best_pos = tl.where(take_pos, tile_pos, best_pos)
        take_neg = tile_neg < best_neg
        idx_neg = tl.where(take_neg, tile_neg_idx + start_n, idx_neg)
        best_neg = tl.where(take_neg, tile_neg, best_neg)

    # 7. two int32 indices per anchor; -1 survives where no candidate was valid
    tl.store(POS_ptr + rm, idx_pos, mask=row_ok)
    tl.store(NEG_ptr + rm, idx_neg, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# tile configuration: named heuristics, chosen outside the kernel (no autotune sweep at import)
# ----------------------------------------------------------------------------------------------------

# Opt-in maximum dynamic shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT_BYTES: Dict[int, int] = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class MiningConfig:
    """Tiles and launch options of :func:`batch_hard_mining_kernel`."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined X and Y slices (the epilogue lives in registers)."""
        return self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K * elem_bytes


def _block_k(n_feat: int, cap: int) -> int:
    """Smallest power of two >= D, between 16 (tl.dot's minimum) and ``cap`` (larger D loops over K)."""
    return max(16, min(cap, triton.next_power_of_2(max(n_feat, 1))))


def heuristic_mining_config_sm90(n_feat: int, elem_bytes: int) -> MiningConfig:
    """H100: 128×128 tiles for 16-bit inputs (wgmma), 128×64 for fp32 (tf32x3 triples the MMA work)."""
    if elem_bytes == 2:
        return MiningConfig(128, 128, _block_k(n_feat, 64), num_warps=8, num_stages=3)
    return MiningConfig(128, 64, _block_k(n_feat, 32), num_warps=8, num_stages=3)


def heuristic_mining_config_sm80(n_feat: int, elem_bytes: int) -> MiningConfig:
    """A100: 128×64 tiles for 16-bit inputs (4 warps up to BLOCK_K=32, 8 at 64); 64×64×16, 4 warps, fp32.

    Chosen from the cubins (``benchmarks/kernel_resources.py``), all spill-free: 128×64×64 with 4 warps
    and 64×64×32 fp32 (tf32x3 keeps hi/lo operand splits live) hit 255 registers and spill; with 8 warps
    ptxas caps the short-K 16-bit tiles at 128 registers and spills a few.
    """
    if elem_bytes == 2:
        block_k = _block_k(n_feat, 64)
        return MiningConfig(128, 64, block_k, num_warps=8 if block_k == 64 else 4, num_stages=3)
    return MiningConfig(64, 64, _block_k(n_feat, 16), num_warps=4, num_stages=4)


def fit_mining_config_to_smem(cfg: MiningConfig, elem_bytes: int, arch: int) -> MiningConfig:
    """Shrink stages, then BLOCK_K, then BLOCK_N until the pipelined slices fit the target's shared memory."""
    limit = SMEM_LIMIT_BYTES[90 if arch >= 90 else 80]
    while cfg.smem_bytes(elem_bytes) > limit:
        if cfg.num_stages > 2:
            cfg = MiningConfig(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps, cfg.num_stages - 1)
        elif cfg.BLOCK_K > 16:
            cfg = MiningConfig(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K // 2, cfg.num_warps, cfg.num_stages)
        elif cfg.BLOCK_N > 16:
            cfg = MiningConfig(cfg.BLOCK_M, cfg.BLOCK_N // 2, cfg.BLOCK_K, cfg.num_warps, cfg.num_stages)
        else:
            break
    return cfg


def mining_config(n_feat: int, dtype: torch.dtype, arch: int) -> MiningConfig:
    """The tile configuration for D = ``n_feat``, input ``dtype`` and compute capability ``arch`` (80, 90)."""
    elem = element_bytes(dtype)
    pick = heuristic_mining_config_sm90 if arch >= 90 else heuristic_mining_config_sm80
    return fit_mining_config_to_smem(pick(n_feat, elem), elem, arch)


def all_mining_configs() -> List[Tuple[int, torch.dtype, MiningConfig]]:
    """Every (arch, dtype, config) the heuristics can pick, for the AOT compilation test and reports."""
    return enumerate_configs(mining_config, (1, 16, 17, 32, 33, 64, 65, 128, 700, 4096))


def aot_job(arch: int, dtype: torch.dtype, cfg: MiningConfig, cosine: bool = False, self_ref: bool = True) -> Dict:
    """A compilation job for :func:`metricloss.kernels.aot.inspect_in_subprocess`: this kernel as a real
    launch with 16-byte-aligned contiguous ``dtype`` tensors (row length a multiple of 16) would build it."""
    ptr = POINTER_TYPE[dtype]
    types = {"X_ptr": ptr, "X_stride": "i32", "XN_ptr": "*fp32", "LX_ptr": "*i64",
             "Y_ptr": ptr, "Y_stride": "i32", "YN_ptr": "*fp32", "LY_ptr": "*i64",
             "POS_ptr": "*i32", "NEG_ptr": "*i32", "n_rows": "i32", "n_cols": "i32", "n_feat": "i32"}
    constexprs = dict(COSINE=cosine, SELF_REF=self_ref, CAST_F32=False, INPUT_PRECISION=input_precision_for(dtype),
                      BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
    aligned = [name for name, t in types.items() if t.startswith("*")] + ["X_stride", "Y_stride"]
    return {"kernel": f"{__name__}:batch_hard_mining_kernel", "types": types, "constexprs": constexprs,
            "arch": arch, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible_by_16": aligned}


def input_precision_for(dtype: torch.dtype) -> str:
    """tl.dot precision: fp32 tiles use 3-pass TF32 (≈ fp32 accuracy for mining); 16-bit tiles ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------

def mine_batch_hard_triton(a: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, ref_labels: torch.Tensor,
                           self_ref: bool, distance: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`batch_hard_mining_kernel`.

    Args:
        a: (N, D) anchors in fp32, fp16 or bf16; unit rows for ``"cosine"`` (the caller normalises).
        labels: (N,) integer labels; r, ref_labels: the reference set (``a``, ``labels`` when ``self_ref``).
        self_ref: reference i is anchor i (excluded from its positives by index).
        distance: ``"euclidean"``, ``"squared_euclidean"`` (the same ordering) or ``"cosine"``.

    Returns:
        ``(pos_idx, neg_idx)``: int64 (N,), -1 where there is none; first index on ties.
    """
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        a = a.float()
    r = a if self_ref else r.to(a.dtype)
    a = a.contiguous()
    r = a if self_ref else r.contiguous()
    n, d = a.shape
    m = r.shape[0]
    lx = labels.to(torch.int64).contiguous()
    ly = lx if self_ref else ref_labels.to(torch.int64).contiguous()
    cosine = distance == "cosine"
    xn = torch.linalg.vecdot(a.float(), a.float(), dim=1) if not cosine else torch.empty(0, device=a.device)
    yn = xn if (self_ref or cosine) else torch.linalg.vecdot(r.float(), r.float(), dim=1)
    pos = torch.empty(n, dtype=torch.int32, device=a.device)
    neg = torch.empty(n, dtype=torch.int32, device=a.device)
    cfg = mining_config(d, a.dtype, target_arch(a))
    grid = (triton.cdiv(n, cfg.BLOCK_M),)
    batch_hard_mining_kernel[grid](
        a, a.stride(0), xn, lx,
        r, r.stride(0), yn, ly,
        pos, neg,
        n, m, d,
        COSINE=cosine, SELF_REF=self_ref, CAST_F32=triton_interpreting(),
        INPUT_PRECISION=input_precision_for(a.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return pos.long(), neg.long()
