"""No silent zero: a batch without a single valid triplet warns once per process, names the cause and the
fix, can be silenced, and still gives a zero loss with a zero gradient."""

import warnings

import pytest
import torch

import metricloss as ml
import metricloss.functional as MF
from metricloss import _warn

MININGS = ["batch_hard", "batch_all", "semi_hard"]


@pytest.fixture(autouse=True)
def fresh_process_state():
    _warn._reset_for_tests()
    yield
    _warn._reset_for_tests()


def _record(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in caught if issubclass(w.category, ml.NoValidTripletWarning)]


@pytest.mark.parametrize("native", ["0", None])
@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("case", ["distinct", "single_class"])
def test_warns_once_names_cause_and_fix_and_the_loss_is_a_zero(mining, case, native, monkeypatch):
    if native is not None:
        monkeypatch.setenv("METRICLOSS_NATIVE", native)
    n = 40  # >= the self-pair op's 32 rows, so the native batch-all path is the one that runs
    labels = torch.arange(n) if case == "distinct" else torch.full((n,), 3)
    x = torch.randn(n, 8, requires_grad=True)
    loss, caught = _record(lambda: ml.TripletLoss(mining=mining)(x, labels))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert ("distinct" if case == "distinct" else "one class") in text
    assert "PKSampler" in text and "filterwarnings" in text and mining in text
    # it points at the caller's line (this file), not inside metricloss or torch
    assert caught[0].filename == __file__
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    # once per process: the next degenerate batch is quiet
    _, again = _record(lambda: ml.TripletLoss(mining=mining)(x, labels))
    assert again == []


@pytest.mark.parametrize("mining", MININGS)
def test_single_class_reference_set_warns(mining):
    x, refs = torch.randn(6, 8), torch.randn(20, 8)
    _, caught = _record(lambda: MF.triplet_loss(x, torch.arange(6), refs, torch.zeros(20, dtype=torch.long),
                                                mining=mining))
    assert len(caught) == 1 and "reference labels are one class" in str(caught[0].message)


@pytest.mark.parametrize("mining", MININGS)
def test_trainable_batches_do_not_warn(mining):
    labels = torch.arange(10).repeat_interleave(4)
    x = torch.randn(40, 8)
    _, caught = _record(lambda: ml.TripletLoss(mining=mining)(x, labels))
    assert caught == []
    # a reference set with all-distinct labels can still hold a positive for every anchor: no warning
    _, caught = _record(lambda: MF.triplet_loss(x[:5], labels[:5], x, torch.arange(40) // 1, mining=mining))
    assert caught == []


def test_the_warning_can_be_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ml.NoValidTripletWarning)
        ml.TripletLoss()(torch.randn(8, 4), torch.arange(8))
    assert not [w for w in caught if issubclass(w.category, ml.NoValidTripletWarning)]


def test_the_check_reads_only_host_values():
    """The decision takes plain ints (the class size mining already read): it adds no device read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn.warn_if_no_valid_triplet(1, 8, True, "x")  # all distinct
        _warn._reset_for_tests()
        _warn.warn_if_no_valid_triplet(8, 8, False, "x")  # single class
        _warn._reset_for_tests()
        _warn.warn_if_no_valid_triplet(1, 8, False, "x")  # distinct references: anchors may have positives
        _warn.warn_if_no_valid_triplet(4, 8, True, "x")  # P x K
        _warn.warn_if_no_valid_triplet(0, 0, False, "x")  # empty reference set: nothing to say
    assert len(caught) == 2


@pytest.mark.parametrize("path", ["triton", "dense"])
def test_paths_without_class_sizes_check_every_cpu_call_and_an_accelerators_first(path, monkeypatch):
    """The Triton batch-hard kernel and the dense one-block miner read no class sizes. Where host reads are
    free (CPU, eager) the labels are checked on every call; under the accelerator's rules on the process's
    first call only (one device read, before any CUDA-graph capture), and not after."""
    if path == "triton":
        pytest.importorskip("triton")
    from metricloss import _checks
    from metricloss.ops import triplet as triplet_ops

    loss = ml.TripletLoss(backend="triton" if path == "triton" else "torch")
    x, distinct = torch.randn(8, 4), torch.arange(8)
    monkeypatch.setitem(triplet_ops._LABELS_CHECKED, path, False)
    for _ in range(2):  # CPU: every call checks (the warning itself is once per process: reset between)
        _warn._reset_for_tests()
        _, caught = _record(lambda: loss(x, distinct))
        assert len(caught) == 1 and caught[0].filename == __file__
    assert not triplet_ops._LABELS_CHECKED[path]
    with _checks.accelerator_rules():
        _warn._reset_for_tests()
        _, caught = _record(lambda: loss(x, distinct))
        assert len(caught) == 1 and caught[0].filename == __file__
        assert triplet_ops._LABELS_CHECKED[path]
        _warn._reset_for_tests()
        _, caught = _record(lambda: loss(x, distinct))
        assert caught == []  # checked once: no further read
