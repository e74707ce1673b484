"""retrieval_metrics with multi-hot labels: a gallery item is relevant to a query when they share a label.

This file owns its reference: relevance by Python sets over each row's labels, every gallery item ranked by
Python sorting of (similarity desc, index asc), then the formulas; the similarities by one fp64 dot product
per pair of the fp32 rows, on inputs where fp32 ranks them the same (integer coordinates for Euclidean,
duplicated rows for exact cosine ties).
"""

import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from metricloss.metrics import retrieval_metrics
from metricloss.ops import labels as label_ops


def brute_force_sets(q, labels, g=None, g_labels=None, ks=(1, 2, 4, 8), metric="cosine"):
    loo = g is None
    g, g_labels = (q, labels) if loo else (g, g_labels)
    if metric == "cosine":
        qn, gn = F.normalize(q.float(), dim=1), F.normalize(g.float(), dim=1)
        sim = [[float(torch.dot(a.double(), b.double())) for b in gn] for a in qn]
    else:
        sim = [[-float(((a.double() - b.double()) ** 2).sum()) for b in g] for a in q]
    sets_q = [set(torch.nonzero(row).flatten().tolist()) for row in labels]
    sets_g = [set(torch.nonzero(row).flatten().tolist()) for row in g_labels]
    out = {f"R@{k}": [] for k in ks}
    out.update({"mAP": [], "MAP@R": [], "R-precision": []})
    for i in range(q.shape[0]):
        order = sorted((j for j in range(g.shape[0]) if not (loo and j == i)), key=lambda j: (-sim[i][j], j))
        rel = [bool(sets_q[i] & sets_g[j]) for j in order]
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


def assert_metrics_close(got, want, tol):
    assert got.keys() == want.keys()
    for k in want:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), k
        else:
            assert abs(got[k] - want[k]) < tol, (k, got[k], want[k])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 24), d=st.integers(1, 4), width=st.integers(1, 6), density=st.sampled_from([0.15, 0.4]),
       seed=st.integers(0, 2**31 - 1), levels=st.sampled_from([0, 2]), gallery=st.integers(0, 14),
       metric=st.sampled_from(["cosine", "euclidean"]), kind=st.sampled_from(["bool", "int", "float"]))
def test_matches_brute_force_on_every_path(n, d, width, density, seed, levels, gallery, metric, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if levels and metric == "euclidean":
        x = torch.randint(-levels, levels + 1, (n, d), generator=g).float()  # exact squared distances, ties
    elif levels:
        x[torch.randint(0, n, (n // 2,), generator=g)] = x[0].clone()  # exact cosine ties
    cast = {"bool": lambda t: t, "int": lambda t: t.to(torch.int64), "float": lambda t: t.to(torch.float32)}[kind]
    y = cast(torch.rand(n, width, generator=g) < density)
    gal = (torch.randn(gallery, d, generator=g), cast(torch.rand(gallery, width, generator=g) < density)) \
        if gallery else (None, None)
    want = brute_force_sets(x, y, gal[0], gal[1], metric=metric)
    results = []
    for native in ("1", "0"):
        for chunk in (None, 100):
            with mock.patch.dict(os.environ, {"METRICLOSS_NATIVE": native}):
                got = retrieval_metrics(x, y, gallery=gal[0], gallery_labels=gal[1], metric=metric, chunk_bytes=chunk)
            assert_metrics_close(got, want, tol=1e-6 if metric == "euclidean" else 1e-9)
            results.append(got)
    # the package's dense full-sort twin agrees
    from metricloss import reference
    assert_metrics_close(reference.retrieval_metrics(x, y, gallery=gal[0], gallery_labels=gal[1], metric=metric),
                         want, tol=1e-6 if metric == "euclidean" else 1e-9)
    # bitwise the same on every path and budget
    assert all(r == results[0] or all(math.isnan(a) and math.isnan(b) for a, b in zip(r.values(), results[0].values()))
               for r in results)


@pytest.mark.parametrize("gallery", [False, True])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_one_hot_rows_give_the_single_label_metrics_bitwise(gallery, metric):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(300, 16, generator=g), torch.randint(0, 20, (300,), generator=g)
    gx, gy = torch.randn(500, 16, generator=g), torch.randint(0, 20, (500,), generator=g)
    kw = dict(gallery=gx, gallery_labels=F.one_hot(gy, 20).bool()) if gallery else {}
    single = dict(gallery=gx, gallery_labels=gy) if gallery else {}
    assert retrieval_metrics(x, F.one_hot(y, 20).bool(), metric=metric, **kw) == \
        retrieval_metrics(x, y, metric=metric, **single)


def test_relation_pieces_do_not_change_the_result():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(200, 8, generator=g), torch.rand(200, 12, generator=g) < 0.2
    want = retrieval_metrics(x, y)
    seen = []
    real = label_ops.RelationIndex.relation_block

    def spy(self, rows):
        seen.append(rows.shape[0])
        return real(self, rows)

    with mock.patch.object(label_ops, "MULTI_HOT_PIECE_BYTES", 7 * 200 * 21), \
            mock.patch.object(label_ops.RelationIndex, "relation_block", spy):
        assert retrieval_metrics(x, y) == want
    assert max(seen) == 7 and len(seen) >= 2 * (200 // 7)


def test_a_query_without_labels_is_lone():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1], [0, 1]], dtype=torch.bool)
    assert_metrics_close(retrieval_metrics(x, y), brute_force_sets(x, y), tol=1e-12)
    nobody = retrieval_metrics(x, torch.zeros(5, 2, dtype=torch.bool))
    assert all(math.isnan(v) for v in nobody.values())


@pytest.mark.parametrize("call, match", [
    (lambda x, y: retrieval_metrics(x, y * 2), "only 0 and 1"),
    (lambda x, y: retrieval_metrics(x, y[:3]), "shape"),
    (lambda x, y: retrieval_metrics(x, y, gallery=x, gallery_labels=torch.arange(6)), r"\(6, 3\)"),
    (lambda x, y: retrieval_metrics(x, y, gallery=x, gallery_labels=y[:, :2]), r"\(6, 3\)"),
])
def test_bad_multi_hot_input(call, match):
    x = torch.randn(6, 4)
    y = (torch.rand(6, 3, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.int64)
    with pytest.raises(ValueError, match=match):
        call(x, y)
