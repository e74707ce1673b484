"""Dense, obviously-correct versions of every loss: the ground truth of the tests, and a baseline.

Nothing here is fast or memory-lean on purpose. Distances come from explicit differences (an (N, M, D)
tensor), masks are dense (N, M) and triplet sets dense (N, M, M) cubes, so every function is a direct
transcription of the formula it documents. Only ``torch`` is used: the reference does not share code
with :mod:`metricloss.ops`, so a bug there cannot hide here (numpy gives the correctly rounded square
root on CPU, :func:`_sqrt_rn`). Where a loop is clearer than a cube there
is also a ``*_loop`` version over Python scalars for tiny inputs.

All functions compute in at least fp32 and accept the same arguments as their fast twins in
:mod:`metricloss.functional`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .ops.mining import tie_bound, tie_rtol_slots  # semantics shared (the tie band), no computation
from .ops.reduction import LossTerms  # the container only: no computation is shared with metricloss.ops

__all__ = ["pairwise_distance", "mine_batch_hard", "triplet_loss", "triplet_loss_terms", "triplet_loss_loop", "warp_loss",
           "warp_loss_loop", "normalize_scale", "cosine_logits", "norm_softmax_loss", "gram_schmidt_loop",
           "centralized_ranking_loss", "centroid_triplet_loss", "retrieval_metrics"]

Margin = Union[float, str]


def _prepare(x: torch.Tensor, distance: str, normalize: bool) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return F.normalize(x, p=2.0, dim=1) if (normalize or distance == "cosine") else x


def _sqrt_rn(u: torch.Tensor) -> torch.Tensor:
    """√u correctly rounded, differentiable as ``torch.sqrt``. torch's CPU root is not correctly rounded
    (1 ulp off for ~20% of fp32, ~1.4% of fp64 inputs); numpy's is, and so are CUDA's and C++'s: every path
    of metricloss decides on the correctly rounded root, so ties fall the same way here."""
    if (u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(u)):
        return torch.sqrt(u)
    root = torch.from_numpy(np.sqrt(u.detach().contiguous().numpy()))
    if not (torch.is_grad_enabled() and u.requires_grad):
        return root
    approx = torch.sqrt(u)  # the gradient; the value is moved onto the correct root (a neighbour: exact)
    return approx + (root - approx).nan_to_num_(nan=0.0).detach()


def _dist(x: torch.Tensor, y: torch.Tensor, distance: str) -> torch.Tensor:
    """Dense distances from explicit differences; x, y already prepared."""
    if distance == "cosine":
        return 1.0 - x @ y.T
    sq = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    if distance == "squared_euclidean":
        return sq
    pos = sq > 0  # √ with gradient 0 at 0
    return torch.where(pos, _sqrt_rn(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _prepare_pair(x: torch.Tensor, y: Optional[torch.Tensor], distance: str,
                  normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both sides prepared, in their common dtype (fp32 with fp64: fp64); ``y`` None means ``x``."""
    xp = _prepare(x, distance, normalize)
    if y is None or y is x:
        return xp, xp
    yp = _prepare(y, distance, normalize)
    common = torch.promote_types(xp.dtype, yp.dtype)
    return xp.to(common), yp.to(common)


def pairwise_distance(x: torch.Tensor, y: Optional[torch.Tensor] = None, distance: str = "euclidean",
                      normalize: bool = False) -> torch.Tensor:
    """(N, M) distances: ``euclidean`` ‖x−y‖, ``squared_euclidean`` ‖x−y‖², ``cosine`` 1 − x̂·ŷ."""
    return _dist(*_prepare_pair(x, y, distance, normalize), distance)


def _self_mask(n: int, m: int, embeddings: torch.Tensor, ref_embeddings: Optional[torch.Tensor],
               ref_self_index: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, M) bool: True at (i, own row of anchor i). The own rows are the diagonal without a reference set
    or when ``ref_embeddings is embeddings`` (unless ``ref_self_index`` says otherwise), else
    ``ref_self_index`` (-1: none)."""
    own = torch.zeros((n, m), dtype=torch.bool, device=embeddings.device)
    if ref_self_index is None:
        if ref_embeddings is None or ref_embeddings is embeddings:
            own.fill_diagonal_(True)
        return own
    rows = torch.arange(n, device=embeddings.device)
    has = ref_self_index >= 0
    own[rows[has], ref_self_index[has].long()] = True
    return own


def _masks(labels: torch.Tensor, ref_labels: Optional[torch.Tensor],
           own: torch.Tensor, relation=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense positive and negative masks; an anchor's own row (``own``) is neither, by index. ``relation``: a
    user's relation, called once on all labels."""
    lr = labels if ref_labels is None else ref_labels
    if relation is not None:
        same = relation(labels, lr)
    elif labels.dim() == 2:  # multi-hot rows: the same class is a label in common
        same = (labels.to(torch.float64) @ lr.to(torch.float64).T) > 0
    else:
        same = labels[:, None] == lr[None, :]  # compares in the promoted dtype: no narrowing cast
    return same & ~own, ~same & ~own


def mine_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None, distance: str = "euclidean",
                    ref_self_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive (max distance) and hardest negative (min distance) per anchor, densely.

    Returns int64 (N,) indices, -1 where the anchor has no positive / no negative; first index on ties.
    ``ref_self_index`` as in :func:`metricloss.functional.mine_batch_hard`.
    """
    with torch.no_grad():
        d = pairwise_distance(embeddings, ref_embeddings, distance)
        pos, neg = _masks(labels, ref_labels, _self_mask(d.shape[0], d.shape[1], embeddings, ref_embeddings,
                                                         ref_self_index))
        pidx = d.masked_fill(~pos, float("-inf")).max(1).indices
        nidx = d.masked_fill(~neg, float("inf")).min(1).indices
        return torch.where(pos.any(1), pidx, -1), torch.where(neg.any(1), nidx, -1)


def _h(z: torch.Tensor, margin: Margin) -> torch.Tensor:
    return F.softplus(z) if margin == "soft" else F.relu(margin + z)


def _terms(per_anchor: torch.Tensor, terms: torch.Tensor, valid: torch.Tensor, soft: bool = False) -> LossTerms:
    """``terms``: the loss terms (any shape, 0 where not ``valid``), ``valid``: which of them exist.

    Nonzero terms: those > 0; with the soft margin every valid one that is not NaN (softplus(z) > 0 for every
    z, so the count does not depend on whether a term's exp underflowed)."""
    positive = (terms == terms) if soft else (terms > 0)
    return LossTerms(per_anchor, valid.sum(), (valid & positive).sum())


def _reduce(per_anchor: torch.Tensor, terms: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``terms``: the loss terms (any shape), ``valid``: which of them exist."""
    terms = torch.where(valid, terms, torch.zeros_like(terms))
    return _reduce_terms(_terms(per_anchor, terms, valid), reduction)


def _reduce_terms(terms: LossTerms, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return terms.per_anchor
    total = terms.per_anchor.sum()
    if reduction == "sum":
        return total
    count = terms.num_terms if reduction == "mean" else terms.num_nonzero
    return total / max(int(count), 1)


def triplet_loss_terms(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                       ref_labels: Optional[torch.Tensor] = None, margin: Margin = 0.2, mining: str = "batch_hard",
                       distance: str = "euclidean", normalize: bool = True,
                       ref_self_index: Optional[torch.Tensor] = None,
                       tie_dtype: Optional[torch.dtype] = None, form=None, relation=None) -> LossTerms:
    """Dense :class:`~metricloss.ops.reduction.LossTerms` of :func:`triplet_loss` (per-anchor sums and counts).

    ``tie_dtype``: the dtype whose tie band (:func:`metricloss.ops.mining.tie_rtol_slots`) decides semi-hard's
    "farther than the positive"; default the computation's own dtype. ``torch.float32`` reproduces, in fp64,
    the choices the chunked path makes on fp16/bf16/fp32 inputs (which it computes in fp32).

    * batch_hard: one term h(max_p d_ap − min_n d_an) per anchor with a positive and a negative.
    * batch_all: one term h(d_ap − d_an) per valid (a, p, n), from an (N, M, M) cube.
    * semi_hard: one term per (a, p) for anchors with a negative: n* = argmin{d_an : d_an > d_ap}, or the
      farthest negative when none is farther than p (TF-Addons).

    h(z) = [m + z]_+, or softplus(z) for ``margin="soft"``. An anchor's own row (the diagonal without a
    reference set or when ``ref_embeddings is embeddings``; else ``ref_self_index``, -1 for none) is
    neither a positive nor a negative.

    ``form``: batch-hard's :class:`~metricloss.ops.triplet.TripletForm` (None: hardest positive, margin loss),
    see :func:`_batch_hard_form_terms`. ``relation``: a user's label relation (called once, on all N × M).
    """
    x, y = _prepare_pair(embeddings, ref_embeddings, distance, normalize)
    d = _dist(x, y, distance)
    pos, neg = _masks(labels, ref_labels, _self_mask(d.shape[0], d.shape[1], embeddings, ref_embeddings,
                                                     ref_self_index), relation)
    has_neg = neg.any(1, keepdim=True)
    if mining == "batch_hard" and form is not None and (form.positive != "hardest" or form.loss != "triplet"):
        return _batch_hard_form_terms(d, pos, neg, margin, distance, form)
    if mining == "batch_hard":
        d_ap = d.masked_fill(~pos, float("-inf")).max(1).values
        d_an = d.masked_fill(~neg, float("inf")).min(1).values
        valid = pos.any(1) & neg.any(1)
        terms = torch.where(valid, _h(d_ap - d_an, margin), torch.zeros_like(d_ap))
        return _terms(terms, terms, valid, margin == "soft")
    if mining == "batch_all":
        cube = _h(d[:, :, None] - d[:, None, :], margin)             # [a, p, n]
        valid = pos[:, :, None] & neg[:, None, :]
        cube = torch.where(valid, cube, torch.zeros_like(cube))
        return _terms(cube.sum((1, 2)), cube, valid, margin == "soft")
    if mining == "semi_hard":
        # "farther" is beyond the tie band of the positive; among the nearest farther ones (within the
        # band of the nearest) the first index
        # band of the nearest) the first index; the band of each (a, p) is the chunked paths' Gram error bound
        r_sq = (y * y).sum(1)
        rtol = tie_rtol_slots(d, (x * x).sum(1), r_sq.max() if r_sq.numel() else r_sq.new_zeros(()), x.shape[1],
                              x.dtype if tie_dtype is None else tie_dtype, distance)             # [a, p]
        farther = neg[:, None, :] & (d[:, None, :] > tie_bound(d, rtol, distance)[:, :, None])    # [a, p, n]
        cand = torch.where(farther, d[:, None, :], torch.full_like(farther, float("inf"), dtype=d.dtype))
        nearest = cand.min(2, keepdim=True).values
        first = (cand <= tie_bound(nearest, rtol[:, :, None], distance)).to(torch.uint8).argmax(2)  # [a, p]
        nearest_farther = d.gather(1, first)
        farthest = d.masked_fill(~neg, float("-inf")).max(1, keepdim=True).values
        d_an = torch.where(farther.any(2), nearest_farther, farthest.expand_as(nearest_farther))
        valid = pos & has_neg
        terms = torch.where(valid, _h(d - d_an, margin), torch.zeros_like(d))
        return _terms(terms.sum(1), terms, valid, margin == "soft")
    raise ValueError(f"unknown mining {mining!r}")


def _batch_hard_form_terms(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: Margin, distance: str,
                           form) -> LossTerms:
    """Batch-hard with an easy positive and/or the nca / sct loss forms, densely, by values.

    * positive: the largest d over ``pos`` (hardest) or the smallest over the non-duplicate positives
      (easiest: not below the duplicate key, 1 − s for cosine, 2(1 − s) on d² for the Euclidean kinds); the
      negative: the smallest d over ``neg``.
    * triplet: h(d_ap − d_an); nca: softplus((S_an − S_ap)/T), S = 1 − d, optionally only where both S > m;
      sct: λ·S_an where S_an > S_ap or S_an > τ, the nca term where S_an < S_ap and S_an < τ, an anchor
      whose negative has S_an > the duplicate similarity dropped.
    """
    key = d * d if distance == "euclidean" else d
    ok = pos
    if form.positive == "easiest":
        if form.duplicate_similarity is not None:
            gap = 1.0 - form.duplicate_similarity
            ok = pos & ~(key < (gap if distance == "cosine" else 2.0 * gap))
        d_ap = d.masked_fill(~ok, float("inf")).min(1).values
    else:
        d_ap = d.masked_fill(~ok, float("-inf")).max(1).values
    d_an = d.masked_fill(~neg, float("inf")).min(1).values
    valid = ok.any(1) & neg.any(1)
    zero = torch.zeros_like(d_ap)
    if form.loss == "triplet":
        terms = torch.where(valid, _h(d_ap - d_an, margin), zero)
        return _terms(terms, terms, valid, margin == "soft")
    s_ap, s_an = torch.where(valid, 1.0 - d_ap, zero), torch.where(valid, 1.0 - d_an, zero)
    nca = F.softplus((s_an - s_ap) / form.temperature)
    if form.loss == "nca":
        if form.min_similarity is not None:
            valid = valid & (s_ap > form.min_similarity) & (s_an > form.min_similarity)
        terms = torch.where(valid, nca, zero)
        return _terms(terms, terms, valid, True)
    if form.duplicate_similarity is not None:
        valid = valid & ~(s_an > form.duplicate_similarity)
    hard = valid & ((s_an > s_ap) | (s_an > form.hard_threshold))
    easy = valid & (s_an < s_ap) & (s_an < form.hard_threshold)
    terms = torch.where(hard, form.hard_weight * s_an, torch.where(easy, nca, zero))
    counted = hard | easy
    return LossTerms(terms, counted.sum(), (easy | (hard & (terms != 0))).sum())


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                 ref_labels: Optional[torch.Tensor] = None, margin: Margin = 0.2, mining: str = "batch_hard",
                 distance: str = "euclidean", normalize: bool = True, reduction: str = "mean",
                 ref_self_index: Optional[torch.Tensor] = None, tie_dtype: Optional[torch.dtype] = None,
                 form=None, relation=None) -> torch.Tensor:
    """Dense triplet loss with the semantics of :func:`metricloss.functional.triplet_loss`
    (:func:`triplet_loss_terms`, reduced). ``"none"`` returns per-anchor sums; ``tie_dtype``, ``form`` and
    ``relation`` as there."""
    return _reduce_terms(triplet_loss_terms(embeddings, labels, ref_embeddings, ref_labels, margin=margin, mining=mining,
                                            distance=distance, normalize=normalize,
                                            ref_self_index=ref_self_index, tie_dtype=tie_dtype, form=form,
                                            relation=relation),
                         reduction)


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


# ----------------------------------------------------------------------------------------------------
# WARP
# ----------------------------------------------------------------------------------------------------

RankWeight = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def _warp_weight(k: int, rank_weight: RankWeight) -> float:
    """L(k) for one integer rank: harmonic Σ_{j=1..k} 1/j (L(0) = 0), LightFM's min(log(max(k, 1)), 10),
    or a callable evaluated on a one-element int64 tensor."""
    if rank_weight == "harmonic":
        return sum(1.0 / j for j in range(1, k + 1))
    if rank_weight == "log":
        return min(math.log(max(k, 1)), 10.0)
    return float(torch.as_tensor(rank_weight(torch.tensor([k], dtype=torch.int64))).reshape(-1)[0])


def _warp_positives(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) bool positive mask from (B,) integer labels or a (B, C) multi-hot matrix."""
    if labels.dim() == 2:
        return labels != 0
    return F.one_hot(labels.long(), num_classes).bool()


def _warp_reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / per_row.shape[0]
    raise ValueError(f"unknown reduction {reduction!r}")


def warp_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, rank_weight: RankWeight = "harmonic",
              reduction: str = "mean") -> torch.Tensor:
    """Exact WARP, densely: for every row i and positive p (a (B, C, C) cube [i, p, j]),

        z_ipj = s_ij + (m − s_ip),   violators V_ip = {j negative : z_ipj > 0},   r_ip = |V_ip|,
        ℓ_ip = L(r_ip)/r_ip · Σ_{j ∈ V_ip} z_ipj   (0 when r_ip = 0),

    and the row's loss is Σ_p ℓ_ip. The weights L(r)/r are constants (r is a count), so autograd gives
    ∂/∂s_ij = L(r)/r per violator and ∂/∂s_ip = −L(r). ``"mean"`` divides by B.
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    B, C = s.shape
    pos = _warp_positives(labels, C)
    z = s[:, None, :] + (margin - s)[:, :, None]                          # [i, p, j]
    viol = pos[:, :, None] & ~pos[:, None, :] & (z > 0)
    r = viol.sum(-1)                                                       # [i, p]
    hinge_sum = torch.where(viol, z, torch.zeros_like(z)).sum(-1)
    weight = torch.tensor([_warp_weight(k, rank_weight) / k if k > 0 else 0.0 for k in r.reshape(-1).tolist()],
                          dtype=s.dtype).reshape(r.shape)
    return _warp_reduce((weight * hinge_sum).sum(1), reduction)


def warp_loss_loop(scores: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, max_trials: Optional[int] = None,
                   rank_weight: RankWeight = "harmonic", reduction: str = "mean",
                   generator: Optional[torch.Generator] = None, return_draws: bool = False):
    """The paper's sequential sampling loop, literally, one example and one draw at a time (tiny inputs).

    For every row i and positive p (each (row, positive) pair is an example), with 𝒩 the row's negatives:
    draw ȳ uniformly from 𝒩 (with replacement, one ``torch.randint`` per draw) until
    s_ȳ + (m − s_p) > 0 or ``max_trials`` draws (default |𝒩|). If a violator was found at trial N, the
    example's loss is L(⌊|𝒩|/N⌋) · (s_ȳ + m − s_p); otherwise 0. Differentiable (built from score entries).

    Returns:
        The reduced loss; with ``return_draws=True`` also a list of ``(row, positive, N, chosen)`` per
            example, with N = 0 and chosen = −1 where no violator was drawn.
    """
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    B, C = s.shape
    pos = _warp_positives(labels, C).tolist()
    per_row: List[torch.Tensor] = []
    draws: List[Tuple[int, int, int, int]] = []
    for i in range(B):
        positives = [j for j in range(C) if pos[i][j]]
        negatives = [j for j in range(C) if not pos[i][j]]
        row_loss = s.new_zeros(())
        for p in positives:
            found_at, chosen = 0, -1
            num_trials = len(negatives) if max_trials is None else max_trials
            if negatives:
                for trial in range(1, num_trials + 1):
                    y_bar = negatives[int(torch.randint(len(negatives), (1,), generator=generator))]
                    if s[i, y_bar] + (margin - s[i, p]) > 0:
                        found_at, chosen = trial, y_bar
                        break
            if chosen >= 0:
                weight = _warp_weight(len(negatives) // found_at, rank_weight)
                row_loss = row_loss + weight * (s[i, chosen] + (margin - s[i, p]))
            draws.append((i, p, found_at, chosen))
        per_row.append(row_loss)
    loss = _warp_reduce(torch.stack(per_row), reduction)
    return (loss, draws) if return_draws else loss


# ----------------------------------------------------------------------------------------------------
# cosine normalize-scale: N-S layer, cosine logits, NormSoftmax, DGCRL (reconstruction)
# ----------------------------------------------------------------------------------------------------

def normalize_scale(x: torch.Tensor, scale: Union[float, torch.Tensor] = 20.0,
                    eps: float = 1e-12) -> torch.Tensor:
    """s · x / max(‖x‖, eps) per row, literally (fp32 at least). ``Tensor.norm`` has gradient 0 at a zero
    row (√ would give 0·inf = NaN there); below eps the divisor is the constant eps."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return scale * x / torch.clamp(x.norm(dim=1, keepdim=True), min=eps)


def cosine_logits(embeddings: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor] = None,
                  scale: Union[float, torch.Tensor] = 20.0, margin: float = 0.0) -> torch.Tensor:
    """s · (cos(x_i, w_c) − margin·[c = y_i]): (B, C); the margin applies only when labels are given."""
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, weight.dtype), torch.float32)
    cos = normalize_scale(embeddings.to(dtype), 1.0) @ normalize_scale(weight.to(dtype), 1.0).T
    if labels is not None:
        cos = cos - margin * F.one_hot(labels.long(), weight.shape[0]).to(dtype)
    return scale * cos


def norm_softmax_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                      temperature: float = 0.05, reduction: str = "mean") -> torch.Tensor:
    """−log softmax(cos(x_i, W) / T)[y_i], from an explicit logsumexp; ``"mean"``, ``"sum"`` or ``"none"``."""
    logits = cosine_logits(embeddings, weight, scale=1.0 / temperature)
    per_row = torch.logsumexp(logits, dim=1) - logits[torch.arange(logits.shape[0]), labels.long()]
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def gram_schmidt_loop(weight: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the rows of ``weight`` (C, D), C <= D, in order: row k is the unit vector
    along the part of w_k orthogonal to the rows before it. A Python loop (differentiable)."""
    rows = []
    for w in weight.to(torch.promote_types(weight.dtype, torch.float32)):
        for q in rows:
            w = w - (q @ w) * q
        rows.append(w / torch.sqrt(w @ w))
    return torch.stack(rows)


def centralized_ranking_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                             margin: float = 0.2, scale: float = 1.0, decorrelation: str = "auto",
                             decorrelation_weight: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """DGCRL reconstruction, densely (see *Methods › DGCRL and the N-S layer* in the docs): distances from an explicit (B, C, D) difference.

    ℓ_i = Σ_{k≠y_i} [m + ‖x̂_i − ĉ_{y_i}‖² − ‖x̂_i − ĉ_k‖²]_+ with x̂ = s·x/‖x‖ and ĉ = s·(Gram-Schmidt rows
    of W) for ``"qr"`` (``"auto"`` with D >= C), else ĉ = s·w/‖w‖; ``"penalty"`` (``"auto"`` with D < C)
    adds λ·mean((ŴŴᵀ − I)²) from the explicit C×C matrix. Reductions over the B·(C − 1) terms as
    :func:`metricloss.functional.centralized_ranking_loss`; ``"none"`` adds λP/B to every row.
    """
    num_classes, in_features = weight.shape
    mode = decorrelation
    if mode == "auto":
        mode = "qr" if in_features >= num_classes else "penalty"
    x = normalize_scale(embeddings, scale)
    centres = scale * gram_schmidt_loop(weight) if mode == "qr" else normalize_scale(weight, scale)
    dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)            # (B, C)
    y = labels.long()
    d_own = dist[torch.arange(x.shape[0]), y]
    rival = torch.ones_like(dist, dtype=torch.bool)
    rival[torch.arange(x.shape[0]), y] = False
    hinge = torch.where(rival, F.relu(margin + d_own[:, None] - dist), torch.zeros_like(dist))
    loss = _reduce(hinge.sum(1), hinge, rival, reduction)
    if mode == "penalty" and decorrelation_weight > 0:
        unit = normalize_scale(weight, 1.0)
        gram = unit @ unit.T
        penalty = decorrelation_weight * ((gram - torch.eye(num_classes, dtype=gram.dtype)) ** 2).mean()
        loss = loss + (penalty / x.shape[0] if reduction == "none" else penalty)
    return loss


# ----------------------------------------------------------------------------------------------------
# centroid bound (Do et al. CVPR 2019)
# ----------------------------------------------------------------------------------------------------

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


def _comparable(labels: torch.Tensor) -> torch.Tensor:
    """Labels as int64, equal exactly where the labels are (uint64 reinterpreted bit for bit)."""
    return labels.view(torch.int64) if labels.dtype == torch.uint64 else labels.to(torch.int64)


def _pow2_scaled(x: torch.Tensor, peak_of: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """fp64 ``x`` times 2**-e, as fp32, where 2**(e-1) <= max|peak_of| < 2**e (per row with ``rows``); zero
    peaks leave ``x`` as is. Multiplying by a power of two is exact, so every ranking is kept."""
    peak = peak_of.abs().amax(1, keepdim=True) if rows else peak_of.abs().max()
    exponent = torch.frexp(peak)[1].long()
    return (x * torch.pow(2.0, (-exponent).double())).float()


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: Union[int, Sequence[int]] = (1, 2, 4, 8),
                      *, gallery: Optional[torch.Tensor] = None, gallery_labels: Optional[torch.Tensor] = None,
                      metric: str = "cosine", similarity: Optional[torch.Tensor] = None,
                      relation=None) -> Dict[str, float]:
    """Full-sort retrieval metrics: the dense (Q, G) similarity matrix, every row sorted.

    The twin of :func:`metricloss.metrics.retrieval_metrics` (same arguments, same protocol, same
    definitions of R@K, mAP, MAP@R and R-precision): each row is sorted by similarity, descending, with a
    stable sort, so equal similarities keep index order (the lower index ranks first); the left-out
    query (no gallery) is dropped from its own ranking; the rank of every relevant item is read off the
    sorted order. O(Q·G) memory and O(Q·G log G) time on purpose. NaN or ±Inf embeddings give NaN metrics.

    The rows are first multiplied by a power of two (exact, rank-preserving): cosine each row by its own,
    so that its largest entry lies in [0.5, 1); Euclidean both sets by one, from their largest entry. So
    finite embeddings of any magnitude (fp32 at 1e20, fp64 at 1e300) rank as at unit scale. Euclidean
    similarity: −fp32(Σ (q − g)²), the differences of the scaled fp32 rows summed in fp64.

    Args:
        similarity: optional (Q, G) similarities (higher = ranked earlier) to rank instead of computing
            them here (fp32 products of the normalised rows for cosine, −squared distances from explicit
            differences for Euclidean, identical gallery rows given identical columns). The tests pass the
            chunked path's own similarity tiles, so that both rank bitwise-identical values.
        relation: as :func:`metricloss.metrics.retrieval_metrics` (called once on all Q × G). Multi-hot
            (Q, L) / (G, L) labels: relevant iff a label in common.
    """
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    loo = gallery is None
    g, g_labels = (embeddings, labels) if loo else (gallery, gallery_labels)
    names = [f"R@{k}" for k in ks] + ["mAP", "MAP@R", "R-precision"]
    if not (bool(torch.isfinite(embeddings).all()) and bool(torch.isfinite(g).all())):
        return {name: float("nan") for name in names}
    if similarity is None:
        q, r = embeddings.detach().double(), g.detach().double()
        if metric == "cosine":  # each row times a power of two (exact): no fp32 norm over- or underflows
            q, r = F.normalize(_pow2_scaled(q, q, rows=True), dim=1), F.normalize(_pow2_scaled(r, r, rows=True), dim=1)
        else:  # one power of two for both sets: the fp32 rows and their distances stay finite
            peak = torch.cat([q.abs().reshape(-1), r.abs().reshape(-1)])
            q, r = _pow2_scaled(q, peak), _pow2_scaled(r, peak)
        r_unique, inverse = torch.unique(r, dim=0, return_inverse=True)
        if metric == "cosine":
            similarity = (q @ r_unique.T)[:, inverse]
        else:  # the squared differences of the fp32 rows, summed in fp64, rounded once to fp32
            diff = q.double().unsqueeze(1) - r_unique.double().unsqueeze(0)
            similarity = -(diff * diff).sum(-1).float()[:, inverse]
    n_query, n_gallery = similarity.shape
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices           # (Q, G)
    if relation is not None:
        relevant = relation(labels, g_labels).gather(1, order)
    elif labels.dim() == 2:  # multi-hot rows: a label in common
        relevant = ((labels.double() @ g_labels.double().T) > 0).gather(1, order)
    else:
        relevant = _comparable(g_labels)[order] == _comparable(labels).unsqueeze(1)
    if loo:
        not_self = order != torch.arange(n_query, device=order.device).unsqueeze(1)
        relevant &= not_self
        rank = not_self.cumsum(1).double()          # rank among the items other than the query itself
    else:
        rank = torch.arange(1, n_gallery + 1, device=order.device, dtype=torch.float64).expand(n_query, n_gallery)
    num_rel = relevant.sum(1).double()
    nth = relevant.cumsum(1).double()
    prec = torch.where(relevant, nth / rank, torch.zeros_like(rank))
    within_r = relevant & (rank <= num_rel.unsqueeze(1))
    first = torch.where(relevant, rank, torch.full_like(rank, float("inf"))).amin(1)
    keep = num_rel > 0
    if not bool(keep.any()):
        return {name: float("nan") for name in names}
    r_q = num_rel[keep]
    values = [(first[keep] <= k).double().mean() for k in ks]
    values += [(prec.sum(1)[keep] / r_q).mean(),
               (torch.where(within_r, prec, torch.zeros_like(prec)).sum(1)[keep] / r_q).mean(),
               (within_r.sum(1)[keep] / r_q).mean()]
    return {name: float(v) for name, v in zip(names, values)}
