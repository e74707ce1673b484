"""GradCache: the parameter gradients of a cached step equal those of the plain step it replaces.

References (this file's own): the same network run on the whole batch with a graph (for a network without
batch coupling or randomness), or on the same sub-batches with a graph from the same RNG state, their outputs
concatenated (with dropout: the same masks; with BatchNorm: each sub-batch's own statistics), and one loss on
the concatenation, ``loss.backward()``.
"""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metricloss as ml

from .helpers import pk_labels

D_IN, D_OUT = 12, 6


def make_model(kind: str, dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, 16)]
    if kind in ("batchnorm", "both"):
        layers.append(nn.BatchNorm1d(16))
    layers.append(nn.ReLU())
    if kind in ("dropout", "both"):
        layers.append(nn.Dropout(0.3))
    layers.append(nn.Linear(16, D_OUT))
    return nn.Sequential(*layers).to(dtype)


LOSSES = {
    "batch_hard": lambda: ml.TripletLoss(mining="batch_hard", monitor=False),
    "batch_all": lambda: ml.TripletLoss(mining="batch_all", reduction="mean_nonzero", monitor=False),
    "semi_hard": lambda: ml.TripletLoss(mining="semi_hard", monitor=False),
    "norm_softmax": lambda: ml.NormSoftmaxLoss(D_OUT, 8),
    "centroid": lambda: ml.CentroidTripletLoss(8, D_OUT, centroids="kmeans"),
    "sct": lambda: ml.SCTLoss(monitor=False),
}


def _data(n=40, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g, dtype=dtype), pk_labels(8, n // 8, g)


def _grads(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def _reference(model, loss, x, y, sub, seed):
    """The plain step: sub-batches forwarded with a graph from the RNG state ``seed``, one loss."""
    torch.manual_seed(seed)
    out = torch.cat([model(x[s:s + sub]) for s in range(0, len(x), sub)])
    value = loss(out, y)
    value.backward()
    return value.detach()


def _cached(model, loss, x, y, sub, seed, **kwargs):
    torch.manual_seed(seed)
    return ml.GradCache(model, loss, sub, **kwargs).step(x, y)


def _compare(kind, loss_name, dtype, sub=16, full_batch=False):
    x, y = _data(dtype=dtype)
    model_a, model_b = make_model(kind, dtype), make_model(kind, dtype)
    loss_a = LOSSES[loss_name]().to(dtype)
    loss_b = copy.deepcopy(loss_a)
    model_a.train(), model_b.train()
    want = _reference(model_a, loss_a, x, y, len(x) if full_batch else sub, seed=7)
    got = _cached(model_b, loss_b, x, y, sub, seed=7)
    ga, gb = _grads(model_a, loss_a), _grads(model_b, loss_b)
    assert len(ga) == len(gb) > 0
    return want, got, ga, gb, model_a, model_b


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_equals_the_full_batch_step_without_batch_coupling(loss_name, dtype):
    want, got, ga, gb, *_ = _compare("plain", loss_name, dtype, full_batch=True)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, **TOL[dtype])


@pytest.mark.parametrize("kind", ["dropout", "batchnorm", "both"])
@pytest.mark.parametrize("loss_name", ["batch_hard", "batch_all", "semi_hard", "norm_softmax", "centroid", "sct"])
def test_equals_the_sub_batched_step_with_dropout_and_batchnorm(kind, loss_name):
    want, got, ga, gb, model_a, model_b = _compare(kind, loss_name, torch.float64)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    # each sub-batch updated BatchNorm's running statistics once, as in the plain step
    for a, b in zip(model_a.buffers(), model_b.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_buffers_see_every_sub_batch_twice_without_restore():
    x, y = _data()
    model = make_model("batchnorm")
    ml.GradCache(model, LOSSES["batch_all"](), 16, restore_buffers=False).step(x, y)
    assert int(model[1].num_batches_tracked) == 6  # 3 sub-batches, twice
    model2 = make_model("batchnorm")
    ml.GradCache(model2, LOSSES["batch_all"](), 16).step(x, y)
    assert int(model2[1].num_batches_tracked) == 3


def _random_loss(emb, y):
    """A loss that draws from the global RNG, as sampled WARP does."""
    return (emb.square().sum(1) * torch.rand(emb.shape[0], dtype=emb.dtype)).mean()


@pytest.mark.parametrize("loss", [LOSSES["batch_hard"](), _random_loss], ids=["no draws", "draws"])
def test_the_rng_continues_as_after_one_plain_step(loss):
    x, y = _data()
    model_a, model_b = make_model("dropout"), make_model("dropout")
    _reference(model_a, loss, x, y, 16, seed=3)
    after_plain = torch.rand(3)
    torch.manual_seed(3)
    ml.GradCache(model_b, loss, 16).step(x, y)
    assert torch.equal(torch.rand(3), after_plain)
    for a, b in zip(_grads(model_a), _grads(model_b)):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_autocast_and_grad_scaler():
    x, y = _data(dtype=torch.float32)
    model_a, model_b = make_model("dropout", torch.float32), make_model("dropout", torch.float32)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss_fn = LOSSES["batch_all"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        out = torch.cat([model_a(x[s:s + 16]) for s in range(0, 40, 16)])
        value = loss_fn(out, y)
        scaler_a.scale(value).backward()
        torch.manual_seed(5)
        got = ml.GradCache(model_b, loss_fn, 16, scaler=scaler_b).step(x, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(got, value.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(model_a), _grads(model_b)):
        # scaled by 1024: the same scaled gradients, up to bf16 rounding of the re-forward's products
        assert a.abs().max() > 1.0
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * float(a.abs().max()))


def test_a_loss_with_a_reference_set_and_a_memory():
    x, y = _data()
    bank, bank_labels = torch.randn(10, D_OUT, dtype=torch.float64), torch.arange(10) % 8
    model_a, model_b = make_model("plain"), make_model("plain")
    loss = LOSSES["batch_hard"]()
    loss(model_a(x), y, ref_embeddings=bank, ref_labels=bank_labels).backward()
    ml.GradCache(model_b, loss, 16).step(x, y, ref_embeddings=bank, ref_labels=bank_labels)
    for a, b in zip(_grads(model_a), _grads(model_b)):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    # a fresh memory holds only the batch after enqueuing: the cached step equals the plain one with it
    model_c, model_d = make_model("plain"), make_model("plain")
    plain_memory = ml.CrossBatchMemory(LOSSES["batch_all"](), D_OUT, 80, dtype=torch.float64)
    cached_memory = ml.CrossBatchMemory(LOSSES["batch_all"](), D_OUT, 80, dtype=torch.float64)
    want = plain_memory(model_c(x), y)
    want.backward()
    got = ml.GradCache(model_d, cached_memory, 16).step(x, y)
    torch.testing.assert_close(got, want.detach(), **TOL[torch.float64])
    for a, b in zip(_grads(model_c), _grads(model_d)):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    assert int(cached_memory.num_filled) == 40
    assert torch.equal(cached_memory.embedding_memory, plain_memory.embedding_memory)


def test_several_inputs_and_a_callable_model():
    x, y = _data()
    w = torch.randn(D_IN, D_OUT, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(40, D_OUT, dtype=torch.float64)
    loss = LOSSES["batch_hard"]()
    loss(x @ w + extra, y).backward()
    want = w.grad.clone()
    w.grad = None
    ml.GradCache(lambda a, b: a @ w + b, loss, 7).step((x, extra), y)
    torch.testing.assert_close(w.grad, want, **TOL[torch.float64])


@pytest.mark.parametrize("kwargs, call, err, match", [
    (dict(sub_batch_size=0), None, ValueError, "sub_batch_size"),
    (dict(sub_batch_size=4, scaler=object()), None, TypeError, "scaler"),
    (dict(sub_batch_size=4, restore_buffers=1), None, TypeError, "restore_buffers"),
    (dict(sub_batch_size=4), lambda c: c.step((torch.randn(8, D_IN), torch.randn(7, D_IN)), torch.arange(8)),
     ValueError, "same batch size"),
    (dict(sub_batch_size=4), lambda c: c.step("x", torch.arange(8)), TypeError, "inputs"),
])
def test_bad_input(kwargs, call, err, match):
    with pytest.raises(err, match=match):
        cache = ml.GradCache(make_model("plain", torch.float32), LOSSES["batch_hard"](), **kwargs)
        call(cache)


def test_bad_model_output_and_loss():
    x, y = _data(dtype=torch.float32)
    with pytest.raises(ValueError, match="embeddings"):
        ml.GradCache(lambda a: a[:, 0], LOSSES["batch_hard"](), 8).step(x, y)
    with pytest.raises(ValueError, match="0-dim"):
        ml.GradCache(make_model("plain", torch.float32), ml.TripletLoss(reduction="none"), 8).step(x, y)


# ----------------------------------------------------------------------------------------------------
# DDP: gradients synchronised once per step, equal to one process's full batch
# ----------------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _data(n=48)
        mine = slice(rank * 24, (rank + 1) * 24)
        single = make_model("plain")
        loss = ml.TripletLoss(mining="batch_all", monitor=False)
        loss(single(x), y).backward()
        model = DDP(make_model("plain"))
        calls = []

        def hook(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            dist.all_reduce(bucket.buffer())
            fut.set_result(bucket.buffer() / world)
            return fut

        model.register_comm_hook(None, hook)
        ml.GradCache(model, ml.distributed.DistributedLoss(loss), 8).step(x[mine], y[mine])
        for a, b in zip(single.parameters(), model.module.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12)
        buckets = len(calls)
        torch.save({"buckets": buckets}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_synchronises_once_and_matches_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        # 3 sub-batches per rank, one all-reduce of the (single) gradient bucket: only the last re-forward syncs
        assert torch.load(tmp_path / f"rank{rank}.pt")["buckets"] == 1
