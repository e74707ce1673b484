"""PKSampler: P×K batches, coverage of every sample, seeding, epochs, ranks and DataLoader use."""

from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from metricloss.samplers import PKSampler


def _labels(counts):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])[torch.randperm(sum(counts))]


def _check_batch(batch, labels, p, k):
    assert len(batch) == p * k
    classes = labels[torch.tensor(batch)].view(p, k)
    assert (classes == classes[:, :1]).all(), "K consecutive indices per class"
    assert len(set(classes[:, 0].tolist())) == p, "P distinct classes"


@given(counts=st.lists(st.integers(1, 13), min_size=3, max_size=9), p=st.integers(1, 3), k=st.integers(1, 5),
       seed=st.integers(0, 5))
def test_every_sample_used_and_batches_are_pk(counts, p, k, seed):
    labels = _labels(counts)
    sampler = PKSampler(labels, p, k, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sampler.batches_per_epoch
    for b in batches:
        _check_batch(b, labels, p, k)
    used = set(i for b in batches for i in b)
    assert used == set(range(len(labels)))


def test_number_of_batches_is_the_minimum():
    # 10 groups of K=2 in one class, 1 in each of 3 others: at least 10 batches (one group of a class each)
    labels = torch.tensor([0] * 20 + [1, 1, 2, 2, 3, 3])
    assert PKSampler(labels, p=2, k=2).batches_per_epoch == 10
    # balanced: ceil(G / P)
    assert PKSampler(torch.arange(8).repeat_interleave(4), p=3, k=2).batches_per_epoch == 6


def test_small_classes_completed_by_resampling_within_the_class():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    batches = list(PKSampler(labels, p=2, k=4))
    for b in batches:
        _check_batch(b, labels, 2, 4)
    counts = Counter(i for b in batches for i in b)
    assert counts[0] >= 4  # class 0 has one sample: it fills its group of 4


def test_partial_last_group_has_distinct_samples():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)
    for b in PKSampler(labels, p=3, k=4, seed=3):
        for g in torch.tensor(b).view(3, 4):
            assert len(set(g.tolist())) == 4  # classes with >= K samples never repeat one inside a group


def test_seeded_and_set_epoch():
    labels = _labels([7, 9, 4, 12, 5])
    a, b = PKSampler(labels, 2, 3, seed=1), PKSampler(labels, 2, 3, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(a) == list(a)  # the same epoch replays
    assert len(list(a)) == len(first)
    assert list(PKSampler(labels, 2, 3, seed=2)) != first
    with pytest.raises(TypeError, match="epoch"):
        a.set_epoch(1.5)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_batches_and_the_same_number(world, drop_last):
    labels = _labels([6, 11, 3, 8, 9, 5, 7])
    samplers = [PKSampler(labels, 3, 2, seed=4, num_replicas=world, rank=r, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    every = samplers[0].epoch_batches()
    # round-robin: together they are the epoch's batches, each exactly once
    dealt = [every[j] for j in range(len(per_rank[0]) * world)]
    assert sorted(map(tuple, sum(per_rank, []))) == sorted(map(tuple, dealt))
    single = PKSampler(labels, 3, 2, seed=4)
    single.set_epoch(2)
    if not drop_last:
        used = set(i for b in sum(per_rank, []) for i in b)
        assert used == set(range(len(labels)))
        assert len(per_rank[0]) == -(-single.batches_per_epoch // world)
    else:
        assert len(per_rank[0]) == single.batches_per_epoch // world
    for b in sum(per_rank, []):
        _check_batch(b, labels, 3, 2)


def test_defaults_outside_a_process_group():
    s = PKSampler([0, 0, 1, 1], 2, 2)
    assert (s.num_replicas, s.rank) == (1, 0)


def test_dataloader_batch_sampler():
    labels = _labels([5, 6, 7, 3])
    ds = TensorDataset(torch.arange(len(labels)), labels)
    sampler = PKSampler(labels, 2, 3, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler)
    got = [idx.tolist() for idx, _ in loader]
    assert got == list(sampler) and len(loader) == len(sampler)
    for idx, y in loader:
        assert (y.view(2, 3) == y.view(2, 3)[:, :1]).all()


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(labels=[0.5, 1.0], p=1, k=1), TypeError, "labels"),
    (dict(labels=[[0, 1]], p=1, k=1), ValueError, "labels"),
    (dict(labels=[], p=1, k=1), ValueError, "labels"),
    (dict(labels=["a"], p=1, k=1), TypeError, "labels"),
    (dict(labels=[0, 1], p=0, k=1), ValueError, "`p`"),
    (dict(labels=[0, 1], p=1, k=1.0), TypeError, "`k`"),
    (dict(labels=[0, 1], p=3, k=1), ValueError, "only 2 classes"),
    (dict(labels=[0, 1], p=1, k=1, num_replicas=2, rank=2), ValueError, "rank"),
    (dict(labels=[0, 1], p=1, k=1, num_replicas=0), ValueError, "num_replicas"),
    (dict(labels=[0, 1], p=1, k=1, seed=None), TypeError, "seed"),
    (dict(labels=[0, 1], p=1, k=1, drop_last=1), TypeError, "drop_last"),
    (dict(labels=[0, 1], p=2, k=1, num_replicas=2, rank=0, drop_last=True), ValueError, "drop_last"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        PKSampler(**kwargs)
