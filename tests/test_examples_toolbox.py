"""The toolbox examples (attention maps, Knowledge Evolution) and benchmarks/toolbox.py run at tiny settings."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"examples_{name}"] = module
    spec.loader.exec_module(module)
    return module


TINY_DATA = ["--max-fonts", "6", "--renders", "1", "--batch", "32"]


def test_attention_maps_smoke(tmp_path):
    maps = _load("attention_maps")
    res = maps.main(["--epochs", "1", "--num-images", "3", "--steps", "20", "--out", str(tmp_path), *TINY_DATA])
    png = (tmp_path / "attention_maps.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    saved = json.loads((tmp_path / "attention_maps.json").read_text())
    assert saved["grid"] == [8, 8] and 1 <= saved["caf_steps"] <= 20 and len(saved["per_image"]) == 3
    for key in ("energy_on_glyph", "glyph_area", "energy_on_border", "border_area"):
        assert 0.0 <= res[key] <= 1.0
    assert math.isclose(res["border_area"], 28 / 64)
    assert math.isfinite(res["mAP"]) and 0 <= res["mAP"] <= 1


def test_attention_maps_last_block_split(tmp_path):
    maps = _load("attention_maps")
    res = maps.main(["--epochs", "0", "--num-images", "2", "--steps", "5", "--split", "3", "--optimizer", "sgd",
                     "--out", str(tmp_path), *TINY_DATA])
    assert res["grid"] == [4, 4]


def test_knowledge_evolution_smoke(tmp_path):
    ke = _load("knowledge_evolution")
    res = ke.main(["--generations", "2", "--epochs", "1", "--out", str(tmp_path), *TINY_DATA])
    assert [r["generation"] for r in res["rows"]] == [0, 1] and [r["epochs"] for r in res["rows"]] == [1, 2]
    for r in res["rows"] + [res["baseline"]]:
        for key, value in r.items():
            if "mAP" in key or "R@1" in key:
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (key, value)
    assert 0.2 < res["fit_parameters"] / res["total_parameters"] < 0.35  # ~a quarter of the weights at s = 0.5
    table = (tmp_path / "knowledge_evolution.md").read_text()
    assert "| 0 | 1 |" in table and "| 1 | 2 |" in table and "control: no re-init" in table
    res = ke.main(["--generations", "1", "--epochs", "1", "--no-baseline", "--out", str(tmp_path), *TINY_DATA])
    assert res["baseline"] is None


@pytest.mark.parametrize("script", ["attention_maps.py", "knowledge_evolution.py"])
def test_examples_help(script):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), "--help"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0 and "usage:" in p.stdout and "Usage:" in p.stdout


# an end-to-end script run, about 7 s (its flags: --help in test_scripts.py)
@pytest.mark.slow
def test_toolbox_benchmark_quick(tmp_path):
    out = tmp_path / "toolbox.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "toolbox.py"), "--quick", "--json-out",
                        str(out)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {r["method"] for r in res["svmax"]} == {"gram", "svd"}
    assert all(r["steps"] >= 1 and r["median_s"] > 0 for r in res["l2_caf"])
    assert all(math.isfinite(r["overhead_median"]) for r in res["two_head"])
    assert "### SVMax" in p.stdout and "### L2-CAF" in p.stdout and "### Two-head" in p.stdout
