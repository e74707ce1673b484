"""The WARP op (Weston, Bengio, Usunier, IJCAI 2011): sampled rank estimation and the exact formula.

Notation: see *Methods › WARP* in the docs. Scores s (B, C); an *example* is a (row i, positive label p) pair: one per row
for integer labels, one per non-zero entry for multi-hot labels. Its negatives 𝒩 are the labels not in
the row's positive set (|𝒩| = C − 1 for integer labels; for multi-hot rows |𝒩| stands in for the
paper's Y − 1, our reconstruction [U] in *Methods › WARP*). With margin m, the hinge of a negative j is
z_j = s_j + (m − s_p) and j *violates* when z_j > 0 (strict). The rank-to-loss map is L(k) = Σ_{j≤k} α_j.

* ``mode="exact"``: r = #violators and ℓ = L(r)/r · Σ_{violators} z_j (0/0 = 0). Row chunks under the
  memory budget, a custom ``autograd.Function`` (gradient in forward for scalar reductions, recomputed
  chunk by chunk for ``"none"``): ∂ℓ/∂s_j = L(r)/r for every violator, ∂ℓ/∂s_p = −L(r).
* ``mode="sampled"`` (the paper's estimator, vectorised): draw negatives i.i.d. uniformly *with
  replacement*, stop at the first violator, N = its trial number, ℓ = L(⌊|𝒩|/N⌋) · z_chosen. The weight
  is a detached constant, so the gradient reaches only s_p (−w) and s_chosen (+w).

One label per row: the loop's outcome is drawn from its law (:func:`single_violators_by_law`; natively on
CPU, :class:`SampledWARPKernelLoss`'s Triton kernels on CUDA): r violators counted, N geometric with p =
r/|𝒩| truncated at ``max_trials``, the violator uniform among the r, from two uniforms per row; no host read.

Multi-hot rows: the sampled estimator keeps the paper's law exactly while bounding memory (``max_trials=None`` means
|𝒩| trials: 4·10⁸ draws at B=4096, C=10⁵, too many to hold at once):

1. Examples without any violator are found exactly with one chunked pass (the row's largest negative
   score vs the positive's threshold). The loop would draw ``max_trials`` times and find nothing, so they
   skip sampling; this also bounds the cost of NaN rows.
2. The remaining examples draw trials in *blocks*: one ``randint``/``rand`` call draws (active, t)
   negatives, the violation mask is evaluated, ``argmax`` finds each example's first violator, and
   examples that found one (or used all their trials) leave. Block sizes start at ``_FIRST_BLOCK`` and
   double (and give the few examples of a long tail at least ``_MIN_DRAWS_PER_BLOCK`` draws in total).
   The schedule alone sets the blocks; the memory budget only splits a block into pieces (groups of
   examples, or runs of one example's trials) evaluated on the device, so the blocks, and the one host
   read each needs to drop the finished examples, do not depend on ``chunk_bytes``. Each example's draws
   come in the same order whatever the pieces, so on the CPU the draws, and the loss, are bitwise the
   same for every budget. Draws are i.i.d., so the concatenated blocks are one long i.i.d. sequence and
   the pair (first-violator trial N, chosen violator) has exactly the loop's law: N ~ Geometric(r/|𝒩|)
   truncated at ``max_trials``, the violator uniform among the r violators. Python iterates over blocks
   (O(log max_trials) of them) and pieces, never over rows or single trials.

Uniform draws over a row's negatives. Integer labels: draw k uniform in [0, C − 1) and shift, col = k +
[k ≥ y]. Multi-hot labels: draw k uniform in [0, |𝒩_i|) (fp64 uniform × |𝒩_i|, floored) and map it to the
k-th negative column. With the row's positives sorted p_0 < p_1 < …, q_m = p_m − m is the number of
negatives before p_m, so the k-th negative is col = k + #{m : q_m ≤ k}: one ``searchsorted`` on the
concatenation of all rows' q (offset by row) instead of a (B, C) cumulative count. For one positive this
is the shift above.
"""

from __future__ import annotations

import collections
from typing import Callable, Hashable, List, Optional, Tuple, Union

import torch

from .._backend import resolve_backend
from .autograd import linked_to_inputs, scaled_saved_gradients
from .distance import accumulation_dtype
from .mining import default_chunk_bytes, rows_per_chunk
from .reduction import mask_nonfinite, reduce_loss

__all__ = [
    "MODES",
    "RANK_WEIGHTS",
    "REDUCTIONS",
    "LOG_WEIGHT_CLIP",
    "WarpExamples",
    "rank_estimate",
    "harmonic_numbers",
    "rank_weights",
    "any_violator",
    "first_violators",
    "single_violators_by_law",
    "sample_violators",
    "exact_chunk_plan",
    "ExactWARPLoss",
    "SampledWARPKernelLoss",
    "warp_kernel_serves",
    "warp_loss_op",
]

MODES = ("sampled", "exact")
RANK_WEIGHTS = ("harmonic", "log")
REDUCTIONS = ("mean", "sum", "none")

# LightFM's MAX_LOSS: the log weight log(max(1, ⌊|𝒩|/N⌋)) is clipped at 10.
LOG_WEIGHT_CLIP = 10.0

# Trials drawn per active example in the first block; later blocks double. Most examples of a
# non-trivial model find a violator in a few trials, so a small first block wastes few draws.
_FIRST_BLOCK = 16

# A block draws at least this many trials in total (when the cap allows): once few examples remain
# active (the long tail of well-ranked rows), one block gives each of them many trials, so the tail
# takes one or two blocks instead of one per doubling. The waste is bounded by this count per block.
_MIN_DRAWS_PER_BLOCK = 1 << 16

# Temporaries per drawn trial: the draw and column (int64), the flat index (int64), the gathered score
# (up to 8 bytes) and its upcast, the violation mask, plus an fp64 uniform for multi-hot rows.
_BYTES_PER_DRAW = 56

RankWeight = Union[str, Callable[[torch.Tensor], torch.Tensor]]


class WarpExamples:
    """The (row, positive label) pairs of a batch, sorted by row then label: one WARP example each.

    Args:
        labels: (B,) integer labels (one example per row), or (B, C) multi-hot (bool, or 0/1 float or
            integer; one example per non-zero entry).
        num_classes: C.

    Attributes:
        rows, cols: (E,) int64 row and positive label of every example.
        counts: (B,) positives per row; starts: (B + 1,) index of each row's first example.
        num_neg: (B,) |𝒩| per row (C − 1 for integer labels; 0 for a row whose labels are all positive).
        single: True for integer labels.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int):
        device = labels.device
        self.num_rows = labels.shape[0]
        self.num_classes = num_classes
        self.single = labels.dim() == 1
        if self.single:
            self.rows = torch.arange(self.num_rows, device=device)
            self.cols = labels.to(torch.int64)
            self.counts = torch.ones(self.num_rows, dtype=torch.int64, device=device)
            self.starts = torch.arange(self.num_rows + 1, device=device)
        else:
            nonzero = labels.nonzero()  # row-major: sorted by row, then label
            self.rows, self.cols = nonzero[:, 0].contiguous(), nonzero[:, 1].contiguous()
            self.counts = torch.bincount(self.rows, minlength=self.num_rows)
            self.starts = torch.zeros(self.num_rows + 1, dtype=torch.int64, device=device)
            torch.cumsum(self.counts, 0, out=self.starts[1:])
        self.num_neg = num_classes - self.counts
        self._q_keys: Optional[torch.Tensor] = None

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The example tensors, for ``save_for_backward`` (so backward releases them)."""
        return self.rows, self.cols, self.counts, self.starts, self.num_neg

    @classmethod
    def from_tensors(cls, tensors: Tuple[torch.Tensor, ...], num_classes: int, single: bool) -> "WarpExamples":
        """Rebuild from :meth:`tensors` (no device work)."""
        ex = cls.__new__(cls)
        ex.rows, ex.cols, ex.counts, ex.starts, ex.num_neg = tensors
        ex.num_rows, ex.num_classes, ex.single = ex.counts.shape[0], num_classes, single
        ex._q_keys = None
        return ex

    @property
    def num_examples(self) -> int:
        return self.rows.shape[0]

    def negative_columns(self, k: torch.Tensor, ex_idx: torch.Tensor) -> torch.Tensor:
        """Column of the k-th negative (0-based, in column order) of each example's row.

        Args:
            k: (a, t) int64 draws, ``0 <= k < |𝒩|`` of the example's row.
            ex_idx: (a,) example indices.

        Returns:
            (a, t) int64 columns, never a positive of the row.
        """
        if self.single:
            return k + (k >= self.cols[ex_idx].unsqueeze(1))
        width = self.num_classes + 1  # q ∈ [0, C]: keys of different rows never interleave
        if self._q_keys is None:
            # q_m = p_m − m, the number of negatives before the row's m-th positive (non-decreasing)
            rank_in_row = torch.arange(self.num_examples, device=self.rows.device) - self.starts[self.rows]
            self._q_keys = self.rows * width + (self.cols - rank_in_row)
        rows = self.rows[ex_idx].unsqueeze(1)
        before = torch.searchsorted(self._q_keys, rows * width + k, right=True) - self.starts[rows]
        return k + before


def rank_estimate(num_neg: torch.Tensor, trials: torch.Tensor) -> torch.Tensor:
    """⌊|𝒩| / N⌋ with integer floor division (never true division); 0 where ``trials`` is 0."""
    return torch.where(trials > 0, torch.div(num_neg, trials.clamp_min(1), rounding_mode="floor"),
                       torch.zeros_like(num_neg))


def harmonic_numbers(max_rank: int, device: torch.device) -> torch.Tensor:
    """fp64 table of L(k) = Σ_{j=1..k} 1/j for k = 0..max_rank, with table[k] = L(k) (so L(0) = 0)."""
    table = torch.zeros(max_rank + 1, dtype=torch.float64, device=device)
    steps = torch.arange(1, max_rank + 1, dtype=torch.float64, device=device)
    torch.cumsum(steps.reciprocal_(), 0, out=table[1:])
    return table


def rank_weights(rank: torch.Tensor, rank_weight: RankWeight, dtype: torch.dtype, max_rank: int,
                 table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L(k) for an int64 tensor of ranks k, as a detached tensor of ``dtype``.

    * ``"harmonic"``: L(k) = Σ_{j=1..k} 1/j, L(0) = 0, from :func:`harmonic_numbers` (``table`` if given).
    * ``"log"``: min(log(max(k, 1)), 10) (LightFM): 0 for k ≤ 1, never −inf.
    * a callable: ``rank_weight(rank)`` must return a tensor (or array-like) of the same shape.

    ``max_rank`` bounds the ranks (|𝒩| ≤ C − 1) and sizes the harmonic table.
    """
    if isinstance(rank_weight, str) and rank_weight == "harmonic":
        table = harmonic_numbers(max_rank, rank.device) if table is None else table
        return table[rank].to(dtype)
    if isinstance(rank_weight, str) and rank_weight == "log":
        return torch.log(rank.clamp_min(1).to(dtype)).clamp_max_(LOG_WEIGHT_CLIP)
    if isinstance(rank_weight, str):
        raise ValueError(f"unknown `rank_weight`={rank_weight!r}")
    out = rank_weight(rank)
    out = torch.as_tensor(out, device=rank.device)
    if out.shape != rank.shape:
        raise ValueError(f"`rank_weight` must return weights of the same shape as the ranks it is given "
                         f"({tuple(rank.shape)}), got shape {tuple(out.shape)}")
    return out.detach().to(dtype)


def exact_chunk_plan(ex: WarpExamples, rows: int) -> List[Tuple[int, int, int, int, int, int]]:
    """The row chunks of exact WARP: ``(s, e, lo, hi, min_count, max_count)`` per chunk of ``rows`` rows.

    [lo, hi) are the examples of rows s:e and min/max_count the fewest / most positives of a row there.
    Integer labels know them without reading the device (one example per row); multi-hot labels read all
    chunks' bounds in one host sync, whatever the number of chunks (never one per chunk).
    """
    B = ex.num_rows
    starts = list(range(0, B, rows))
    if ex.single:
        return [(s, min(s + rows, B), s, min(s + rows, B), 1, 1) for s in starts]
    device = ex.counts.device
    edges = torch.tensor(starts + [B], device=device)
    padded = torch.zeros(len(starts) * rows, dtype=ex.counts.dtype, device=device)
    padded[:B] = ex.counts
    blocks = padded.view(len(starts), rows)
    # the last chunk's padding must not lower its minimum: use its real rows' count there
    last = B - starts[-1]
    lows = torch.cat([blocks[:-1].amin(1), blocks[-1, :last].amin().unsqueeze(0)])
    values = torch.cat([ex.starts[edges], lows, blocks.amax(1)]).tolist()
    n = len(starts)
    bounds, mins, maxs = values[:n + 1], values[n + 1:2 * n + 1], values[2 * n + 1:]
    return [(s, min(s + rows, B), bounds[k], bounds[k + 1], mins[k], maxs[k]) for k, s in enumerate(starts)]


def any_violator(scores: torch.Tensor, ex: WarpExamples, base: torch.Tensor,
                 chunk_bytes: Optional[int]) -> torch.Tensor:
    """Whether each example has at least one violator, exactly, without a (B, C) temporary.

    An example has a violator iff the row's largest *negative* score n_max satisfies n_max + (m − s_p) > 0
    (the sum is monotone in the score, so the max of the hinges is the hinge of the max).

    1. One ``amax`` pass gives each row's maximum; where it exceeds every positive of the row it is n_max.
    2. Rows whose maximum may be a positive (a well-ranked row) are copied in chunks, their positives set
       to −inf, and reduced again: the copy costs only what those rows need.

    Args:
        scores: (B, C) scores, any float dtype (reduced in it, compared after an exact upcast).
        base: (E,) m − s_p in the accumulation dtype.

    Returns:
        (E,) bool. A row holding a NaN has max NaN, so its examples report no violator (the loss is NaN
        anyway); so does a NaN positive.
    """
    B, C = scores.shape
    device = scores.device
    # 1. row maxima, in chunks so fp16/bf16 reductions never allocate more than the budget
    row_max = torch.empty(B, dtype=scores.dtype, device=device)
    rows = rows_per_chunk(C, scores.element_size(), chunk_bytes)
    for s in range(0, B, rows):
        torch.amax(scores[s:s + rows], 1, out=row_max[s:s + rows])
    pos_max = torch.full((B,), float("-inf"), dtype=scores.dtype, device=device)
    pos_max.scatter_reduce_(0, ex.rows, torch.take(scores, ex.rows * C + ex.cols), reduce="amax")
    # 2. rows whose maximum is (or ties) a positive: the max over negatives, on a copy of those rows
    neg_max = row_max.clone()
    recheck = (pos_max >= row_max).nonzero().squeeze(1)
    if recheck.numel() > 0:
        # position of each example's row in `recheck` (examples are sorted by row, so each chunk of
        # `recheck` owns a contiguous run of the examples selected below)
        local = torch.full((B,), -1, dtype=torch.int64, device=device)
        local[recheck] = torch.arange(recheck.numel(), device=device)
        ex_local = local[ex.rows]
        sel = (ex_local >= 0).nonzero().squeeze(1)
        sel_local, sel_cols = ex_local[sel], ex.cols[sel]
        bounds = torch.searchsorted(sel_local, torch.arange(0, recheck.numel() + rows, rows, device=device))
        bounds = bounds.tolist()
        for chunk, s in enumerate(range(0, recheck.numel(), rows)):
            block = scores.index_select(0, recheck[s:s + rows])
            lo, hi = bounds[chunk], bounds[chunk + 1]
            block.view(-1).index_fill_(0, (sel_local[lo:hi] - s) * C + sel_cols[lo:hi], float("-inf"))
            neg_max[recheck[s:s + rows]] = block.amax(1)
    return (neg_max.to(base.dtype)[ex.rows] + base) > 0


def first_violators(scores: torch.Tensor, ex: WarpExamples, base: torch.Tensor, active: torch.Tensor,
                    max_trials: Optional[int], generator: Optional[torch.Generator],
                    chunk_bytes: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's sampling loop for every active example at once, in blocks of i.i.d. trials.

    Args:
        scores: (B, C) scores (not differentiated here).
        ex: the examples; base: (E,) m − s_p in the accumulation dtype.
        active: (E,) bool, the examples to sample (those with a violator and at least one negative).
        max_trials: trials per example, or None for |𝒩| of the example's row.
        generator: the random source (None: the global generator of ``scores``' device).
        chunk_bytes: memory budget of one block (default 64 MiB).

    Returns:
        ``(trials, chosen)``: (E,) int64, the trial number N ≥ 1 of the first violator and its column, or
        (0, −1) where no violator was drawn within the trials.
    """
    B, C = scores.shape
    device = scores.device
    E = ex.num_examples
    trials = torch.zeros(E, dtype=torch.int64, device=device)
    chosen = torch.full((E,), -1, dtype=torch.int64, device=device)
    idx = active.nonzero().squeeze(1)
    if idx.numel() == 0:
        return trials, chosen
    num_neg = ex.num_neg[ex.rows]
    # Integer labels share one cap; multi-hot rows with max_trials=None each have their own |𝒩|.
    per_example_cap = max_trials is None and not ex.single
    max_cap = (int(num_neg[idx].max()) if per_example_cap else (C - 1 if max_trials is None else max_trials))
    budget = default_chunk_bytes() if chunk_bytes is None else chunk_bytes
    done, block = 0, _FIRST_BLOCK
    while idx.numel() > 0 and done < max_cap:
        a = idx.numel()
        # the block's trial count follows the schedule alone (never the budget), so the number of blocks,
        # and of host reads (one per block, below), does not depend on the memory budget
        t = min(max(block, _MIN_DRAWS_PER_BLOCK // a), max_cap - done)
        hit, first, col = _draw_block(scores, ex, base, idx, num_neg, done, t, per_example_cap, generator, budget)
        hit_idx = idx[hit]
        trials[hit_idx] = done + 1 + first[hit]
        chosen[hit_idx] = col[hit]
        done += t
        # 4. examples that found a violator or used all their trials leave (one host read per block)
        keep = ~hit
        if per_example_cap:
            keep &= num_neg[idx] > done
        idx = idx[keep]
        block *= 2
    return trials, chosen


def _draw_block(scores: torch.Tensor, ex: WarpExamples, base: torch.Tensor, idx: torch.Tensor,
                num_neg: torch.Tensor, done: int, t: int, per_example_cap: bool,
                generator: Optional[torch.Generator], budget: int
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trials ``done + 1 … done + t`` of the active examples ``idx`` (a,), in pieces that fit ``budget``.

    Returns ``(hit, first, col)`` (a,): whether a violator was drawn, the 0-based trial of the first one
    within the block and its column. Pieces are groups of examples and, when one example's t draws exceed
    the budget, runs of trials; a later run only fills examples that had no violator yet, so the first
    violator is the same as in one piece (the draws are i.i.d.). No host sync.
    """
    B, C = scores.shape
    device = scores.device
    a = idx.numel()
    per_draw = max(1, budget // _BYTES_PER_DRAW)
    group = max(1, min(a, per_draw // t))          # examples per piece
    run = t if group * t <= per_draw else per_draw  # trials per piece (one example at a time when split)
    hit = torch.zeros(a, dtype=torch.bool, device=device)
    first = torch.zeros(a, dtype=torch.int64, device=device)
    col = torch.full((a,), -1, dtype=torch.int64, device=device)
    for g0 in range(0, a, group):
        g1 = min(g0 + group, a)
        gi = idx[g0:g1]
        for t0 in range(0, t, run):
            tt = min(run, t - t0)
            # 1. tt i.i.d. uniform draws from each example's negatives, one call for the piece
            if ex.single:
                k = torch.randint(0, C - 1, (g1 - g0, tt), generator=generator, device=device)
            else:
                n = num_neg[gi].unsqueeze(1)
                u = torch.rand((g1 - g0, tt), dtype=torch.float64, generator=generator, device=device)
                k = torch.minimum((u * n).to(torch.int64), n - 1)
            cols = ex.negative_columns(k, gi)
            # 2. violation mask v = [s_n + (m − s_p) > 0] (strict)
            vals = torch.take(scores, ex.rows[gi].unsqueeze(1) * C + cols).to(base.dtype)
            viol = (vals + base[gi].unsqueeze(1)) > 0
            if per_example_cap:
                viol &= (done + t0 + torch.arange(tt, device=device)) < num_neg[gi].unsqueeze(1)
            # 3. the first violator: argmax returns the first maximal index; earlier runs keep theirs
            new = viol.any(1) & ~hit[g0:g1]
            at = viol.to(torch.uint8).argmax(1, keepdim=True)
            first[g0:g1] = torch.where(new, t0 + at.squeeze(1), first[g0:g1])
            col[g0:g1] = torch.where(new, cols.gather(1, at).squeeze(1), col[g0:g1])
            hit[g0:g1] |= new
    return hit, first, col


# Temporaries per score of the law sampler: the upcast score and its hinge (accumulation dtype, up to 8
# bytes each), the violation mask, its int32 running count and the pick mask.
_LAW_BYTES_PER_SCORE = 22


def single_violators_by_law(scores: torch.Tensor, labels: torch.Tensor, uniforms: torch.Tensor, margin: float,
                            max_trials: int, chunk_bytes: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's loop for one label per row, its outcome drawn from its law: no host read, no
    data-dependent shape, a fixed number of ops per row chunk (the torch twin of the native sampler).

    With r violators among a row's n = C − 1 negatives, the loop's first-violator trial N is geometric with
    p = r / n, truncated at ``max_trials`` (beyond it nothing is drawn), and the violator is uniform among
    the r and independent of N. Per row, from its two uniforms (u_trial, u_pick):

    1. r = #{j ≠ y : s_j + (m − s_y) > 0} (strict), compared in the accumulation dtype after an exact
       upcast; a row holding a NaN has no violator.
    2. N = 1 + ⌊log(1 − u_trial) / log1p(−p)⌋ (inversion: P(N = k) = (1 − p)^(k−1)·p), N = 1 when every
       negative violates; N > ``max_trials``: no violator drawn.
    3. The k-th violator in column order, k = ⌊u_pick·r⌋: the number of columns whose running violator
       count is at most k.

    Args:
        scores: (B, C) scores, any float dtype, C ≥ 2 (read only).
        labels: (B,) int64 positive column per row.
        uniforms: (B, 2) fp64 uniforms in [0, 1).
        margin: m. max_trials: the cap on N (≥ 1; C − 1 for the paper's loop).
        chunk_bytes: memory budget of one row chunk's temporaries (default 64 MiB).

    Returns:
        ``(trials, chosen)``: (B,) int64, N ≥ 1 and the violator's column, or (0, −1) where none was drawn.
    """
    B, C = scores.shape
    acc = accumulation_dtype(scores.dtype)
    num_neg = C - 1
    trials = torch.empty(B, dtype=torch.int64, device=scores.device)
    chosen = torch.empty(B, dtype=torch.int64, device=scores.device)
    rows = rows_per_chunk(C, _LAW_BYTES_PER_SCORE, chunk_bytes)
    for s in range(0, B, rows):
        x, y, u = scores[s:s + rows], labels[s:s + rows].unsqueeze(1), uniforms[s:s + rows]
        # 1. the violators (the positive is no negative) and their count; NaN anywhere: none
        viol = x.to(acc) + (margin - x.gather(1, y).to(acc)) > 0
        viol.scatter_(1, y, False)
        r = viol.sum(1).masked_fill_(x.isnan().any(1), 0)
        # 2. the first violator's trial: geometric(r / n), truncated at max_trials
        steps = torch.floor(torch.log(1.0 - u[:, 0]) / torch.log1p(r.to(torch.float64) / -num_neg))
        found = (r > 0) & ((r == num_neg) | (steps < max_trials))
        n_trial = torch.where(r == num_neg, 1, steps.clamp(0, max_trials).to(torch.int64) + 1)
        # 3. the violator: the k-th in column order, k = ⌊u_pick·r⌋ < r
        k = torch.minimum((u[:, 1] * r).to(torch.int64), r - 1).unsqueeze(1)
        col = (torch.cumsum(viol, 1, dtype=torch.int32) <= k).sum(1)
        trials[s:s + rows] = n_trial.masked_fill_(~found, 0)
        chosen[s:s + rows] = col.masked_fill_(~found, -1)
    return trials, chosen


def sample_violators(scores: torch.Tensor, ex: WarpExamples, margin: float, max_trials: Optional[int],
                     generator: Optional[torch.Generator],
                     chunk_bytes: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sampling half of sampled WARP (no gradient): the first violator of every example.

    Returns:
        ``(trials, chosen)`` as :func:`first_violators`: (E,) int64 trial number N ≥ 1 and column of the
        first drawn violator, (0, −1) where none was drawn (no violator exists, no negative, or all
        ``max_trials`` draws missed).
    """
    with torch.no_grad():
        B, C = scores.shape
        if ex.single and scores.device.type == "cpu" and C > 1:
            # CPU, one label per row: the loop's outcome drawn from its law in two native passes per row
            from .native import warp_sample_single

            native = warp_sample_single(scores, ex.cols, margin, C - 1 if max_trials is None else max_trials,
                                        generator)
            if native is not None:
                return native
        if ex.single and C > 1:
            # one label per row elsewhere (CUDA, or the native path off): the same law in torch, no host read
            uniforms = torch.rand((B, 2), dtype=torch.float64, generator=generator, device=scores.device)
            return single_violators_by_law(scores, ex.cols, uniforms, margin,
                                           C - 1 if max_trials is None else max_trials, chunk_bytes)
        base = margin - torch.take(scores, ex.rows * C + ex.cols).to(accumulation_dtype(scores.dtype))
        # multi-hot rows: 1. the exact "has a violator" test; 2. first violators by blocks of i.i.d. draws
        active = any_violator(scores, ex, base, chunk_bytes) & (ex.num_neg[ex.rows] > 0)
        return first_violators(scores, ex, base, active, max_trials, generator, chunk_bytes)


def _sampled_per_row(scores: torch.Tensor, ex: WarpExamples, margin: float, max_trials: Optional[int],
                     rank_weight: RankWeight, generator: Optional[torch.Generator],
                     chunk_bytes: Optional[int]) -> torch.Tensor:
    B, C = scores.shape
    acc = accumulation_dtype(scores.dtype)
    trials, chosen = sample_violators(scores, ex, margin, max_trials, generator, chunk_bytes)
    found = trials > 0
    # 3. w = L(⌊|𝒩|/N⌋), a constant
    weight = rank_weights(rank_estimate(ex.num_neg[ex.rows], trials), rank_weight, acc, C - 1)
    weight = torch.where(found, weight, torch.zeros_like(weight))
    # 4. ℓ = w · (s_chosen + m − s_p): one gather, so the gradient reaches only s_p and s_chosen
    flat_pos = ex.rows * C + ex.cols
    pair = torch.take(scores, torch.cat([flat_pos, ex.rows * C + chosen.clamp_min(0)])).to(acc)
    s_pos, s_neg = pair[:ex.num_examples], pair[ex.num_examples:]
    terms = torch.where(found, weight * (s_neg + (margin - s_pos)), torch.zeros_like(s_neg))
    if ex.single:
        return terms
    return torch.zeros(B, dtype=acc, device=scores.device).index_add(0, ex.rows, terms)


def _exact_chunk(scores: torch.Tensor, ex: WarpExamples, chunk: Tuple[int, int, int, int, int, int],
                 margin: float, rank_weight: RankWeight, table: Optional[torch.Tensor],
                 grad: Optional[torch.Tensor] = None, grad_scale: float = 1.0) -> torch.Tensor:
    """Exact WARP of one chunk of :func:`exact_chunk_plan`: returns the per-row loss sums (c,). When
    ``grad`` is given (a zeroed (c, C) block in the accumulation dtype), adds the gradient of
    ``grad_scale`` × the sum of the chunk's row losses into it. No host sync."""
    s, e, lo, hi, min_count, max_count = chunk
    B, C = scores.shape
    acc = accumulation_dtype(scores.dtype)
    x = scores[s:e].to(acc)
    c = x.shape[0]
    sums = torch.zeros(c, dtype=acc, device=x.device)
    if lo == hi:
        return sums
    counts, starts = ex.counts[s:e], ex.starts[s:e]
    pos_cells = (ex.rows[lo:hi] - s) * C + ex.cols[lo:hi]
    # fresh contiguous buffers (not empty_like: a transposed or sliced ``scores`` would hand its strides
    # to z, and the flat view below needs row-major cells)
    z = torch.empty(x.shape, dtype=acc, device=x.device)
    viol = torch.empty(x.shape, dtype=acc, device=x.device)
    for slot in range(max_count):
        # one positive per row at a time: the slot-th positive of each row (invalid rows are masked)
        valid = counts > slot
        p = ex.cols[torch.where(valid, starts + slot, torch.full_like(starts, lo))]
        s_pos = x.gather(1, p.unsqueeze(1))
        # 1. z_j = s_j + (m − s_p) for every label; positives (and invalid rows) can never violate
        torch.add(x, margin - s_pos, out=z)
        z.view(-1).index_fill_(0, pos_cells, float("-inf"))
        if slot >= min_count:
            z.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        # 2. r = #{z_j > 0} (strict) and Σ hinge over violators. The mask is 0/1 in the float dtype: its
        #    row sums are fast and exact (counts < 2^24), and it scales the gradient with one addcmul.
        torch.gt(z, 0, out=viol)
        r = viol.sum(1).to(torch.int64)
        hinge_sum = z.clamp_min_(0).sum(1)
        # 3. ℓ = L(r)/r · Σ hinge, 0/0 = 0
        per_violator = rank_weights(r, rank_weight, acc, C - 1, table) / r.clamp_min(1)
        per_violator = torch.where(r > 0, per_violator, torch.zeros_like(per_violator))
        sums += per_violator * hinge_sum
        if grad is not None:
            # 4. ∂ℓ/∂s_j = L(r)/r for every violator j, ∂ℓ/∂s_p = −L(r)
            w = per_violator * grad_scale
            grad.addcmul_(viol, w.unsqueeze(1))
            grad.scatter_add_(1, p.unsqueeze(1), (-w * r).unsqueeze(1))
    return sums


def _exact_rows_per_chunk(scores: torch.Tensor, chunk_bytes: Optional[int]) -> int:
    acc_size = torch.empty((), dtype=accumulation_dtype(scores.dtype)).element_size()
    # the upcast chunk, z, the violation mask and the gradient block (a temporary only for half-precision
    # scores), all in the accumulation dtype
    return rows_per_chunk(scores.shape[1], 4 * acc_size, chunk_bytes)


def _exact_pass(scores: torch.Tensor, ex: WarpExamples, plan, margin: float, rank_weight: RankWeight,
                table: Optional[torch.Tensor], want_grad: bool,
                grad_scale: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every chunk of ``plan``: per-row sums (B,) and, with ``want_grad``, the gradient (B, C) of
    ``grad_scale`` × their sum (in the scores' dtype and layout)."""
    B = scores.shape[0]
    acc = accumulation_dtype(scores.dtype)
    per_row = torch.empty(B, dtype=acc, device=scores.device)
    grad = torch.empty_like(scores) if want_grad else None
    for chunk in plan:
        s, e = chunk[0], chunk[1]
        block = _zeroed_grad_block(grad, s, e, acc) if want_grad else None
        per_row[s:e] = _exact_chunk(scores, ex, chunk, margin, rank_weight, table, block, grad_scale)
        if want_grad and grad.dtype != acc:  # a half-precision block is a temporary: cast it back
            grad[s:e] = block
    return per_row, grad


class ExactWARPLoss(torch.autograd.Function):
    """Exact WARP over row chunks, O(chunk·C) temporaries; ``setup_context`` form (``torch.func`` ready).

    Inputs: ``scores`` (B, C), the :class:`WarpExamples`, margin, rank weight, reduction, ``chunk_bytes``
    and whether to compute the gradient in forward. Outputs: the reduced loss (``()``) or per-row sums
    (``(B,)``) for ``reduction="none"``, and the gradient of the scalar loss (B, C) computed in the same
    pass (an empty tensor when not wanted), non-differentiable, saved for backward. The loss is terminal,
    so computing its gradient in forward saves a second pass; ``"none"`` weighs rows by the upstream
    gradient, so its backward recomputes the chunks.

    Twice differentiable, exactly: ∂ℓ/∂s is piecewise constant in the scores (L(r)/r changes only where r
    does), so the second derivative with respect to the scores is 0, and backward is linear in the
    upstream gradient (a product autograd differentiates under ``create_graph``).
    """

    @staticmethod
    def forward(scores, ex, margin, rank_weight, reduction, chunk_bytes, want_grad):
        B, C = scores.shape
        rows = _exact_rows_per_chunk(scores, chunk_bytes)
        plan = exact_chunk_plan(ex, rows)
        harmonic = isinstance(rank_weight, str) and rank_weight == "harmonic"
        table = harmonic_numbers(C - 1, scores.device) if harmonic else None
        grad_now = want_grad and reduction != "none"
        scale = 1.0 / B if reduction == "mean" else 1.0
        per_row, grad = _exact_pass(scores, ex, plan, margin, rank_weight, table, grad_now, scale)
        count = torch.tensor(B, device=scores.device)
        loss = reduce_loss(per_row, count, count, reduction)
        return loss, scores.new_empty(0) if grad is None else grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        scores, ex, margin, rank_weight, reduction, chunk_bytes, want_grad = inputs
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(scores, grad, *ex.tensors())
        ctx.single, ctx.margin, ctx.rank_weight, ctx.reduction = ex.single, margin, rank_weight, reduction
        ctx.chunk_bytes = chunk_bytes

    @staticmethod
    def backward(ctx, grad_out, _grad_of_grad):
        scores, saved, *ex_tensors = ctx.saved_tensors
        if ctx.reduction != "none" and saved.numel() > 0:
            grads = scaled_saved_gradients(ctx, (saved,), grad_out)
            if grads is not None:
                return linked_to_inputs(grads, (scores,)) + (None,) * 6
        # reduction="none" (row i scaled by grad_out[i]) or a retained second backward: recompute the
        # unit-weight gradient (a constant: no graph through the scores) and scale it
        with torch.no_grad():
            C = scores.shape[1]
            harmonic = isinstance(ctx.rank_weight, str) and ctx.rank_weight == "harmonic"
            table = harmonic_numbers(C - 1, scores.device) if harmonic else None
            ex = WarpExamples.from_tensors(tuple(ex_tensors), C, ctx.single)
            plan = exact_chunk_plan(ex, _exact_rows_per_chunk(scores, ctx.chunk_bytes))
            scale = 1.0 / scores.shape[0] if ctx.reduction == "mean" else 1.0
            _, unit = _exact_pass(scores, ex, plan, ctx.margin, ctx.rank_weight, table, True, scale)
        factor = grad_out.to(unit.dtype)
        factor = factor.unsqueeze(1) if ctx.reduction == "none" else factor
        if torch.is_grad_enabled():
            return linked_to_inputs((unit * factor,), (scores,)) + (None,) * 6
        return (unit.mul_(factor),) + (None,) * 6


def _zeroed_grad_block(grad: torch.Tensor, s: int, e: int, acc: torch.dtype) -> torch.Tensor:
    """Rows s:e of the gradient as a zeroed accumulation block: a view into ``grad`` when it already
    has the accumulation dtype (no copy), else a temporary to be cast back by the caller."""
    if grad.dtype == acc:
        return grad[s:e].zero_()
    return torch.zeros((e - s, grad.shape[1]), dtype=acc, device=grad.device)


# Small constant device tensors a kernel launch reads (the harmonic table, the margin and scale), made
# once per key and reused by every step: a training loop then launches no kernel to rebuild them. Least
# recently used entries leave beyond _CONSTANTS_KEPT.
_CONSTANTS: "collections.OrderedDict[Hashable, torch.Tensor]" = collections.OrderedDict()
_CONSTANTS_KEPT = 32


def _device_constant(key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    if key in _CONSTANTS:
        _CONSTANTS.move_to_end(key)
        return _CONSTANTS[key]
    value = _CONSTANTS[key] = make()
    while len(_CONSTANTS) > _CONSTANTS_KEPT:
        _CONSTANTS.popitem(last=False)
    return value


def warp_kernel_serves(labels: torch.Tensor, num_classes: int, mode: str, rank_weight: RankWeight) -> bool:
    """Whether the Triton kernel implements this call: sampled mode, one label per row, C ≥ 2 and a built-in
    rank weight (a callable runs in torch; multi-hot rows have a data-dependent number of examples)."""
    return mode == "sampled" and labels.dim() == 1 and num_classes > 1 and isinstance(rank_weight, str)


class SampledWARPKernelLoss(torch.autograd.Function):
    """Sampled WARP for one label per row in two Triton launches (:mod:`metricloss.kernels.warp`): the
    forward (the loop's outcome from its law, the weight and the row's term) and the backward (the whole
    gradient, written once). No host read, no data-dependent shape.

    Inputs: ``scores`` (B, C) with unit column stride, ``labels`` (B,) int64, ``uniforms`` (B, 2) fp64, the fp64
    (margin, scale) and harmonic table device constants, ``max_trials`` and whether the weight is ``"log"``.
    Outputs: the (B,) terms scale·w·(s_chosen + m − s_y) (NaN for a row holding a NaN or an infinity), and,
    not differentiable, scale·w (B,) and the chosen columns (B,) int64 (−1: none drawn).
    """

    @staticmethod
    def forward(scores, labels, uniforms, params, table, max_trials, log_weight):
        from ..kernels.warp import warp_sample_triton

        term, weight, _, chosen = warp_sample_triton(scores, labels, uniforms, params, table, max_trials, log_weight)
        return term, weight, chosen

    @staticmethod
    def setup_context(ctx, inputs, output):
        scores, labels = inputs[0], inputs[1]
        _, weight, chosen = output
        ctx.mark_non_differentiable(weight, chosen)
        ctx.set_materialize_grads(False)  # the outputs without a gradient cost no zero-filled tensor
        ctx.save_for_backward(labels, chosen, weight)
        ctx.scores_like = (tuple(scores.shape), scores.dtype, scores.device)

    @staticmethod
    def backward(ctx, grad_term, *unused):
        from ..kernels.warp import warp_grad_triton

        if grad_term is None:
            return (None,) * 7
        labels, chosen, weight = ctx.saved_tensors
        shape, dtype, device = ctx.scores_like
        grad = warp_grad_triton(grad_term, labels, chosen, weight, torch.empty(0, dtype=dtype, device=device), shape)
        return (grad,) + (None,) * 6


def _sampled_kernel(scores: torch.Tensor, labels: torch.Tensor, margin: float, max_trials: Optional[int],
                    rank_weight: str, reduction: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Sampled WARP through :class:`SampledWARPKernelLoss`: the reduced loss (the kernel scales each term by
    1/B for ``"mean"``, and writes NaN for a row holding a NaN or an infinity, so the sum is NaN too)."""
    B, C = scores.shape
    device = scores.device
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    scale = 1.0 / B if reduction == "mean" else 1.0
    params = _device_constant(("warp params", float(margin), scale, device),
                              lambda: torch.tensor([margin, scale], dtype=torch.float64, device=device))
    log_weight = rank_weight == "log"
    table = None if log_weight else _device_constant(("harmonic", C - 1, device),
                                                       lambda: harmonic_numbers(C - 1, device))
    uniforms = torch.rand((B, 2), dtype=torch.float64, generator=generator, device=device)
    term, _, _ = SampledWARPKernelLoss.apply(scores, labels.to(torch.int64), uniforms, params, table,
                                             C - 1 if max_trials is None else max_trials, log_weight)
    if reduction == "none":
        # a non-finite score anywhere makes every row NaN, as on the torch path
        lo, hi = torch.aminmax(scores.detach())
        return mask_nonfinite(term, lo, hi)
    return term.sum()


def warp_loss_op(scores: torch.Tensor, labels: torch.Tensor, margin: float, max_trials: Optional[int], mode: str,
                 rank_weight: RankWeight, reduction: str, generator: Optional[torch.Generator],
                 chunk_bytes: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """WARP on validated inputs (see :func:`metricloss.functional.warp_loss`).

    Args:
        scores: (B, C) any float dtype (never upcast as a whole: chunks and gathered entries are).
        labels: (B,) int64 in [0, C), or (B, C) multi-hot.
        chunk_bytes: memory budget of one row chunk / trial block (default 64 MiB).
        backend: ``"auto"`` (the Triton kernel on CUDA where it serves the call, :func:`warp_kernel_serves`),
            ``"torch"`` or ``"triton"`` (see :func:`metricloss._backend.resolve_backend`).

    Returns:
        The reduced loss, or (B,) per-row sums for ``reduction="none"``, in fp32 (fp64 for fp64 scores); NaN
        when a score is NaN or infinite.
    """
    B, C = scores.shape
    serves = warp_kernel_serves(labels, C, mode, rank_weight)
    op = "warp_loss" if serves else "warp_loss (exact mode, multi-hot labels or a callable rank_weight)"
    if resolve_backend(backend, scores.device, op, ("torch", "triton") if serves else ("torch",)) == "triton":
        return _sampled_kernel(scores, labels, margin, max_trials, rank_weight, reduction, generator)
    ex = WarpExamples(labels, C)
    if mode == "exact":
        want_grad = torch.is_grad_enabled() and scores.requires_grad
        loss, _ = ExactWARPLoss.apply(scores, ex, margin, rank_weight, reduction, chunk_bytes, want_grad)
    else:
        per_row = _sampled_per_row(scores, ex, margin, max_trials, rank_weight, generator, chunk_bytes)
        count = torch.tensor(B, device=scores.device)
        loss = reduce_loss(per_row, count, count, reduction)
    # the extremes are finite iff every score is: one pass over the scores, no (B, C) temporary
    lo, hi = torch.aminmax(scores.detach())
    return mask_nonfinite(loss, lo, hi)
