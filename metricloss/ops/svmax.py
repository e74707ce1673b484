"""SVMax (Taha, Hanson, Shrivastava, Davis 2021): the mean singular value of a batch of embeddings.

For a (b, d) batch E with L2-normalised rows and singular values σ_1 ≥ … ≥ σ_r, r = min(b, d)::

    s_μ(E) = (1/r) · Σ_k σ_k = ‖E‖_* / r

Maximising s_μ spreads the batch over many directions (it fights model collapse, where every row points
the same way). Two exact routes compute it (see *Methods › SVMax* in the docs):

* ``"svd"``: ``torch.linalg.svdvals(E)``, the textbook route; its gradient is U·Vᵀ / r (thin SVD).
* ``"gram"``: the singular values are the square roots of the eigenvalues of the smaller Gram matrix
  (EᵀE, d×d, when b ≥ d; EEᵀ, b×b, otherwise). The Gram matrix is formed and diagonalised in fp64, so
  squaring the condition number costs no accuracy an fp32 input has: a singular value's absolute error
  is about √(eps₆₄·λ_max) ≈ 1e-8·σ_max. Its gradient is written by hand, E·V·diag(1/σ)·Vᵀ / r (= U·Vᵀ / r),
  with 1/σ replaced by 0 for singular values below :data:`GRAM_NULL_RTOL`·σ_max·√max(b, d): at a
  rank-deficient E (a collapsed batch) the subgradient's null-space part is taken as 0, which is a valid
  subgradient of the nuclear norm, and the backward never produces Inf or NaN.

Measured with ``benchmarks/toolbox.py`` (fp32 input, CPU, 1 thread, process CPU time, median of 5),
forward / forward + backward: b × d = 4096 × 512: ``"gram"`` 84 / 130 ms, ``"svd"`` 76 / 163 ms;
512 × 4096: 68 / 122 ms vs 401 / 512 ms; 256 × 128: 1.7 / 2.4 ms vs 1.4 / 3.1 ms. So the Gram route is
as fast as ``svdvals`` for a tall batch's forward pass, 1.25–1.3× faster with the backward, and 4–6× faster
for a wide batch (b < d); on 2 threads of a lightly loaded machine it was ~6× faster at 4096 × 512
(31 vs 186 ms forward). ``"auto"`` therefore takes the Gram route everywhere. GPUs were not measured.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["SVMAX_METHODS", "GRAM_NULL_RTOL", "mean_singular_value_op", "svmax_bounds"]

SVMAX_METHODS = ("auto", "gram", "svd")

# Singular values below GRAM_NULL_RTOL·σ_max·√max(b, d) count as zero in the Gram route's backward. The
# fp64 eigenvalues of a rank-deficient Gram matrix come out near ±eps₆₄·λ_max instead of 0, so the square
# roots of null eigenvalues sit near √eps₆₄·σ_max ≈ 1.5e-8·σ_max; the threshold is ≥ 60× above that noise
# and ~8× above what an fp32 input can resolve (eps₃₂·√n·σ_max), so genuine singular values of fp32 inputs
# are kept. (fp64 inputs whose singular values span more than ~1e6 need method="svd" for exact gradients.)
GRAM_NULL_RTOL = 1e-6


def svmax_bounds(b: int, d: int) -> Tuple[float, float]:
    """Analytic bounds of s_μ for a (b, d) batch of unit rows: ``(lower, upper)``.

    With r = min(b, d) and ‖E‖_F = √b (unit rows):

    * lower = √b / r: all rows collapsed onto one direction, rank 1 with σ_1 = ‖E‖_F = √b;
    * upper = √(b / r): from ‖E‖_* ≤ √r·‖E‖_F = √(r·b), attained when all r singular values are equal
      (σ_k = √(b/r)).

    For b > d (the authors' setting) this is [√b/d, √(b/d)]; the upper bound is attained by a tight frame
    (EᵀE = (b/d)·I). For b ≤ d it is [1/√b, 1]; the upper bound is attained by orthonormal rows. For b = d
    both forms agree.
    """
    r = min(b, d)
    return math.sqrt(b) / r, math.sqrt(b / r)


def _null_mask(sigma: torch.Tensor, n: int) -> torch.Tensor:
    # sigma is sorted ascending (eigh); the last value is σ_max
    return sigma > GRAM_NULL_RTOL * math.sqrt(n) * sigma[-1]


class _GramMeanSingularValue(torch.autograd.Function):
    """s_μ by the eigenvalues of the smaller Gram matrix (fp64), with the hand-written gradient U·Vᵀ / r."""

    @staticmethod
    def forward(ctx, e: torch.Tensor) -> torch.Tensor:
        b, d = e.shape
        e64 = e.to(torch.float64)
        tall = b >= d
        gram = e64.T @ e64 if tall else e64 @ e64.T
        lam, vec = torch.linalg.eigh(gram)
        sigma = lam.clamp_min(0).sqrt()
        r = min(b, d)
        ctx.save_for_backward(e64, vec, sigma)
        ctx.tall = tall
        ctx.in_dtype = e.dtype
        return (sigma.sum() / r).to(e.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        e64, vec, sigma = ctx.saved_tensors
        b, d = e64.shape
        keep = _null_mask(sigma, max(b, d))
        inv = torch.where(keep, 1.0 / torch.where(keep, sigma, torch.ones_like(sigma)), torch.zeros_like(sigma))
        # M = V diag(1/σ) Vᵀ, then U Vᵀ = E M (tall) or M E (wide); scaled by the upstream gradient / r
        m = (vec * inv) @ vec.T
        g = e64 @ m if ctx.tall else m @ e64
        return (g * (grad_out.to(torch.float64) / min(b, d))).to(ctx.in_dtype)


def mean_singular_value_op(e: torch.Tensor, method: str) -> torch.Tensor:
    """s_μ of a validated (b, d) float tensor (rows already normalised when asked), as a () tensor.

    ``method``: ``"gram"`` or ``"auto"`` (fp64 Gram eigenvalues) or ``"svd"`` (``torch.linalg.svdvals``
    in ``e``'s dtype). Differentiable.
    """
    if method == "svd":
        return torch.linalg.svdvals(e).mean()
    return _GramMeanSingularValue.apply(e)
