"""benchmarks/metrics_speed.py runs end to end at tiny sizes, so it cannot rot; its methods agree."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_BEFORE = os.environ.get("METRICLOSS_NATIVE")
HAVE_PML_FAISS = all(importlib.util.find_spec(m) is not None for m in ("pytorch_metric_learning", "faiss"))


# an end-to-end script run, about 13 s (its flags: --help in test_scripts.py)
@pytest.mark.slow
def test_metrics_speed_script_runs_tiny_sizes(tmp_path):
    raw = tmp_path / "speed.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "metrics_speed.py"), "--sizes", "200", "--dim", "8",
           "--json-out", str(raw)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| N | method | time (s) | × floor |" in p.stdout
    rows = {r["method"]: r for r in json.loads(raw.read_text())}
    assert set(rows) == {"floor", "metricloss", "metricloss_torch", "pml_faiss_maxbin", "pml_faiss_all"}
    measured = ["floor", "metricloss", "metricloss_torch"] + (["pml_faiss_maxbin", "pml_faiss_all"] if HAVE_PML_FAISS
                                                              else [])
    for method in measured:
        assert rows[method]["median_s"] > 0 and rows[method]["peak_extra_mib"] >= -1, rows[method]
        assert f"| 200 | {method} | " in p.stdout
    # the native kernel served "metricloss", the torch path "metricloss_torch": bitwise the same values
    assert rows["metricloss"]["values"].pop("native") == 1.0 and rows["metricloss_torch"]["values"].pop("native") == 0.0
    for name in ("R@1", "mAP", "MAP@R", "R-precision"):
        assert rows["metricloss"]["values"][name] == rows["metricloss_torch"]["values"][name]
    if not HAVE_PML_FAISS:  # optional: skipped with a message, never an error
        assert "needs" in rows["pml_faiss_maxbin"]["skipped"]
        return
    ours, maxbin, full = (rows[m]["values"] for m in ("metricloss", "pml_faiss_maxbin", "pml_faiss_all"))
    assert ours["R@1"] == pytest.approx(maxbin["precision_at_1"], abs=1e-6)
    assert ours["MAP@R"] == pytest.approx(maxbin["mean_average_precision_at_r"], abs=1e-6)
    assert ours["R-precision"] == pytest.approx(maxbin["r_precision"], abs=1e-6)
    assert ours["mAP"] == pytest.approx(full["mean_average_precision"], abs=1e-6)


def test_pml_all_is_skipped_where_the_dense_array_does_not_fit(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "metrics_speed.py"), "--sizes", "20000", "--dim", "4",
           "--methods", "pml_faiss_all", "--mem-limit-gb", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| 20000 | pml_faiss_all |" in p.stdout
    assert "GiB" in p.stdout or "needs" in p.stdout


def test_case_values_are_finite_and_not_trivial(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks.metrics_speed import case

    values = case("metricloss", n=400, d=16)()
    assert all(math.isfinite(v) for v in values.values())
    assert 0.05 < values["mAP"] < 1.0 and values["cpu_s"] >= 0
    log = tmp_path / "progress.log"
    torch_values = case("metricloss_torch", n=400, d=16, progress_log=str(log))()
    assert "retrieval metrics" in log.read_text() and "1/1" in log.read_text()  # the tqdm bar went there
    assert torch_values["native"] == 0.0 and torch_values["mAP"] == values["mAP"]
    assert os.environ.get("METRICLOSS_NATIVE") == ENV_BEFORE  # the case restores the switch
    assert math.isfinite(case("floor", n=300, d=8)()["mean row max"])
    with pytest.raises(ValueError, match="unknown method"):
        case("dense", n=10, d=2)
