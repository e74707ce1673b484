"""Adversarial ties: every path makes the fp64 dense reference's decisions (issue: rounding-level ties).

Generators (each from its seed):

* ``dups``: cross-class duplicate rows (d_an == d_ap bitwise; margin 0 gives hinges that are exactly 0);
* ``zeros``: three zero rows; with ``normalize=True`` a zero anchor meets its positives and negatives at
  distances ‖x‖ = 1 up to rounding (rounding-level ties decided by the square root's last bit);
* ``simplex``: near-equidistant points I + noise·N(0, 1) (hinges tiny against the distances: the loss
  value cancels if it is formed as Σ t·k − Σ c·d);
* ``far``: unnormalised rows scaled so that softplus(d_ap − d_an) underflows (the soft margin's count must
  not depend on the exp implementation).

Each case runs on the torch path (``METRICLOSS_NATIVE=0``) and the native path with every self-pair ISA
build (``SELF_PAIR_MAX_ISA`` 0/1/2; a build the CPU lacks runs the widest it has), and is compared with
:func:`metricloss.reference.triplet_loss_terms` in fp64: counts exactly, losses to a few ulps relative to
fp64 (fp32 inputs: to the fp32 rounding of the distances), gradients to rounding.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import native
from metricloss.ops.distance import paired_distance, safe_sqrt, sqrt_rn, sqrt_rn_


def _labels(n: int, per: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.arange(n) // per  # classes of `per` (the last one shorter when per does not divide n)
    return labels[torch.randperm(n, generator=g)]


def make_case(kind: str, n: int, per: int, dim: int, dtype: torch.dtype, seed: int = 0, noise: float = 1e-6,
              scale: float = 1.0):
    """(x, labels) of one adversarial generator (see the module notes), x in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    labels = _labels(n, per, g)
    if kind == "simplex":
        x = torch.eye(n, dim, dtype=torch.float64) + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
        return x.to(dtype), labels
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if kind == "dups":
        for _ in range(n // 4):
            i, j = torch.randint(0, n, (2,), generator=g).tolist()
            if labels[i] != labels[j]:
                x[j] = x[i]
    elif kind == "zeros":
        x[torch.randperm(n, generator=g)[:3]] = 0
    elif kind != "far":
        raise ValueError(kind)
    return (scale * x).to(dtype), labels


# name: (generator args, options of the loss)
CASES = {
    # self-pair op (batch-all over the batch, 1-12 positives, numeric margin)
    "dups32_k8": (("dups", 64, 8, 32, torch.float32), dict(margin=0.0, normalize=False)),
    "dups64_k8": (("dups", 64, 8, 32, torch.float64), dict(margin=0.0, normalize=True)),
    "dups32_k4_margin1": (("dups", 48, 4, 16, torch.float32), dict(margin=1.0, normalize=False)),
    "zeros64_k8_norm": (("zeros", 64, 8, 32, torch.float64), dict(margin=0.0, normalize=True)),
    "zeros64_k4_norm": (("zeros", 64, 4, 32, torch.float64), dict(margin=0.0, normalize=True)),
    "zeros32_k8": (("zeros", 64, 8, 32, torch.float32), dict(margin=0.0, normalize=False)),
    # chunked paths: threshold-sorting (14 per class), fewer rows than a self-pair panel, soft margin
    "zeros64_k14_norm": (("zeros", 56, 14, 32, torch.float64), dict(margin=0.0, normalize=True)),
    "dups32_k14": (("dups", 56, 14, 32, torch.float32), dict(margin=0.0, normalize=False)),
    "dups32_small": (("dups", 24, 4, 16, torch.float32), dict(margin=0.0, normalize=False)),
    "zeros64_soft_norm": (("zeros", 64, 8, 32, torch.float64), dict(margin="soft", normalize=True)),
    "far32_soft": (("far", 64, 8, 32, torch.float32, 0, 0.0, 30.0), dict(margin="soft", normalize=False)),
    "far64_soft": (("far", 64, 8, 32, torch.float64, 0, 0.0, 250.0), dict(margin="soft", normalize=False)),
    # near-equidistant simplices: the loss value (sum), margin 0
    "simplex64": (("simplex", 128, 8, 128, torch.float64, 0, 1e-6), dict(margin=0.0, normalize=False)),
    "simplex32": (("simplex", 128, 8, 128, torch.float32, 0, 1e-5), dict(margin=0.0, normalize=False)),
}
SLOW_CASES = {
    "simplex32_512": (("simplex", 512, 8, 512, torch.float32, 0, 1e-6), dict(margin=0.0, normalize=False)),
    "simplex32_256": (("simplex", 256, 8, 256, torch.float32, 0, 1e-5), dict(margin=0.0, normalize=False)),
    "zeros64_223_norm": (("zeros", 223, 8, 32, torch.float64, 3), dict(margin=0.0, normalize=True)),
    "dups32_k8_seed1": (("dups", 96, 8, 24, torch.float32, 1), dict(margin=0.0, normalize=False)),
    "zeros32_k14_seed2": (("zeros", 70, 14, 32, torch.float32, 2), dict(margin=0.0, normalize=False)),
}
PATHS = ["torch", "native-isa0", "native-isa1", "native-isa2"]


def _minings(name: str):
    return ("batch_all",) if name.startswith("simplex") else ("batch_all", "semi_hard", "batch_hard")


@functools.lru_cache(maxsize=None)
def _reference(name: str, mining: str):
    args, opts = {**CASES, **SLOW_CASES}[name]
    x, labels = make_case(*args)
    xr = x.double().requires_grad_()
    terms = reference.triplet_loss_terms(xr, labels, mining=mining, tie_dtype=x.dtype, **opts)
    total = terms.per_anchor.sum()
    total.backward()
    return int(terms.num_terms), int(terms.num_nonzero), float(total.detach()), xr.grad


@functools.lru_cache(maxsize=None)
def _torch_path_nonzero(name: str, mining: str) -> int:
    args, opts = {**CASES, **SLOW_CASES}[name]
    x, labels = make_case(*args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METRICLOSS_NATIVE", "0")
        return int(MF.triplet_loss_terms(x, labels, mining=mining, **opts).num_nonzero)


def _use_path(monkeypatch, path: str) -> None:
    if path == "torch":
        monkeypatch.setenv("METRICLOSS_NATIVE", "0")
        return
    if not native.native_library():
        pytest.skip("the native extension does not build here")
    monkeypatch.setenv("METRICLOSS_NATIVE", "1")
    monkeypatch.setattr(native, "SELF_PAIR_MAX_ISA", int(path[-1]))


def _check(monkeypatch, name: str, path: str) -> None:
    _use_path(monkeypatch, path)
    args, opts = {**CASES, **SLOW_CASES}[name]
    x, labels = make_case(*args)
    fp64 = x.dtype == torch.float64
    for mining in _minings(name):
        num_terms, num_nonzero, total, grad = _reference(name, mining)
        xx = x.clone().requires_grad_()
        terms = MF.triplet_loss_terms(xx, labels, mining=mining, **opts)
        got = terms.per_anchor.sum()
        got.backward()
        where = f"{name} {mining} on {path}"
        assert int(terms.num_terms) == num_terms, where
        if name.startswith("simplex") and not fp64:
            # fp32 simplices: every hinge d_ap − d_an is ~1e-6 against fp32 distances of √2 whose Gram error
            # is ~(D + 2)·eps ≈ 1e-5 at D = 128 to 6e-5 at D = 512, so fp32 decides a few percent of them
            # otherwise than fp64 (measured: 0.3% at N = 256, 2.9% at N = 512, on every path). The paths
            # agree with each other to rounding: the chunked ops exactly, the self-pair op (its own Gram
            # value for both views of a cell) to 1e-3 of the terms (measured 7.6e-5 and 2.8e-4 of them)
            want = _torch_path_nonzero(name, mining)
            assert abs(num_nonzero - want) <= 0.04 * num_nonzero, where
            got_nonzero = int(terms.num_nonzero)
            assert abs(got_nonzero - want) <= 1e-3 * want, f"{where}: nonzero {got_nonzero} vs torch path {want}"
        else:
            want = num_nonzero
            assert int(terms.num_nonzero) == want, f"{where}: nonzero {int(terms.num_nonzero)} != {want}"
        # fp64: the distances' rounding (Gram entries, ~eps·‖x‖² each) averaged over the terms; fp32 inputs:
        # the fp32 rounding of every distance against fp64 (measured up to 5.9e-4 on the simplices, where a
        # hinge sum formed as a difference of large sums was off by 27%)
        rtol = (1e-9 if fp64 else 1e-3) if name.startswith("simplex") else (1e-12 if fp64 else 1e-5)
        assert abs(float(got) - total) <= rtol * abs(total) + 1e-300, f"{where}: loss {float(got)!r} vs {total!r}"
        if mining != "batch_all" and opts["normalize"] and args[0] == "zeros":
            continue  # a zero anchor's positives (negatives) tie at rounding level: which one is mined is a
            # tie-break by the last bit, the loss and counts the same, the gradient not
        # (fp32 simplices: up to 3% of the decisions are fp32 rounding-level ties that fp64 decides otherwise,
        # and the gradient moves with them: measured 2.8% at N = 512)
        gtol = 1e-9 if fp64 else (4e-2 if name.startswith("simplex") else 3e-4)
        err = float((xx.grad.double() - grad).norm() / grad.norm().clamp_min(1e-300))
        assert err <= gtol, f"{where}: gradient relative error {err:.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_ties_match_reference(monkeypatch, name, path):
    _check(monkeypatch, name, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_ties_match_reference_slow(monkeypatch, name, path):
    _check(monkeypatch, name, path)


def test_self_pair_op_serves_the_self_pair_cases(monkeypatch):
    """The cases named for the self-pair op reach it (a plan change must not silently move them)."""
    from metricloss.ops import triplet

    if not native.native_library():
        pytest.skip("the native extension does not build here")
    monkeypatch.setenv("METRICLOSS_NATIVE", "1")
    calls = []
    real = triplet.native_batch_all_self
    monkeypatch.setattr(triplet, "native_batch_all_self", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("dups32_k8", "zeros64_k8_norm", "simplex64"):
        args, opts = CASES[name]
        x, labels = make_case(*args)
        MF.triplet_loss(x, labels, mining="batch_all", **opts)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sqrt_rn_is_correctly_rounded(dtype):
    """sqrt_rn / sqrt_rn_ / safe_sqrt give numpy's (correctly rounded) root on CPU, which torch.sqrt does not."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g, dtype=torch.float64).mul_(8).to(dtype)
    want = torch.from_numpy(np.sqrt(u.numpy()))
    if dtype == torch.float32:  # and it is the correctly rounded fp32 root of the exact fp64 one
        assert torch.equal(want, torch.sqrt(u.double()).float())
    assert torch.equal(sqrt_rn(u), want)
    assert torch.equal(sqrt_rn_(u.clone()), want)
    assert torch.equal(safe_sqrt(u), want)
    strided = u.view(100, 200).t()
    assert torch.equal(sqrt_rn_(strided.clone()), want.view(100, 200).t())
    assert torch.equal(sqrt_rn(strided), want.view(100, 200).t())
    leaf = u.clone().requires_grad_()
    out = sqrt_rn(leaf)
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, 0.5 / torch.sqrt(u), rtol=4 * torch.finfo(dtype).eps, atol=0)
    # the exact row distances the loss recomputes: the correctly rounded root of the reference's sum of squares
    x = torch.randn(2000, 24, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(2000, 24, generator=g, dtype=torch.float64).to(dtype)
    sq = ((x - y) ** 2).sum(-1)
    assert torch.equal(paired_distance(x, y, "euclidean"), torch.from_numpy(np.sqrt(sq.numpy())))


def test_reference_distances_are_correctly_rounded():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    d = reference.pairwise_distance(x)
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert torch.equal(d, torch.from_numpy(np.sqrt(sq.numpy())))
    xr = x.clone().requires_grad_()
    reference.pairwise_distance(xr).sum().backward()
    assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_duplicate_rows_found_on_the_device_give_the_host_results(mining, distance, monkeypatch):
    # On an accelerator's path the duplicate reference rows are found without a host read
    # (canonical_columns_dense); the loss and gradients are bitwise those of the host check.
    from metricloss._checks import accelerator_rules

    monkeypatch.setenv("METRICLOSS_NATIVE", "0")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(24, 5, generator=g, dtype=torch.float64)
    x0[[3, 9, 17]] = x0[0].clone()               # copies across classes and within one
    x0[13] = x0[12].clone()
    labels = torch.arange(24) // 4
    out = []
    for rules in (False, True):
        x = x0.clone().requires_grad_()
        with accelerator_rules() if rules else contextlib.nullcontext():
            loss = MF.triplet_loss(x, labels, mining=mining, distance=distance, reduction="sum")
            loss.backward()
        out.append((loss.detach(), x.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
