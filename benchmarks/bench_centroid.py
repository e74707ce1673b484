"""pytest-benchmark suite for CentroidTripletLoss: metricloss vs a naive dense torch version.

    pytest benchmarks/bench_centroid.py --benchmark-only --benchmark-group-by=group [--bench-memory]

C=1000 classes (random unit centroids), D=128, fp32, 2 threads, forward+backward w.r.t. the embeddings,
the cases of :func:`benchmarks.centroid.case`:

* ``metricloss``: ``ml.CentroidTripletLoss(C, D, centroids=..., backend="torch")`` (class chunks, never
  (B, C));
* ``naive``: :func:`benchmarks.centroid.naive_centroid_loss`, the dense way one writes it by hand
  (``torch.cdist`` to all centroids, (B, C) masks). ``metricloss.reference.centroid_triplet_loss`` builds
  explicit (B, C, D) differences (2 GiB per tensor at B=4096), so it is the tests' ground truth, not a
  baseline here.

pytorch-metric-learning 2.9.0 has no centroid triplet loss, so there is no PML column. Scaling to
B=65536, memory at C=100000 and the K-means centroids: ``python benchmarks/centroid.py``.
"""

import pytest

CASE = "benchmarks.centroid:case"


@pytest.mark.parametrize("n", [1024, 4096, 16384])
@pytest.mark.parametrize("method", ["metricloss", "naive"])
def test_centroid_forward_backward(run_case, method, n):
    run_case(CASE, {"method": method, "n": n, "scheme": "random"}, group=f"centroid B={n} C=1000 D=128",
             rounds=5)
