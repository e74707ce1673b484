"""Distributed losses on real gloo process groups (CPU), checked in fp64 against one process.

Every world size is spawned once (a module fixture) and runs every case inside; each case compares, on
every rank, the distributed result with the same computation done in one process on the concatenated
global batch: loss values, and gradients after averaging over the ranks as DDP does (a rank's gradient
divided by W, or the parameter gradients of a real DDP model). Batch sizes differ across ranks.
"""

import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metricloss as ml
from metricloss.distributed import DistributedLoss, all_gather_with_grad, is_distributed

SIZES = {2: [6, 4], 3: [5, 3, 6]}  # unequal batch sizes per rank
MININGS = ("batch_hard", "batch_all", "semi_hard")
REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
D = 5
_SOLO = []  # in the workers: one process group per rank holding that rank alone


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _global_batch(world, seed, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES[world])
    return (torch.randn(n, D, generator=g, dtype=torch.float64),
            torch.randint(0, num_classes, (n,), generator=g))


def _my_slice(world, rank):
    start = sum(SIZES[world][:rank])
    return slice(start, start + SIZES[world][rank])


# ----------------------------------------------------------------------------------------------------
# the cases (run on every rank; every rank issues the same collectives)
# ----------------------------------------------------------------------------------------------------

def case_all_gather_values_and_grads(rank, world):
    x, _ = _global_batch(world, 1)
    mine = _my_slice(world, rank)
    local = x[mine].clone().requires_grad_()
    gathered = all_gather_with_grad(local)
    _close(gathered.detach(), x, "gathered values")
    weight = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x) * (rank + 1)
    (gathered * weight).sum().backward()
    # every rank weighted the gathered rows by (rank + 1) * w: the sum over ranks reaches each owner
    factor = sum(r + 1 for r in range(world))
    _close(local.grad, factor * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)[mine], "gather grad")


def case_all_gather_noncontiguous(rank, world):
    x, _ = _global_batch(world, 2)
    mine = _my_slice(world, rank)
    base = x[mine].t().contiguous().requires_grad_()   # (D, B_r), contiguous
    local = base.t()                               # (B_r, D) non-contiguous view
    assert not local.is_contiguous()
    gathered = all_gather_with_grad(local)
    _close(gathered.detach(), x, "non-contiguous gathered values")
    gathered.pow(2).sum().backward()
    _close(base.grad.t(), world * 2 * x[mine], "non-contiguous grad")


def _loss(mining, reduction, **kw):
    return ml.TripletLoss(margin=0.2, mining=mining, reduction=reduction, **kw)


def _distributed_vs_one_process(rank, world, mining, reduction, seed, margin=0.2, distance="euclidean", crit=None):
    x, y = _global_batch(world, seed)
    mine = _my_slice(world, rank)
    if crit is None:
        crit = ml.TripletLoss(margin=margin, mining=mining, reduction=reduction, distance=distance)
    # one process on the concatenated batch
    xg = x.clone().requires_grad_()
    ref = crit(xg, y)
    # this rank's share
    local = x[mine].clone().requires_grad_()
    out = DistributedLoss(crit)(local, y[mine])
    if reduction == "none":
        _close(out.detach(), ref.detach()[mine], "per-anchor values")
        w = torch.linspace(0.5, 2.0, len(y), dtype=x.dtype)
        (w * ref).sum().backward()
        (world * (w[mine] * out).sum()).backward()
    else:
        _close(out.detach(), ref.detach(), "loss value (the global loss on every rank)")
        ref.backward()
        out.backward()
    assert float(ref.detach().abs().sum()) > 0, "degenerate case: zero loss"
    # DDP averages the ranks' gradients: divide by W
    _close(local.grad / world, xg.grad[mine], "gradient after averaging")


def _make_loss_case(mining, reduction):
    def case(rank, world):
        _distributed_vs_one_process(rank, world, mining, reduction, seed=10 + MININGS.index(mining))
    return case


def case_soft_margin_cosine(rank, world):
    _distributed_vs_one_process(rank, world, "batch_all", "mean", seed=21, margin="soft", distance="cosine")


def case_easy_positive_forms(rank, world):
    """SCT, EPHN and the easy positive with the hinge: the global loss and its gradients on every rank."""
    for i, crit in enumerate([ml.SCTLoss(), ml.EPHNLoss(min_similarity=None, reduction="sum"),
                              ml.TripletLoss(positive="easiest", reduction="none"),
                              ml.TripletLoss(loss="sct", distance="cosine", reduction="mean_nonzero")]):
        _distributed_vs_one_process(rank, world, "batch_hard", crit.reduction, seed=51 + i, crit=crit)


def case_multi_hot_labels(rank, world):
    """Multi-hot rows (a label in common: positive): the global loss of every mining and its gradients; and a
    user's relation on the same rows, carried by the wrapped loss."""
    x, _ = _global_batch(world, 61)
    labels = torch.rand(x.shape[0], 4, generator=torch.Generator().manual_seed(62)) < 0.4
    mine = _my_slice(world, rank)
    for crit in (ml.TripletLoss(reduction="mean"), ml.SCTLoss(reduction="sum"),
                 ml.TripletLoss(mining="batch_all", reduction="mean_nonzero"),
                 ml.TripletLoss(mining="semi_hard", reduction="none"),
                 # a user's relation on the same rows: positive when two labels are shared
                 ml.TripletLoss(mining="batch_all", relation=lambda a, b: a.float() @ b.float().T >= 2)):
        xg = x.clone().requires_grad_()
        ref = crit(xg, labels)
        local = x[mine].clone().requires_grad_()
        out = DistributedLoss(crit)(local, labels[mine])
        if crit.reduction == "none":
            _close(out.detach(), ref.detach()[mine], "multi-hot per-anchor values")
            w = torch.linspace(0.5, 2.0, x.shape[0], dtype=x.dtype)
            ref, out = (w * ref).sum(), world * (w[mine] * out).sum()
        else:
            _close(out.detach(), ref.detach(), "multi-hot loss value")
        assert float(ref.detach().abs()) > 0, f"degenerate case: zero loss ({crit.mining})"
        ref.backward()
        out.backward()
        _close(local.grad / world, xg.grad[mine], f"multi-hot gradient after averaging ({crit.mining})")


def case_nonfinite_on_one_rank_reaches_every_rank(rank, world):
    x, y = _global_batch(world, 41)
    x[0, 0] = float("nan")  # a row of rank 0
    mine = _my_slice(world, rank)
    for reduction in ("mean", "sum"):
        out = DistributedLoss(_loss("batch_hard", reduction))(x[mine].clone().requires_grad_(), y[mine])
        assert torch.isnan(out), (reduction, out)


def case_ddp_model_parameter_grads(rank, world):
    """A real DDP model: its averaged parameter gradients equal one process's on the concatenated batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _global_batch(world, 31)
    mine = _my_slice(world, rank)
    torch.manual_seed(0)
    single = nn.Linear(D, 4).double()
    model = nn.Linear(D, 4).double()
    model.load_state_dict(single.state_dict())
    ddp = DDP(model)
    for mining, reduction in (("batch_hard", "mean"), ("batch_all", "mean_nonzero"), ("semi_hard", "sum")):
        crit = _loss(mining, reduction)
        single.zero_grad()
        ref = crit(single(x), y)
        ref.backward()
        ddp.zero_grad()
        out = DistributedLoss(crit)(ddp(x[mine]), y[mine])
        out.backward()
        _close(out.detach(), ref.detach(), f"{mining}/{reduction} DDP loss")
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            _close(p.grad, q.grad, f"{mining}/{reduction} DDP grad of {name}")


def case_memory_in_process_group(rank, world):
    """CrossBatchMemory under DDP: every rank holds the one-process memory; same losses and gradients.

    The one-process reference runs on the rank itself, in a process group of that rank alone.
    """
    mine = _my_slice(world, rank)
    for mining, reduction in (("batch_hard", "mean"), ("batch_all", "mean_nonzero"), ("semi_hard", "sum"),
                              ("batch_all", "none")):
        crit = _loss(mining, reduction)
        memory_size = 2 * sum(SIZES[world]) + 3  # wraps around on the third step
        single = ml.CrossBatchMemory(crit, D, memory_size, dtype=torch.float64, group=_SOLO[rank])
        shared = ml.CrossBatchMemory(crit, D, memory_size, dtype=torch.float64)
        for step in range(4):
            x, y = _global_batch(world, 100 + step, num_classes=4)
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
            _close(local.grad / world, xg.grad[mine], what + " gradient after averaging")
            for name in ("embedding_memory", "label_memory", "queue_idx", "num_filled"):
                assert torch.equal(getattr(shared, name), getattr(single, name)), (what, name)


def case_memory_enqueue_mask_in_process_group(rank, world):
    mine = _my_slice(world, rank)
    crit = _loss("batch_all", "mean")
    single = ml.CrossBatchMemory(crit, D, 64, dtype=torch.float64, group=_SOLO[rank])
    shared = ml.CrossBatchMemory(crit, D, 64, dtype=torch.float64)
    for step in range(3):
        x, y = _global_batch(world, 200 + step, num_classes=2)
        mask = torch.arange(len(y)) % 3 == step % 3
        xg = x.clone().requires_grad_()
        ref = single(xg, y, enqueue_mask=mask)
        local = x[mine].clone().requires_grad_()
        out = shared(local, y[mine], enqueue_mask=mask[mine])
        _close(out.detach(), ref.detach(), f"masked step {step} value")
        ref.backward()
        out.backward()
        _close(local.grad / world, xg.grad[mine], f"masked step {step} gradient")
        assert torch.equal(shared.embedding_memory, single.embedding_memory)


CASES = {"all_gather_values_and_grads": case_all_gather_values_and_grads,
         "all_gather_noncontiguous": case_all_gather_noncontiguous,
         "soft_margin_cosine": case_soft_margin_cosine,
         "easy_positive_forms": case_easy_positive_forms,
         "multi_hot_labels": case_multi_hot_labels,
         "nonfinite_on_one_rank_reaches_every_rank": case_nonfinite_on_one_rank_reaches_every_rank,
         "ddp_model_parameter_grads": case_ddp_model_parameter_grads,
         "memory_in_process_group": case_memory_in_process_group,
         "memory_enqueue_mask_in_process_group": case_memory_enqueue_mask_in_process_group}
for _m in MININGS:
    for _r in REDUCTIONS:
        CASES[f"loss_{_m}_{_r}"] = _make_loss_case(_m, _r)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        assert is_distributed()
        # one single-rank group per rank (every rank creates every group: new_group is collective)
        _SOLO[:] = [dist.new_group([r]) for r in range(world)]
        assert not is_distributed(_SOLO[rank])
        for name, case in CASES.items():
            try:
                case(rank, world)
                results[name] = None
            except Exception:  # reported per case by the parent test
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(SIZES))
def world_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    results = []
    for rank in range(world):
        with open(tmp / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return world, results


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_on_every_rank(world_results, case):
    world, results = world_results
    failures = [f"rank {r}:\n{res.get(case, 'not run')}" for r, res in enumerate(results) if res.get(case, "")]
    assert not failures, f"world size {world}, case {case}:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------------
# outside a process group
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distributed_loss_outside_a_process_group_is_the_plain_loss(reduction):
    x, y = _global_batch(2, 5)
    crit = _loss("batch_all", reduction)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out, ref = DistributedLoss(crit)(a, y), crit(b, y)
    _close(out, ref, "value")
    out.sum().backward()
    ref.sum().backward()
    _close(a.grad, b.grad, "grad")


def test_all_gather_with_grad_outside_a_process_group_is_identity():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
    with pytest.raises(TypeError, match="tensor"):
        all_gather_with_grad([1.0])
    with pytest.raises(ValueError, match="dimension"):
        all_gather_with_grad(torch.tensor(1.0))


def test_distributed_loss_needs_loss_terms():
    with pytest.raises(TypeError, match="loss_terms"):
        DistributedLoss(nn.MSELoss())


# ----------------------------------------------------------------------------------------------------
# the DDP example, as the README runs it (torchrun, 2 CPU processes, gloo), at a tiny setting
# ----------------------------------------------------------------------------------------------------

def test_train_ddp_example_runs_on_two_processes():
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "examples/train_ddp.py", "--max-fonts", "8", "--renders", "1", "--epochs", "1", "--p", "4", "--k", "4"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "2 rank(s)" in p.stdout
    trained = re.search(r"trained .*mAP ([0-9.]+)\s+MAP@R ([0-9.]+)\s+R@1 ([0-9.]+)", p.stdout)
    assert trained, p.stdout
    assert all(0.0 <= float(v) <= 1.0 for v in trained.groups())
