"""MultiLabelPKSampler: P distinct labels × K carriers per batch, coverage, the duplicate and no-label rules,
seeding, epochs, ranks, label dtypes, validation, and one-hot rows against PKSampler."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import metricloss as ml
from metricloss.samplers import MultiLabelPKSampler, PKSampler


def _multi_hot(n, num_labels, density, seed, unlabelled=0):
    """Random (n, L) bool rows, each with at least one label, then ``unlabelled`` all-zero rows spread among them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, num_labels, generator=g) < density
    y[torch.arange(n), torch.randint(num_labels, (n,), generator=g)] = True
    y = torch.cat([y, torch.zeros(unlabelled, num_labels, dtype=torch.bool)])
    return y[torch.randperm(len(y), generator=g)]


def _check_epoch(sampler, y):
    """Every structural property of one epoch's batches (all ranks'); returns the batches."""
    y = torch.as_tensor(y).bool()
    p, k = sampler.p, sampler.k
    batches, batch_labels = sampler.epoch_batches(return_labels=True)
    assert batches == sampler.epoch_batches()
    carriers = {l: set(torch.nonzero(y[:, l]).flatten().tolist()) for l in range(y.shape[1])}
    for batch, chosen in zip(batches, batch_labels):
        assert len(batch) == p * k
        assert len(chosen) == p and len(set(chosen)) == p, "P distinct labels"
        rows = y[torch.tensor(batch)]
        groups = rows.view(p, k, -1)
        for g, l in enumerate(chosen):
            assert groups[g, :, l].all(), "each group of K carries its label"
        if k >= 2:  # every position has another position sharing a label (a positive)
            share = (rows.float() @ rows.float().t()) > 0
            share.fill_diagonal_(False)
            assert share.any(1).all()
        # the duplicate rule: an index repeats only where every carrier of its group's label is already there
        seen = set()
        for pos, i in enumerate(batch):
            if i in seen:
                l = chosen[pos // k]
                assert carriers[l] <= set(batch[:pos]), (batch, chosen, pos)
            seen.add(i)
    return batches


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p, k", [(1, 1), (3, 2), (4, 4), (2, 5)])
def test_batches_cover_every_labelled_sample_and_are_pk(seed, p, k):
    y = _multi_hot(60, 9, 0.25, seed)
    s = MultiLabelPKSampler(y, p, k, seed=seed)
    for epoch in range(2):
        s.set_epoch(epoch)
        batches = _check_epoch(s, y)
        got = list(s)
        assert got == batches and len(got) == len(s) == s.batches_per_epoch
        assert set(i for b in got for i in b) == set(range(len(y)))


def test_number_of_batches_from_home_labels():
    # samples 0..5 carry label 0 only, 6..9 carry labels 0 and 1 (label 1 is rarer: their home), 10, 11 label 2
    y = torch.zeros(12, 3, dtype=torch.bool)
    y[:10, 0] = True
    y[6:10, 1] = True
    y[10:, 2] = True
    s = MultiLabelPKSampler(y, p=2, k=2)
    assert [len(h) for h in s._home] == [6, 4, 2]
    assert s._groups_per_class == [3, 2, 1]
    assert s.batches_per_epoch == 3  # max(ceil(6 / 2), 3)
    _check_epoch(s, y)
    # ties go to the lowest column: two identical labels, every sample's home is label 0
    twin = torch.ones(8, 2, dtype=torch.bool)
    assert [len(h) for h in MultiLabelPKSampler(twin, 1, 4)._home] == [8, 0]


def test_no_duplicates_when_labels_have_enough_carriers():
    y = _multi_hot(200, 6, 0.3, seed=3)
    assert int(y.sum(0).min()) >= 4 * 3
    s = MultiLabelPKSampler(y, p=4, k=3, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        for b in _check_epoch(s, y):
            assert len(set(b)) == len(b)
    # overlapping labels force replacements (label 0 is everywhere), still no duplicates
    y2 = y.clone()
    y2[:, 0] = True
    s2 = MultiLabelPKSampler(y2, p=4, k=3, seed=2)
    for b in _check_epoch(s2, y2):
        assert len(set(b)) == len(b)


def test_duplicates_only_where_the_data_forces_them():
    # label 1 has 2 carriers (< K = 4): its group repeats them; label 2's 4 carriers all carry label 3 too,
    # so a batch with labels 2 and 3 has to repeat some of them
    y = torch.zeros(14, 4, dtype=torch.bool)
    y[:8, 0] = True
    y[8:10, 1] = True
    y[10:14, 2] = True
    y[10:14, 3] = True
    found_forced = False
    for seed in range(8):
        s = MultiLabelPKSampler(y, p=3, k=4, seed=seed)
        batches, labels = s.epoch_batches(return_labels=True)
        _check_epoch(s, y)  # asserts the rule at each repeat
        for b, chosen in zip(batches, labels):
            if 1 in chosen:
                g = chosen.index(1)
                assert sorted(set(b[g * 4:(g + 1) * 4])) == [8, 9]
            if {2, 3} <= set(chosen):
                found_forced = True
                assert len(set(b)) < len(b)
    assert found_forced


def test_replacement_keeps_coverage():
    # every sample carries the common label 0 and one of three rare ones: groups of the rare labels and
    # fill groups of label 0 overlap; each repeat is replaced and every sample is still used
    y = torch.zeros(30, 4, dtype=torch.bool)
    y[:, 0] = True
    y[torch.arange(30), 1 + torch.arange(30) % 3] = True
    for seed in range(5):
        s = MultiLabelPKSampler(y, p=3, k=3, seed=seed)
        batches = _check_epoch(s, y)
        assert set(i for b in batches for i in b) == set(range(30))
        assert all(len(set(b)) == len(b) for b in batches)


def test_unlabelled_samples_are_never_yielded():
    y = _multi_hot(40, 5, 0.3, seed=4, unlabelled=7)
    empty = set(torch.nonzero(~y.any(1)).flatten().tolist())
    assert len(empty) == 7
    s = MultiLabelPKSampler(y, 3, 2, seed=0, num_replicas=2, rank=1)
    assert s.num_unlabelled == 7
    used = set(i for b in s.epoch_batches() for i in b)
    assert used == set(range(len(y))) - empty
    assert "unlabelled=7" in repr(s)


def test_label_columns_without_carriers_are_skipped():
    y = torch.zeros(12, 5, dtype=torch.bool)
    y[:6, 1] = True
    y[6:, 3] = True
    s = MultiLabelPKSampler(y, p=2, k=3)
    assert s.label_ids.tolist() == [1, 3]
    _, labels = s.epoch_batches(return_labels=True)
    assert all(sorted(c) == [1, 3] for c in labels)
    with pytest.raises(ValueError, match="only 2 labels"):
        MultiLabelPKSampler(y, p=3, k=1)


def test_seeded_and_set_epoch():
    y = _multi_hot(50, 7, 0.2, seed=5)
    a, b = MultiLabelPKSampler(y, 3, 3, seed=1), MultiLabelPKSampler(y, 3, 3, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(a) == list(a)
    assert list(MultiLabelPKSampler(y, 3, 3, seed=2)) != first
    with pytest.raises(TypeError, match="epoch"):
        a.set_epoch("1")


def test_len_is_exact_for_every_seed_and_epoch():
    y = _multi_hot(70, 8, 0.3, seed=6)
    for world, drop_last in [(1, False), (3, False), (3, True)]:
        lengths = set()
        for seed in range(3):
            s = MultiLabelPKSampler(y, 4, 3, seed=seed, num_replicas=world, rank=world - 1, drop_last=drop_last)
            for epoch in range(3):
                s.set_epoch(epoch)
                lengths.add((len(s), len(list(s))))
        assert len(lengths) == 1 and len({n for pair in lengths for n in pair}) == 1, lengths


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_batches_and_the_same_number(world, drop_last):
    y = _multi_hot(45, 6, 0.3, seed=7)
    samplers = [MultiLabelPKSampler(y, 3, 2, seed=4, num_replicas=world, rank=r, drop_last=drop_last)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    every = _check_epoch(samplers[0], y)
    assert all(s.epoch_batches() == every for s in samplers[1:])  # the same epoch on every rank
    for r in range(world):  # round-robin
        assert per_rank[r] == every[r::world][:len(per_rank[r])]
    single = MultiLabelPKSampler(y, 3, 2, seed=4)
    if drop_last:
        assert len(per_rank[0]) == single.batches_per_epoch // world
    else:
        assert len(per_rank[0]) == -(-single.batches_per_epoch // world)
        assert set(i for b in sum(per_rank, []) for i in b) == set(range(len(y)))
        assert len(every) == len(per_rank[0]) * world


@pytest.mark.parametrize("convert", [
    lambda y: y,
    lambda y: y.to(torch.uint8),
    lambda y: y.to(torch.float32),
    lambda y: y.to(torch.float64),
    lambda y: y.to(torch.int64),
    lambda y: y.int().tolist(),
    lambda y: y.tolist(),
], ids=["bool", "uint8", "float32", "float64", "int64", "list-of-int-lists", "list-of-bool-lists"])
def test_label_dtypes_give_the_same_batches(convert):
    y = _multi_hot(30, 5, 0.3, seed=8)
    want = MultiLabelPKSampler(y, 2, 3, seed=3).epoch_batches()
    assert MultiLabelPKSampler(convert(y), 2, 3, seed=3).epoch_batches() == want


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("p, k, world", [(3, 4, 1), (2, 3, 2), (4, 2, 3)])
def test_one_hot_rows_are_pksampler(seed, p, k, world):
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(6, (55,), generator=g) * 2  # classes 0, 2, ..., 10: odd columns stay empty
    classes[:6] = torch.arange(6) * 2
    y = torch.nn.functional.one_hot(classes, 12)
    for epoch in range(2):
        a = PKSampler(classes, p, k, seed=seed, num_replicas=world, rank=world - 1)
        b = MultiLabelPKSampler(y, p, k, seed=seed, num_replicas=world, rank=world - 1)
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert len(a) == len(b) and a.epoch_batches() == b.epoch_batches() and list(a) == list(b)


def test_dataloader_batch_sampler_and_export():
    assert ml.MultiLabelPKSampler is MultiLabelPKSampler and "MultiLabelPKSampler" in ml.__all__
    y = _multi_hot(24, 4, 0.3, seed=9)
    ds = TensorDataset(torch.arange(len(y)), y)
    sampler = ml.MultiLabelPKSampler(y, p=2, k=3)
    loader = DataLoader(ds, batch_sampler=sampler)
    got = [idx.tolist() for idx, _ in loader]
    assert got == list(sampler) and len(loader) == len(sampler)
    for _, rows in loader:
        share = (rows.float() @ rows.float().t()) > 0
        assert (share.sum(1) >= 2).all()  # itself and at least one positive


def test_defaults_outside_a_process_group_and_accelerator_free_input():
    s = MultiLabelPKSampler([[1, 0], [1, 0], [0, 1], [0, 1]], 2, 2)
    assert (s.num_replicas, s.rank, s.seed, s.drop_last, s.epoch) == (1, 0, 0, False, 0)
    assert "MultiLabelPKSampler(p=2, k=2, labels=2" in repr(s)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(labels=[0, 1, 1], p=1, k=1), ValueError, r"\(N, L\) multi-hot"),
    (dict(labels=torch.zeros(2, 2, 2), p=1, k=1), ValueError, r"\(N, L\) multi-hot"),
    (dict(labels=torch.zeros(0, 3), p=1, k=1), ValueError, "non-empty"),
    (dict(labels=torch.zeros(3, 0), p=1, k=1), ValueError, "non-empty"),
    (dict(labels=[[0, 2], [1, 0]], p=1, k=1), ValueError, "only 0 and 1"),
    (dict(labels=torch.tensor([[0.5, 1.0]]), p=1, k=1), ValueError, "only 0 and 1"),
    (dict(labels=torch.tensor([[float("nan"), 1.0]]), p=1, k=1), ValueError, "only 0 and 1"),
    (dict(labels=torch.ones(2, 2, dtype=torch.complex64), p=1, k=1), TypeError, "bool, float or integer"),
    (dict(labels=[["a", "b"]], p=1, k=1), TypeError, "multi-hot"),
    (dict(labels=[[1, 0], [0]], p=1, k=1), TypeError, "multi-hot"),
    (dict(labels=torch.zeros(4, 3), p=1, k=1), ValueError, "only 0 labels"),
    (dict(labels=torch.eye(3), p=4, k=1), ValueError, "`p`=4 labels per batch, but `labels` has only 3"),
    (dict(labels=torch.eye(3), p=0, k=1), ValueError, "`p`"),
    (dict(labels=torch.eye(3), p=1, k=0), ValueError, "`k` must be an int >= 1"),
    (dict(labels=torch.eye(3), p=1, k=2.0), TypeError, "`k`"),
    (dict(labels=torch.eye(3), p=1, k=1, num_replicas=2, rank=2), ValueError, "rank"),
    (dict(labels=torch.eye(3), p=1, k=1, num_replicas=2, rank=-1), ValueError, "rank"),
    (dict(labels=torch.eye(3), p=1, k=1, num_replicas=0), ValueError, "num_replicas"),
    (dict(labels=torch.eye(3), p=1, k=1, num_replicas=True), TypeError, "num_replicas"),
    (dict(labels=torch.eye(3), p=1, k=1, seed=None), TypeError, "seed"),
    (dict(labels=torch.eye(3), p=1, k=1, drop_last=1), TypeError, "drop_last"),
    (dict(labels=torch.eye(2), p=2, k=1, num_replicas=2, rank=0, drop_last=True), ValueError, "drop_last"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match) as info:
        MultiLabelPKSampler(**kwargs)
    assert str(info.value).startswith("MultiLabelPKSampler: ")
