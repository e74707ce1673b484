"""The chunked ranking of retrieval_metrics against the full-sort reference, its chunking invariance, and
the label-dtype, non-finite and ``ks`` rules."""

import contextlib
import math
import os
import shutil
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss.reference as R
from metricloss import metrics as M
from metricloss.metrics import retrieval_metrics

CHUNKS = [1, 64, 700, 5_000, 100_000, None]  # 1 row per chunk … every row in one chunk
# how a tile is ranked on CPU: the native kernel, the torch candidate list, torch over every item (the
# device path)
PATHS = ["native", "compact", "every"]


@contextlib.contextmanager
def tile_bytes_of(tile_bytes):
    """Similarity tiles of about ``tile_bytes`` (no minimum row count): many tiles on small data."""
    with mock.patch.object(M, "SIMILARITY_TILE_BYTES", tile_bytes), mock.patch.object(M, "SIMILARITY_TILE_MIN_ROWS", 1):
        yield


@contextlib.contextmanager
def ranking_path(path):
    """Rank with ``path`` (METRICLOSS_NATIVE=1, or =0 with the compact heuristic on or off)."""
    if path == "native" and shutil.which("c++") is None and not os.environ.get("CI"):
        pytest.skip("no C++ compiler: the native path cannot be built here")  # CI must build it
    with mock.patch.dict(os.environ, {"METRICLOSS_NATIVE": "1" if path == "native" else "0"}), \
            mock.patch.object(M, "compact_candidates", lambda device: path != "every"):
        yield


def dense_similarity(x, y, gallery=None, gallery_labels=None, metric="cosine"):
    """The chunked path's own similarities, tile by tile, as one (Q, G) matrix."""
    problem, _, _ = M._prepare(x, y, (1,), gallery, gallery_labels, metric, None, "test")
    return torch.cat([problem.similarity(s, e) for s, e in problem.tiles()])


def reference(x, y, ks=(1, 2, 4, 8), gallery=None, gallery_labels=None, metric="cosine"):
    return R.retrieval_metrics(x, y, ks, gallery=gallery, gallery_labels=gallery_labels, metric=metric,
                               similarity=dense_similarity(x, y, gallery, gallery_labels, metric))


def assert_same(got, want, tol=1e-12):
    assert got.keys() == want.keys()
    for k in want:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), (k, got[k])
        else:
            assert abs(got[k] - want[k]) <= tol, (k, got[k], want[k])


def tie_heavy(g, n, d, kind):
    """Random rows; or duplicated rows (exact ties for both metrics); or small integer coordinates."""
    x = torch.randn(n, d, generator=g)
    if kind == "duplicates":
        src = torch.randint(0, max(1, n // 3), (n,), generator=g)
        x = x[src].clone()
    elif kind == "integers":
        x = torch.randint(-2, 3, (n, d), generator=g).float()
    return x


@given(n=st.integers(1, 30), d=st.integers(1, 5), classes=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["random", "duplicates", "integers"]), gallery=st.integers(0, 20),
       metric=st.sampled_from(["cosine", "euclidean"]), chunk=st.sampled_from(CHUNKS),
       path=st.sampled_from(PATHS), tile_bytes=st.sampled_from([1, 200, M.SIMILARITY_TILE_BYTES]),
       ks=st.sampled_from([(1, 2, 4, 8), (1,), (3, 50)]))
def test_chunked_ranking_equals_full_sort(n, d, classes, seed, kind, gallery, metric, chunk, path, tile_bytes, ks):
    g = torch.Generator().manual_seed(seed)
    x = tie_heavy(g, n, d, kind)
    y = torch.randint(0, classes, (n,), generator=g)
    gal = gal_y = None
    if gallery:
        gal = torch.cat([tie_heavy(g, gallery, d, kind), x[: gallery // 2]])  # gallery rows that equal queries
        gal_y = torch.randint(0, classes, (gal.shape[0],), generator=g)
    with tile_bytes_of(tile_bytes), ranking_path(path):
        got = retrieval_metrics(x, y, ks, gallery=gal, gallery_labels=gal_y, metric=metric, chunk_bytes=chunk)
        want = reference(x, y, ks, gal, gal_y, metric)
    assert_same(got, want)


def test_lone_queries_only_and_single_query():
    x = torch.randn(5, 3)
    for path in PATHS:
        with ranking_path(path):
            assert all(math.isnan(v) for v in retrieval_metrics(x, torch.arange(5)).values())
            one = retrieval_metrics(x[:1], torch.tensor([2]), gallery=x, gallery_labels=torch.tensor([0, 2, 2, 1, 2]))
            assert_same(one, reference(x[:1], torch.tensor([2]), gallery=x, gallery_labels=torch.tensor([0, 2, 2, 1, 2])))
    single = retrieval_metrics(torch.randn(1, 4), torch.tensor([0]))  # one query, its own gallery: lone
    assert all(math.isnan(v) for v in single.values())


def test_reference_full_sort_by_hand():
    # 1-D Euclidean, gallery order 0.1 (rel), 0.2, 0.3 (rel): AP = (1 + 2/3) / 2; ties by index
    got = R.retrieval_metrics(torch.tensor([[0.0]]), torch.tensor([1]), (1, 2), gallery=torch.tensor([[0.1], [0.2], [0.3]]),
                              gallery_labels=torch.tensor([1, 0, 1]), metric="euclidean")
    assert got == pytest.approx({"R@1": 1.0, "R@2": 1.0, "mAP": (1 + 2 / 3) / 2, "MAP@R": 0.5, "R-precision": 0.5})
    tie = R.retrieval_metrics(torch.tensor([[0.0]]), torch.tensor([1]), 1, gallery=torch.ones(2, 1),
                              gallery_labels=torch.tensor([0, 1]), metric="euclidean")
    assert tie["R@1"] == 0.0 and tie["mAP"] == 0.5


# ---- issue 12.10: the results do not depend on chunk_bytes ----------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("with_gallery", [False, True])
def test_results_bitwise_identical_for_every_chunk_budget(metric, with_gallery):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 48, generator=g)                       # fp32: a GEMM of another shape may round
    y = torch.randint(0, 20, (200,), generator=g)
    gal, gal_y = (torch.randn(300, 48, generator=g), torch.randint(0, 20, (300,), generator=g)) if with_gallery \
        else (None, None)
    results = []
    for tile in (M.SIMILARITY_TILE_BYTES, 16 << 10):  # one tile, and 14-20 tiles of 13-20 rows
        with tile_bytes_of(tile):
            per_tile = [retrieval_metrics(x, y, gallery=gal, gallery_labels=gal_y, metric=metric, chunk_bytes=c)
                        for c in (1, 20_000, None)]
        assert all(r == per_tile[0] for r in per_tile), per_tile   # bitwise: == on the Python floats
        results.append(per_tile[0])
    # tiles of another shape may round a few similarities differently: close, not necessarily identical
    assert_same(results[1], results[0], tol=1e-3)


def test_similarity_gemm_shapes_do_not_depend_on_chunk_bytes():
    calls = []
    real = M._Problem.similarity

    def spy(self, s, e, out=None):
        calls[-1].append((s, e))
        return real(self, s, e, out)

    x, y = torch.randn(300, 8), torch.randint(0, 10, (300,))
    with tile_bytes_of(4 * 300 * 64), mock.patch.object(M._Problem, "similarity", spy):
        for chunk in (1, 5_000, None):
            calls.append([])
            retrieval_metrics(x, y, chunk_bytes=chunk)
    assert calls[0] == calls[1] == calls[2] == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]


def test_similarity_tile_rows_heuristic():
    """128 MiB of fp32 rows, but at least 128 rows within 512 MiB (a thin GEMM streams the gallery per row
    block), at most Q."""
    assert M.similarity_tile_rows(50_000, 50_000) == (128 << 20) // (4 * 50_000)      # 671 rows, 128 MiB
    assert M.similarity_tile_rows(10**6, 10**6) == 128                                 # 512 MiB
    assert M.similarity_tile_rows(10**6, 2 * 10**6) == (512 << 20) // (4 * 2 * 10**6)  # 67 rows, 512 MiB
    assert M.similarity_tile_rows(10, 10**6) == 10 and M.similarity_tile_rows(5, 0) == 5
    assert M.similarity_tile_rows(10**6, 10**9) == 1


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_similarity_into_a_reused_buffer_is_bitwise_the_same(metric, duplicates):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 33, generator=g)
    if duplicates:
        x[35:] = x[:35]
    problem, _, _ = M._prepare(x, torch.zeros(70, dtype=torch.int64), (1,), None, None, metric, None, "test")
    assert problem.expand == duplicates
    buffer = torch.full((30, 70), float("nan"))
    for s, e in [(0, 30), (30, 60), (60, 70)]:
        got = problem.similarity(s, e, out=buffer[:e - s])
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, problem.similarity(s, e))


def test_host_reads_do_not_grow_with_the_number_of_chunks():
    counts = []
    names = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            counts[-1] += 1
            return originals[name](self, *args, **kwargs)
        return wrapper

    x, y = torch.randn(200, 8), torch.randint(0, 10, (200,))
    patches = [mock.patch.object(torch.Tensor, name, counting(name)) for name in names]
    for p in patches:
        p.start()
    try:
        for chunk in (1, None):  # 200 chunks, then 1
            counts.append(0)
            retrieval_metrics(x, y, chunk_bytes=chunk)
    finally:
        for p in patches:
            p.stop()
    assert counts[0] == counts[1] <= 3, counts  # duplicate check, largest class, results


# ---- issue 18.1: mixed label dtypes compare in a wide dtype -------------------------------------------------

def test_mixed_label_dtypes_do_not_merge_classes():
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tensor([256, 256, 7, 7])
    wide = retrieval_metrics(x, y, gallery=bank, gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7]))
    narrow = retrieval_metrics(x, y, gallery=bank, gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7], dtype=torch.uint8))
    assert_same(narrow, wide)
    # 256 would become uint8 0 under a narrowing cast: queries 0 and 1 would then count (3 relevant each)
    y_big = torch.tensor([2**32 + 7, 2**32 + 7, 7, 7])
    big = retrieval_metrics(x, y_big, gallery=bank, gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7], dtype=torch.int32))
    assert_same(big, retrieval_metrics(x[2:], y_big[2:], gallery=bank,
                                       gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7])))
    # int8 queries against an int64 gallery, and the reverse
    small = retrieval_metrics(x, torch.tensor([0, 0, 7, 7], dtype=torch.int8), gallery=bank,
                              gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7]))
    assert_same(small, retrieval_metrics(x, torch.tensor([0, 0, 7, 7]), gallery=bank,
                                         gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7], dtype=torch.int8)))


def test_uint64_labels():
    x, bank = torch.randn(4, 3), torch.randn(6, 3)
    y64 = torch.tensor([2**63 + 5, 2**63 + 5, 7, 7], dtype=torch.uint64)
    got = retrieval_metrics(x, y64, gallery=bank,
                            gallery_labels=torch.tensor([2**63 + 5, 0, 0, 7, 7, 7], dtype=torch.uint64))
    want = retrieval_metrics(x, torch.tensor([1, 1, 7, 7]), gallery=bank, gallery_labels=torch.tensor([1, 0, 0, 7, 7, 7]))
    assert_same(got, want)
    assert_same(retrieval_metrics(x, torch.tensor([5, 5, 7, 7], dtype=torch.uint64), gallery=bank,
                                  gallery_labels=torch.tensor([5, 0, 0, 7, 7, 7], dtype=torch.uint8)), want)
    with pytest.raises(TypeError, match="`labels`.*`gallery_labels`"):
        retrieval_metrics(x, y64, gallery=bank, gallery_labels=torch.tensor([0, 0, 0, 7, 7, 7]))


# ---- issue 18.3: NaN or Inf embeddings give NaN, never plausible numbers -------------------------------------

@pytest.mark.parametrize("where, value", [("all", float("nan")), ("one_row", float("nan")), ("one_row", float("inf")),
                                          ("gallery", float("nan")), ("gallery", float("-inf"))])
def test_non_finite_embeddings_give_nan(where, value):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    gal, gal_y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    if where == "all":
        x.fill_(value)
    elif where == "one_row":
        x[3, 1] = value
    else:
        gal[5, 0] = value
    kwargs = {"gallery": gal, "gallery_labels": gal_y} if where == "gallery" else {}
    for path in PATHS:
        with ranking_path(path):
            got = retrieval_metrics(x, y, **kwargs)
        assert all(math.isnan(v) for v in got.values()), got
    assert all(math.isnan(v) for v in R.retrieval_metrics(x, y, **kwargs).values())


# ---- issue 18.10: ks as an int -----------------------------------------------------------------------------

def test_ks_int_means_one_k():
    x, y = torch.randn(20, 4), torch.randint(0, 4, (20,))
    assert retrieval_metrics(x, y, ks=1) == retrieval_metrics(x, y, ks=(1,))
    assert set(retrieval_metrics(x, y, ks=3)) == {"R@3", "mAP", "MAP@R", "R-precision"}


@pytest.mark.parametrize("ks, exc", [("1", TypeError), (1.5, TypeError), (True, TypeError), ((1, 0), ValueError),
                                     (torch.tensor([1]), TypeError), ((2.0,), TypeError)])
def test_bad_ks_names_the_argument(ks, exc):
    with pytest.raises(exc, match="`ks`"):
        retrieval_metrics(torch.randn(4, 2), torch.arange(4), ks=ks)
