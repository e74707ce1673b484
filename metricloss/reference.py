"""Dense, obviously-correct versions of every loss: the ground truth of the tests, and a baseline.

Nothing here is fast or memory-lean on purpose. Distances come from explicit differences (an (N, M, D)
tensor), masks are dense (N, M) and triplet sets dense (N, M, M) cubes, so every function is a direct
transcription of the formula it documents. Only ``torch`` is used: the reference does not share code
with :mod:`metricloss.ops`, so a bug there cannot hide here. Where a loop is clearer than a cube there
is also a ``*_loop`` version over Python scalars for tiny inputs.

All functions compute in at least fp32 and accept the same arguments as their fast twins in
:mod:`metricloss.functional`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["pairwise_distance", "mine_batch_hard", "triplet_loss", "triplet_loss_loop", "centroid_triplet_loss"]

Margin = Union[float, str]


def _prepare(x: torch.Tensor, distance: str, normalize: bool) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return F.normalize(x, p=2.0, dim=1) if (normalize or distance == "cosine") else x


def _dist(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Dense distances from explicit differences; x, y already prepared."""
    if distance == "cosine":
        return 1.0 - x @ y.T
    sq = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    if distance == "squared_euclidean":
        return sq
    pos = sq > 0  # √ with gradient 0 at 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, distance: str = "euclidean",
                      normalize: bool = False) -> torch.Tensor:
    """(N, M) distances: ``euclidean`` ‖x−y‖, ``squared_euclidean`` ‖x−y‖², ``cosine`` 1 − x̂·ŷ."""
    xp = _prepare(x, distance, normalize)
    yp = xp if y is None else _prepare(y, distance, normalize)
    return _dist(xp, yp, distance)


def _masks(labels: torch.Tensor, ref_labels: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense positive and negative masks; self is excluded by index when there is no reference set."""
    lr = labels if ref_labels is None else ref_labels
    same = labels[:, None] == lr[None, :]
    pos = same.clone()
    if ref_labels is None:
        pos.fill_diagonal_(False)
    return pos, ~same


def mine_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None,
                    distance: str = "euclidean") -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive (max distance) and hardest negative (min distance) per anchor, densely.

    Returns int64 (N,) indices, -1 where the anchor has no positive / no negative; first index on ties.
    """
    with torch.no_grad():
        d = pairwise_distance(embeddings, ref_embeddings, distance)
        pos, neg = _masks(labels, ref_labels)
        pidx = d.masked_fill(~pos, float("-inf")).max(1).indices
        nidx = d.masked_fill(~neg, float("inf")).min(1).indices
        return torch.where(pos.any(1), pidx, -1), torch.where(neg.any(1), nidx, -1)


def _h(z: torch.Tensor, margin: Margin) -> torch.Tensor:
    return F.softplus(z) if margin == "soft" else F.relu(margin + z)


def _reduce(per_anchor: torch.Tensor, terms: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``terms``: the loss terms (any shape), ``valid``: which of them exist."""
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return terms.sum()
    count = valid.sum() if reduction == "mean" else (valid & (terms > 0)).sum()
    return terms.sum() / max(int(count), 1)


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                 ref_labels: Optional[torch.Tensor] = None, margin: Margin = 0.2, mining: str = "batch_hard",
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Dense triplet loss with the semantics of :func:`metricloss.functional.triplet_loss`.

    * batch_hard: one term h(max_p d_ap − min_n d_an) per anchor with a positive and a negative.
    * batch_all: one term h(d_ap − d_an) per valid (a, p, n), from an (N, M, M) cube.
    * semi_hard: one term per (a, p) for anchors with a negative: n* = argmin{d_an : d_an > d_ap}, or the
      farthest negative when none is farther than p (TF-Addons).

    h(z) = [m + z]_+, or softplus(z) for ``margin="soft"``. ``"none"`` returns per-anchor sums.
    """
    x = _prepare(embeddings, distance, normalize)
    y = x if ref_embeddings is None else _prepare(ref_embeddings, distance, normalize)
    d = _dist(x, y, distance)
    pos, neg = _masks(labels, ref_labels)
    has_neg = neg.any(1, keepdim=True)
    if mining == "batch_hard":
        d_ap = d.masked_fill(~pos, float("-inf")).max(1).values
        d_an = d.masked_fill(~neg, float("inf")).min(1).values
        valid = pos.any(1) & neg.any(1)
        terms = torch.where(valid, _h(d_ap - d_an, margin), torch.zeros_like(d_ap))
        return _reduce(terms, terms, valid, reduction)
    if mining == "batch_all":
        cube = _h(d[:, :, None] - d[:, None, :], margin)             # [a, p, n]
        valid = pos[:, :, None] & neg[:, None, :]
        cube = torch.where(valid, cube, torch.zeros_like(cube))
        return _reduce(cube.sum((1, 2)), cube, valid, reduction)
    if mining == "semi_hard":
        farther = neg[:, None, :] & (d[:, None, :] > d[:, :, None])    # [a, p, n]
        nearest_farther = torch.where(farther, d[:, None, :], torch.full_like(farther, float("inf"), dtype=d.dtype))
        nearest_farther = nearest_farther.min(2).values
        farthest = d.masked_fill(~neg, float("-inf")).max(1, keepdim=True).values
        d_an = torch.where(farther.any(2), nearest_farther, farthest.expand_as(nearest_farther))
        valid = pos & has_neg
        terms = torch.where(valid, _h(d - d_an, margin), torch.zeros_like(d))
        return _reduce(terms.sum(1), terms, valid, reduction)
    raise ValueError(f"unknown mining {mining!r}")


def triplet_loss_loop(embeddings: torch.Tensor, labels: torch.Tensor, margin: Margin = 0.2,
                      mining: str = "batch_all", distance: str = "euclidean", normalize: bool = True,
                      reduction: str = "mean") -> float:
    """Python-loop triplet loss over scalars (tiny inputs only), the most literal statement of each mode.

    Returns a float (no gradient). Reference set = the batch, self excluded.
    """
    d = pairwise_distance(embeddings.detach(), distance=distance, normalize=normalize).double().tolist()
    y = labels.tolist()
    n = len(y)
    h = (lambda z: float(F.softplus(torch.tensor(z, dtype=torch.float64)))) if margin == "soft" else \
        (lambda z: max(0.0, margin + z))
    terms = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and y[p] == y[a]]
        negatives = [q for q in range(n) if y[q] != y[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            terms.append(h(max(d[a][p] for p in positives) - min(d[a][q] for q in negatives)))
        elif mining == "batch_all":
            terms.extend(h(d[a][p] - d[a][q]) for p in positives for q in negatives)
        elif mining == "semi_hard":
            for p in positives:
                farther = [d[a][q] for q in negatives if d[a][q] > d[a][p]]
                d_an = min(farther) if farther else max(d[a][q] for q in negatives)
                terms.append(h(d[a][p] - d_an))
        else:
            raise ValueError(f"unknown mining {mining!r}")
    total = sum(terms)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(len(terms), 1)
    if reduction == "mean_nonzero":
        return total / max(sum(1 for t in terms if t > 0), 1)
    raise ValueError(f"reduction {reduction!r} is not supported by the loop reference")


def centroid_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, centroids: Union[torch.Tensor, str],
                          num_classes: Optional[int] = None, reduction: str = "mean") -> torch.Tensor:
    """Dense centroid bound (Do et al. 2019): ℓ_i = d(x_i, c_{y_i}) − 1/(3(C − 1)) · Σ_{m ≠ y_i} d(x_i, c_m).

    ``centroids`` is a (C, D) tensor, or ``"onehot"`` (``torch.eye(num_classes, D)``). Distances are
    Euclidean from explicit (B, C, D) differences, √ with gradient 0 at 0. Computed in fp32 at least (fp64
    when either input is fp64). ``reduction``: ``"mean"`` over rows, ``"sum"`` or ``"none"`` ((B,)).
    """
    if isinstance(centroids, str):
        centroids = torch.eye(num_classes, embeddings.shape[1], dtype=embeddings.dtype,
                              device=embeddings.device)
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, centroids.dtype), torch.float32)
    x, c = embeddings.to(dtype), centroids.to(dtype)
    num = c.shape[0]
    d = _dist(x, c, "euclidean")                                         # (B, C)
    own = F.one_hot(labels.long(), num).bool()
    per_row = d[own] - torch.where(own, torch.zeros_like(d), d).sum(1) / (3 * (num - 1))
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
