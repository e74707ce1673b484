"""Retrieval metrics vs a sort-based brute force, hand-computed cases, and PML's AccuracyCalculator."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss as ml
from metricloss.metrics import retrieval_metrics


def brute_force(q, labels, g=None, g_labels=None, ks=(1, 2, 4, 8), metric="cosine"):
    """Rank every gallery item by (similarity desc, index asc) with Python sorting; then the formulas."""
    loo = g is None
    g, g_labels = (q, labels) if loo else (g, g_labels)
    # one dot product per pair (fp64): identical vectors get bitwise-identical similarities
    if metric == "cosine":
        qn, gn = torch.nn.functional.normalize(q.float(), dim=1), torch.nn.functional.normalize(g.float(), dim=1)
        sim = torch.tensor([[float(torch.dot(a.double(), b.double())) for b in gn] for a in qn])
    else:
        sim = torch.tensor([[-float(((a.double() - b.double()) ** 2).sum()) for b in g] for a in q])
    out = {f"R@{k}": [] for k in ks}
    out.update({"mAP": [], "MAP@R": [], "R-precision": []})
    for i in range(q.shape[0]):
        order = sorted((j for j in range(g.shape[0]) if not (loo and j == i)), key=lambda j: (-sim[i, j].item(), j))
        rel = [bool(g_labels[j] == labels[i]) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        ranks = [p + 1 for p, hit in enumerate(rel) if hit]
        for k in ks:
            out[f"R@{k}"].append(float(ranks[0] <= k))
        out["mAP"].append(sum((n + 1) / rk for n, rk in enumerate(ranks)) / r)
        out["MAP@R"].append(sum((n + 1) / rk for n, rk in enumerate(ranks) if rk <= r) / r)
        out["R-precision"].append(sum(1 for rk in ranks if rk <= r) / r)
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in out.items()}


def assert_metrics_close(got, want, tol=1e-9):
    assert got.keys() == want.keys()
    for k in want:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert abs(got[k] - want[k]) < tol, (k, got[k], want[k])


@given(n=st.integers(1, 25), d=st.integers(1, 4), classes=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       levels=st.sampled_from([0, 2, 3]), gallery=st.integers(0, 15), metric=st.sampled_from(["cosine", "euclidean"]),
       chunk=st.sampled_from([None, 100]))
def test_matches_brute_force(n, d, classes, seed, levels, gallery, metric, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if levels and metric == "euclidean":
        # integer coordinates: squared distances are exact in fp32, so many exact ties, broken by index
        x = torch.randint(-levels, levels + 1, (n, d), generator=g).float()
    elif levels:
        # cosine: exact ties come from duplicated rows (scaled copies would tie only up to rounding)
        x[torch.randint(0, n, (n // 2,), generator=g)] = x[0].clone()
    y = torch.randint(0, classes, (n,), generator=g)
    gal = (torch.randn(gallery, d, generator=g), torch.randint(0, classes, (gallery,), generator=g)) if gallery \
        else (None, None)
    got = retrieval_metrics(x, y, gallery=gal[0], gallery_labels=gal[1], metric=metric, chunk_bytes=chunk)
    want = brute_force(x, y, gal[0], gal[1], metric=metric)
    assert_metrics_close(got, want, tol=1e-6 if metric == "euclidean" else 1e-9)


def test_hand_computed_ranking():
    # 1-D embeddings, Euclidean: query 0 at 0.0; gallery order by distance: 1 (0.1, rel), 2 (0.2, irrelevant),
    # 3 (0.3, rel), 4 (0.4, irrelevant), 5 (0.5, rel). Relevant ranks 1, 3, 5 -> AP = (1 + 2/3 + 3/5) / 3.
    q = torch.tensor([[0.0]])
    gal = torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5]])
    got = retrieval_metrics(q, torch.tensor([7]), gallery=gal, gallery_labels=torch.tensor([7, 1, 7, 1, 7]),
                            metric="euclidean", ks=(1, 2))
    assert got["R@1"] == 1.0 and got["R@2"] == 1.0
    assert got["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert got["MAP@R"] == pytest.approx((1 + 2 / 3) / 3)          # R = 3: only ranks 1 and 3 count
    assert got["R-precision"] == pytest.approx(2 / 3)


def test_research_ap_example_0789():
    # The research's first AP illustration (0.789) is reproduced by relevant items at ranks 1, 2, 4, 7, 8 of 8:
    # AP = (1/1 + 2/2 + 3/4 + 4/7 + 5/8) / 5 = 0.78929. (Its second value, 0.8768, matches no ranking of
    # up to 10 items, with or without relevant items missing from the list, so it is not reconstructed.)
    q = torch.tensor([[0.0]])
    gal = torch.arange(1, 9, dtype=torch.float32).unsqueeze(1) / 10
    relevant = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1])
    got = retrieval_metrics(q, torch.tensor([1]), gallery=gal, gallery_labels=relevant, metric="euclidean", ks=(1,))
    assert got["mAP"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 7 + 5 / 8) / 5)
    assert round(got["mAP"], 3) == 0.789
    assert got["MAP@R"] == pytest.approx((1 + 1 + 3 / 4) / 5)     # R = 5: ranks 1, 2, 4 count
    assert got["R-precision"] == pytest.approx(3 / 5)


def test_hand_computed_second_case_and_tie_break_by_index():
    # Relevant at ranks 2 and 3 of 4 -> AP = (1/2 + 2/3) / 2 = 0.58333; R@1 = 0, R@2 = 1.
    q = torch.tensor([[0.0]])
    gal = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    got = retrieval_metrics(q, torch.tensor([1]), gallery=gal, gallery_labels=torch.tensor([0, 1, 1, 0]),
                            metric="euclidean", ks=(1, 2))
    assert got["R@1"] == 0.0 and got["R@2"] == 1.0
    assert got["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["MAP@R"] == pytest.approx((1 / 2) / 2)
    # identical gallery points: the lower index ranks first
    tie = retrieval_metrics(q, torch.tensor([1]), gallery=torch.ones(2, 1), gallery_labels=torch.tensor([0, 1]),
                            metric="euclidean", ks=(1,))
    assert tie["R@1"] == 0.0 and tie["mAP"] == pytest.approx(0.5)


def test_leave_one_out_and_lone_queries():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    got = retrieval_metrics(x, torch.tensor([0, 0, 5]), ks=(1,))
    assert got["R@1"] == 1.0 and got["mAP"] == 1.0  # query 2 is lone and excluded; nobody retrieves itself
    only_lone = retrieval_metrics(x, torch.tensor([0, 1, 2]), ks=(1,))
    assert all(math.isnan(v) for v in only_lone.values())


def test_agrees_with_pml_accuracy_calculator():
    ac_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = torch.randint(0, 12, (300,), generator=g)
    calc = ac_mod.AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                     k="max_bin_count", knn_func=CustomKNN(CosineSimilarity()))
    theirs = calc.get_accuracy(x, y)  # reference = query, self excluded
    ours = retrieval_metrics(x, y)
    assert ours["R@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["R-precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_module_attribute_and_progress_bar():
    pytest.importorskip("tqdm")
    x, y = torch.randn(40, 8), torch.arange(10).repeat(4)
    assert ml.metrics.retrieval_metrics(x, y, progress=True, chunk_bytes=4000) == pytest.approx(retrieval_metrics(x, y))


@pytest.mark.parametrize("call, exc, name", [
    (lambda: retrieval_metrics(torch.randn(4), torch.arange(4)), ValueError, "embeddings"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(3)), ValueError, "labels"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(4), ks=(0,)), ValueError, "ks"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(4), ks=()), ValueError, "ks"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(4), metric="dot"), ValueError, "metric"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(4), gallery=torch.randn(3, 2)), ValueError,
     "gallery_labels"),
    (lambda: retrieval_metrics(torch.randn(4, 2), torch.arange(4), gallery=torch.randn(3, 5),
                               gallery_labels=torch.arange(3)), ValueError, "gallery"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()
