"""Batch-hard and semi-hard mining on the chunked torch backend vs dense references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import mining
from metricloss.ops.distance import GramFactors
from metricloss.ops.labels import ClassIndex

from ..helpers import label_pattern

PATTERNS = ["random", "singletons", "one_class", "pk2", "pk3"]


def dense_semi_hard(d, pos, neg):
    """For each (a, p): argmin{d_an : d_an > d_ap}, else the farthest negative (first index on ties)."""
    n, m = d.shape
    out = torch.full((n, m), -1, dtype=torch.int64)
    for a in range(n):
        negatives = [q for q in range(m) if neg[a, q]]
        for p in range(m):
            if not pos[a, p] or not negatives:
                continue
            farther = [q for q in negatives if d[a, q] > d[a, p]]
            if farther:
                out[a, p] = min(farther, key=lambda q: (d[a, q].item(), q))
            else:
                out[a, p] = max(negatives, key=lambda q: (d[a, q].item(), -q))
    return out


@given(n=st.integers(1, 24), d=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       pattern=st.sampled_from(PATTERNS), distance=st.sampled_from(["euclidean", "squared_euclidean", "cosine"]),
       ref_m=st.sampled_from([0, 1, 7]), chunk=st.sampled_from([None, 200]))
def test_mine_batch_hard_matches_dense_reference(n, d, seed, pattern, distance, ref_m, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = label_pattern(pattern, n, g)
    ref = (torch.randn(ref_m, d, generator=g, dtype=torch.float64), label_pattern("random", ref_m, g)) if ref_m \
        else (None, None)
    got = MF.mine_batch_hard(x, y, *ref, distance=distance, chunk_bytes=chunk)
    want = reference.mine_batch_hard(x, y, *ref, distance=distance)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_mine_batch_hard_no_positive_no_negative():
    x = torch.randn(5, 3)
    pos, neg = MF.mine_batch_hard(x, torch.arange(5))
    assert (pos == -1).all() and (neg >= 0).all()
    pos, neg = MF.mine_batch_hard(x, torch.zeros(5, dtype=torch.int64))
    assert (neg == -1).all() and (pos >= 0).all()
    assert (pos != torch.arange(5)).all()  # never itself
    pos, neg = MF.mine_batch_hard(x[:1], torch.zeros(1, dtype=torch.int64))
    assert pos.tolist() == [-1] and neg.tolist() == [-1]


def test_self_is_excluded_by_index_not_by_value():
    # Two identical rows of one class: each is the other's positive at distance 0, never itself.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pos, _ = MF.mine_batch_hard(x, torch.tensor([0, 0, 1]))
    assert pos.tolist()[:2] == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mine_batch_hard_low_precision_inputs(dtype):
    x = torch.randn(64, 16)
    y = torch.arange(16).repeat(4)
    got = MF.mine_batch_hard(x.to(dtype), y)
    want = reference.mine_batch_hard(x.to(dtype).float(), y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("sorted_path", [False, True])
@given(n=st.integers(2, 20), seed=st.integers(0, 2**31 - 1), pattern=st.sampled_from(PATTERNS))
def test_semi_hard_negative_idx_matches_brute_force(sorted_path, n, seed, pattern):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = label_pattern(pattern, n, g)
    index = ClassIndex(y)
    cls = index.anchor_classes(y, True)
    width = index.max_count - 1
    members, in_class = index.positive_table(cls, width)
    dist = GramFactors(x, x, "euclidean").distance_block(0, n)
    dense = reference.pairwise_distance(x)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(n, dtype=torch.bool)
    neg = y[:, None] != y[None, :]
    want = dense_semi_hard(dense, pos, neg)
    saved = mining._SEMI_HARD_SORT_MIN_POSITIVES
    mining._SEMI_HARD_SORT_MIN_POSITIVES = -1 if sorted_path else 10**9
    try:
        got = mining.semi_hard_negative_idx(dist, dist.gather(1, members), members, in_class,
                                            torch.arange(n))
    finally:
        mining._SEMI_HARD_SORT_MIN_POSITIVES = saved
    for a in range(n):
        if cls.num_neg[a] == 0:
            continue
        for k in range(width):
            if in_class[a, k]:
                assert got[a, k] == want[a, members[a, k]]


def test_rows_per_chunk_respects_budget():
    assert mining.rows_per_chunk(1000, 4, 4000 * 10) == 10
    assert mining.rows_per_chunk(10**9, 4, 1) == 1


def test_chunk_budget_environment(monkeypatch):
    monkeypatch.setenv("METRICLOSS_CHUNK_BYTES", "1234")
    assert mining.default_chunk_bytes() == 1234
    monkeypatch.setenv("METRICLOSS_CHUNK_BYTES", "0")
    with pytest.raises(ValueError, match="METRICLOSS_CHUNK_BYTES"):
        mining.default_chunk_bytes()
