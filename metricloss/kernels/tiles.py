"""Pieces every kernel shares: the Gram tile loop (a ``@triton.jit`` helper, inlined by the compiler) and
the plumbing of tile configurations (target architecture, enumeration for AOT checks)."""

from __future__ import annotations

from typing import Callable, Iterable, List, Tuple, TypeVar

import torch
import triton
import triton.language as tl

__all__ = ["gram_tile", "target_arch", "enumerate_configs", "element_bytes", "POINTER_TYPE"]

Config = TypeVar("Config")


@triton.jit
def gram_tile(X_ptr, X_stride, rm64, row_ok, Y_ptr, Y_stride, rn64, col_ok, n_feat,
              CAST_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 = X[rm] · Y[rn]ᵀ, summed over D in BLOCK_K slices (split-D, masked tails).

    ``rm64``/``rn64`` are int64 row indices (offsets can exceed 2³¹), ``row_ok``/``col_ok`` their masks.
    ``CAST_F32`` casts the tiles to fp32 first (the interpreter computes bf16 dots wrongly).
    """
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start_k in range(0, n_feat, BLOCK_K):
        kk = start_k + rk
        k_ok = kk < n_feat
        x = tl.load(X_ptr + rm64[:, None] * X_stride + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(Y_ptr + rn64[:, None] * Y_stride + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if CAST_F32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
    return acc


def target_arch(x: torch.Tensor) -> int:
    """Compute capability of ``x``'s GPU as 80, 90, …; 90 for CPU tensors (the interpreter)."""
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return major * 10 + minor
    return 90


# Triton signature type of a pointer to each supported input dtype (for ahead-of-time compilation jobs).
POINTER_TYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def enumerate_configs(config_for: Callable[[int, torch.dtype, int], Config],
                      feature_sizes: Iterable[int]) -> List[Tuple[int, torch.dtype, Config]]:
    """Every distinct (arch, dtype, config) ``config_for(n_feat, dtype, arch)`` picks over the given D values,
    for sm_80 and sm_90 and fp32/fp16/bf16: what the AOT tests compile and the resources report lists."""
    seen: List[Tuple[int, torch.dtype, Config]] = []
    for arch in (80, 90):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n_feat in feature_sizes:
                entry = (arch, dtype, config_for(n_feat, dtype, arch))
                if entry not in seen:
                    seen.append(entry)
    return seen
