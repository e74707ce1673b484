"""Small data generators shared by the tests (each test file owns its torch reference)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


def pk_labels(p: int, k: int, generator: Optional[torch.Generator] = None, shuffle: bool = True) -> torch.Tensor:
    """P classes × K samples, shuffled."""
    labels = torch.arange(p).repeat_interleave(k)
    if shuffle:
        labels = labels[torch.randperm(p * k, generator=generator)]
    return labels


def label_pattern(pattern: str, n: int, g: torch.Generator, num_classes: int = 3) -> torch.Tensor:
    """Label patterns the contract names: random, singletons, one class, P×K (K=2 or 3)."""
    if pattern == "random":
        return torch.randint(0, max(1, num_classes), (n,), generator=g)
    if pattern == "singletons":
        return torch.randperm(n, generator=g)
    if pattern == "one_class":
        return torch.full((n,), 7, dtype=torch.int64)
    if pattern.startswith("pk"):
        k = int(pattern[2:])
        return (torch.arange(n) // k)[torch.randperm(n, generator=g)]
    raise ValueError(pattern)


def duplicate_rows(x: torch.Tensor, g: torch.Generator, count: int = 2,
                   labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copy ``count`` random rows onto other rows (exact duplicates). With ``labels``, only onto rows of
    the same class (cross-class duplicates make semi-hard's strict d_an > d_ap an exact tie)."""
    x = x.clone()
    n = x.shape[0]
    if n < 2:
        return x
    for _ in range(count):
        i, j = torch.randint(0, n, (2,), generator=g).tolist()
        if labels is None or labels[i] == labels[j]:
            x[j] = x[i]
    return x


def tie_free_case(n: int, d: int, labels: torch.Tensor, margin, seed: int = 0,
                  ref: Optional[Tuple[int, torch.Tensor]] = None, distances=("euclidean", "squared_euclidean",
                                                                             "cosine"), gap: float = 1e-4):
    """fp64 embeddings (and an optional (M, D) reference set) for finite-difference checks.

    For every anchor and every distance kind, the distances to all candidates (batch rows other than
    itself, and reference rows) are pairwise more than ``gap`` apart, and no hinge argument
    m + d_ap − d_an lies within ``gap`` of 0. Mining choices and hinge activity are then stable
    under small perturbations.
    """
    from metricloss import reference

    for s in range(seed, seed + 2000):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        r = None if ref is None else torch.randn(ref[0], d, generator=g, dtype=torch.float64)
        ok = True
        for distance in distances:
            dist = reference.pairwise_distance(x, torch.cat([x, r]) if r is not None else x, distance,
                                               normalize=True)
            dist[torch.arange(n), torch.arange(n)] = float("nan")  # self is never a candidate
            diffs = dist[:, :, None] - dist[:, None, :]
            off = ~torch.eye(dist.shape[1], dtype=torch.bool)
            diffs = diffs[:, off]
            diffs = diffs[~torch.isnan(diffs)]
            if (diffs.abs() < gap).any() or (margin != "soft" and ((diffs + margin).abs() < gap).any()):
                ok = False
                break
        if ok:
            return x, r
    raise RuntimeError("no tie-free case found")


def assert_row_normalised_losses_match(loss: Callable, want_loss: Callable, x: torch.Tensor, w: torch.Tensor,
                                       seed: int = 0, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    """``loss(x, w)`` equals ``want_loss(x, w)``, value and gradients w.r.t. both (B, D) and (C, D) inputs.

    Shapes of the loss: any (a scalar or per-row "none"; random upstream weights then). Both inputs pass
    through a row normalisation, which scales their gradients by 1/‖row‖: gradients are compared after
    multiplying each row by max(‖row‖, 1e-12), with tolerances relative to the largest entry.
    """
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    got, want = loss(xs, ws), want_loss(xr, wr)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for t, got_grad, want_grad in ((x, xs.grad, xr.grad), (w, ws.grad, wr.grad)):
        row_norm = t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        got_grad, want_grad = got_grad * row_norm, want_grad * row_norm
        torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=atol * max(1.0, want_grad.abs().max().item()))


def record_served(monkeypatch, module, names) -> list:
    """Wrap each native driver ``module.<name>`` (one that returns None when the native path does not
    serve a call) so that every call appends whether it served; returns that list."""
    served = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            served.append(out is not None)
            return out

        monkeypatch.setattr(module, name, spy)
    return served
