"""The collapse monitor (:class:`metricloss.CollapseMonitor`, ``loss_fn.last_stats``) and the mining schedule
(:class:`metricloss.MiningSchedule`)."""

import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import metricloss as ml
from metricloss import reference

from ..helpers import pk_labels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _collapsing_steps(steps, n=32, d=8, seed=0, rate=0.9):
    """Batches whose classes overlap and whose scale shrinks by ``rate`` per step: the picture of a collapse
    (the hardest negative nearer than the hardest positive, both distances shrinking)."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        yield (rate ** t) * torch.randn(n, d, generator=g, dtype=torch.float64), pk_labels(8, 4, g)


def _healthy_steps(steps, n=32, d=8, seed=0):
    """Well separated classes at a constant scale."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(8, d, generator=g, dtype=torch.float64)
    for _ in range(steps):
        y = pk_labels(8, 4, g)
        yield centres[y] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), y


def _train(crit, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in steps:
            crit(x.requires_grad_(), y).backward()
    return [w for w in caught if issubclass(w.category, ml.CollapseWarning)]


def test_last_stats_are_the_selected_distances():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), pk_labels(6, 4, g)
    crit = ml.TripletLoss(margin=0.2)
    loss = crit(x, y)
    stats = crit.last_stats.as_dict()
    # independently: the dense reference's distances at the miner's indices
    d = reference.pairwise_distance(x, distance="euclidean", normalize=True)
    pos, neg = ml.functional.mine_batch_hard(F.normalize(x, dim=1), y)
    rows = torch.arange(24)
    d_ap, d_an = d[rows, pos], d[rows, neg]
    assert stats["d_ap_mean"] == pytest.approx(float(d_ap.mean()), rel=1e-12)
    assert stats["d_an_mean"] == pytest.approx(float(d_an.mean()), rel=1e-12)
    assert stats["d_ap_std"] == pytest.approx(float(d_ap.std(unbiased=False)), rel=1e-10)
    assert stats["d_an_std"] == pytest.approx(float(d_an.std(unbiased=False)), rel=1e-10)
    assert stats["hard_negative_ratio"] == pytest.approx(float((d_an < d_ap).double().mean()), abs=1e-15)
    terms = F.relu(d_ap - d_an + 0.2)
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-15)
    assert stats["num_terms"] == 24 and stats["num_nonzero"] == int((terms > 0).sum())
    assert stats["active_fraction"] == pytest.approx(int((terms > 0).sum()) / 24)
    assert "d_ap_mean=" in repr(crit.last_stats)


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_batch_all_and_semi_hard_report_counts_and_loss_only(mining):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), pk_labels(4, 4, g)
    crit = ml.TripletLoss(mining=mining, reduction="mean_nonzero")
    terms = crit.loss_terms(x, y)
    stats = crit.last_stats.as_dict()
    assert stats["num_terms"] == int(terms.num_terms) and stats["num_nonzero"] == int(terms.num_nonzero)
    assert stats["loss"] == pytest.approx(float(terms.reduce("mean_nonzero")), rel=1e-15)
    assert math.isnan(stats["d_ap_mean"]) and math.isnan(stats["hard_negative_ratio"])


def test_the_reference_backend_keeps_no_record():
    crit = ml.TripletLoss(backend="reference")
    crit(torch.randn(8, 3), torch.arange(4).repeat(2))
    assert crit.last_stats is None


def test_the_warning_fires_once_on_a_collapse():
    monitor = ml.CollapseMonitor(check_every=2, patience=5)
    crit = ml.TripletLoss(margin="soft", normalize=False, monitor=monitor)
    fired = _train(crit, _collapsing_steps(80))
    assert len(fired) == 1
    assert "looks collapsed" in str(fired[0].message) and "SCTLoss" in str(fired[0].message)
    assert monitor.collapsed_at is not None and monitor.collapsed_at % 2 == 0
    # at the step it fired, the last `patience` checks were at ln 2 (10%) with nearly every negative harder
    upto = [h for h in monitor.history if h["step"] <= monitor.collapsed_at]
    window = upto[-5:]
    assert window[-1]["step"] == monitor.collapsed_at
    assert all(abs(h["loss"] - math.log(2)) <= 0.1 * math.log(2) and h["hard_negative_ratio"] >= 0.9
               for h in window)
    # and before it, the streak was shorter: the first step at which the rule holds
    assert not all(abs(h["loss"] - math.log(2)) <= 0.1 * math.log(2) and h["hard_negative_ratio"] >= 0.9
                   for h in upto[-6:])


def test_hinge_collapse_is_read_against_the_margin():
    monitor = ml.CollapseMonitor(check_every=1, patience=5)
    crit = ml.TripletLoss(margin=0.5, normalize=False, monitor=monitor)
    assert len(_train(crit, _collapsing_steps(80))) == 1


@pytest.mark.parametrize("crit", [ml.TripletLoss(margin="soft", normalize=False), ml.TripletLoss(margin=0.2),
                                  ml.SCTLoss(), ml.EPHNLoss()], ids=["soft", "hinge", "sct", "ephn"])
def test_silent_on_a_healthy_run(crit):
    crit.monitor = ml.CollapseMonitor(check_every=2, patience=5)
    assert _train(crit, _healthy_steps(100)) == []
    assert crit.monitor.collapsed_at is None and len(crit.monitor.history) == 50


def test_silent_when_the_distances_do_not_shrink():
    # overlapping classes at a constant scale: the loss sits near ln 2 but nothing contracts
    monitor = ml.CollapseMonitor(check_every=2, patience=5)
    crit = ml.TripletLoss(margin="soft", normalize=False, monitor=monitor)
    _train(crit, (((0.01 * x), y) for x, y in _collapsing_steps(80, rate=1.0)))
    assert monitor.history and all(abs(h["loss"] - math.log(2)) < 0.1 for h in monitor.history)
    # a strictly constant batch never shrinks: never fires
    monitor2 = ml.CollapseMonitor(check_every=1, patience=3)
    crit2 = ml.TripletLoss(margin="soft", normalize=False, monitor=monitor2)
    x, y = next(_collapsing_steps(1))
    assert _train(crit2, ((0.01 * x.clone(), y) for _ in range(30))) == []


def test_the_spread_rule_sees_one_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(1, 8, generator=g, dtype=torch.float64)
    monitor = ml.CollapseMonitor(check_every=1, patience=3, spread=True)
    crit = ml.TripletLoss(margin=0.2, monitor=monitor)
    steps = (((1.0 + 0.01 * torch.rand(32, 1, generator=g, dtype=torch.float64)) * direction
              + 1e-4 * (0.5 ** t) * torch.randn(32, 8, generator=g, dtype=torch.float64), pk_labels(8, 4, g))
             for t in range(20))
    assert len(_train(crit, steps)) == 1
    assert monitor.history[-1]["spread"] < 0.1


def test_no_record_read_in_eval_mode_or_without_grad_and_monitor_off():
    crit = ml.TripletLoss(monitor=ml.CollapseMonitor(check_every=1))
    x, y = torch.randn(16, 4), pk_labels(4, 4)
    crit.eval()
    crit(x, y)
    crit.train()
    with torch.no_grad():
        crit(x, y)
    assert crit.monitor.step == 0 and crit.last_stats is not None
    crit(x, y)
    assert crit.monitor.step == 1 and len(crit.monitor.history) == 1
    off = ml.TripletLoss(monitor=False)
    off(x, y)
    assert off.monitor is None and off.last_stats is not None


def test_monitor_state_dict_round_trip():
    monitor = ml.CollapseMonitor(check_every=2, patience=5)
    crit = ml.TripletLoss(margin="soft", normalize=False, monitor=monitor)
    _train(crit, _collapsing_steps(40))
    other = ml.CollapseMonitor(check_every=2, patience=5)
    other.load_state_dict(monitor.state_dict())
    assert other.state_dict() == monitor.state_dict()


@pytest.mark.parametrize("kwargs, err", [(dict(check_every=0), ValueError), (dict(patience=1.5), TypeError),
                                         (dict(tolerance=0.0), ValueError), (dict(spread=1), TypeError),
                                         (dict(min_hard_ratio=-0.1), ValueError)])
def test_bad_monitor_options(kwargs, err):
    with pytest.raises(err):
        ml.CollapseMonitor(**kwargs)


def test_the_monitor_adds_no_dispatched_op_or_sync_between_checks():
    sys.path.insert(0, ROOT)
    from benchmarks.step_costs import count_step

    x0, y = torch.randn(64, 32), torch.arange(64) // 4
    with_monitor = ml.TripletLoss(monitor=ml.CollapseMonitor(check_every=1000))
    without = ml.TripletLoss(monitor=False)
    a = count_step(lambda: with_monitor(x0.clone().requires_grad_(), y))
    b = count_step(lambda: without(x0.clone().requires_grad_(), y))
    c = count_step(lambda: ml.functional.triplet_loss(x0.clone().requires_grad_(), y))
    assert a == b == c


# ----------------------------------------------------------------------------------------------------
# MiningSchedule
# ----------------------------------------------------------------------------------------------------

def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, 6, generator=g, dtype=torch.float64), pk_labels(6, 4, g)


def test_the_schedule_switches_at_its_steps_and_equals_each_stage():
    x, y = _batch()
    sct = ml.SCTLoss()
    schedule = ml.MiningSchedule([(0, "batch_all"), (2, "semi_hard"), (4, sct)], margin=0.1)
    expected = [ml.TripletLoss(0.1, "batch_all")(x, y)] * 2 + [ml.TripletLoss(0.1, "semi_hard")(x, y)] * 2 + \
        [sct(x, y)] * 2
    for want in expected:
        assert torch.equal(schedule(x, y), want)
    assert schedule.step == 6 and schedule.stage_index == 2 and schedule.current is sct
    assert schedule.reduction == "mean" and schedule.last_stats is sct.last_stats


def test_the_schedule_counts_training_steps_only_and_loss_terms_too():
    x, y = _batch()
    schedule = ml.MiningSchedule([(0, "batch_all"), (1, "batch_hard")])
    schedule.eval()
    schedule(x, y)
    schedule.train()
    with torch.no_grad():
        schedule(x, y)
    assert schedule.step == 0
    terms = schedule.loss_terms(x, y)
    assert schedule.step == 1 and schedule.current.mining == "batch_hard"
    torch.testing.assert_close(terms.reduce("mean"), ml.TripletLoss(mining="batch_all")(x, y))
    schedule.set_step(0)
    assert schedule.current.mining == "batch_all"


def test_the_schedule_step_is_in_state_dict():
    schedule = ml.MiningSchedule([(0, "batch_all"), (5, "batch_hard")])
    schedule.set_step(7)
    other = ml.MiningSchedule([(0, "batch_all"), (5, "batch_hard")])
    other.load_state_dict(schedule.state_dict())
    assert other.step == 7 and other.current.mining == "batch_hard"
    assert "starts=[0, 5], step=7" in repr(other)


def test_the_schedule_under_distributed_and_memory_wrappers():
    x, y = _batch()
    schedule = ml.MiningSchedule([(0, "batch_all"), (1, "batch_hard")])
    mem = ml.CrossBatchMemory(schedule, 6, 48, dtype=torch.float64)
    first = mem(x, y)
    torch.testing.assert_close(first, ml.TripletLoss(mining="batch_all")(x, y))
    assert schedule.step == 1
    dl = ml.distributed.DistributedLoss(ml.MiningSchedule([(0, "semi_hard")]))
    torch.testing.assert_close(dl(x, y), ml.TripletLoss(mining="semi_hard")(x, y))


@pytest.mark.parametrize("stages, err, match", [
    ([], ValueError, "empty"),
    ([(1, "batch_all")], ValueError, "begin at 0"),
    ([(0, "batch_all"), (0, "batch_hard")], ValueError, "increase strictly"),
    ([(0, "hardest")], ValueError, "mining"),
    ([(0, torch.nn.Linear(2, 2))], TypeError, "loss_terms"),
    ([("0", "batch_all")], TypeError, "start"),
    ([0], TypeError, "pair"),
    (5, TypeError, "sequence"),
])
def test_bad_schedules(stages, err, match):
    with pytest.raises(err, match=match):
        ml.MiningSchedule(stages)


def test_the_record_is_per_term_for_sum_and_the_warning_fires():
    monitor = ml.CollapseMonitor(check_every=1, patience=5)
    crit = ml.TripletLoss(margin=0.5, normalize=False, reduction="sum", monitor=monitor)
    assert len(_train(crit, _collapsing_steps(80))) == 1
    stats = crit.last_stats.as_dict()
    assert stats["loss"] < 0.6 and stats["num_terms"] == 32


def test_presets_take_the_keyword_options():
    assert ml.BatchHardTripletLoss(monitor=False).monitor is None
    assert ml.BatchHardTripletLoss(positive="easiest").form.positive == "easiest"
    assert ml.BatchAllTripletLoss(monitor=False).monitor is None and ml.SemiHardTripletLoss(monitor=False).monitor is None
    with pytest.raises(TypeError, match="positive"):
        ml.BatchAllTripletLoss(positive="easiest")


def test_a_compiled_loss_keeps_one_graph_and_no_record():
    crit = ml.TripletLoss(monitor=ml.CollapseMonitor(check_every=1))
    x, y = torch.randn(16, 4), pk_labels(4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(crit, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            torch.testing.assert_close(compiled(x.clone().requires_grad_(), y), crit.eval()(x, y))
            crit.train()
    assert crit.monitor.step == 0  # the eager calls above were in eval mode; the compiled ones count nothing


def test_a_stage_change_inside_a_wrapper_reduces_with_the_stage_that_ran():
    x, y = _batch()
    stages = [(0, ml.TripletLoss(mining="batch_all", reduction="sum")), (1, ml.TripletLoss(mining="batch_hard"))]
    mem = ml.CrossBatchMemory(ml.MiningSchedule(stages), 6, 48, dtype=torch.float64)
    first = mem(x, y)
    torch.testing.assert_close(first, ml.TripletLoss(mining="batch_all", reduction="sum")(x, y))
    dl = ml.distributed.DistributedLoss(ml.MiningSchedule(stages))
    torch.testing.assert_close(dl(x, y), ml.TripletLoss(mining="batch_all", reduction="sum")(x, y))
