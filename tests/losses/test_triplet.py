"""TripletLoss (batch-hard, batch-all, semi-hard) vs the dense reference, PML parity, gradients, edges."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import mining as mining_ops
from metricloss.ops import triplet as triplet_ops

from ..helpers import duplicate_rows, label_pattern, pk_labels, tie_free_case

MININGS = ["batch_hard", "batch_all", "semi_hard"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]
PATTERNS = ["random", "singletons", "one_class", "pk2", "pk3", "pk5"]


def _group_rows(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sum gradient rows over groups of identical input rows (invariant to which copy a tie picks)."""
    _, group = torch.unique(x, dim=0, return_inverse=True)
    return torch.zeros(int(group.max()) + 1, grad.shape[1], dtype=grad.dtype).index_add_(0, group, grad)


def assert_loss_and_grads_match(x, y, ref, kwargs, upstream_seed=0, atol=1e-9):
    """Loss and gradients (w.r.t. embeddings and reference set) equal the dense reference.

    With duplicated rows, ties between identical candidates may route a gradient to either copy, so
    gradients are compared summed over groups of identical rows; with margin 0 a duplicate can also put a
    hinge exactly at its kink (m + d_ap − d_an = 0), where either subgradient is right, so only values are
    compared then (*Design › Numerics*: tie-free inputs, or compare values).
    """
    inputs = [x] + ([ref[0]] if ref[0] is not None else [])
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    args = (inputs[0], y) + ((inputs[1], ref[1]) if len(inputs) == 2 else ())
    got = MF.triplet_loss(*args, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_bytes"}
    want = reference.triplet_loss(*args, **ref_kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=atol)
    has_duplicates = any(torch.unique(t.detach(), dim=0).shape[0] < t.shape[0] for t in inputs) or (
        len(inputs) == 2 and torch.unique(torch.cat([t.detach() for t in inputs]), dim=0).shape[0]
        < sum(t.shape[0] for t in inputs))
    if has_duplicates and kwargs.get("margin") == 0.0:
        return
    # a non-uniform upstream gradient exercises the recompute path of reduction="none"
    w = torch.rand(got.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=got.dtype)
    g_got = torch.autograd.grad((got * w).sum(), inputs, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True)
    for t, a, b in zip(inputs, g_got, g_want):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        if has_duplicates:
            a, b = _group_rows(a, t.detach()), _group_rows(b, t.detach())
        torch.testing.assert_close(a, b, rtol=1e-7, atol=atol)


@st.composite
def triplet_cases(draw, cross_class_duplicates=True):
    n = draw(st.integers(1, 18))
    d = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    y = label_pattern(draw(st.sampled_from(PATTERNS)), n, g, num_classes=draw(st.integers(1, 5)))
    if draw(st.booleans()):
        x = duplicate_rows(x, g, count=2, labels=None if cross_class_duplicates else y)
    ref_m = draw(st.sampled_from([0, 0, 1, 6]))
    ref = (None, None)
    if ref_m:
        r = torch.randn(ref_m, d, generator=g, dtype=torch.float64)
        if draw(st.booleans()) and n:
            r[0] = x[0]  # a reference row equal to an anchor
        ref = (r, torch.randint(0, 4, (ref_m,), generator=g))
    kwargs = dict(margin=draw(st.sampled_from([0.0, 0.2, 1.0, "soft"])),
                  reduction=draw(st.sampled_from(REDUCTIONS)), normalize=draw(st.booleans()),
                  chunk_bytes=draw(st.sampled_from([None, 64, 2000])))
    return x, y, ref, kwargs


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
@given(case=triplet_cases())
def test_matches_reference_fp64(mining, distance, case):
    x, y, ref, kwargs = case
    assert_loss_and_grads_match(x, y, ref, dict(kwargs, mining=mining, distance=distance))


@pytest.mark.parametrize("distance", DISTANCES)
@given(case=triplet_cases())
def test_semi_hard_matches_reference_fp64(distance, case):
    # Semi-hard is discontinuous where a negative ties a positive (d_an = d_ap exactly, e.g. the same
    # vector in two classes); both sides decide such ties with the same tie band (ops.mining.tie_rtol),
    # so cross-class duplicates are included. Everything else is as in test_matches_reference_fp64.
    x, y, ref, kwargs = case
    assert_loss_and_grads_match(x, y, ref, dict(kwargs, mining="semi_hard", distance=distance))


@st.composite
def tie_heavy_cases(draw):
    """Integer-valued embeddings (exact distance ties, as quantised embeddings give), duplicated rows,
    optionally an integer-valued reference set sharing rows with the batch."""
    n = draw(st.integers(2, 16))
    d = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randint(-2, 3, (n, d), generator=g).double()
    y = label_pattern(draw(st.sampled_from(["random", "pk2", "pk3"])), n, g, num_classes=draw(st.integers(2, 4)))
    if draw(st.booleans()):
        x = duplicate_rows(x, g, count=3)
    ref = (None, None)
    if draw(st.booleans()):
        r = torch.randint(-2, 3, (draw(st.integers(1, 6)), d), generator=g).double()
        r[0] = x[0]
        ref = (r, torch.randint(0, 4, (r.shape[0],), generator=g))
    # margin 0.2137: no rational distance difference of these points equals it (no hinge on its kink);
    # margin 1.0: kinks happen (values only)
    kwargs = dict(margin=draw(st.sampled_from([0.2137, 1.0, "soft"])), reduction=draw(st.sampled_from(REDUCTIONS)),
                  normalize=draw(st.booleans()), chunk_bytes=draw(st.sampled_from([None, 64, 2000])))
    return x, y, ref, kwargs


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
@given(case=tie_heavy_cases())
def test_tie_heavy_inputs_match_reference(mining, distance, case):
    # Exact ties everywhere: every chunk size and the reference must make the same choices (same loss);
    # batch-all selects nothing, so its gradients are compared too.
    x, y, ref, kwargs = case
    kwargs = dict(kwargs, mining=mining, distance=distance)
    args = (x, y) + ((ref[0], ref[1]) if ref[0] is not None else ())
    want = reference.triplet_loss(*args, **{k: v for k, v in kwargs.items() if k != "chunk_bytes"})
    torch.testing.assert_close(MF.triplet_loss(*args, **kwargs), want, rtol=1e-9, atol=1e-9)
    for chunk_bytes in (1, 1 << 30):
        torch.testing.assert_close(MF.triplet_loss(*args, **dict(kwargs, chunk_bytes=chunk_bytes)), want,
                                   rtol=1e-9, atol=1e-9)
    # Gradients: batch-all only; not with margin 1 (a hinge can sit on its kink), nor with a zero row
    # normalised (F.normalize's gradient there is 1/eps: rounding residue of exact cancellations explodes)
    rows = torch.cat([x] + ([ref[0]] if ref[0] is not None else []))
    zero_row = bool((rows == 0).all(1).any()) and (kwargs["normalize"] or distance == "cosine")
    if mining == "batch_all" and kwargs["margin"] != 1.0 and not zero_row:
        assert_loss_and_grads_match(x, y, ref, kwargs)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@given(case=triplet_cases(cross_class_duplicates=False), distance=st.sampled_from(DISTANCES))
def test_sort_based_paths_match_reference(mining, case, distance):
    # Force the large-class algorithms (sorted thresholds / sorted negatives) on every input.
    x, y, ref, kwargs = case
    saved = triplet_ops._BATCH_ALL_SORT_MIN_POSITIVES, mining_ops._SEMI_HARD_SORT_MIN_POSITIVES
    triplet_ops._BATCH_ALL_SORT_MIN_POSITIVES = mining_ops._SEMI_HARD_SORT_MIN_POSITIVES = -1
    try:
        assert_loss_and_grads_match(x, y, ref, dict(kwargs, mining=mining, distance=distance))
    finally:
        triplet_ops._BATCH_ALL_SORT_MIN_POSITIVES, mining_ops._SEMI_HARD_SORT_MIN_POSITIVES = saved


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
@pytest.mark.parametrize("margin", [0.3, "soft"])
def test_dense_reference_agrees_with_loop_reference(mining, reduction, margin):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4])
    dense = reference.triplet_loss(x, y, margin=margin, mining=mining, reduction=reduction)
    loop = reference.triplet_loss_loop(x, y, margin=margin, mining=mining, reduction=reduction)
    assert abs(dense.item() - loop) < 1e-12


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_medium_batch_matches_reference(mining, distance):
    # Wide enough (M=200) for the grouped row-argmin and several chunks.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    y = pk_labels(50, 4, g)
    assert_loss_and_grads_match(x, y, (None, None), dict(mining=mining, distance=distance, margin=0.2,
                                                        reduction="mean", chunk_bytes=200 * 8 * 40))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin", [0.2, "soft"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("mining", MININGS)
def test_gradcheck(mining, distance, margin, reduction):
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    ry = torch.tensor([0, 1, 2, 3, 1])
    x, r = tie_free_case(10, 3, y, margin if margin != "soft" else 0.0, seed=7, ref=(5, ry))
    x.requires_grad_()
    r.requires_grad_()

    def fn(x_, r_):
        out = MF.triplet_loss(x_, y, mining=mining, distance=distance, margin=margin, reduction=reduction)
        out_ref = MF.triplet_loss(x_, y, r_, ry, mining=mining, distance=distance, margin=margin,
                                  reduction=reduction)
        return out, out_ref

    assert torch.autograd.gradcheck(fn, (x, r), eps=1e-6, atol=1e-6)


def _pml_parity_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(128, 32, generator=g), pk_labels(32, 4, g)


def test_pml_parity_batch_hard():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    x0, y = _pml_parity_inputs()
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(x1, y, pml_miners.BatchHardMiner()(x1, y))
    ours = ml.BatchHardTripletLoss(margin=0.2, reduction="mean_nonzero")(x2, y)
    theirs.backward()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-5)


def test_pml_parity_batch_all():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    x0, y = _pml_parity_inputs()
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(x1, y)
    ours = ml.BatchAllTripletLoss(margin=0.2, reduction="mean_nonzero")(x2, y)
    theirs.backward()
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.int64)], ids=["singletons", "one"])
def test_no_valid_anchor_gives_connected_zero(mining, reduction, labels):
    x = torch.randn(6, 4, requires_grad=True)
    loss = MF.triplet_loss(x, labels, mining=mining, reduction=reduction)
    assert loss.requires_grad
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mining", MININGS)
def test_nonfinite_input_propagates(mining, bad):
    x = torch.randn(16, 4)
    x[3, 1] = bad
    x.requires_grad_()
    loss = MF.triplet_loss(x, torch.arange(4).repeat(4), mining=mining)
    assert torch.isnan(loss)
    loss.backward()  # no crash


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mining", MININGS)
def test_dtypes(mining, dtype):
    x32 = torch.randn(32, 8)
    y = torch.arange(8).repeat(4)
    x = x32.to(dtype).requires_grad_()
    loss = MF.triplet_loss(x, y, mining=mining)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = reference.triplet_loss(x.detach().to(loss.dtype), y, mining=mining)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mining", MININGS)
def test_autocast_does_not_lower_precision(mining):
    x = torch.randn(32, 8, requires_grad=True)
    y = torch.arange(8).repeat(4)
    plain = MF.triplet_loss(x, y, mining=mining)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = MF.triplet_loss(x, y, mining=mining)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


@pytest.mark.parametrize("mining", MININGS)
def test_none_reduction_sums_to_sum_and_is_per_anchor(mining):
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.tensor([0] * 5 + [1] * 5 + [2] * 13 + [3])  # the last anchor has no positive
    per_anchor = MF.triplet_loss(x, y, mining=mining, reduction="none")
    assert per_anchor.shape == (24,) and per_anchor[-1] == 0
    torch.testing.assert_close(per_anchor.sum(), MF.triplet_loss(x, y, mining=mining, reduction="sum"))


def test_reference_set_gradients_flow_to_both():
    x = torch.randn(8, 4, requires_grad=True)
    r = torch.randn(12, 4, requires_grad=True)
    for mining in MININGS:
        x.grad = r.grad = None
        MF.triplet_loss(x, torch.arange(4).repeat(2), r, torch.arange(4).repeat(3), mining=mining).backward()
        assert x.grad.abs().sum() > 0 and r.grad.abs().sum() > 0


def test_module_presets_and_functional_agree():
    x, y = torch.randn(20, 5), torch.arange(5).repeat(4)
    for preset, mining in ((ml.BatchHardTripletLoss, "batch_hard"), (ml.BatchAllTripletLoss, "batch_all"),
                           (ml.SemiHardTripletLoss, "semi_hard")):
        module = preset(margin=0.3, distance="cosine", reduction="sum")
        assert module.mining == mining and "cosine" in repr(module)
        torch.testing.assert_close(module(x, y), MF.triplet_loss(x, y, margin=0.3, mining=mining,
                                                                 distance="cosine", reduction="sum"))
    assert ml.TripletLoss().mining == "batch_hard" and ml.TripletLoss().margin == 0.2
    assert len(list(ml.TripletLoss().parameters())) == 0


def test_batch_hard_uses_the_hardest_pair():
    # Anchor 0: positives at distances 1 and 3, negatives at 2 and 5 -> term m + 3 - 2.
    x = torch.tensor([[0.0], [1.0], [3.0], [2.0], [5.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    per_anchor = MF.triplet_loss(x, y, margin=0.5, normalize=False, reduction="none")
    assert per_anchor[0].item() == pytest.approx(1.5)


def test_semi_hard_picks_nearest_farther_negative_or_the_farthest():
    x = torch.tensor([[0.0], [1.0], [3.0], [0.5], [2.0], [5.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    per_anchor = MF.triplet_loss(x, y, margin=1.0, mining="semi_hard", normalize=False, reduction="none")
    # anchor 0: p=1 (d=1) -> n at 2 -> [1+1-2]_+ = 0 ; p=2 (d=3) -> n at 5 -> [1+3-5]_+ = 0
    assert per_anchor[0].item() == pytest.approx(0.0)
    # anchor 2 (x=3): p=0 (d=3) -> none farther than 3 among {2.5, 1, 2}: farthest 2.5 -> 1+3-2.5 = 1.5
    #                 p=1 (d=2) -> farther than 2: 2.5 -> 1+2-2.5 = 0.5
    assert per_anchor[2].item() == pytest.approx(2.0)


def test_batch_all_counts_every_triplet():
    x = torch.tensor([[0.0], [1.0], [0.5], [4.0]])
    y = torch.tensor([0, 0, 1, 1])
    mean = MF.triplet_loss(x, y, margin=1.0, mining="batch_all", normalize=False, reduction="mean")
    total = reference.triplet_loss_loop(x, y, margin=1.0, mining="batch_all", normalize=False, reduction="sum")
    assert mean.item() == pytest.approx(total / 8)  # 4 anchors × 1 positive × 2 negatives
