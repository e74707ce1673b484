"""No host synchronisation inside a chunk loop: the number of synchronising calls of one loss call
(forward+backward) must not grow with the number of chunks.

The counter (:func:`benchmarks.gpu_check.make_sync_counter`, a ``TorchFunctionMode``) counts the calls that
stall a GPU (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``nonzero``, boolean-mask
indexing, ``cpu``/``numpy``, …) on the CPU path, so the test needs no GPU. Each loss runs once with a tiny
budget (many chunks: small ``chunk_bytes`` / ``class_chunk``) and once with a large one (one chunk); the
counts must be equal. The workloads are the GPU check's (:func:`benchmarks.gpu_check.sync_workloads`).
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu_check import make_sync_counter, sync_workloads  # noqa: E402

# Losses allowed to synchronise once per chunk: none (a name here becomes a strict xfail).
PER_CHUNK_SYNC: dict = {}

WORKLOADS = dict(sync_workloads("cpu", tiny=True))


def _param(name):
    if name in PER_CHUNK_SYNC:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=PER_CHUNK_SYNC[name]), id=name)
    return pytest.param(name, id=name)


def count(fn, *args):
    with make_sync_counter() as counter:
        fn(*args)
    return counter


# The chunk loops are the torch path's (the one GPUs run); on CPU the native kernels replace some of them
# (the retrieval ranking has no chunk loop there), so each criterion runs on both paths.
NATIVE_SETTINGS = [pytest.param(None, id="native-default"), pytest.param("0", id="torch-path")]


@pytest.mark.parametrize("native", NATIVE_SETTINGS)
@pytest.mark.parametrize("name", [_param(n) for n in WORKLOADS])
def test_sync_count_does_not_grow_with_chunks(name, native, monkeypatch):
    if native is not None:
        monkeypatch.setenv("METRICLOSS_NATIVE", native)
    fn = WORKLOADS[name]
    tiny, large = count(fn, "tiny"), count(fn, "large")
    assert tiny.total == large.total, (f"{name}: {tiny.total} syncs with many chunks vs {large.total} with one; "
                                       f"sites: {dict(tiny.sites)}")


def test_workloads_cover_every_loss():
    expected = {"triplet batch_hard (torch)", "triplet batch_all", "triplet semi_hard", "WARP sampled", "WARP exact",
                "centroid (tensor, torch)", "centroid (onehot)", "NormSoftmax streamed", "DGCRL streamed",
                "retrieval_metrics"}
    assert set(WORKLOADS) == expected
    assert set(PER_CHUNK_SYNC) <= expected


class _CountCalls(TorchFunctionMode):
    """Counts every torch call (device-side work included): a proxy for the number of chunks."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_tiny_budget_really_makes_many_chunks(name, monkeypatch):
    """The criterion means something only if the tiny budget splits the work: the tiny-budget call makes
    several times more torch calls than the one-chunk call. On the torch path (``METRICLOSS_NATIVE=0``):
    its chunk loops are the ones a GPU runs, while the native CPU ranking of retrieval_metrics has none."""
    monkeypatch.setenv("METRICLOSS_NATIVE", "0")
    calls = {}
    for key in ("tiny", "large"):
        with _CountCalls() as mode:
            WORKLOADS[name](key)
        calls[key] = mode.calls
    assert calls["tiny"] > 2 * calls["large"], calls


# ----------------------------------------------------------------------------------------------------
# the counter itself
# ----------------------------------------------------------------------------------------------------

def _toy_loss(x, chunk, sync_in_loop):
    total = x.new_zeros(())
    for s in range(0, x.shape[0], chunk):
        part = x[s:s + chunk].square().sum()
        if sync_in_loop and part.item() > -1.0:  # a per-chunk host read
            total = total + part
        elif not sync_in_loop:
            total = total + part
    return float(total)  # one sync at the end


def test_counter_detects_a_per_chunk_item():
    x = torch.randn(64, 3)
    assert count(_toy_loss, x, 64, True).total == 2
    assert count(_toy_loss, x, 4, True).total == 17
    assert count(_toy_loss, x, 4, True).counts["item"] == 16
    assert count(_toy_loss, x, 4, False).total == count(_toy_loss, x, 64, False).total == 1


@pytest.mark.parametrize("expr, name", [
    (lambda t, m: t.tolist(), "tolist"),
    (lambda t, m: bool(t[0] > 0), "__bool__"),
    (lambda t, m: int(t[0]), "__int__"),
    (lambda t, m: float(t[0]), "__float__"),
    (lambda t, m: t.nonzero(), "nonzero"),
    (lambda t, m: torch.nonzero(t), "nonzero"),
    (lambda t, m: t.cpu(), "cpu"),
    (lambda t, m: t.numpy(), "numpy"),
    (lambda t, m: t[m], "__getitem__[mask]"),
    (lambda t, m: t.__setitem__(m, 0.0), "__setitem__[mask]"),
    (lambda t, m: torch.where(m), "where(cond)"),
    (lambda t, m: torch.repeat_interleave(t, m.long()), "repeat_interleave(tensor)"),
    (lambda t, m: torch.unique(t), "unique"),
    (lambda t, m: t.masked_select(m), "masked_select"),
    (lambda t, m: range(t.long()[0]), "__index__"),
])
def test_counter_counts_each_kind_of_sync(expr, name):
    t = torch.tensor([1.0, 2.0, 0.0])
    m = t > 0.5
    counter = count(expr, t, m)
    assert counter.counts[name] >= 1, dict(counter.counts)


def test_counter_ignores_device_side_work():
    t = torch.randn(8, 4)
    m = t > 0
    counter = count(lambda: (t @ t.T, torch.where(m, t, 0.0), t.masked_fill(m, 0.0), t.max(1), t[1:3],
                             t[torch.tensor([0, 2])], t.sum() > 0, t.to(torch.float64)))
    assert counter.total == 0, dict(counter.counts)
    assert counter.sites == {}


def test_counter_names_the_library_line():
    import metricloss.functional as MF

    x = torch.randn(32, 4)
    labels = torch.arange(32) % 4
    with make_sync_counter() as counter:
        MF.triplet_loss(x, labels, mining="batch_hard", backend="torch")
    assert counter.total >= 1
    assert all(site.split(" @ ")[1].startswith("metricloss/") for site in counter.sites), dict(counter.sites)
