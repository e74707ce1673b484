"""NormSoftmaxLoss, forward+backward: class-streamed vs unchunked vs the dense reference vs PML.

    pytest benchmarks/bench_cosine.py --benchmark-only --benchmark-group-by=group [--bench-memory]

B=1024, D=512, T=0.05, fp32, 2 threads, labels uniform over the classes; gradients w.r.t. the embeddings
and the (C, D) class weights. The cases of :func:`benchmarks.norm_softmax.case`:

* ``chunked``: ``ml.NormSoftmaxLoss(D, C, class_chunk=4_000_000 // B)`` (online logsumexp, no (B, C) tensor);
* ``dense``: the same module with ``class_chunk=None`` ((B, C) logits and ``F.cross_entropy``);
* ``reference``: :func:`metricloss.reference.norm_softmax_loss` on the same weight;
* ``pml``: ``NormalizedSoftmaxLoss(C, D, temperature=0.05)`` (the same loss); skipped without PML.

Time and peak memory at C=100000 and other class_chunk values: ``python benchmarks/norm_softmax.py``;
the grid over C: ``python benchmarks/report.py --only norm_softmax``.
"""

import importlib.util

import pytest

CASE = "benchmarks.norm_softmax:case"
BATCH, DIM = 1024, 512
CHUNK = 4_000_000 // BATCH
HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


@pytest.mark.parametrize("method", ["chunked", "dense", "reference", "pml"])
@pytest.mark.parametrize("c", [10000, 30000])
def test_norm_softmax_forward_backward(run_case, method, c):
    if method == "pml" and not HAVE_PML:
        pytest.skip("pytorch-metric-learning is not installed")
    params = {"method": method, "b": BATCH, "d": DIM, "c": c, "chunk": CHUNK if method == "chunked" else 0}
    run_case(CASE, params, group=f"norm_softmax B={BATCH} D={DIM} C={c}")
