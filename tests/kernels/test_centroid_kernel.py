"""The fused centroid-bound kernels under TRITON_INTERPRET=1, against the chunked torch path."""

import pytest
import torch

pytest.importorskip("triton")

import metricloss as ml  # noqa: E402
import metricloss.functional as MF  # noqa: E402
from metricloss.kernels.centroid import all_centroid_configs, centroid_config, centroid_sums_triton  # noqa: E402
from metricloss.ops.distance import paired_distance  # noqa: E402


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("b, c, d", [(1, 2, 1), (5, 3, 3), (70, 130, 65), (33, 40, 130), (9, 17, 700), (64, 64, 16)])
def test_loss_and_gradient_match_torch(b, c, d, reduction):
    g = torch.Generator().manual_seed(b * 100 + c + d)
    x0 = torch.randn(b, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    a = MF.centroid_triplet_loss(xa, y, centroids, reduction=reduction, backend="triton")
    b_ = MF.centroid_triplet_loss(xb, y, centroids, reduction=reduction, backend="torch")
    torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    a.sum().backward()
    b_.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_rows_on_or_near_centroids():
    g = torch.Generator().manual_seed(1)
    centroids = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    x0 = torch.randn(8, 8, generator=g)
    x0[0] = centroids[0]                 # on its own centroid: own term 0, subgradient 0
    x0[1] = centroids[3] + 1e-4          # near another class's centroid: the torch path redoes the row
    x0[2] = centroids[4]                 # exactly on another class's centroid
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    a = MF.centroid_triplet_loss(xa, y, centroids, reduction="none", backend="triton")
    b = MF.centroid_triplet_loss(xb, y, centroids, reduction="none", backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    _, _, near, _, _ = centroid_sums_triton(x0, y, centroids, False)
    assert near[1] > 0 and near[2] > 0 and near[3:].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_driver_sums_in_each_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 24, generator=g).to(dtype)
    y = torch.randint(0, 10, (40,), generator=g)
    c = torch.nn.functional.normalize(torch.randn(10, 24, generator=g), dim=1).to(dtype)
    own, sums, near, s, v = centroid_sums_triton(x, y, c, True)
    x32, c32 = x.float(), c.float()
    d = torch.cdist(x32.double(), c32.double())
    other = torch.ones_like(d, dtype=torch.bool)
    other[torch.arange(40), y] = False
    torch.testing.assert_close(own.double(), paired_distance(x32, c32[y], "euclidean").double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), (d * other).sum(1), rtol=1e-4, atol=1e-4)
    w = torch.where(other, 1.0 / d, torch.zeros_like(d))
    torch.testing.assert_close(s.double(), w.sum(1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.double(), w @ c32.double(), rtol=1e-4, atol=1e-4)
    assert near.eq(0).all()


def test_module_dispatch_and_fallbacks():
    x = torch.randn(12, 16, requires_grad=True)
    y = torch.randint(0, 5, (12,))
    loss = ml.CentroidTripletLoss(5, 16, centroids="kmeans", backend="triton")
    torch.testing.assert_close(loss(x, y), ml.CentroidTripletLoss(5, 16, centroids="kmeans", backend="torch")(x, y))
    # one-hot centroids have no GEMM: "triton" warns once and runs the torch path
    from metricloss import _backend

    _backend._warned.clear()
    with pytest.warns(UserWarning, match="no Triton kernel"):
        ml.CentroidTripletLoss(5, 16, backend="triton")(x, y)
    # fp64 rows run on torch (the kernels accumulate in fp32), with the same result as the torch backend
    x64 = x.detach().double()
    torch.testing.assert_close(MF.centroid_triplet_loss(x64, y, loss.centroids.double(), backend="triton"),
                               MF.centroid_triplet_loss(x64, y, loss.centroids.double(), backend="torch"))


def test_heuristics_cover_both_arches():
    configs = all_centroid_configs()
    assert {a for a, _, _ in configs} == {80, 90}
    assert centroid_config(700, torch.float32, 80).BLOCK_K == 16
