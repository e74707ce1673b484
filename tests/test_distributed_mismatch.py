"""Ranks that disagree, ranks with empty batches: clear errors on every rank, never an abort or a hang.

Real gloo process groups on CPU (2 and 3 ranks). Each world is spawned once (a module fixture) with a
wall-clock limit: a rank still alive after it is killed and every case it had not finished fails, as
does a rank that died (SIGABRT, exit code != 0). Each case runs on every rank and records, per rank,
either success or the exception it raised (type and message); the parent tests assert that every rank
raised the same ``ValueError`` text (or, for a rank whose own inputs were malformed, that rank its own
error and the others the message naming it), and that empty ranks give exactly the one-process result
on the concatenated batch (fp64, 1e-12) with a zero (0, D) gradient.
"""

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metricloss as ml
from metricloss.distributed import DistributedLoss, all_gather_with_grad

WORLDS = (2, 3)
TIMEOUT_S = 240          # the whole world (spawn, every case); a hang fails instead of blocking
GLOO_TIMEOUT_S = 30      # a collective that waits longer raises inside the rank
EMPTY_SIZES = {2: [7, 0], 3: [0, 6, 5]}  # batch sizes with empty ranks
MININGS = ("batch_hard", "batch_all", "semi_hard")
REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
D = 5
_SOLO = []  # in the workers: one process group per rank holding that rank alone


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _batch(n, seed, d=D, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _crit(mining="batch_all", reduction="mean"):
    return ml.TripletLoss(margin=0.2, mining=mining, reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# cases that must raise (every rank issues the same calls; the expected outcome is in EXPECT)
# ----------------------------------------------------------------------------------------------------

def case_dl_mixed_half_dtypes(rank, world):
    x, y = _batch(4, 1)
    dtype = torch.bfloat16 if rank == 1 else torch.float16  # rank 1 bf16, the others fp16
    DistributedLoss(_crit())(x.to(dtype), y)


def case_dl_fp32_fp64(rank, world):
    x, y = _batch(4, 2)
    DistributedLoss(_crit())(x.to(torch.float64 if rank == 1 else torch.float32), y)


def case_dl_label_dtype(rank, world):
    x, y = _batch(4, 3)
    DistributedLoss(_crit())(x, y.to(torch.int32 if rank == 1 else torch.int64))


def case_dl_width(rank, world):
    x, y = _batch(4, 4, d=9 if rank == 1 else 8)
    DistributedLoss(_crit())(x, y)


def case_dl_reduction(rank, world):
    x, y = _batch(4, 5)
    DistributedLoss(_crit(reduction="sum" if rank == 1 else "mean"))(x, y)


def case_dl_local_failure(rank, world):
    x, y = _batch(4, 6)
    DistributedLoss(_crit())(x, y[:3] if rank == 1 else y)  # rank 1's labels are too short


def case_dl_all_empty(rank, world):
    x, y = _batch(0, 7)
    DistributedLoss(_crit())(x.requires_grad_(), y)


def case_gather_dtype(rank, world):
    all_gather_with_grad(torch.zeros(3, 2, dtype=torch.float64 if rank == 1 else torch.float32))


def case_gather_trailing_shape(rank, world):
    all_gather_with_grad(torch.zeros(3, 3, 2) if rank == 1 else torch.zeros(3, 2, 3))


def case_gather_not_a_tensor(rank, world):
    all_gather_with_grad([1.0, 2.0] if rank == 1 else torch.zeros(2, 3))


def case_xbm_embedding_dtype(rank, world):
    mem = ml.CrossBatchMemory(_crit(), D, 64, dtype=torch.float64)
    x, y = _batch(4, 8)
    mem(x.to(torch.float32 if rank == 1 else torch.float64), y)


def case_xbm_embedding_dim(rank, world):
    d = 9 if rank == 1 else 8
    mem = ml.CrossBatchMemory(_crit(), d, 64, dtype=torch.float64)
    x, y = _batch(4, 9, d=d)
    mem(x, y)


def case_xbm_memory_state(rank, world):
    mem = ml.CrossBatchMemory(_crit(), D, 64, dtype=torch.float64)
    if rank == 1:  # a local enqueue (no collective): rank 1's ring has moved, the others' have not
        mem.enqueue(*_batch(3, 10))
    x, y = _batch(4, 11)
    mem(x, y)


def case_xbm_local_failure(rank, world):
    mem = ml.CrossBatchMemory(_crit(), D, 64, dtype=torch.float64)
    x, y = _batch(4, 12, d=D + 1 if rank == 1 else D)  # rank 1's rows are too wide for embedding_dim
    mem(x, y)


def case_xbm_global_overflow(rank, world):
    mem = ml.CrossBatchMemory(_crit(), D, 6, dtype=torch.float64)  # 4 rows per rank fit, the global batch not
    mem(*_batch(4, 13))


def case_xbm_all_empty(rank, world):
    mem = ml.CrossBatchMemory(_crit(), D, 64, dtype=torch.float64)
    mem(*_batch(0, 14))


def _rank_list(world, value_of):
    return ", ".join(f"rank {r} {value_of(r)}" for r in range(world))


def _all_ranks(message):
    return lambda world, rank: ("ValueError", message(world))


def _one_rank_failed(where, own_type, own_start, bad_rank=1):
    def expected(world, rank):
        if rank == bad_rank:
            return own_type, own_start
        return ("ValueError", f"{where}: rank(s) [{bad_rank}] failed their input checks (that rank raised the "
                              f"error saying why); no data was exchanged")
    return expected


# case -> expected(world, rank) -> (exception type, message; a message ending in "..." is a prefix)
EXPECT = {
    "dl_mixed_half_dtypes": _all_ranks(lambda w: "DistributedLoss: ranks disagree on the embedding dtype: " + _rank_list(
        w, lambda r: "bfloat16" if r == 1 else "float16")),
    "dl_fp32_fp64": _all_ranks(lambda w: "DistributedLoss: ranks disagree on the embedding dtype: " + _rank_list(
        w, lambda r: "float64" if r == 1 else "float32")),
    "dl_label_dtype": _all_ranks(lambda w: "DistributedLoss: ranks disagree on the label dtype: " + _rank_list(
        w, lambda r: "int32" if r == 1 else "int64")),
    "dl_width": _all_ranks(lambda w: "DistributedLoss: ranks disagree on D (the embedding width): " + _rank_list(
        w, lambda r: 9 if r == 1 else 8)),
    "dl_reduction": _all_ranks(lambda w: "DistributedLoss: ranks disagree on the reduction: " + _rank_list(
        w, lambda r: "sum" if r == 1 else "mean")),
    "dl_local_failure": _one_rank_failed("DistributedLoss", "ValueError",
                                         "DistributedLoss: `labels` must have shape (4,)..."),
    "dl_all_empty": _all_ranks(lambda w: f"DistributedLoss: every rank's batch is empty (sizes {[0] * w}); the "
                                         f"global batch must have at least one row"),
    "gather_dtype": _all_ranks(lambda w: "all_gather_with_grad: ranks disagree on the dtype: " + _rank_list(
        w, lambda r: "float64" if r == 1 else "float32")),
    "gather_trailing_shape": _all_ranks(
        lambda w: "all_gather_with_grad: ranks disagree on the trailing shape (the dims after the first): "
                  + _rank_list(w, lambda r: (3, 2) if r == 1 else (2, 3))),
    "gather_not_a_tensor": _one_rank_failed("all_gather_with_grad", "TypeError",
                                            "all_gather_with_grad: `tensor` must be a torch.Tensor, got list"),
    "xbm_embedding_dtype": _all_ranks(lambda w: "CrossBatchMemory: ranks disagree on the embedding dtype: "
                                                + _rank_list(w, lambda r: "float32" if r == 1 else "float64")),
    "xbm_embedding_dim": _all_ranks(lambda w: "CrossBatchMemory: ranks disagree on D (embedding_dim): "
                                              + _rank_list(w, lambda r: 9 if r == 1 else 8)),
    "xbm_memory_state": _all_ranks(
        lambda w: "CrossBatchMemory: ranks disagree on the memory state (queue_idx, num_filled): "
                  + _rank_list(w, lambda r: (3, 3) if r == 1 else (0, 0))
                  + "; every rank must hold the same memory (load the same state_dict, or reset_queue(), on every rank)"),
    "xbm_local_failure": _one_rank_failed("CrossBatchMemory", "ValueError",
                                          f"CrossBatchMemory: `embeddings` must have embedding_dim={D} columns..."),
    "xbm_global_overflow": _all_ranks(
        lambda w: f"CrossBatchMemory: the global batch enqueues {4 * w} rows in one call (ranks {[4] * w}), more "
                  f"than memory_size=6; the batch would overwrite itself"),
    "xbm_all_empty": _all_ranks(lambda w: f"CrossBatchMemory: every rank's batch is empty (sizes {[0] * w}); the "
                                          f"global batch must have at least one row"),
}


# ----------------------------------------------------------------------------------------------------
# cases that must succeed: empty ranks, against one process on the concatenated batch
# ----------------------------------------------------------------------------------------------------

def _empty_rank_case(mining, reduction):
    def case(rank, world):
        sizes = EMPTY_SIZES[world]
        x, y = _batch(sum(sizes), 20 + MININGS.index(mining))
        mine = _slice(sizes, rank)
        crit = _crit(mining, reduction)
        xg = x.clone().requires_grad_()
        ref = crit(xg, y)
        local = x[mine].clone().requires_grad_()
        out = DistributedLoss(crit)(local, y[mine])
        if reduction == "none":
            assert out.shape == (sizes[rank],), out.shape
            _close(out.detach(), ref.detach()[mine], "per-anchor values")
            w = torch.linspace(0.5, 2.0, len(y), dtype=x.dtype)
            (w * ref).sum().backward()
            (world * (w[mine] * out).sum()).backward()
        else:
            _close(out.detach(), ref.detach(), "loss value (the global loss on every rank)")
            ref.backward()
            out.backward()
        assert float(ref.detach().abs().sum()) > 0, "degenerate case: zero loss"
        assert local.grad is not None and local.grad.shape == (sizes[rank], D), local.grad
        _close(local.grad / world, xg.grad[mine], "gradient after averaging")
        if sizes[rank] == 0:
            assert local.grad.dtype == torch.float64
    return case


def case_dl_empty_rank_nonfinite_reaches_it(rank, world):
    sizes = EMPTY_SIZES[world]
    x, y = _batch(sum(sizes), 30)
    x[-1, 0] = float("nan")  # a row of the last rank (never empty here)
    out = DistributedLoss(_crit("batch_hard"))(x[_slice(sizes, rank)].clone().requires_grad_(),
                                               y[_slice(sizes, rank)])
    assert torch.isnan(out), out


def case_gather_empty_rank(rank, world):
    sizes = EMPTY_SIZES[world]
    x, _ = _batch(sum(sizes), 31)
    local = x[_slice(sizes, rank)].clone().requires_grad_()
    gathered = all_gather_with_grad(local)
    _close(gathered.detach(), x, "gathered values")
    weight = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)
    (gathered * weight * (rank + 1)).sum().backward()
    factor = sum(r + 1 for r in range(world))
    assert local.grad.shape == (sizes[rank], D)
    _close(local.grad, factor * weight[_slice(sizes, rank)], "gather grad")


def case_gather_all_empty(rank, world):
    local = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(local)
    assert gathered.shape == (0, D)
    gathered.sum().backward()
    assert local.grad.shape == (0, D)


def case_xbm_empty_rank(rank, world):
    """An empty rank under CrossBatchMemory: the memories and losses of one process on the global batches."""
    sizes = EMPTY_SIZES[world]
    mine = _slice(sizes, rank)
    for mining, reduction in (("batch_hard", "mean"), ("batch_all", "none")):
        crit = _crit(mining, reduction)
        single = ml.CrossBatchMemory(crit, D, 32, dtype=torch.float64, group=_SOLO[rank])
        shared = ml.CrossBatchMemory(crit, D, 32, dtype=torch.float64)
        for step in range(3):
            x, y = _batch(sum(sizes), 40 + step, classes=4)
            xg = x.clone().requires_grad_()
            ref = single(xg, y)
            local = x[mine].clone().requires_grad_()
            out = shared(local, y[mine])
            what = f"{mining}/{reduction} step {step}"
            if reduction == "none":
                _close(out.detach(), ref.detach()[mine], what + " values")
                w = torch.linspace(0.5, 2.0, len(y), dtype=x.dtype)
                (w * ref).sum().backward()
                (world * (w[mine] * out).sum()).backward()
            else:
                _close(out.detach(), ref.detach(), what + " value")
                ref.backward()
                out.backward()
            assert local.grad is not None and local.grad.shape == (sizes[rank], D)
            _close(local.grad / world, xg.grad[mine], what + " gradient after averaging")
            for name in ("embedding_memory", "label_memory", "queue_idx", "num_filled"):
                assert torch.equal(getattr(shared, name), getattr(single, name)), (what, name)


def case_xbm_all_false_mask_on_empty_memory(rank, world):
    """Nothing enqueued into an empty memory on any rank: a connected zero; the next step is the usual one."""
    crit = _crit("batch_all", "mean")
    single = ml.CrossBatchMemory(crit, D, 64, dtype=torch.float64, group=_SOLO[rank])
    shared = ml.CrossBatchMemory(crit, D, 64, dtype=torch.float64)
    sizes = [4] * world
    mine = _slice(sizes, rank)
    for step, mask_of in enumerate((lambda n: torch.zeros(n, dtype=torch.bool),
                                    lambda n: torch.arange(n) % 2 == 0)):
        x, y = _batch(sum(sizes), 50 + step, classes=2)
        mask = mask_of(len(y))
        xg = x.clone().requires_grad_()
        ref = single(xg, y, enqueue_mask=mask)
        local = x[mine].clone().requires_grad_()
        out = shared(local, y[mine], enqueue_mask=mask[mine])
        _close(out.detach(), ref.detach(), f"step {step} value")
        ref.backward()
        out.backward()
        _close(local.grad / world, xg.grad[mine], f"step {step} gradient")
        if step == 0:
            assert float(out.detach()) == 0.0 and torch.equal(local.grad, torch.zeros_like(local))
        else:
            assert float(out.detach()) > 0


SUCCEED = {"dl_empty_rank_nonfinite_reaches_it": case_dl_empty_rank_nonfinite_reaches_it,
           "gather_empty_rank": case_gather_empty_rank,
           "gather_all_empty": case_gather_all_empty,
           "xbm_empty_rank": case_xbm_empty_rank,
           "xbm_all_false_mask_on_empty_memory": case_xbm_all_false_mask_on_empty_memory}
for _m in MININGS:
    for _r in REDUCTIONS:
        SUCCEED[f"dl_empty_rank_{_m}_{_r}"] = _empty_rank_case(_m, _r)

CASES = {name: globals()[f"case_{name}"] for name in EXPECT}
CASES.update(SUCCEED)


# ----------------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------------

def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        _SOLO[:] = [dist.new_group([r]) for r in range(world)]
        for name, case in CASES.items():
            try:
                case(rank, world)
                results[name] = {"ok": True}
            except Exception as err:  # reported per case by the parent test
                results[name] = {"ok": False, "type": type(err).__name__, "message": str(err),
                                 "traceback": traceback.format_exc()}
            with open(path, "w") as f:  # after every case: what a rank finished survives its death
                json.dump(results, f)
            dist.barrier()
    finally:
        with open(path, "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS)
def world_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"mismatch{world}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp / "store"), str(tmp))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for rank in range(world):
        try:
            with open(tmp / f"rank{rank}.json") as f:
                results.append(json.load(f))
        except (OSError, ValueError):
            results.append({})
    return world, results, hung, [p.exitcode for p in procs]


def _outcomes(world_results, case):
    world, results, hung, exitcodes = world_results
    assert not hung, f"world {world}: rank(s) {hung} still running after {TIMEOUT_S} s (killed)"
    assert all(code == 0 for code in exitcodes), f"world {world}: rank exit codes {exitcodes} (an abort?)"
    missing = [r for r in range(world) if case not in results[r]]
    assert not missing, f"world {world}: case {case} did not finish on rank(s) {missing}"
    return world, [results[r][case] for r in range(world)]


@pytest.mark.parametrize("case", list(EXPECT))
def test_every_rank_raises_the_same_clear_error(world_results, case):
    world, outcomes = _outcomes(world_results, case)
    for rank, got in enumerate(outcomes):
        want_type, want = EXPECT[case](world, rank)
        assert not got["ok"], f"world {world}, rank {rank}: no error raised"
        assert got["type"] == want_type, f"world {world}, rank {rank}: {got['traceback']}"
        if want.endswith("..."):
            assert got["message"].startswith(want[:-3]), f"world {world}, rank {rank}: {got['message']!r}"
        else:
            assert got["message"] == want, f"world {world}, rank {rank}: {got['message']!r}"
    # ranks with the same role raised exactly the same text
    others = {o["message"] for r, o in enumerate(outcomes) if EXPECT[case](world, r) == EXPECT[case](world, 0)}
    assert len(others) == 1, others


@pytest.mark.parametrize("case", list(SUCCEED))
def test_empty_ranks_give_the_one_process_result(world_results, case):
    world, outcomes = _outcomes(world_results, case)
    failures = [f"rank {r}:\n{o['traceback']}" for r, o in enumerate(outcomes) if not o["ok"]]
    assert not failures, f"world size {world}, case {case}:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------------
# outside a process group: unchanged
# ----------------------------------------------------------------------------------------------------

def test_outside_a_process_group_an_empty_batch_still_raises():
    with pytest.raises(ValueError, match="empty batch"):
        DistributedLoss(_crit())(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty batch"):
        ml.CrossBatchMemory(_crit(), D, 8)(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
