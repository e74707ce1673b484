"""The fused batch-hard mining kernel under TRITON_INTERPRET=1, against the chunked torch engine.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the kernel runs on CPU
tensors. Inputs are tie-free in practice (continuous random data); where two candidates' keys are
within rounding of each other, the selection is accepted if the two distances agree (*Kernels › Testing Triton without a GPU*).
"""

import pytest
import torch

pytest.importorskip("triton")

import metricloss as ml  # noqa: E402
import metricloss.functional as MF  # noqa: E402
from metricloss import _backend, reference  # noqa: E402
from metricloss.kernels.mining import all_mining_configs, mine_batch_hard_triton, mining_config  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_selection(got, want, x, r, distance):
    """Indices equal, or selecting candidates at the same distance (a tie within rounding)."""
    assert torch.equal(got == -1, want == -1)
    diff = (got != want) & (want >= 0)
    if diff.any():
        rows = diff.nonzero().squeeze(1)
        dg = reference.pairwise_distance(x[rows].double(), r[got[rows]].double(), distance).diagonal()
        dw = reference.pairwise_distance(x[rows].double(), r[want[rows]].double(), distance).diagonal()
        torch.testing.assert_close(dg, dw, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (5, 9, 3), (70, 70, 1), (130, 45, 130), (33, 150, 700),
                                     (129, 129, 16)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_kernel_matches_torch_engine(dtype, distance, n, m, d, with_ref):
    g = torch.Generator().manual_seed(n * 1000 + m + d)
    x = torch.randn(n, d, generator=g).to(dtype)
    labels = torch.randint(0, max(2, n // 3), (n,), generator=g)
    ref, ref_labels = (torch.randn(m, d, generator=g).to(dtype), torch.randint(0, max(2, m // 3), (m,), generator=g)) \
        if with_ref else (None, None)
    got = MF.mine_batch_hard(x, labels, ref, ref_labels, distance=distance, backend="triton")
    # the torch engine on the very same (rounded) values
    want = MF.mine_batch_hard(x.float(), labels, None if ref is None else ref.float(), ref_labels, distance=distance,
                              backend="torch")
    xr = x.float() if ref is None else ref.float()
    for g_idx, w_idx in zip(got, want):
        assert_same_selection(g_idx, w_idx, x.float(), xr, distance)


@pytest.mark.parametrize("labels", [torch.zeros(40, dtype=torch.int64), torch.arange(40),
                                    torch.tensor([5] * 39 + [-3])], ids=["one_class", "no_positives", "lone"])
def test_kernel_sentinels(labels):
    x = torch.randn(40, 8)
    pos, neg = MF.mine_batch_hard(x, labels, backend="triton")
    want_pos, want_neg = MF.mine_batch_hard(x, labels, backend="torch")
    assert torch.equal(pos == -1, want_pos == -1) and torch.equal(neg == -1, want_neg == -1)
    assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)
    assert (pos != torch.arange(40)).all()  # never itself


def test_kernel_labels_are_compared_as_int64():
    # labels that differ only above 2^32 must stay different classes
    x = torch.randn(6, 4)
    labels = torch.tensor([1, 1 + 2**33, 1, 1 + 2**33, 7, 7])
    assert torch.equal(torch.stack(MF.mine_batch_hard(x, labels, backend="triton")),
                       torch.stack(MF.mine_batch_hard(x, labels, backend="torch")))


@pytest.mark.parametrize("mining_dtype", DTYPES)
def test_triplet_loss_with_triton_mining_equals_torch(mining_dtype):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(96, 24, generator=g).to(mining_dtype)
    y = torch.arange(24).repeat(4)
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    a = ml.BatchHardTripletLoss(backend="triton")(xa, y)
    b = ml.BatchHardTripletLoss(backend="torch")(xb, y)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_triton_on_cpu_without_interpreter_warns_and_falls_back(monkeypatch):
    from metricloss import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_warned", set())
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1"):
        got = MF.mine_batch_hard(x, y, backend="triton")
    want = MF.mine_batch_hard(x, y, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_auto_stays_on_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("METRICLOSS_BACKEND", raising=False)
    calls = []
    import metricloss.ops.mining as mining

    monkeypatch.setattr(mining, "batch_hard_indices_triton", lambda *a, **k: calls.append(1))
    MF.mine_batch_hard(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    assert not calls


def test_auto_picks_triton_for_cuda_tensors():
    assert _backend.resolve_backend("auto", torch.device("cuda"), "op", ("torch", "triton")) == "triton"


def test_driver_handles_fp64_and_noncontiguous_inputs():
    x = torch.randn(20, 10, dtype=torch.float64)[:, ::2]  # non-contiguous
    labels = torch.arange(5).repeat(4)
    pos, neg = mine_batch_hard_triton(x.float(), labels, x.float(), labels, self_ref=True, distance="euclidean")
    want = reference.mine_batch_hard(x, labels)
    assert torch.equal(pos, want[0]) and torch.equal(neg, want[1])


def test_heuristics_cover_every_regime():
    configs = all_mining_configs()
    assert {arch for arch, _, _ in configs} == {80, 90}
    for d in (1, 64, 700, 100000):
        for dtype in DTYPES:
            cfg = mining_config(d, dtype, 90)
            assert cfg.BLOCK_K >= 16 and cfg.BLOCK_K <= 64 and cfg.BLOCK_M >= 16 and cfg.BLOCK_N >= 16


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1024, 128), (777, 512), (300, 2000)])
def test_kernel_large_sweep(dtype, n, d):
    """Bigger shapes under the interpreter (seconds each): run with `pytest -m slow`."""
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g).to(dtype)
    labels = torch.randint(0, n // 4, (n,), generator=g)
    got = MF.mine_batch_hard(x, labels, backend="triton")
    want = MF.mine_batch_hard(x.float(), labels, backend="torch")
    for g_idx, w_idx in zip(got, want):
        assert_same_selection(g_idx, w_idx, x.float(), x.float(), "euclidean")
