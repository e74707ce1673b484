"""Batch-all and semi-hard with multi-hot labels: a reference is a positive of an anchor when they share a
label, a negative when they share none (``labels`` (N, L) and ``ref_labels`` (M, L), bool or 0/1); the anchor's
own row (by index) is neither.

This file owns its reference: the relation by Python sets over each row's labels, the distances from the
package's dense ``pairwise_distance``, every triplet (batch-all) and every selection (semi-hard) by loops.
"""

import math
import os
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import _warn, reference
from metricloss.ops import labels as label_ops

SMALL_CHUNKS = 2_000  # several anchor chunks


def _h(z, margin):
    return math.log1p(math.exp(z)) if margin == "soft" else max(0.0, margin + z)


def loop_reference(x, labels, bank, bank_labels, own, mining, margin, distance):
    """Per-anchor terms by loops: (sums (N,), number of terms, number of nonzero terms)."""
    r = x if bank is None else bank
    lr = labels if bank_labels is None else bank_labels
    d = reference.pairwise_distance(x, r, distance=distance, normalize=True).tolist()
    sets_a = [set(torch.nonzero(row).flatten().tolist()) for row in labels]
    sets_r = [set(torch.nonzero(row).flatten().tolist()) for row in lr]
    sums, count, nonzero = [], 0, 0
    for i in range(x.shape[0]):
        mine = i if bank is None else (-1 if own is None else int(own[i]))
        pos = [j for j in range(r.shape[0]) if j != mine and sets_a[i] & sets_r[j]]
        neg = [j for j in range(r.shape[0]) if j != mine and not sets_a[i] & sets_r[j]]
        total = 0.0
        if neg:
            for p in pos:
                if mining == "batch_all":
                    chosen = neg
                else:  # the nearest negative farther than the positive, else the farthest one
                    farther = [n for n in neg if d[i][n] > d[i][p]]
                    chosen = [min(farther, key=lambda n: d[i][n]) if farther else max(neg, key=lambda n: d[i][n])]
                for n in chosen:
                    z = d[i][p] - d[i][n]
                    term = _h(z, margin)
                    total += term
                    count += 1
                    nonzero += margin == "soft" or term > 0
        sums.append(total)
    return torch.tensor(sums, dtype=torch.float64), count, nonzero


@st.composite
def cases(draw):
    n = draw(st.integers(2, 18))
    d = draw(st.integers(1, 6))
    width = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    density = draw(st.sampled_from([0.1, 0.3, 0.6]))
    labels = torch.rand(n, width, generator=g) < density
    kind = draw(st.sampled_from(["bool", "int", "float"]))
    cast = {"bool": lambda t: t, "int": lambda t: t.to(torch.int64), "float": lambda t: t.to(torch.float32)}[kind]
    ref = draw(st.sampled_from(["self", "bank", "bank_with_own_rows"]))
    bank = bank_labels = own = None
    if ref != "self":
        m = draw(st.integers(1, 12))
        bank = torch.randn(m, d, generator=g, dtype=torch.float64)
        bank_labels = torch.rand(m, width, generator=g) < density
        if ref == "bank_with_own_rows":
            bank = torch.cat([bank, x[: n // 2]])
            bank_labels = torch.cat([bank_labels, labels[: n // 2]])
            own = torch.full((n,), -1, dtype=torch.int64)
            own[: n // 2] = torch.arange(m, m + n // 2)
        bank_labels = cast(bank_labels)
    return (x, cast(labels), bank, bank_labels, own, draw(st.sampled_from(["batch_all", "semi_hard"])),
            draw(st.sampled_from(["euclidean", "squared_euclidean", "cosine"])), draw(st.sampled_from([0.2, "soft"])))


PATHS = [dict(native="1"), dict(native="1", chunk_bytes=SMALL_CHUNKS), dict(native="0"),
         dict(native="0", chunk_bytes=SMALL_CHUNKS)]


def _run(path, fn):
    with mock.patch.dict(os.environ, {"METRICLOSS_NATIVE": path["native"]}), warnings.catch_warnings():
        warnings.simplefilter("ignore", ml.NoValidTripletWarning)
        return fn(path.get("chunk_bytes"))


@settings(max_examples=20, deadline=None)
@given(cases())
def test_every_path_matches_the_loop_reference(case):
    x, labels, bank, bank_labels, own, mining, distance, margin = case
    refs = () if bank is None else (bank, bank_labels)
    want, want_count, want_nonzero = loop_reference(x, labels, bank, bank_labels, own, mining, margin, distance)
    kw = dict(mining=mining, margin=margin, distance=distance, ref_self_index=own)
    dense = MF.triplet_loss(x, labels, *refs, reduction="none", backend="reference", **kw)
    torch.testing.assert_close(dense, want, rtol=1e-9, atol=1e-11)
    for path in PATHS:
        got = _run(path, lambda cb: MF.triplet_loss(x, labels, *refs, reduction="none", chunk_bytes=cb, **kw))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
        terms = _run(path, lambda cb: MF.triplet_loss_terms(x, labels, *refs, chunk_bytes=cb, **kw))
        assert (int(terms.num_terms), int(terms.num_nonzero)) == (want_count, want_nonzero)


@settings(max_examples=12, deadline=None)
@given(cases(), st.sampled_from(["mean", "sum", "mean_nonzero", "none"]))
def test_gradients_match_the_dense_reference(case, reduction):
    x, labels, bank, bank_labels, own, mining, distance, margin = case
    refs = () if bank is None else (bank.clone().requires_grad_(), bank_labels)
    kw = dict(mining=mining, margin=margin, distance=distance, ref_self_index=own, reduction=reduction)
    upstream = torch.linspace(0.5, 2.0, x.shape[0], dtype=x.dtype)

    def grads(fn):
        e = x.clone().requires_grad_()
        out = fn(e)
        (out * upstream).sum().backward() if reduction == "none" else out.backward()
        return out.detach(), e.grad, (None if bank is None else refs[0].grad)

    want = grads(lambda e: MF.triplet_loss(e, labels, *refs, backend="reference", **kw))
    for path in PATHS:
        if bank is not None:
            refs[0].grad = None
        got = _run(path, lambda cb: grads(lambda e: MF.triplet_loss(e, labels, *refs, chunk_bytes=cb, **kw)))
        for g, w in zip(got, want):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
@pytest.mark.parametrize("kwargs", [dict(), dict(chunk_bytes=SMALL_CHUNKS), dict(margin="soft"),
                                    dict(distance="cosine"), dict(reduction="mean_nonzero")],
                         ids=["default", "chunks", "soft", "cosine", "mean_nonzero"])
def test_single_labels_as_one_hot_rows_give_the_single_label_loss(mining, kwargs):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=g, dtype=torch.float64), torch.arange(12).repeat(4)
    one_hot = F.one_hot(y, 12).bool()
    for native in ("1", "0"):
        with mock.patch.dict(os.environ, {"METRICLOSS_NATIVE": native}):
            want = MF.triplet_loss(x, y, mining=mining, **kwargs)
            torch.testing.assert_close(MF.triplet_loss(x, one_hot, mining=mining, **kwargs), want,
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_gradcheck(mining):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(14, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.rand(14, 4, generator=g) < 0.35
    torch.autograd.gradcheck(lambda t: MF.triplet_loss(t, labels, mining=mining, chunk_bytes=SMALL_CHUNKS), (x,))


def test_the_relation_is_computed_per_chunk():
    # the engine never holds an (N, M) relation: its blocks are (rows, M), rows < N
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.rand(64, 3, generator=g) < 0.4
    seen = []
    real = label_ops.RelationIndex.relation_block

    def spy(self, rows):
        seen.append((rows.shape[0], self.num_refs))
        return real(self, rows)

    with mock.patch.object(label_ops.RelationIndex, "relation_block", spy), \
            mock.patch.object(label_ops, "MULTI_HOT_PIECE_BYTES", 16 * 64 * 21):
        for mining in ("batch_all", "semi_hard"):
            MF.triplet_loss(x, labels, mining=mining, chunk_bytes=64 * 64 * 4)
    # pieces of 16 rows (16 * 64 cells of 21 bytes), never more than a chunk's rows
    assert len(seen) > 8 and all(rows <= 16 and cols == 64 for rows, cols in seen)


def test_positive_table_lists_the_positives_in_index_order():
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(30, 6, generator=g) < 0.3
    anchors = torch.rand(9, 6, generator=g) < 0.3
    own = torch.tensor([3, -1, 0, 29, -1, 7, 7, 12, -1])
    index = label_ops.MultiHotIndex(ref)
    cls = index.anchor_classes(anchors, self_index=own)
    width = index.max_positives(cls)
    members, valid = index.positive_table(cls, width)
    shares = (anchors.double() @ ref.double().T) > 0
    for i in range(9):
        want = [j for j in range(30) if shares[i, j] and j != int(own[i])]
        assert members[i][valid[i]].tolist() == want
        assert int(cls.num_pos[i]) == len(want)
        assert int(cls.num_neg[i]) == sum(1 for j in range(30) if not shares[i, j] and j != int(own[i]))
    assert width == max(int(v.sum()) for v in valid) and bool((members >= 0).all() & (members < 30).all())


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_cross_batch_memory_with_multi_hot_labels(mining):
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.rand(12, 5, generator=g) < 0.4)
               for _ in range(3)]
    mem = ml.CrossBatchMemory(ml.TripletLoss(mining=mining), 8, 64, dtype=torch.float64, num_labels=5)
    for x, labels in batches:
        got = mem(x, labels)
    bank = torch.cat([b[0] for b in batches])
    bank_labels = torch.cat([b[1] for b in batches])
    want = ml.TripletLoss(mining=mining, backend="reference")(batches[-1][0], batches[-1][1], bank, bank_labels,
                                                              ref_self_index=torch.arange(24, 36))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_no_valid_triplet_warns_once(mining):
    x = torch.randn(6, 3, dtype=torch.float64)
    every_label = torch.ones(6, 2, dtype=torch.bool)  # everyone shares a label: no negative anywhere
    _warn._reset_for_tests()
    try:
        with pytest.warns(ml.NoValidTripletWarning, match="MultiLabelPKSampler"):
            out = MF.triplet_loss(x, every_label, mining=mining)
        assert float(out) == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            MF.triplet_loss(x, every_label, mining=mining)  # once per process
    finally:
        _warn._reset_for_tests()
