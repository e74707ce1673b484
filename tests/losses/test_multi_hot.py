"""Batch-hard with multi-hot labels: a reference is a positive of an anchor when they share a label, a negative
when they share none (``labels`` (N, L) and ``ref_labels`` (M, L), bool or 0/1).

This file owns its reference: the relation by Python sets over each row's labels, the distances from the
package's dense ``pairwise_distance``, the selection by explicit loops.
"""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metricloss as ml
import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import labels as label_ops
from metricloss.ops import mining as mining_ops

SMALL_CHUNKS = 2_000  # several chunks of the multi-hot engine, and no one-block path


def loop_reference(x, labels, bank, bank_labels, own, margin, distance, positive="hardest", dup=0.9999):
    """Per-anchor batch-hard terms by loops: (terms (N,), valid (N,))."""
    r = x if bank is None else bank
    lr = labels if bank_labels is None else bank_labels
    d = reference.pairwise_distance(x, r, distance=distance, normalize=True)
    cos = F.normalize(x, dim=1) @ F.normalize(r, dim=1).T
    sets_a = [set(torch.nonzero(row).flatten().tolist()) for row in labels]
    sets_r = [set(torch.nonzero(row).flatten().tolist()) for row in lr]
    terms, valid = [], []
    for i in range(x.shape[0]):
        mine = i if bank is None else (-1 if own is None else int(own[i]))
        pos = [j for j in range(r.shape[0]) if j != mine and sets_a[i] & sets_r[j]]
        neg = [j for j in range(r.shape[0]) if j != mine and not sets_a[i] & sets_r[j]]
        if positive == "easiest":
            pos = [j for j in pos if not float(cos[i, j]) > dup]
        if not pos or not neg:
            terms.append(0.0)
            valid.append(False)
            continue
        d_ap = min(float(d[i, j]) for j in pos) if positive == "easiest" else max(float(d[i, j]) for j in pos)
        d_an = min(float(d[i, j]) for j in neg)
        z = d_ap - d_an
        terms.append(math.log1p(math.exp(z)) if margin == "soft" else max(0.0, margin + z))
        valid.append(True)
    return torch.tensor(terms, dtype=torch.float64), torch.tensor(valid)


@st.composite
def cases(draw):
    n = draw(st.integers(2, 20))
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
    return x, cast(labels), bank, bank_labels, own, draw(st.sampled_from(["euclidean", "squared_euclidean",
                                                                           "cosine"])), \
        draw(st.sampled_from([0.2, "soft"])), draw(st.sampled_from(["hardest", "easiest"]))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_every_path_matches_the_loop_reference(case):
    x, labels, bank, bank_labels, own, distance, margin, positive = case
    refs = () if bank is None else (bank, bank_labels)
    want_terms, want_valid = loop_reference(x, labels, bank, bank_labels, own, margin, distance, positive)
    for path in (dict(), dict(chunk_bytes=SMALL_CHUNKS)):
        got = MF.triplet_loss(x, labels, *refs, margin=margin, distance=distance, reduction="none",
                              ref_self_index=own, positive=positive, **path)
        torch.testing.assert_close(got, want_terms, rtol=1e-9, atol=1e-11)
        terms = MF.triplet_loss_terms(x, labels, *refs, margin=margin, distance=distance, ref_self_index=own,
                                      positive=positive, **path)
        assert int(terms.num_terms) == int(want_valid.sum())
    # the package's dense reference backend agrees too
    got = MF.triplet_loss(x, labels, *refs, margin=margin, distance=distance, reduction="none",
                          ref_self_index=own, positive=positive, backend="reference")
    torch.testing.assert_close(got, want_terms, rtol=1e-9, atol=1e-11)


@settings(max_examples=30, deadline=None)
@given(cases())
def test_the_miner_selects_the_dense_reference_rows(case):
    x, labels, bank, bank_labels, own, distance, _, _ = case
    refs = () if bank is None else (bank, bank_labels)
    want = reference.mine_batch_hard(x, labels, *refs, distance=distance, ref_self_index=own)
    for path in (dict(), dict(chunk_bytes=SMALL_CHUNKS)):
        got = MF.mine_batch_hard(x, labels, *refs, distance=distance, ref_self_index=own, **path)
        # ties between equal distances may pick different rows: compare the selected distances
        d = reference.pairwise_distance(x, bank, distance=distance)
        rows = torch.arange(x.shape[0])
        for g_idx, w_idx in zip(got, want):
            assert torch.equal(g_idx >= 0, w_idx >= 0)
            ok = g_idx >= 0
            torch.testing.assert_close(d[rows[ok], g_idx[ok]], d[rows[ok], w_idx[ok]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("crit", [ml.SCTLoss(), ml.EPHNLoss(), ml.TripletLoss(positive="easiest")],
                         ids=["sct", "ephn", "easy"])
def test_the_forms_take_multi_hot_labels(crit):
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.rand(40, 5, generator=g) < 0.3
    want = crit.__class__(backend="reference")(x, labels) if not isinstance(crit, ml.TripletLoss) or \
        type(crit) is not ml.TripletLoss else ml.TripletLoss(positive="easiest", backend="reference")(x, labels)
    for chunk in (None, SMALL_CHUNKS):
        crit.chunk_bytes = chunk
        torch.testing.assert_close(crit(x, labels), want, rtol=1e-12, atol=1e-12)
    e = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda t: crit(t, labels), (e,))


def test_single_labels_as_one_hot_rows_give_the_single_label_loss():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.arange(8).repeat(4)
    one_hot = F.one_hot(y, 8).bool()
    for kwargs in (dict(), dict(chunk_bytes=SMALL_CHUNKS), dict(positive="easiest"), dict(margin="soft")):
        torch.testing.assert_close(MF.triplet_loss(x, one_hot, **kwargs), MF.triplet_loss(x, y, **kwargs),
                                   rtol=1e-12, atol=1e-12)


def test_the_relation_is_computed_per_chunk():
    # the chunked engine never holds an (N, M) relation: its blocks are (rows, M)
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.rand(64, 3, generator=g) < 0.4
    seen = []
    real = label_ops.RelationIndex.relation_block

    def spy(self, rows):
        seen.append((rows.shape[0], self.num_refs))
        return real(self, rows)

    with mock.patch.object(label_ops.RelationIndex, "relation_block", spy):
        mining_ops.batch_hard_indices_multi_hot(x, x, labels, labels, True, "euclidean", 64 * 64)
    assert len(seen) > 1 and all(rows < 64 and cols == 64 for rows, cols in seen)


def test_cross_batch_memory_with_multi_hot_labels():
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.rand(12, 5, generator=g) < 0.4)
               for _ in range(3)]
    mem = ml.CrossBatchMemory(ml.TripletLoss(), 8, 64, dtype=torch.float64, num_labels=5)
    for x, labels in batches:
        got = mem(x, labels)
    bank = torch.cat([b[0] for b in batches])
    bank_labels = torch.cat([b[1] for b in batches])
    want = ml.TripletLoss()(batches[-1][0], batches[-1][1], bank, bank_labels, ref_self_index=torch.arange(24, 36))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert mem.label_memory.shape == (64, 5) and mem.label_memory.dtype == torch.bool
    with pytest.raises(ValueError, match=r"\(12, 5\)"):
        mem(batches[0][0], torch.arange(12))


def test_triton_is_routed_around_loudly():
    from metricloss._backend import _warned

    _warned.clear()
    assert mining_ops.triton_or_torch_for_multi_hot("triton", True, "auto", "op") == "torch"
    assert mining_ops.triton_or_torch_for_multi_hot("triton", False, "auto", "op") == "triton"
    with pytest.warns(UserWarning, match="one label per sample"):
        mining_ops.triton_or_torch_for_multi_hot("triton", True, "triton", "op")


@pytest.mark.parametrize("call, err, match", [
    (lambda x, m: MF.triplet_loss(x, m * 2, mining="batch_all"), ValueError, "only 0 and 1"),
    (lambda x, m: MF.triplet_loss(x, m, x, m[:, :2], mining="semi_hard"), ValueError, r"\(8, 3\)"),
    (lambda x, m: MF.triplet_loss(x, m * 2), ValueError, "only 0 and 1"),
    (lambda x, m: MF.triplet_loss(x, m[:5]), ValueError, "shape"),
    (lambda x, m: MF.triplet_loss(x, m, x, torch.arange(8)), ValueError, r"\(8, 3\)"),
    (lambda x, m: MF.triplet_loss(x, m, x, m[:, :2]), ValueError, r"\(8, 3\)"),
])
def test_bad_multi_hot_input(call, err, match):
    x, m = torch.randn(8, 4), (torch.rand(8, 3, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.int64)
    with pytest.raises(err, match=match):
        call(x, m)
