"""A user-given label relation: ``relation(labels_chunk, ref_labels) -> (c, M) bool``, True where reference j
is a positive of anchor i, False where it is a negative (PML #669's custom label comparison), for every
mining, the retrieval metrics, and the wrappers that carry the labels.

References: the same problem written as plain labels where the relation is an equivalence (the super-class),
and the package's dense reference backend, which calls the relation once on all N × M, where it is not.
"""

import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss.metrics import retrieval_metrics
from metricloss.ops import labels as label_ops

MININGS = ("batch_hard", "batch_all", "semi_hard")
SMALL_CHUNKS = 2_000


def same_superclass(a, b):
    """Classes 0-2, 3-5, ... form super-classes."""
    return (a.unsqueeze(1) // 3) == (b.unsqueeze(0) // 3)


def neighbours(a, b):
    """Not an equivalence: j is a positive of i when their labels differ by at most 1."""
    return (a.unsqueeze(1) - b.unsqueeze(0)).abs() <= 1


def attribute_overlap(a, b):
    """Float attribute rows: positive when the attributes' cosine similarity exceeds 0.5."""
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T > 0.5


@st.composite
def cases(draw):
    n = draw(st.integers(2, 18))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, draw(st.integers(1, 5)), generator=g, dtype=torch.float64)
    y = torch.randint(0, draw(st.integers(2, 9)), (n,), generator=g)
    ref = draw(st.sampled_from(["self", "bank", "bank_with_own_rows"]))
    bank = bank_y = own = None
    if ref != "self":
        m = draw(st.integers(1, 12))
        bank = torch.randn(m, x.shape[1], generator=g, dtype=torch.float64)
        bank_y = torch.randint(0, 9, (m,), generator=g)
        if ref == "bank_with_own_rows":
            bank, bank_y = torch.cat([bank, x[: n // 2]]), torch.cat([bank_y, y[: n // 2]])
            own = torch.full((n,), -1, dtype=torch.int64)
            own[: n // 2] = torch.arange(m, m + n // 2)
    return (x, y, bank, bank_y, own, draw(st.sampled_from(MININGS)),
            draw(st.sampled_from(["euclidean", "squared_euclidean", "cosine"])), draw(st.sampled_from([0.2, "soft"])))


PATHS = [dict(native="1"), dict(native="1", chunk_bytes=SMALL_CHUNKS), dict(native="0", chunk_bytes=SMALL_CHUNKS)]


def _on(path, fn):
    with mock.patch.dict(os.environ, {"METRICLOSS_NATIVE": path["native"]}):
        return fn(path.get("chunk_bytes"))


@pytest.mark.filterwarnings("ignore::metricloss.NoValidTripletWarning")
@settings(max_examples=25, deadline=None)
@given(cases())
def test_an_equivalence_relation_gives_the_loss_of_its_classes(case):
    x, y, bank, bank_y, own, mining, distance, margin = case
    kw = dict(mining=mining, distance=distance, margin=margin, ref_self_index=own, reduction="none")
    refs = () if bank is None else (bank, bank_y)
    coarse = () if bank is None else (bank, bank_y // 3)
    for path in PATHS:
        want = _on(path, lambda cb: MF.triplet_loss(x, y // 3, *coarse, chunk_bytes=cb, **kw))
        got = _on(path, lambda cb: MF.triplet_loss(x, y, *refs, chunk_bytes=cb, relation=same_superclass, **kw))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(cases(), st.sampled_from(["mean", "sum", "mean_nonzero", "none"]))
def test_any_relation_matches_the_dense_reference(case, reduction):
    x, y, bank, bank_y, own, mining, distance, margin = case
    kw = dict(mining=mining, distance=distance, margin=margin, ref_self_index=own, reduction=reduction,
              relation=neighbours)
    upstream = torch.linspace(0.5, 2.0, x.shape[0], dtype=x.dtype)

    def run(fn):
        e = x.clone().requires_grad_()
        refs = () if bank is None else (bank.clone().requires_grad_(), bank_y)
        out = fn(e, refs)
        (out * upstream).sum().backward() if reduction == "none" else out.backward()
        return out.detach(), e.grad, (None if bank is None else refs[0].grad)

    want = run(lambda e, refs: MF.triplet_loss(e, y, *refs, backend="reference", **kw))
    for path in PATHS:
        got = _on(path, lambda cb: run(lambda e, refs: MF.triplet_loss(e, y, *refs, chunk_bytes=cb, **kw)))
        for g_, w_ in zip(got, want):
            if w_ is not None:
                torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mining", MININGS)
def test_labels_of_any_shape_and_dtype(mining):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    attributes = torch.rand(30, 4, generator=g, dtype=torch.float64)  # float rows: not multi-hot
    want = MF.triplet_loss(x, attributes, mining=mining, relation=attribute_overlap, backend="reference")
    got = MF.triplet_loss(x, attributes, mining=mining, relation=attribute_overlap, chunk_bytes=SMALL_CHUNKS)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(want) > 0


def test_the_relation_is_called_per_chunk():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 12, (64,), generator=g)
    seen = []

    def spy(a, b):
        seen.append((a.shape[0], b.shape[0]))
        return same_superclass(a, b)

    with mock.patch.object(label_ops, "MULTI_HOT_PIECE_BYTES", 16 * 64 * 21):
        for mining in MININGS:
            MF.triplet_loss(x, y, mining=mining, relation=spy, chunk_bytes=64 * 64 * 4)
    assert len(seen) > 8 and all(rows < 64 and cols == 64 for rows, cols in seen)


@pytest.mark.parametrize("mining", MININGS)
def test_the_module_and_the_presets_take_it(mining):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(0, 9, (24,), generator=g)
    preset = {"batch_hard": ml.BatchHardTripletLoss, "batch_all": ml.BatchAllTripletLoss,
              "semi_hard": ml.SemiHardTripletLoss}[mining]
    want = MF.triplet_loss(x, y // 3, mining=mining)
    for crit in (ml.TripletLoss(mining=mining, relation=same_superclass), preset(relation=same_superclass)):
        torch.testing.assert_close(crit(x, y), want, rtol=1e-12, atol=1e-12)
        terms = crit.loss_terms(x, y)
        torch.testing.assert_close(terms.reduce("mean"), want, rtol=1e-12, atol=1e-12)
        assert "relation=same_superclass" in repr(crit)


@pytest.mark.parametrize("mining", MININGS)
def test_cross_batch_memory_carries_the_relation(mining):
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randint(0, 12, (12,), generator=g))
               for _ in range(3)]
    mem = ml.CrossBatchMemory(ml.TripletLoss(mining=mining, relation=neighbours), 8, 64, dtype=torch.float64)
    for x, y in batches:
        got = mem(x, y)
    bank = torch.cat([b[0] for b in batches])
    bank_y = torch.cat([b[1] for b in batches])
    want = MF.triplet_loss(batches[-1][0], batches[-1][1], bank, bank_y, mining=mining, relation=neighbours,
                           ref_self_index=torch.arange(24, 36), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcache_with_a_relation():
    g = torch.Generator().manual_seed(5)
    net = torch.nn.Linear(6, 4).double()
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 9, (32,), generator=g)
    crit = ml.TripletLoss(mining="batch_all", relation=neighbours)
    crit(net(x), y).backward()
    want = net.weight.grad.clone()
    net.zero_grad()
    ml.GradCache(net, crit, 8).step(x, y)
    torch.testing.assert_close(net.weight.grad, want, rtol=1e-10, atol=1e-12)


def test_retrieval_metrics_with_a_relation():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 30, (200,), generator=g)
    gx, gy = torch.randn(300, 8, generator=g), torch.randint(0, 30, (300,), generator=g)
    for metric in ("cosine", "euclidean"):
        assert retrieval_metrics(x, y, relation=same_superclass, metric=metric) == \
            retrieval_metrics(x, y // 3, metric=metric)
        assert retrieval_metrics(x, y, gallery=gx, gallery_labels=gy, relation=same_superclass, metric=metric) == \
            retrieval_metrics(x, y // 3, gallery=gx, gallery_labels=gy // 3, metric=metric)


def test_retrieval_metrics_with_a_non_equivalence_relation():
    # R@1 by hand: the nearest other item is relevant when its label is within 1 of the query's
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randint(0, 8, (40,), generator=g)
    xn = torch.nn.functional.normalize(x, dim=1)
    sim = xn @ xn.T
    sim.fill_diagonal_(-math.inf)
    rel = neighbours(y, y)
    rel.fill_diagonal_(False)
    has = rel.any(1)
    hits = rel[torch.arange(40), sim.argmax(1)]
    got = retrieval_metrics(x, y, ks=1, relation=neighbours)
    assert got["R@1"] == pytest.approx(float(hits[has].double().mean()), abs=1e-12)
    want = ml.reference.retrieval_metrics(x, y, ks=1, relation=neighbours)
    assert all(abs(got[k] - want[k]) < 1e-12 for k in want)


@pytest.mark.parametrize("relation, err, match", [
    (3, TypeError, "must be None or a callable"),
    (lambda a, b: (a.unsqueeze(1) == b.unsqueeze(0)).int(), ValueError, "bool tensor of shape"),
    (lambda a, b: a.unsqueeze(1) == b.unsqueeze(0)[:, :3], ValueError, "bool tensor of shape"),
    (lambda a, b: None, ValueError, "got a NoneType"),
])
def test_bad_relations_are_named(relation, err, match):
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    for mining in MININGS:
        with pytest.raises(err, match=match):
            MF.triplet_loss(x, y, mining=mining, relation=relation)
    with pytest.raises(err, match=match):
        retrieval_metrics(x, y, relation=relation)
    if err is TypeError:
        with pytest.raises(err, match=match):
            ml.TripletLoss(relation=relation)


def test_labels_must_have_n_rows():
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="8 rows"):
        MF.triplet_loss(x, torch.arange(5), relation=same_superclass)
    with pytest.raises(ValueError, match="5 rows"):
        MF.triplet_loss(x, torch.arange(8), torch.randn(5, 4), torch.arange(4), relation=same_superclass)
