"""benchmarks/gpu_check.py runs end to end in its --dry-run mode (CPU tensors, Triton interpreter, tiny sizes),
so the GPU check cannot rot between the rare runs on a GPU machine."""

import json
import os
import subprocess
import sys

import pytest

import metricloss as ml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(out), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_dry_run_writes_report_and_json(dry_run):
    out, p = dry_run
    md = (out / "REPORT.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert md in p.stdout  # the report is also printed
    for section in ("## Correctness", "## Speed and memory", "## Targets", "## Host syncs", "## Cases and budgets"):
        assert section in md
    env = data["environment"]
    for key in ("date_utc", "torch", "triton", "cuda", "device_name", "mode"):
        assert key in env
    assert env["mode"] == "dry-run" and env["triton_interpret"] == "1"


def test_dry_run_lists_every_public_loss(dry_run):
    out, _ = dry_run
    md = (out / "REPORT.md").read_text()
    public = [name for name in ml.__all__ if name[0].isupper() and not name.endswith("Warning")] + \
        ["mine_batch_hard", "retrieval_metrics"]
    for name in public:
        assert name in md, name
    data = json.loads((out / "report.json").read_text())
    assert set(public) <= set(data["covered"])
    # the checks really ran for every family, with every backend that serves batch-hard and the centroid bound
    checks = data["checks"]
    names = {c["check"].split(" ")[0] for c in checks}
    for family in ("batch-hard", "mine_batch_hard", "batch_all", "semi_hard", "WARP", "centroid", "NormalizeScale",
                   "CosineClassifier", "NormSoftmax", "CentralizedRanking", "retrieval_metrics"):
        assert family in names, family
    for case in ("batch-hard mining and loss", "centroid"):
        backends = {c["params"].get("backend") for c in checks if c["case"] == case}
        assert {"auto", "triton", "torch"} <= backends, (case, backends)
    assert {c["params"].get("dtype") for c in checks if "dtype" in c["params"]} == {"fp32", "bf16", "fp16"}


def test_dry_run_has_no_correctness_failure(dry_run):
    out, _ = dry_run
    data = json.loads((out / "report.json").read_text())
    failed = [c for c in data["checks"] if not c["ok"]]
    assert not failed, failed[:5]
    assert len(data["checks"]) > 300
    assert all(c["status"] == "done" for c in data["cases"]), data["cases"]


def test_dry_run_times_every_method_and_counts_syncs(dry_run):
    out, _ = dry_run
    data = json.loads((out / "report.json").read_text())
    methods = {(t["family"], t["method"]) for t in data["timings"]}
    for family in ("batch-hard", "batch_all", "semi_hard", "centroid", "NormSoftmax", "DGCRL", "WARP"):
        assert any(f == family for f, _ in methods), family
    timed = [t for t in data["timings"] if "median_s" in t]
    assert len(timed) >= 15
    assert {s["loss"] for s in data["syncs"]} == {name for name, _ in gpu_check.sync_workloads("cpu", tiny=True)}
    assert all("count_tiny" in s and "count_large" in s for s in data["syncs"])


def test_peak_table_matches_device_names():
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3")["bf16"] == 989.0
    assert gpu_check.peak_for("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert gpu_check.peak_for("NVIDIA H200")["tf32"] == 494.5
    assert gpu_check.peak_for("NVIDIA A100-SXM4-80GB")["fp32"] == 19.5
    assert gpu_check.peak_for("NVIDIA GeForce RTX 4090") is None


def test_wheels_folder_goes_on_sys_path(tmp_path, monkeypatch):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert gpu_check.add_wheels_to_path(str(tmp_path)) == [str(wheel)]
    assert str(wheel) in sys.path
    assert gpu_check.add_wheels_to_path(str(tmp_path / "none")) == []


def test_rel_err_flags_nan_and_shape_mismatch():
    import torch

    a = torch.tensor([1.0, 2.0])
    assert gpu_check.rel_err(a, a) == 0.0
    assert gpu_check.rel_err(torch.tensor([1.0, float("nan")]), a) == float("inf")
    assert gpu_check.rel_err(a[:1], a) == float("inf")
    assert gpu_check.rel_err(a * 1.01, a) == pytest.approx(0.01)


def test_a_wrong_result_is_reported_as_failure():
    """The comparison machinery can fail: a loss off by 1% is flagged, and the run records it."""
    import torch

    run = gpu_check.Run("dry-run", "cpu")
    run.case_name = "selftest"
    x = torch.randn(8, 3)
    ok = gpu_check.compare_losses(run, "scaled", {}, lambda t: (t * t).sum() * 1.01, lambda t: (t * t).sum(), [x],
                                  "fp32", 2e-4)
    assert not ok and not run.checks[0]["ok"] and run.checks[0]["err"] == pytest.approx(0.01, rel=1e-4)


def test_time_budget_stops_a_case():
    run = gpu_check.Run("dry-run", "cpu")
    run.deadline = 0.0
    with pytest.raises(gpu_check.CaseTimeout):
        run.tick()


def test_targets_read_off_the_timings():
    run = gpu_check.Run("quick", "cpu")
    run.peak = gpu_check.PEAK_TFLOPS["H100"]
    big = dict(family="batch-hard", N=65536, D=512, dtype="bf16")
    mid = dict(family="batch-hard", N=16384, D=512, dtype="bf16")
    run.timings = [dict(big, method="triton miner only", median_s=0.009),
                   dict(big, method="bare matmul x @ x.T (bf16)", median_s=0.006),
                   dict(big, method="metricloss triton (fwd+bwd)", median_s=0.02, peak_extra_mib=300.0),
                   dict(mid, method="metricloss triton (fwd+bwd)", median_s=0.002),
                   dict(mid, method="PML (fwd+bwd)", median_s=0.1)]
    rows = gpu_check.targets(run)
    assert [r["met"] for r in rows] == [True, True, True, True]
    assert "2.02x the bound" in rows[0]["measured"] and "50.0x" in rows[2]["measured"]
    run.timings[0]["median_s"] = 0.012   # 2.7x the 4.45 ms bound, over 10 ms
    run.timings[4]["median_s"] = 0.03    # 15x
    assert [r["met"] for r in gpu_check.targets(run)] == [False, False, False, True]
    run.timings = [dict(mid, method="PML (fwd+bwd)", error="skipped")]
    assert [r["met"] for r in gpu_check.targets(run)] == [None, None]


def test_a_raising_subcase_is_a_listed_failure_and_the_case_goes_on():
    run = gpu_check.Run("dry-run", "cpu")
    run.case_name = "selftest"
    for i in range(3):
        with run.subcase({"i": i}):
            if i == 1:
                raise RuntimeError("kernel did not compile\nmore")
            run.check("ok", {"i": i}, 0.0, 1.0)
    assert [(c["check"], c["ok"]) for c in run.checks] == [("ok", True), ("sub-case raised", False), ("ok", True)]
    assert run.checks[1]["note"] == "RuntimeError: kernel did not compile" and run.checks[1]["params"] == {"i": 1}
    run.deadline = 0.0
    with pytest.raises(gpu_check.CaseTimeout):
        with run.subcase({}):
            run.tick()
