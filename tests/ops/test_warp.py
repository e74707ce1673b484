"""The WARP sampler's law (issue 4 acceptance (a)-(c)), the negative draws, and the reference loop.

Statistics use many identical rows in one call (rows draw independently), fixed seeds, and chi-square
p-values from ``torch.special.gammaincc`` (no scipy). Each law test also checks that the same histogram
*rejects* a slightly wrong law, so it can fail.
"""

from typing import List, Tuple

import pytest
import torch

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import warp as warp_ops

ALPHA = 1e-4  # chance that a correct sampler fails one law test at a given seed


@pytest.fixture(autouse=True, params=["native", "torch"])
def sampler_path(request, monkeypatch):
    """Every test of the law runs on both CPU samplers: the native one (one label per row: the outcome drawn
    from the loop's law, csrc/warp_sample.cpp) and the torch one (the loop's trials drawn in blocks)."""
    if request.param == "torch":
        monkeypatch.setenv("METRICLOSS_NATIVE", "0")
    else:
        monkeypatch.delenv("METRICLOSS_NATIVE", raising=False)
    return request.param


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of counts to probabilities; adjacent bins merged until each expects >= 5."""
    n = float(observed.sum())
    obs: List[float] = []
    exp: List[float] = []
    acc_o = acc_e = 0.0
    for o, p in zip(observed.tolist(), probs.tolist()):
        acc_o, acc_e = acc_o + o, acc_e + p * n
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:
        obs[-1] += acc_o
        exp[-1] += acc_e
    o_t, e_t = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = ((o_t - e_t) ** 2 / e_t).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def truncated_geometric(p: float, cap: int) -> torch.Tensor:
    """P(N = n) for n = 1..cap, then P(no violator in cap trials)."""
    n = torch.arange(1, cap + 1, dtype=torch.float64)
    pmf = (1 - p) ** (n - 1) * p
    return torch.cat([pmf, torch.tensor([(1 - p) ** cap], dtype=torch.float64)])


def trial_histogram(trials: torch.Tensor, cap: int) -> torch.Tensor:
    """Counts of N = 1..cap, then of "not found" (trials == 0)."""
    counts = torch.bincount(trials, minlength=cap + 1).to(torch.float64)
    return torch.cat([counts[1:cap + 1], counts[:1]])


def sample(scores: torch.Tensor, labels: torch.Tensor, margin: float, max_trials, seed: int,
           chunk_bytes=None) -> Tuple[warp_ops.WarpExamples, torch.Tensor, torch.Tensor]:
    ex = warp_ops.WarpExamples(labels, scores.shape[1])
    trials, chosen = warp_ops.sample_violators(scores, ex, margin, max_trials, torch.Generator().manual_seed(seed),
                                               chunk_bytes)
    return ex, trials, chosen


# One single-label row: positive y = 4 (score 0), m = 1, so j violates iff s_j > -1:
# 3 violators (columns 1, 6, 9) among the 9 negatives -> p = 1/3.
SINGLE_ROW = torch.tensor([-1.5, 0.5, -2.0, -3.0, 0.0, -1.2, 0.2, -4.0, -1.1, -0.3], dtype=torch.float64)
SINGLE_Y = 4
SINGLE_VIOLATORS = [1, 6, 9]

# One multi-hot row, C = 12, positives {2, 5, 6} (9 negatives):
#   p=2 (score 0.0):  violators s_j > -1   -> columns 0, 3, 8, 11      (r = 4)
#   p=5 (score 1.0):  violators s_j > 0    -> columns 3, 8             (r = 2)
#   p=6 (score -9.0): every negative violates                         (r = 9)
MULTI_ROW = torch.tensor([-0.5, -2.0, 0.0, 0.7, -3.0, 1.0, -9.0, -1.5, 0.3, -4.0, -2.5, -0.9], dtype=torch.float64)
MULTI_POS = [2, 5, 6]
MULTI_VIOLATORS = {2: [0, 3, 8, 11], 5: [3, 8], 6: [0, 1, 3, 4, 7, 8, 9, 10, 11]}


def single_batch(n: int):
    return SINGLE_ROW.repeat(n, 1), torch.full((n,), SINGLE_Y)


def multi_batch(n: int):
    labels = torch.zeros(n, 12, dtype=torch.bool)
    labels[:, MULTI_POS] = True
    return MULTI_ROW.repeat(n, 1), labels


# ----------------------------------------------------------------------------------------------------
# draws
# ----------------------------------------------------------------------------------------------------

def test_negative_columns_enumerate_each_rows_negatives_in_order():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(7, 9, generator=g) < 0.4
    labels[0] = False
    labels[1] = True
    labels[2, [0, 8]] = True
    ex = warp_ops.WarpExamples(labels, 9)
    for e in range(ex.num_examples):
        row = int(ex.rows[e])
        negatives = (~labels[row]).nonzero().squeeze(1)
        if negatives.numel() == 0:
            continue
        k = torch.arange(negatives.numel()).unsqueeze(0)
        cols = ex.negative_columns(k, torch.tensor([e]))
        assert torch.equal(cols.squeeze(0), negatives)
    single = warp_ops.WarpExamples(torch.tensor([0, 3, 8]), 9)
    cols = single.negative_columns(torch.arange(8).repeat(3, 1), torch.arange(3))
    for i, y in enumerate([0, 3, 8]):
        assert cols[i].tolist() == [j for j in range(9) if j != y]


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_draws_are_uniform_over_the_negatives(kind):
    # With margin large enough that every negative violates, the first draw is the chosen one: its
    # histogram is the draw distribution, uniform over the row's negatives and never a positive.
    scores, labels = single_batch(18000) if kind == "single" else multi_batch(18000)
    ex, trials, chosen = sample(scores, labels, 100.0, None, seed=1)
    assert (trials == 1).all()
    negatives = [j for j in range(scores.shape[1]) if (j != SINGLE_Y if kind == "single" else j not in MULTI_POS)]
    counts = torch.bincount(chosen, minlength=scores.shape[1]).to(torch.float64)
    assert counts[[j for j in range(scores.shape[1]) if j not in negatives]].sum() == 0
    uniform = torch.full((len(negatives),), 1 / len(negatives), dtype=torch.float64)
    assert chi_square_pvalue(counts[negatives], uniform) > ALPHA
    skewed = uniform.clone()
    skewed[0], skewed[-1] = skewed[0] * 1.1, skewed[-1] * 0.9
    assert chi_square_pvalue(counts[negatives], skewed) < ALPHA


# ----------------------------------------------------------------------------------------------------
# (a) every negative violates: first trial, rank |𝒩|, weight L(|𝒩|), deterministically
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank_weight", ["harmonic", "log"])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_all_violate_first_trial_full_rank(kind, rank_weight):
    c = 50
    scores = torch.zeros(40, c, dtype=torch.float64)                      # every negative at 0
    if kind == "single":
        labels = torch.arange(40) % c
        scores[torch.arange(40), labels] = -2.0
        num_neg = torch.full((40,), c - 1)
    else:
        labels = torch.rand(40, c, generator=torch.Generator().manual_seed(0)) < 0.3
        labels[:, 0] = True                                                # every row has a positive
        labels[:, 1] = False                                               # and a negative
        scores[labels] = -2.0
        num_neg = (~labels).sum(1)
    hinge = 0.0 + (1.0 - (-2.0))                                           # s_n + m − s_p = 3
    weight = warp_ops.rank_weights(num_neg, rank_weight, torch.float64, c - 1)
    per_positive = labels.sum(1) if kind == "multi" else torch.ones(40)
    want = weight * hinge * per_positive
    for seed in range(30):
        ex, trials, _ = sample(scores, labels, 1.0, None, seed)
        assert (trials == 1).all()
        assert torch.equal(warp_ops.rank_estimate(ex.num_neg[ex.rows], trials), ex.num_neg[ex.rows])
        got = MF.warp_loss(scores, labels, rank_weight=rank_weight, reduction="none",
                           generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------------------------------
# (b) constant weight: the mean sampled loss is the exact mean hinge; the violator is uniform
# ----------------------------------------------------------------------------------------------------

def ones(k: torch.Tensor) -> torch.Tensor:
    return torch.ones(k.shape, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_constant_weight_mean_is_exact_mean_hinge(kind):
    n = 20000
    scores, labels = single_batch(n) if kind == "single" else multi_batch(n)
    # enough trials that missing every violator has probability < 1e-100
    per_row = MF.warp_loss(scores, labels, rank_weight=ones, max_trials=2000, reduction="none",
                           generator=torch.Generator().manual_seed(2))
    exact = MF.warp_loss(scores[:1], labels[:1], rank_weight=ones, mode="exact", reduction="none")[0]
    se = per_row.std() / n ** 0.5
    assert abs(per_row.mean() - exact) < 4 * se
    assert abs(per_row.mean() - exact * 1.02) > 4 * se         # a 2% bias would be caught
    # hand check of the exact value (1/r) Σ hinge for the single row
    if kind == "single":
        hinges = [SINGLE_ROW[j].item() + 1.0 for j in SINGLE_VIOLATORS]
        assert exact.item() == pytest.approx(sum(hinges) / len(hinges))


def test_constant_weight_mean_with_default_trials_includes_the_miss_probability():
    # max_trials=None = |𝒩| = 9 trials: E[loss] = (1 − (1 − r/|𝒩|)^|𝒩|) · (1/r) Σ hinge
    n = 20000
    scores, labels = single_batch(n)
    per_row = MF.warp_loss(scores, labels, rank_weight=ones, reduction="none",
                           generator=torch.Generator().manual_seed(3))
    exact = MF.warp_loss(scores[:1], labels[:1], rank_weight=ones, mode="exact")
    want = (1 - (1 - 3 / 9) ** 9) * exact
    se = per_row.std() / n ** 0.5
    assert abs(per_row.mean() - want) < 4 * se


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_chosen_violator_is_uniform_among_violators(kind):
    n = 20000
    scores, labels = single_batch(n) if kind == "single" else multi_batch(n)
    ex, trials, chosen = sample(scores, labels, 1.0, 2000, seed=4)
    assert (trials > 0).all()
    violators = {SINGLE_Y: SINGLE_VIOLATORS} if kind == "single" else MULTI_VIOLATORS
    for p, cols in violators.items():
        picked = chosen[ex.cols == p]
        counts = torch.bincount(picked, minlength=scores.shape[1]).to(torch.float64)
        assert counts.sum() == counts[cols].sum()                         # only violators are chosen
        uniform = torch.full((len(cols),), 1 / len(cols), dtype=torch.float64)
        assert chi_square_pvalue(counts[cols], uniform) > ALPHA


# ----------------------------------------------------------------------------------------------------
# (c) the first-violator trial count is geometric with p = r/|𝒩|, truncated at max_trials
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_trials, chunk_bytes", [(None, None), (None, 1), (5, None), (40, 3000)])
def test_trial_count_is_truncated_geometric_single(max_trials, chunk_bytes):
    # chunk_bytes=1 forces one trial per block: the block structure must not change the law
    n = 20000
    scores, labels = single_batch(n)
    _, trials, _ = sample(scores, labels, 1.0, max_trials, seed=5, chunk_bytes=chunk_bytes)
    cap = 9 if max_trials is None else max_trials
    hist = trial_histogram(trials, cap)
    assert chi_square_pvalue(hist, truncated_geometric(3 / 9, cap)) > ALPHA
    assert chi_square_pvalue(hist, truncated_geometric(3 / 8, cap)) < ALPHA  # |𝒩| = C instead of C − 1...


def test_trial_count_law_across_growing_blocks():
    # One violator among 9 negatives (p = 1/9) and 60 trials: about 15% of the rows need more than the
    # first block of 16 trials, 2% more than 32 (blocks of 16, 32, 12).
    n = 20000
    row = SINGLE_ROW.clone()
    row[[6, 9]] = -5.0                                                     # only column 1 violates
    _, trials, chosen = sample(row.repeat(n, 1), torch.full((n,), SINGLE_Y), 1.0, 60, seed=9)
    assert (trials > 16).sum() > 1000 and (trials > 32).sum() > 100
    assert set(chosen[trials > 0].tolist()) == {1}
    hist = trial_histogram(trials, 60)
    assert chi_square_pvalue(hist, truncated_geometric(1 / 9, 60)) > ALPHA
    assert chi_square_pvalue(hist, truncated_geometric(1 / 8, 60)) < ALPHA


def test_trial_caps_differ_per_multi_hot_row():
    # max_trials=None gives each multi-hot row its own cap |𝒩|: MULTI rows (|𝒩| = 9) next to rows with
    # 8 positives (|𝒩| = 4, one violator: p = 1/4, cap 4).
    n = 12000
    scores, labels = multi_batch(2 * n)
    labels[n:] = True
    labels[n:, [0, 1, 4, 7]] = False                  # negatives 0, 1, 4, 7
    scores[n:, 6] = 0.0                               # positive 6 now at 0: only column 0 (−0.5) violates
    ex, trials, _ = sample(scores, labels, 1.0, None, seed=10)
    second = (ex.rows >= n) & (ex.cols == 6)
    assert int(trials[second].max()) == 4             # the row's own cap, not the batch's 9
    hist = trial_histogram(trials[second], 4)
    assert chi_square_pvalue(hist, truncated_geometric(1 / 4, 4)) > ALPHA
    first = (ex.rows < n) & (ex.cols == 2)
    assert chi_square_pvalue(trial_histogram(trials[first], 9), truncated_geometric(4 / 9, 9)) > ALPHA


@pytest.mark.parametrize("max_trials", [None, 3])
def test_trial_count_is_truncated_geometric_multi(max_trials):
    n = 15000
    scores, labels = multi_batch(n)
    ex, trials, _ = sample(scores, labels, 1.0, max_trials, seed=6)
    cap = 9 if max_trials is None else max_trials
    for p, cols in MULTI_VIOLATORS.items():
        hist = trial_histogram(trials[ex.cols == p], cap)
        law = truncated_geometric(len(cols) / 9, cap)
        if len(cols) == 9:
            assert torch.equal(hist, torch.tensor([n] + [0] * cap, dtype=torch.float64))
            continue
        assert chi_square_pvalue(hist, law) > ALPHA
        assert chi_square_pvalue(hist, truncated_geometric(len(cols) / 12, cap)) < ALPHA   # |𝒩| = C


def test_reference_loop_follows_the_same_law():
    # The paper's sequential loop (one randint per draw) against the same truncated geometric law and
    # the same uniform choice among violators.
    n = 3000
    scores, labels = single_batch(n)
    _, draws = reference.warp_loss_loop(scores, labels, generator=torch.Generator().manual_seed(7),
                                        return_draws=True)
    trials = torch.tensor([d[2] for d in draws])
    assert chi_square_pvalue(trial_histogram(trials, 9), truncated_geometric(3 / 9, 9)) > ALPHA
    chosen = torch.tensor([d[3] for d in draws if d[3] >= 0])
    counts = torch.bincount(chosen, minlength=10).to(torch.float64)
    assert counts.sum() == counts[SINGLE_VIOLATORS].sum()
    assert chi_square_pvalue(counts[SINGLE_VIOLATORS], torch.full((3,), 1 / 3, dtype=torch.float64)) > ALPHA


def test_reference_loop_matches_the_loss_it_reports():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(6, 7, generator=g, dtype=torch.float64)
    labels = torch.rand(6, 7, generator=g) < 0.4
    loss, draws = reference.warp_loss_loop(s, labels, reduction="none", generator=g, return_draws=True)
    per_row = torch.zeros(6, dtype=torch.float64)
    for i, p, n_trials, chosen in draws:
        if n_trials:
            num_neg = int((~labels[i]).sum())
            k = num_neg // n_trials
            per_row[i] += sum(1 / j for j in range(1, k + 1)) * (s[i, chosen] + 1.0 - s[i, p])
    torch.testing.assert_close(loss, per_row)


def test_exact_reference_agrees_with_loop_in_expectation_for_all_violators():
    # With every negative violating, the loop's draw is the first trial: L(|𝒩|) · hinge, as the exact
    # formula's L(r)/r · Σ hinge when all hinges are equal.
    s = torch.zeros(3, 6, dtype=torch.float64)
    s[:, 2] = -5.0
    y = torch.full((3,), 2)
    loop = reference.warp_loss_loop(s, y, reduction="none", generator=torch.Generator().manual_seed(0))
    dense = reference.warp_loss(s, y, reduction="none")
    torch.testing.assert_close(loop, dense)
    torch.testing.assert_close(dense, torch.full((3,), (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) * 6.0,
                                                 dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# the native sampler (one label per row)
# ----------------------------------------------------------------------------------------------------

def test_native_sampler_serves_single_labels_on_cpu(sampler_path, monkeypatch):
    from metricloss.ops import native

    results = []
    real = native.warp_sample_single
    monkeypatch.setattr(native, "warp_sample_single", lambda *a: results.append(real(*a)) or results[-1])
    scores, labels = single_batch(8)
    _, trials, chosen = sample(scores, labels, 1.0, None, seed=0)
    multi_scores, multi_labels = multi_batch(8)
    sample(multi_scores, multi_labels, 1.0, None, seed=0)           # multi-hot rows: the torch sampler
    assert len(results) == 1
    if sampler_path == "native":
        # the sampler's result is the native op's, drawn from the generator's two uniforms per row
        direct = real(scores, labels, 1.0, 9, torch.Generator().manual_seed(0))
        assert torch.equal(trials, direct[0]) and torch.equal(chosen, direct[1])
    else:
        assert results == [None]


def test_native_sampler_does_not_depend_on_the_thread_count(sampler_path):
    g = torch.Generator().manual_seed(3)
    scores, labels = torch.randn(3000, 50, generator=g), torch.randint(0, 50, (3000,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample(scores, labels, 0.5, None, seed=7)[1:]
        torch.set_num_threads(2)
        two = sample(scores, labels, 0.5, None, seed=7)[1:]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_sampler_compares_16_bit_scores_after_an_exact_upcast(dtype):
    g = torch.Generator().manual_seed(4)
    scores, labels = torch.randn(500, 20, generator=g).to(dtype), torch.randint(0, 20, (500,), generator=g)
    low = sample(scores, labels, 1.0, None, seed=2)[1:]
    up = sample(scores.float(), labels, 1.0, None, seed=2)[1:]
    assert torch.equal(low[0], up[0]) and torch.equal(low[1], up[1])


def test_rows_with_nan_have_no_violator():
    scores, labels = single_batch(4)
    scores = scores.clone()
    scores[1, 0] = float("nan")
    scores[2, SINGLE_Y] = float("nan")
    _, trials, chosen = sample(scores, labels, 1.0, None, seed=0)
    assert trials.tolist()[1:3] == [0, 0] and chosen.tolist()[1:3] == [-1, -1] and trials[0] > 0 and trials[3] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("max_trials", [None, 1, 4])
def test_torch_law_sampler_equals_the_native_one_on_the_same_uniforms(dtype, max_trials, sampler_path):
    # The torch sampler for one label per row (the path CUDA takes) computes what the native op computes,
    # from the same two uniforms per row: r, the geometric trial and the k-th violator in column order,
    # rows with NaN and rows where every or no negative violates included.
    from metricloss.ops import native

    if not native.native_enabled(torch.empty(0), "warp"):
        pytest.skip("the native WARP sampler is not available")
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(600, 30, generator=g).to(dtype)
    labels = torch.randint(0, 30, (600,), generator=g)
    scores[0, 3] = float("nan")
    scores[1] = -5.0
    scores[1, labels[1]] = 5.0                 # no violator
    scores[2] = 5.0
    scores[2, labels[2]] = -5.0                # every negative violates
    cap = 29 if max_trials is None else max_trials
    uniforms = torch.rand((600, 2), dtype=torch.float64, generator=g)
    want = torch.ops.metricloss_native.warp_sample_single(scores.contiguous(), labels, uniforms, 1.0, cap)
    for chunk_bytes in (None, 30 * 22 * 7):    # one chunk, and chunks of 7 rows
        got = warp_ops.single_violators_by_law(scores, labels, uniforms, 1.0, cap, chunk_bytes)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][:2].tolist() == [0, 0] and got[0][2] == 1 and (got[0] > 0).sum() > 300
