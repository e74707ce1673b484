"""The centroid op's building blocks: centroid construction (one-hot, seeded K-means) and the tiling."""

import pytest
import torch

from metricloss import reference
from metricloss.ops import centroid as C


def _pairwise_ratio(c: torch.Tensor) -> float:
    d = torch.cdist(c.double(), c.double())
    off = ~torch.eye(c.shape[0], dtype=torch.bool)
    return (d[off].max() / d[off].min()).item()


def test_onehot_centroids():
    c = C.onehot_centroids(3, 5)
    assert torch.equal(c, torch.eye(3, 5)) and c.dtype == torch.float32
    with pytest.raises(ValueError, match="centroids='kmeans'"):
        C.onehot_centroids(6, 5)


def test_kmeans_centroids_are_seeded_unit_vectors():
    a = C.kmeans_sphere_centroids(30, 16, seed=1)
    assert a.shape == (30, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(30))
    assert torch.equal(a, C.kmeans_sphere_centroids(30, 16, seed=1))
    assert not torch.equal(a, C.kmeans_sphere_centroids(30, 16, seed=2))
    assert torch.unique(a, dim=0).shape[0] == 30


def test_kmeans_chunked_assignment_equals_one_chunk():
    whole = C.kmeans_sphere_centroids(25, 8, seed=3)
    chunked = C.kmeans_sphere_centroids(25, 8, seed=3, chunk_bytes=25 * 8 * 130)  # 4 row chunks
    assert torch.equal(whole, chunked)


def test_kmeans_centroids_are_spread_out():
    # Near-equidistant for D >= C: pairwise distances within a modest ratio, all close to √2.
    c = C.kmeans_sphere_centroids(20, 64, seed=0)
    assert _pairwise_ratio(c) < 1.5
    d = torch.cdist(c, c)[~torch.eye(20, dtype=torch.bool)]
    assert (d - 2 ** 0.5).abs().max() < 0.35


def test_kmeans_fills_empty_clusters():
    # On the 1-D "sphere" {−1, +1} at most two clusters are non-empty after an assignment: the others are
    # refilled from points, so every centroid is still a unit vector.
    c = C.kmeans_sphere_centroids(5, 1, seed=0)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c.abs(), torch.ones(5, 1))


def test_build_centroids_dispatches():
    t = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    built = C.build_centroids(t, 4, 6)
    assert torch.equal(built, t.detach()) and not built.requires_grad and built.data_ptr() != t.data_ptr()
    assert torch.equal(C.build_centroids("onehot", 4, 6), torch.eye(4, 6))
    assert torch.equal(C.build_centroids("kmeans", 4, 6, seed=9), C.kmeans_sphere_centroids(4, 6, seed=9))
    with pytest.raises(ValueError, match="unknown centroid scheme"):
        C.build_centroids("random", 4, 6)


@pytest.mark.parametrize("onehot", [False, True])
@pytest.mark.parametrize("chunk_bytes", [64, 5000, None])
def test_tiles_stay_within_the_budget_and_cover_every_class(onehot, chunk_bytes):
    # Never a (B, C) block: every tile and its per-row temporaries fit the budget (a single row is the
    # floor); together the tiles cover the (B, C) grid once, and the own class is 0 in its tile.
    b, num, d = 9, 120 if not onehot else 40, 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, num, (b,), generator=g)
    centroids = None if onehot else torch.randn(num, d, generator=g, dtype=torch.float64)
    dense = reference.pairwise_distance(x, torch.eye(num, d, dtype=torch.float64) if onehot else centroids)
    dense[torch.arange(b), y] = 0
    covered = torch.zeros(b, num, dtype=torch.int64)
    budget = min(chunk_bytes or C.TILE_BYTES, C.TILE_BYTES)
    per_elem, per_row = x.element_size() + 1, (3 * d + 2) * x.element_size()
    rows, classes = C._tile_shape(b, num, d, x.element_size(), chunk_bytes)
    for r0 in range(0, b, rows):
        r1 = min(r0 + rows, b)
        for tile, block in C._other_class_tiles(x[r0:r1], y[r0:r1], centroids, num, classes):
            assert block.numel() * per_elem <= budget
            assert block.numel() * per_elem + (r1 - r0) * per_row <= budget or r1 - r0 == 1
            torch.testing.assert_close(block, dense[r0:r1, tile.c0:tile.c1], rtol=1e-12, atol=1e-12)
            covered[r0:r1, tile.c0:tile.c1] += 1
    assert (covered == 1).all()
    if chunk_bytes == 64:
        assert rows < b and classes < num  # both loops run


def test_large_class_count_with_small_budget_matches_one_tile():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3000, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3000, (64,), generator=g)
    small = C.centroid_triplet_loss_op(x, y, c, 3000, "sum", chunk_bytes=40000)
    (g_small,) = torch.autograd.grad(small, x)
    whole = C.centroid_triplet_loss_op(x, y, c, 3000, "sum", chunk_bytes=None)
    (g_whole,) = torch.autograd.grad(whole, x)
    torch.testing.assert_close(small, whole, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_small, g_whole, rtol=1e-10, atol=1e-12)


def test_distance_sum_is_not_twice_differentiable():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 4, dtype=torch.float64)
    out = C.centroid_triplet_loss_op(x, torch.tensor([0, 1, 2, 0, 1]), c, 3, "sum", None)
    # create_graph itself is allowed (torch.func.grad needs it); differentiating the gradient raises
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(RuntimeError, match="centroid_triplet_loss is not twice differentiable"):
        torch.autograd.grad(g.square().sum(), x)


def test_rows_with_more_near_centroids_than_the_sync_free_slots_are_redone_exactly():
    # A row sitting among more than NEAR_PAIRS_PER_CHUNK other-class centroids, all within its refinement
    # radius: the sync-free pass flags it and the driver redoes it with every pair exact (loss, ∂x and ∂c).
    g = torch.Generator().manual_seed(5)
    d, num = 6, 12
    point = torch.randn(d, generator=g, dtype=torch.float64) * 3
    c = torch.randn(num, d, generator=g, dtype=torch.float64)
    c[1:9] = point + 1e-3 * torch.randn(8, d, generator=g, dtype=torch.float64)  # 8 near centroids
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    x[2] = point
    y = torch.tensor([0, 1, 0, 3, 9, 10, 11])
    assert C.NEAR_PAIRS_PER_CHUNK < 8
    _, _, exact_rows = C._rows_torch(x, c, y, num, None, False)
    assert exact_rows is not None and exact_rows.tolist() == [2]
    for chunk_bytes in (None, 200):
        xa, ca = x.clone().requires_grad_(), c.clone().requires_grad_()
        xb, cb = x.clone().requires_grad_(), c.clone().requires_grad_()
        got = C.centroid_triplet_loss_op(xa, y, ca, num, "none", chunk_bytes)
        want = reference.centroid_triplet_loss(xb, y, cb, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        weights = torch.rand(7, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((got * weights).sum(), (xa, ca))
        gb = torch.autograd.grad((want * weights).sum(), (xb, cb))
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
