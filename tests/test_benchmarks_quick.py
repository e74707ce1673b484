"""The benchmark report script runs end to end (tiny sizes) and writes its markdown and its plot."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("batch_hard", "batch_all", "semi_hard", "warp", "centroid", "norm_softmax", "dgcrl")


# about a minute on 2 cores: the report over every family (its flags are checked by --help in test_scripts.py)
@pytest.mark.slow
def test_report_quick_writes_markdown_and_png(tmp_path):
    out = tmp_path / "report"
    raw = tmp_path / "raw.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--quick", "--out", str(out),
           "--json-out", str(raw)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    md = (out / "RESULTS.md").read_text()
    assert "torch " in md and "thread per point" in md and "report.py --quick" in md
    for title in ("triplet batch-hard", "triplet batch-all", "triplet semi-hard", "WARP", "centroid bound",
                  "NormSoftmax", "DGCRL"):
        assert f"## {title}" in md
    assert "## Headline" in md and "one N×N×D matmul" in md
    import json

    results = json.loads(raw.read_text())
    assert {r["family"] for r in results} == set(FAMILIES)
    # every point of the quick grid is measured (no skips, no errors): each case function still runs
    failed = [r for r in results if "median_s" not in r]
    have_pml = importlib.util.find_spec("pytorch_metric_learning") is not None
    assert [r for r in failed if r["impl"] != "pml" or have_pml] == []
    assert all(r["peak_extra_mib"] >= 0 for r in results if "median_s" in r)
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "results.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert "![time and peak memory" in md


# an end-to-end script run, about 11 s (its flags: --help in test_scripts.py)
@pytest.mark.slow
def test_metrics_memory_script_runs_small_sizes(tmp_path):
    raw = tmp_path / "metrics.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "metrics_memory.py"), "--sizes", "300", "600",
           "--dim", "16", "--json-out", str(raw)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| 300 |" in p.stdout and "| 600 |" in p.stdout and "error" not in p.stdout.lower()
    import json

    rows = json.loads(raw.read_text())
    assert [r["params"]["n"] for r in rows] == [300, 600]
    assert all(r["median_s"] > 0 and r["peak_extra_mib"] >= 0 for r in rows)


def test_metrics_memory_case_gives_finite_nontrivial_metrics():
    import math

    from benchmarks.metrics_memory import case

    out = case(n=500, d=16)()
    assert set(out) >= {"R@1", "mAP", "MAP@R", "R-precision"}
    # overlapping clusters: better than chance (1/10 classes), not perfect
    assert all(math.isfinite(v) for v in out.values())
    assert 0.1 < out["mAP"] < 1.0
