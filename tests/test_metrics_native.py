"""The native rank histogram of retrieval_metrics (csrc/retrieval_rank.cpp): bitwise the torch paths'
histogram and metrics, equal to the full-sort reference; it serves every CPU tile; the build fallback and
the METRICLOSS_NATIVE switch."""

import math
import os
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metricloss import metrics as M
from metricloss.metrics import retrieval_metrics
from metricloss.ops import native

from .helpers import record_served
from .test_metrics_ranking import CHUNKS, PATHS, assert_same, ranking_path, reference, tile_bytes_of, tie_heavy


@pytest.fixture
def native_calls(monkeypatch):
    """Records, per similarity tile, whether the native rank histogram served it."""
    return record_served(monkeypatch, M, ("native_rank_histogram",))


# ---- the histogram itself: native vs both torch paths, on hand-made tiles ---------------------------------

@st.composite
def tiles(draw):
    """A tile with many exact ties (small integers, ±0.0), optional NaN cells, a relevant table with
    padding, lone rows (lowest +inf) and optionally an own column per row."""
    n = draw(st.integers(1, 12))
    g_size = draw(st.integers(max(n, 1), 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["integers", "signed_zeros", "random"]))
    if kind == "integers":
        tile = torch.randint(-3, 4, (n, g_size), generator=gen).float()
    elif kind == "signed_zeros":
        tile = torch.randint(0, 2, (n, g_size), generator=gen).float().mul_(-1.0)  # -0.0 and -1.0
        tile[torch.rand(n, g_size, generator=gen) < 0.5] = 0.0                      # and +0.0
    else:
        tile = torch.randn(n, g_size, generator=gen)
    if draw(st.booleans()):
        tile[torch.rand(n, g_size, generator=gen) < 0.1] = float("nan")
    width = draw(st.integers(1, min(6, g_size)))
    members = torch.stack([torch.randperm(g_size, generator=gen)[:width] for _ in range(n)])
    valid = torch.rand(n, width, generator=gen) < 0.7
    valid[torch.rand(n, generator=gen) < 0.2] = False                               # lone rows
    own_start = draw(st.sampled_from([None, 0, g_size - n]))
    return tile, members, valid, own_start


def _histograms(tile, members, valid, own_start, chunks=(1, None)):
    """(native, torch compact, torch every-item) histograms of one tile, with the keys of _rank_tile."""
    n, g_size = tile.shape
    index_bits = max(1, (g_size - 1).bit_length())
    rows = torch.arange(n)
    rel_values = tile.gather(1, members)
    lowest = torch.where(valid, rel_values, torch.full_like(rel_values, float("inf"))).amin(1, keepdim=True)
    rel = M._rank_keys(rel_values, rows.unsqueeze(1), members, index_bits, g_size)
    rel = torch.where(valid, rel, rows.unsqueeze(1).bitwise_left_shift(32 + index_bits).expand_as(rel))
    rel = torch.sort(rel, dim=1).values
    got = native.retrieval_rank_histogram(tile.clone(), rel, lowest, own_start, index_bits)
    ts = 0 if own_start is None else own_start
    compact, every = ([M._torch_rank_histogram(tile.clone(), ts, rel, lowest, own_start is not None, index_bits,
                                               is_compact, chunk).view(n, -1) for chunk in chunks]
                      for is_compact in (True, False))
    return got, compact, every


def _rank_bins(hist, valid):
    """The bins the ranks read: p > #padding slots of the row (the every-item path also counts, in lower
    bins, the items below the lowest relevant one, which the other paths skip; lone rows read none)."""
    width = valid.shape[1]
    p = torch.arange(width + 1)
    return torch.where(p > (width - valid.sum(1, keepdim=True)), hist, torch.zeros_like(hist))


@given(case=tiles())
def test_native_histogram_equals_torch_histograms(built, case):
    with mock.patch.dict(os.environ, {native.ENV_VAR: "1"}):
        got, compact, every = _histograms(*case)
    assert got is not None and got.dtype == torch.int64
    for want in compact:  # the same items counted: the whole histogram is equal
        assert torch.equal(got, want), (got, want)
    if torch.isnan(case[0]).any():
        return  # the every-item path ranks NaN cells (the compact and native paths skip them): differs by design
    valid = case[2]
    for want in every:
        assert torch.equal(_rank_bins(got, valid), _rank_bins(want, valid)), (got, want)


def test_signed_zeros_tie_and_break_by_index(built):
    # one row, gallery [+0.0, -0.0, -0.0, +0.0]; relevant: column 2 (a -0.0). Ranked by index among the
    # tied zeros: columns 0 and 1 are above it, column 3 below.
    tile = torch.tensor([[0.0, -0.0, -0.0, 0.0]])
    with mock.patch.dict(os.environ, {native.ENV_VAR: "1"}):
        got, compact, every = _histograms(tile, torch.tensor([[2]]), torch.tensor([[True]]), None)
    # columns 0 and 1 above the relevant key (position 1: rank 3); the key itself and column 3 at position 0
    assert got.tolist() == [[2, 2]]
    assert all(torch.equal(got, h) for h in compact + every)


# ---- the metrics: native == torch (bitwise) == reference, for every chunking ---------------------------------

@given(n=st.integers(1, 30), d=st.integers(1, 5), classes=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["random", "duplicates", "integers"]), gallery=st.integers(0, 20),
       metric=st.sampled_from(["cosine", "euclidean"]), chunk=st.sampled_from(CHUNKS),
       tile_bytes=st.sampled_from([1, 200, M.SIMILARITY_TILE_BYTES]), ks=st.sampled_from([(1, 2, 4, 8), (1,), (3, 50)]))
def test_native_metrics_equal_torch_paths_bitwise_and_the_reference(built, n, d, classes, seed, kind, gallery, metric,
                                                                    chunk, tile_bytes, ks):
    g = torch.Generator().manual_seed(seed)
    x = tie_heavy(g, n, d, kind)
    y = torch.randint(0, classes, (n,), generator=g)
    gal = gal_y = None
    if gallery:
        gal = torch.cat([tie_heavy(g, gallery, d, kind), x[: gallery // 2]])  # gallery rows that equal queries
        gal_y = torch.randint(0, classes, (gal.shape[0],), generator=g)
    results = {}
    with tile_bytes_of(tile_bytes):
        for path in PATHS:
            with ranking_path(path):
                results[path] = retrieval_metrics(x, y, ks, gallery=gal, gallery_labels=gal_y, metric=metric,
                                                  chunk_bytes=chunk)
        want = reference(x, y, ks, gal, gal_y, metric)
    for path in ("compact", "every"):
        assert results["native"].keys() == results[path].keys()
        assert all(results["native"][k] == results[path][k] or (math.isnan(results["native"][k])
                                                                and math.isnan(results[path][k]))
                   for k in results[path]), (results["native"], results[path])
    assert_same(results["native"], want)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("setup", ["leave_one_out", "gallery", "duplicate_gallery"])
def test_native_serves_every_cpu_tile_by_default(built, monkeypatch, native_calls, metric, setup):
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 8, (120,), generator=g)
    kwargs = {}
    if setup != "leave_one_out":
        bank = torch.randn(90, 6, generator=g)
        if setup == "duplicate_gallery":
            bank[45:] = bank[:45]  # deduplicated before the GEMM, expanded back per tile
        kwargs = {"gallery": bank, "gallery_labels": torch.randint(0, 8, (90,), generator=g)}
    with tile_bytes_of(4 * 200 * 16):  # several tiles
        got = retrieval_metrics(x, y, metric=metric, **kwargs)
        assert len(native_calls) > 1 and all(native_calls)
        monkeypatch.setenv(native.ENV_VAR, "0")
        want = retrieval_metrics(x, y, metric=metric, **kwargs)
    assert got == want


def test_native_declines_other_tiles(built, monkeypatch):
    """Only contiguous float32 CPU tiles are native (the metrics always rank fp32)."""
    monkeypatch.setenv(native.ENV_VAR, "1")
    rel, lowest = torch.arange(2).bitwise_left_shift(34).unsqueeze(1), torch.full((2, 1), float("inf"))  # lone rows
    assert native.retrieval_rank_histogram(torch.zeros(2, 3, dtype=torch.float64), rel, lowest, None, 2) is None
    assert native.retrieval_rank_histogram(torch.zeros(3, 2).T, rel, lowest, None, 2) is None
    assert native.retrieval_rank_histogram(torch.zeros(2, 3), rel, lowest, None, 2).shape == (2, 2)


def test_native_op_refuses_bad_operands(built):
    op = torch.ops.metricloss_native.retrieval_rank_histogram
    tile, rel, lowest = torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2)
    with pytest.raises(RuntimeError, match="own columns out of range"):
        op(tile, rel, lowest, 2, 2)
    with pytest.raises(RuntimeError, match="rel must be"):
        op(tile, rel.int(), lowest, -1, 2)
    with pytest.raises(RuntimeError, match="do not fit in int64"):
        op(tile, rel, lowest, -1, 1)  # G − 1 = 2 needs 2 index bits
    real = M._rank_keys(torch.tensor([[0.5]]), torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
                        2, 3)
    with pytest.raises(RuntimeError, match="lowest must be the lowest relevant similarity"):
        op(torch.zeros(1, 3), real, torch.tensor([0.75]), -1, 2)  # a relevant key below `lowest`


@pytest.mark.parametrize("kind", ["random", "integers", "signed_zeros", "clustered", "sparse", "switching"])
@pytest.mark.parametrize("g_size", [5_000, 70_000])
def test_native_histogram_on_wide_tiles(built, monkeypatch, kind, g_size):
    """Galleries wide enough for many buckets per row (up to the 16384 of the heuristic) and many column
    chunks, with ties, ±0.0, many relevant keys in one bucket (clustered), few or many items above the
    lowest relevant one, or both in turn (the two counting loops), and an own column."""
    monkeypatch.setenv(native.ENV_VAR, "1")
    gen = torch.Generator().manual_seed(g_size)
    n = 6
    tile = torch.randn(n, g_size, generator=gen)
    if kind == "integers":
        tile = tile.mul_(3).round_()
    elif kind == "signed_zeros":
        tile = torch.where(tile > 0, torch.zeros_like(tile), torch.full_like(tile, -0.0))
    elif kind == "clustered":
        tile[:, : g_size // 2] = 0.25 + torch.randint(0, 3, (n, g_size // 2), generator=gen) * 1e-7
    width = 40
    members = torch.stack([torch.randperm(g_size, generator=gen)[:width] for _ in range(n)])
    if kind == "switching":  # with the boost below: dense candidates in some column ranges, none in others
        tile[:, (torch.arange(g_size) // 3000) % 2 == 1] -= 4.0
    if kind in ("sparse", "switching"):  # relevant items far above the rest: few candidates (the branchy count)
        tile.scatter_add_(1, members, torch.full(members.shape, 6.0))
    valid = torch.ones(n, width, dtype=torch.bool)
    valid[0, ::2] = False       # padding in one row
    valid[1] = False            # a lone row
    got, compact, every = _histograms(tile, members, valid, 17, chunks=(None,))
    assert all(torch.equal(got, want) for want in compact)
    assert all(torch.equal(_rank_bins(got, valid), _rank_bins(want, valid)) for want in every)


# ---- the fallback and the switch ------------------------------------------------------------------------

def _case():
    g = torch.Generator().manual_seed(2)
    return torch.randn(80, 5, generator=g), torch.randint(0, 6, (80,), generator=g)


def test_switch_zero_runs_torch_and_never_builds(monkeypatch, fresh_state, native_calls):
    def no_build(key):
        raise AssertionError("METRICLOSS_NATIVE=0 must not build")

    monkeypatch.setattr(native, "_build", no_build)
    monkeypatch.setenv(native.ENV_VAR, "0")
    x, y = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = retrieval_metrics(x, y, chunk_bytes=2000)
    assert native_calls and not any(native_calls)
    assert not any(st["loaded"] or st["error"] is not None for st in fresh_state.values())
    assert_same(got, reference(x, y))


def test_failed_build_warns_once_naming_the_cause_and_runs_torch(monkeypatch, fresh_state, native_calls):
    def failing_build(key):
        raise native.NativeBuildError("building the native extension failed: simulated: no C++ compiler")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    x, y = _case()
    with tile_bytes_of(4 * 80 * 16):  # 5 tiles: still one warning
        with pytest.warns(UserWarning, match="simulated: no C.. compiler") as record:
            got = retrieval_metrics(x, y)
        assert len([w for w in record if "native" in str(w.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            again = retrieval_metrics(x, y)
        assert native_calls and not any(native_calls)
        monkeypatch.setenv(native.ENV_VAR, "0")
        want = retrieval_metrics(x, y)
    assert got == again == want


def test_failed_build_with_switch_one_raises(monkeypatch, fresh_state):
    def failing_build(key):
        raise native.NativeBuildError("ninja is not installed (pip install ninja)")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.setenv(native.ENV_VAR, "1")
    x, y = _case()
    with pytest.raises(native.NativeBuildError, match="METRICLOSS_NATIVE=1 but ninja is not installed"):
        retrieval_metrics(x, y)


def test_metrics_build_only_the_retrieval_extension(monkeypatch, fresh_state):
    """A script that only evaluates compiles retrieval_rank.cpp, never the triplet kernels."""
    asked = []

    def recording_build(key):
        asked.append(key)
        raise native.NativeBuildError("simulated")

    monkeypatch.setattr(native, "_build", recording_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    x, y = _case()
    with pytest.warns(UserWarning, match="simulated"):
        retrieval_metrics(x, y)
    assert asked == ["retrieval"]
    assert native.EXTENSIONS["retrieval"].sources == ("retrieval_rank.cpp",)
