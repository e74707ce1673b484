"""CrossBatchMemory: the ring buffer, its buffers, self-exclusion by slot, and agreement with PML's."""

import pytest
import torch
from torch import nn

import metricloss as ml
from metricloss.ops.reduction import reduce_loss

D = 6


def _batches(steps, n=12, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))
            for _ in range(steps)]


# ----------------------------------------------------------------------------------------------------
# the ring
# ----------------------------------------------------------------------------------------------------

def test_ring_fills_then_wraps_oldest_first():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 10, dtype=torch.float64)
    rows = torch.arange(14 * D, dtype=torch.float64).view(14, D)
    labels = torch.arange(14)
    assert mem.enqueue(rows[:4], labels[:4]).tolist() == [0, 1, 2, 3]
    assert (int(mem.queue_idx), int(mem.num_filled)) == (4, 4)
    assert mem.enqueue(rows[4:11], labels[4:11]).tolist() == [4, 5, 6, 7, 8, 9, 0]
    assert (int(mem.queue_idx), int(mem.num_filled)) == (1, 10)
    assert mem.label_memory.tolist() == [10, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(mem.embedding_memory[0], rows[10])
    mem.enqueue(rows[11:14], labels[11:14])
    assert mem.label_memory.tolist() == [10, 11, 12, 13, 4, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="memory_size"):
        mem.enqueue(rows[:11], labels[:11])
    mem.reset_queue()
    assert int(mem.num_filled) == 0 and int(mem.queue_idx) == 0 and not mem.embedding_memory.any()


def test_the_ring_position_is_kept_on_the_host_and_reread_after_load_state_dict():
    import collections
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks.gpu_check import make_sync_counter

    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 10, dtype=torch.float64)
    batches = _batches(4, n=4)
    with make_sync_counter() as syncs:
        for x, y in batches[:3]:
            mem.enqueue(x, y)
    assert syncs.counts.get("tolist", 0) == 0  # no device read per call
    assert (int(mem.queue_idx), int(mem.num_filled)) == (2, 10)
    # a state saved elsewhere (another position) is read once after loading, then mirrored again
    other = ml.CrossBatchMemory(ml.TripletLoss(), D, 10, dtype=torch.float64)
    other.enqueue(*batches[0])
    mem.load_state_dict(other.state_dict())
    with make_sync_counter() as syncs:
        first, second = mem.enqueue(*batches[3]), mem.enqueue(*batches[3])
    assert syncs.counts == collections.Counter({"tolist": 1})
    assert first.tolist() == [4, 5, 6, 7] and second.tolist() == [8, 9, 0, 1]
    assert (int(mem.queue_idx), int(mem.num_filled)) == (2, 10)
    mem.reset_queue()
    assert mem.enqueue(*batches[0]).tolist() == [0, 1, 2, 3]


def test_enqueued_rows_are_detached_copies():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 8)
    x = torch.randn(4, D, requires_grad=True)
    mem.enqueue(x, torch.arange(4))
    assert not mem.embedding_memory.requires_grad
    with torch.no_grad():
        x.mul_(2)
    assert not torch.equal(mem.embedding_memory[:4], x.detach())


def test_buffers_in_state_dict_and_moved_by_to():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 8)
    x, y = _batches(1, n=5, dtype=torch.float32)[0]
    mem(x, y)
    state = mem.state_dict()
    for name in ("embedding_memory", "label_memory", "queue_idx", "num_filled"):
        assert name in state
    other = ml.CrossBatchMemory(ml.TripletLoss(), D, 8)
    other.load_state_dict(state)
    assert torch.equal(other.embedding_memory, mem.embedding_memory) and int(other.num_filled) == 5
    mem64 = mem.to(torch.float64)
    assert mem64.embedding_memory.dtype == torch.float64 and mem64.label_memory.dtype == torch.int64
    assert mem.embedding_memory.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
def test_first_call_equals_the_plain_loss_on_the_batch(mining, reduction):
    # an empty memory holds only the batch after enqueuing: the loss is the batch's own loss
    x, y = _batches(1)[0]
    crit = ml.TripletLoss(mining=mining, reduction=reduction)
    mem = ml.CrossBatchMemory(crit, D, 32, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = mem(a, y), crit(b, y)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    # the memory is detached: only the anchors' side of the gradient
    c = x.clone().requires_grad_()
    terms = crit.loss_terms(c, y, x, y, ref_self_index=torch.arange(len(y)))
    reduce_loss(*terms, reduction).sum().backward()
    torch.testing.assert_close(a.grad, c.grad)
    assert a.grad.abs().sum() > 0


def test_own_slot_is_never_a_positive_but_a_duplicate_is():
    crit = ml.TripletLoss(margin=2.0, mining="batch_hard", reduction="none")
    mem = ml.CrossBatchMemory(crit, 2, 16, dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # first call: each anchor's only same-class row is its own slot (distance 0): no positive, no term
    assert mem(x, y).tolist() == [0.0, 0.0]
    # second call, same rows: the first call's copies are positives at distance 0, negatives at sqrt(2)
    expected = torch.full((2,), 2.0 - 2.0 ** 0.5, dtype=torch.float64)
    torch.testing.assert_close(mem(x, y), expected)


def test_enqueue_mask_anchors_are_the_other_rows():
    crit = ml.TripletLoss(mining="batch_all", reduction="none")
    mem = ml.CrossBatchMemory(crit, D, 32, dtype=torch.float64)
    x, y = _batches(1)[0]
    mask = torch.arange(len(y)) < 7
    out = mem(x, y, enqueue_mask=mask)
    assert out.shape == (5,) and int(mem.num_filled) == 7
    ref = crit(x[~mask], y[~mask], x[mask], y[mask])
    torch.testing.assert_close(out, ref)


def test_all_rows_enqueued_gives_a_connected_zero():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 32, dtype=torch.float64)
    x, y = _batches(1)[0]
    x.requires_grad_()
    out = mem(x, y, enqueue_mask=torch.ones(len(y), dtype=torch.bool))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
def test_nothing_enqueued_into_an_empty_memory_gives_a_connected_zero(mining, reduction):
    # an all-False mask on the first call: every row is an anchor, there is no reference (PML returns 0)
    mem = ml.CrossBatchMemory(ml.TripletLoss(mining=mining, reduction=reduction), D, 32, dtype=torch.float64)
    x, y = _batches(1)[0]
    x.requires_grad_()
    out = mem(x, y, enqueue_mask=torch.zeros(len(y), dtype=torch.bool))
    assert out.shape == ((len(y),) if reduction == "none" else ())
    assert out.dtype == torch.float64 and not out.detach().any()
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert int(mem.num_filled) == 0
    # the next call is the usual one: the rows it enqueues are the references of its other rows
    x2, y2 = _batches(2, seed=5)[1]
    mask = torch.arange(len(y2)) < 6
    torch.testing.assert_close(mem(x2, y2, enqueue_mask=mask),
                               mem.loss(x2[~mask], y2[~mask], x2[mask], y2[mask]))


def test_nothing_enqueued_into_an_empty_memory_after_reset_and_in_fp32_and_with_nan():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 32)
    x, y = _batches(1, dtype=torch.float32)[0]
    mem(x, y)
    mem.reset_queue()
    none = torch.zeros(len(y), dtype=torch.bool)
    out = mem(x.clone().requires_grad_(), y, enqueue_mask=none)
    assert out.dtype == torch.float32 and float(out.detach()) == 0.0
    x[3, 1] = float("nan")  # NaN in an anchor still gives NaN, as everywhere in the library
    assert torch.isnan(mem(x, y, enqueue_mask=none))


def test_batch_all_over_a_large_memory_does_not_build_pair_lists():
    # 40 anchors against 8192 references of 4 classes: ~3e7 triplets, which a pair-list engine would
    # enumerate; the chunked engine is bounded by chunk_bytes.
    crit = ml.TripletLoss(mining="batch_all", reduction="mean", chunk_bytes=1 << 20)
    mem = ml.CrossBatchMemory(crit, D, 8192)
    g = torch.Generator().manual_seed(0)
    mem.enqueue(torch.randn(8192, D, generator=g), torch.randint(0, 4, (8192,), generator=g))
    x = torch.randn(40, D, generator=g, requires_grad=True)
    out = mem(x, torch.randint(0, 4, (40,), generator=g))
    out.backward()
    assert torch.isfinite(out) and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(loss=nn.MSELoss(), embedding_dim=4, memory_size=8), TypeError, "loss_terms"),
    (dict(loss=ml.TripletLoss(), embedding_dim=0, memory_size=8), ValueError, "embedding_dim"),
    (dict(loss=ml.TripletLoss(), embedding_dim=4, memory_size=2.0), TypeError, "memory_size"),
    (dict(loss=ml.TripletLoss(), embedding_dim=4, memory_size=8, dtype=torch.int64), TypeError, "dtype"),
])
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        ml.CrossBatchMemory(**kwargs)


def test_bad_forward_inputs():
    mem = ml.CrossBatchMemory(ml.TripletLoss(), D, 8)
    x, y = torch.randn(4, D), torch.arange(4)
    with pytest.raises(ValueError, match="embedding_dim"):
        mem(torch.randn(4, D + 1), y)
    with pytest.raises(ValueError, match="labels"):
        mem(x, y[:3])
    with pytest.raises(TypeError, match="enqueue_mask"):
        mem(x, y, enqueue_mask=torch.ones(4))
    with pytest.raises(ValueError, match="enqueue_mask"):
        mem(x, y, enqueue_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="memory_size"):
        mem(torch.randn(9, D), torch.arange(9))
    assert int(mem.num_filled) == 0  # nothing was enqueued by the failed calls


# ----------------------------------------------------------------------------------------------------
# against pytorch-metric-learning's CrossBatchMemory
# ----------------------------------------------------------------------------------------------------

pml = pytest.importorskip("pytorch_metric_learning")


def _pml_memory(mining, memory_size):
    from pytorch_metric_learning import losses, miners

    miner = miners.BatchHardMiner() if mining == "batch_hard" else None
    return losses.CrossBatchMemory(losses.TripletMarginLoss(margin=0.2), D, memory_size=memory_size, miner=miner)


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_pml_cross_batch_memory(mining, masked):
    """Same batches, same losses and anchor gradients as PML's (TripletMarginLoss(0.2), AvgNonZero)."""
    memory_size = 30  # wraps on the third batch of 12
    ours = ml.CrossBatchMemory(ml.TripletLoss(margin=0.2, mining=mining, reduction="mean_nonzero"), D,
                               memory_size, dtype=torch.float64)
    theirs = _pml_memory(mining, memory_size).double()
    for step, (x, y) in enumerate(_batches(5, seed=3)):
        mask = (torch.arange(len(y)) % 2 == step % 2) if masked else None
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = ours(a, y, enqueue_mask=mask)
        ref = theirs(b, y, enqueue_mask=mask)
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-5, msg=f"step {step} loss")
        out.backward()
        ref.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=f"step {step} grad")
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_benchmark_case_runs_and_both_libraries_agree(mining):
    # benchmarks/cross_batch_memory.py's step at a tiny size: the two libraries compute the same loss
    from benchmarks.cross_batch_memory import case

    ours = case("metricloss", mining, batch=8, dim=4, memory=32, classes=4, k=2)()
    theirs = case("pml", mining, batch=8, dim=4, memory=32, classes=4, k=2)()
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
