"""The sampled-WARP Triton kernels under TRITON_INTERPRET=1, against the torch law sampler and the loop's law.

For the same uniforms the kernel picks what :func:`metricloss.ops.warp.single_violators_by_law` picks (the
torch path CUDA would otherwise take), so the losses agree bitwise for ``"sum"``/``"none"`` and to the
rounding of the 1/B scaling for ``"mean"``, and the gradients agree bitwise. The law itself is checked on
the kernel's own draws with the law suite's statistics.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import metricloss as ml  # noqa: E402
import metricloss.functional as MF  # noqa: E402
from metricloss.kernels.warp import warp_block_c, warp_block_r, warp_num_warps, warp_sample_triton  # noqa: E402
from metricloss.ops import warp as warp_ops  # noqa: E402
from tests.ops.test_warp import (ALPHA, SINGLE_VIOLATORS, chi_square_pvalue, single_batch,  # noqa: E402
                                 trial_histogram, truncated_geometric)

if not ml._backend.triton_interpreting():
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1", allow_module_level=True)


def _kernel_draws(scores, labels, uniforms, margin=1.0, max_trials=None, log_weight=False):
    C = scores.shape[1]
    params = torch.tensor([margin, 1.0], dtype=torch.float64)
    table = None if log_weight else warp_ops.harmonic_numbers(C - 1, scores.device)
    return warp_sample_triton(scores, labels, uniforms, params, table, C - 1 if max_trials is None else max_trials,
                              log_weight)


def _pair(scores, labels, reduction, rank_weight, max_trials, seed=1, margin=1.0):
    """(loss, grad) on the kernel and on the torch path, same generator seed (so the same uniforms)."""
    out = []
    for backend in ("triton", "torch"):
        x = scores.clone().requires_grad_()
        loss = MF.warp_loss(x, labels, margin=margin, reduction=reduction, rank_weight=rank_weight,
                            max_trials=max_trials, backend=backend, generator=torch.Generator().manual_seed(seed))
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weights).sum().backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("METRICLOSS_NATIVE", "0")  # the torch law sampler, as on CUDA without the kernel


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rank_weight", ["harmonic", "log"])
@pytest.mark.parametrize("max_trials", [None, 1, 3])
def test_loss_and_gradient_match_the_torch_path(dtype, reduction, rank_weight, max_trials):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(40, 37, generator=g).to(dtype)
    labels = torch.randint(0, 37, (40,), generator=g)
    (la, ga), (lb, gb) = _pair(scores, labels, reduction, rank_weight, max_trials)
    assert la.dtype == lb.dtype and ga.dtype == gb.dtype == dtype
    if reduction == "mean":
        # the kernel scales each term by 1/B before the sum, torch divides the sum; the gradient's factors
        # (upstream, 1/B, w) are multiplied in another order: one rounding of the scores' dtype apart
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
        torch.testing.assert_close(ga, gb, rtol=max(rtol, torch.finfo(dtype).eps), atol=0)
    elif dtype == torch.bfloat16:
        # the interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest): one bf16 ulp apart
        assert torch.equal(la, lb)
        torch.testing.assert_close(ga, gb, rtol=torch.finfo(dtype).eps, atol=0)
    else:
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert float(lb.sum()) > 0


@pytest.mark.parametrize("b, c", [(1, 2), (3, 2), (5, 17), (9, 2047), (4, 2049), (3, 5000)])
def test_draws_equal_the_torch_law_sampler_at_every_width(b, c):
    # one tile, a ragged last tile, and the tile loop (C > 2048), with rows that have no violator, one, or
    # only violators
    g = torch.Generator().manual_seed(b * 31 + c)
    scores = torch.randn(b, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=g)
    scores[0] = -3.0
    scores[0, labels[0]] = 3.0
    if b > 1:
        scores[1] = 3.0
        scores[1, labels[1]] = -3.0
    uniforms = torch.rand((b, 2), dtype=torch.float64, generator=g)
    for max_trials in (None, 2):
        cap = c - 1 if max_trials is None else max_trials
        _, _, trials, chosen = _kernel_draws(scores, labels, uniforms, max_trials=max_trials)
        want = warp_ops.single_violators_by_law(scores, labels, uniforms, 1.0, cap, None)
        assert torch.equal(trials, want[0]) and torch.equal(chosen, want[1])
    assert trials[0] == 0 and chosen[0] == -1
    if b > 1:
        assert trials[1] == 1 and chosen[1] >= 0


def test_nonfinite_scores_give_nan_and_the_row_keeps_its_draws():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 12, (6,), generator=g)
    scores[1, 0] = float("nan")
    scores[2, 5] = float("inf")
    term, weight, trials, chosen = _kernel_draws(scores, labels, torch.rand((6, 2), dtype=torch.float64,
                                                                            generator=g))
    assert torch.isnan(term[1]) and torch.isnan(term[2]) and torch.isfinite(term[[0, 3, 4, 5]]).all()
    assert trials[1] == 0 and chosen[1] == -1 and weight[1] == 0   # a NaN row has no violator (all paths)
    for reduction in ("mean", "sum", "none"):
        loss = MF.warp_loss(scores, labels, reduction=reduction, backend="triton")
        assert torch.isnan(loss).all()


def test_trial_count_is_truncated_geometric():
    n = 20000
    scores, labels = single_batch(n)
    for cap in (None, 5):
        _, _, trials, chosen = _kernel_draws(scores, labels, torch.rand((n, 2), dtype=torch.float64,
                                                                        generator=torch.Generator().manual_seed(5)),
                                             max_trials=cap)
        cap = 9 if cap is None else cap
        hist = trial_histogram(trials, cap)
        assert chi_square_pvalue(hist, truncated_geometric(3 / 9, cap)) > ALPHA
        assert chi_square_pvalue(hist, truncated_geometric(3 / 8, cap)) < ALPHA   # |𝒩| = C instead of C − 1
    counts = torch.bincount(chosen[trials > 0], minlength=10).to(torch.float64)
    assert counts.sum() == counts[SINGLE_VIOLATORS].sum()
    assert chi_square_pvalue(counts[SINGLE_VIOLATORS], torch.full((3,), 1 / 3, dtype=torch.float64)) > ALPHA


def test_weights_are_the_rank_weights_of_the_draws():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(300, 50, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (300,), generator=g)
    uniforms = torch.rand((300, 2), dtype=torch.float64, generator=g)
    for log_weight, kind in ((False, "harmonic"), (True, "log")):
        term, weight, trials, chosen = _kernel_draws(scores, labels, uniforms, margin=0.5, log_weight=log_weight)
        found = trials > 0
        want = warp_ops.rank_weights(warp_ops.rank_estimate(torch.full_like(trials, 49), trials), kind,
                                     torch.float64, 49)
        assert torch.equal(weight, torch.where(found, want, torch.zeros_like(want)))
        rows = torch.arange(300)
        hinge = scores[rows, chosen.clamp_min(0)] + (0.5 - scores[rows, labels])
        assert torch.equal(term, torch.where(found, weight * hinge, torch.zeros_like(hinge)))


def test_non_contiguous_scores_and_module():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 20, generator=g)
    labels = torch.randint(0, 20, (20,), generator=g)
    scores = base.t()                                        # column stride 30: copied for the kernel
    (la, ga), (lb, gb) = _pair(scores, labels, "mean", "harmonic", None)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    assert torch.equal(ga, gb)
    criterion = ml.WARPLoss(backend="triton", generator=torch.Generator().manual_seed(0))
    assert "backend='triton'" in repr(criterion)
    assert torch.isfinite(criterion(scores, labels))


def test_calls_the_kernel_cannot_serve_fall_back_loudly():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(8, 6, generator=g, dtype=torch.float64)
    multi = torch.rand(8, 6, generator=g) < 0.4
    from metricloss import _backend

    _backend._warned.clear()
    with pytest.warns(UserWarning, match="multi-hot"):
        got = MF.warp_loss(scores, multi, backend="triton", generator=torch.Generator().manual_seed(0))
    want = MF.warp_loss(scores, multi, backend="torch", generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="backend"):
        MF.warp_loss(scores, multi, backend="reference")


def test_launch_heuristics():
    assert warp_block_c(2) == 16 and warp_block_c(1000) == 1024 and warp_block_c(100000) == 2048
    assert [warp_num_warps(b) for b in (16, 512, 1024, 2048)] == [2, 2, 4, 8]
    assert [warp_block_r(b) for b in (16, 32, 1024, 2048)] == [64, 64, 2, 1]


def test_auto_takes_the_kernel_only_on_cuda(monkeypatch):
    calls = []
    real = warp_ops._sampled_kernel
    monkeypatch.setattr(warp_ops, "_sampled_kernel", lambda *a: calls.append(1) or real(*a))
    scores, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    MF.warp_loss(scores, labels)                              # CPU tensors: the torch path, even interpreted
    assert calls == []
    monkeypatch.setenv("METRICLOSS_BACKEND", "triton")
    MF.warp_loss(scores, labels)
    assert calls == [1]
    assert os.environ["TRITON_INTERPRET"] == "1"
