"""Backend selection (*Design › Backends*): auto, the environment override, loud fallbacks, triton on CPU.

Triton is installed in the test environment; "Triton absent" is simulated by patching ``triton_available``.
"""

import warnings

import pytest
import torch

import metricloss.functional as MF
from metricloss import _backend
from metricloss._backend import resolve_backend

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("METRICLOSS_BACKEND", raising=False)
    assert resolve_backend("auto", CPU, "op", ("torch", "triton")) == "torch"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("METRICLOSS_BACKEND", "reference")
    assert resolve_backend("auto", CPU, "op", ("torch", "reference")) == "reference"
    # an explicit request is not overridden
    assert resolve_backend("torch", CPU, "op", ("torch", "reference")) == "torch"


def test_environment_value_is_validated(monkeypatch):
    monkeypatch.setenv("METRICLOSS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="METRICLOSS_BACKEND"):
        resolve_backend("auto", CPU, "op", ("torch",))


def test_requested_backend_without_kernel_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="falling back to the chunked torch backend"):
        assert resolve_backend("triton", CPU, "some_op", ("torch",)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("triton", CPU, "some_op", ("torch",)) == "torch"


@pytest.mark.parametrize("installed", [True, False], ids=["triton-installed", "triton-absent"])
def test_triton_on_cpu_without_interpreter_warns_once_and_falls_back(monkeypatch, installed):
    # one rule whatever is installed: the same warning-and-fallback with and without Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "triton_available", lambda: installed)
    reason = "not CUDA" if installed else "triton >= 3.0 is not installed"
    with pytest.warns(UserWarning, match=f"backend='triton' is not available .*{reason}"):
        assert resolve_backend("triton", CPU, "op", ("torch", "triton")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("triton", CPU, "op", ("torch", "triton")) == "torch"


def test_triton_on_cpu_under_interpreter_is_allowed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert resolve_backend("triton", CPU, "op", ("torch", "triton")) == "triton"


def test_triton_absent_under_interpreter_warns_and_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.warns(UserWarning, match=r"triton >= 3\.0 is not installed"):
        assert resolve_backend("triton", CPU, "op", ("torch", "triton")) == "torch"


@pytest.mark.parametrize("installed", [True, False], ids=["triton-installed", "triton-absent"])
def test_loss_with_triton_on_cpu_gives_the_torch_result_whatever_is_installed(monkeypatch, installed):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "triton_available", lambda: installed)
    x, y = torch.randn(12, 4), torch.arange(4).repeat(3)
    with pytest.warns(UserWarning, match="triplet_loss: backend='triton'"):
        got = MF.triplet_loss(x, y, mining="batch_hard", backend="triton")
    torch.testing.assert_close(got, MF.triplet_loss(x, y, mining="batch_hard", backend="torch"))
    centroids = torch.randn(4, 4)
    with pytest.warns(UserWarning, match="backend='triton'"):
        got = MF.centroid_triplet_loss(x, y, centroids, backend="triton")
    torch.testing.assert_close(got, MF.centroid_triplet_loss(x, y, centroids, backend="torch"))


def test_loss_with_triton_requested_falls_back_loudly(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    x, y = torch.randn(12, 4), torch.arange(4).repeat(3)
    with pytest.warns(UserWarning, match="triplet_loss: backend='triton'"):
        got = MF.triplet_loss(x, y, mining="batch_all", backend="triton")
    torch.testing.assert_close(got, MF.triplet_loss(x, y, mining="batch_all", backend="torch"))


def test_reference_backend_matches_torch_backend():
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.arange(5).repeat(4)
    for mining in ("batch_hard", "batch_all", "semi_hard"):
        a = MF.triplet_loss(x, y, mining=mining, backend="reference")
        b = MF.triplet_loss(x, y, mining=mining, backend="torch")
        torch.testing.assert_close(a, b)
    pa, na = MF.mine_batch_hard(x, y, backend="reference")
    pb, nb = MF.mine_batch_hard(x, y, backend="torch")
    assert torch.equal(pa, pb) and torch.equal(na, nb)


@pytest.mark.parametrize("version, ok", [("3.0.0", True), ("3.9.0", True), ("3.6.0+git1a2b3c", True),
                                         ("2.3.0", False), ("2.3.1+cu121", False), ("", False)])
def test_triton_older_than_3_counts_as_absent(monkeypatch, version, ok):
    # the kernels need tl.dot(..., input_precision=...), which Triton 2.x lacks (torch 2.3 ships Triton 2.3)
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert _backend.triton_available() is ok
