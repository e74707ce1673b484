"""The main job (examples/compare_losses.py) runs end to end on a tiny setting; its data and verdicts."""

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"examples_{name}"] = module  # dataclasses look their module up in sys.modules
    module.__name__ = f"examples_{name}"
    spec.loader.exec_module(module)
    return module


def test_compare_losses_smoke(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning")
    compare = _load("compare_losses")
    rows = compare.main(["--seeds", "0", "1", "--epochs", "1", "--finetune-epochs", "1", "--max-fonts", "6",
                         "--renders", "1", "--size", "16", "--timing-repeats", "1", "--no-progress",
                         "--out", str(tmp_path)])
    names = ["(untrained network)"] + [m.name for m in compare.METHODS]
    assert [r["loss"] for r in rows] == names * 2 and [r["seed"] for r in rows] == [0] * len(names) + [1] * len(names)
    for r in rows:
        for key in ("mAP", "MAP@R", "R@1"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (r["loss"], key, r[key])
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in names) and " ± " in table
    assert "dataset fingerprint: sha256 " in table and "torch " in table and "Pillow " in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert {s["loss"] for s in result["summary"]} == set(names)
    by = {s["loss"]: s for s in result["summary"]}
    for name in ("batch-hard triplet", "batch-all triplet", "NormSoftmax", "cross-entropy + cosine"):
        # PML's version of the loss on the same batch (same class weights) gives the same value
        assert by[name]["pml_value"] == pytest.approx(by[name]["loss_value"], rel=1e-4, abs=1e-5), name
        assert by[name]["pml_ms"] > 0 and by[name]["loss_ms"] > 0
    claims = " ".join(c["claim"] for c in result["claims"])
    for claim in ("WARP fine-tuning is faster", "cosine layer", "centroid bound trains faster", "DGCRL converges",
                  "mining dominates", "makes the batch-hard family train here", "the collapse monitor on"):
        assert claim in claims, claim
    assert all(c["verdict"] and c["measured"] for c in result["claims"])
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "monitor.png").stat().st_size > 0
    assert len(by["batch-hard triplet"]["collapse_epochs"]) == 2 and "monitor_curve" in by["SCT (easy positive, selective)"]
    assert result["meta"]["fingerprint_matches"]  # not the default data: nothing to compare, no warning
    assert "FINGERPRINT DIFFERS" not in capsys.readouterr().out


def test_defaults_and_full():
    compare = _load("compare_losses")
    args = compare.parse_args([])
    assert (args.seeds, args.epochs, args.finetune_epochs, args.threads) == ([0, 1, 2], 8, 4, 1)
    full = compare.parse_args(["--full"])
    assert (full.seeds, full.epochs, full.finetune_epochs) == ([0, 1, 2, 3, 4], 20, 8)
    with pytest.raises(SystemExit):
        compare.parse_args(["--losses", "no such loss"])


def test_fingerprint_differs_loudly():
    compare = _load("compare_losses")
    args = compare.parse_args([])
    assert compare.check_fingerprint(dict(compare.EXPECTED_FINGERPRINT), args) is None
    changed = dict(compare.EXPECTED_FINGERPRINT, sha256="0" * 64)
    assert "FINGERPRINT DIFFERS" in compare.check_fingerprint(changed, args)
    assert compare.check_fingerprint(changed, compare.parse_args(["--max-fonts", "3"])) is None  # not the default


def test_default_fonts_are_the_pinned_set():
    datasets = _load("datasets")
    compare = _load("compare_losses")
    import matplotlib
    import PIL

    assert [os.path.basename(p) for p in datasets.bundled_font_files()] == list(datasets.FONT_SET)
    if (matplotlib.__version__, PIL.__version__) != (datasets.FONT_SET_MATPLOTLIB, "13.0.0"):
        pytest.skip("the expected fingerprint is for the pinned matplotlib and Pillow of the examples extra")
    images, labels, _ = datasets.load_fonts(size=24, renders=3, seed=0)
    assert datasets.fingerprint(images, labels) == compare.EXPECTED_FINGERPRINT


def test_datasets_clean_fonts_fingerprint_and_class_split(tmp_path):
    datasets = _load("datasets")
    images, labels, names = datasets.load_fonts(size=16, renders=1, max_fonts=5)
    assert images.shape[1:] == (16, 16) and len(names) == 5 and len(set(names)) == 5
    assert set(labels.tolist()) == set(range(5))
    fp = datasets.fingerprint(images, labels)
    assert fp["classes"] == 5 and fp["images"] == len(labels) and len(fp["sha256"]) == 64
    flipped = images.copy()
    flipped[0, 0, 0] ^= 1
    assert datasets.fingerprint(flipped, labels)["sha256"] != fp["sha256"]
    train, test = datasets.class_split(labels, 0.6, seed=0)
    assert not (set(labels[train].tolist()) & set(labels[test].tolist()))
    assert (train | test).all()
    with pytest.raises(FileNotFoundError, match="font_dirs"):
        datasets.load_fonts(max_fonts=1, font_dirs=[str(tmp_path / "missing")])


def test_hermans_schedule_and_verdicts():
    compare = _load("compare_losses")
    lrs = [compare.hermans_lr(t, 100, 3e-4) for t in range(101)]
    assert all(lr == 3e-4 and b == 0.9 for lr, b in lrs[:60])
    assert lrs[60] == (3e-4, 0.5) and lrs[100][0] == pytest.approx(3e-7) and lrs[80][0] == pytest.approx(3e-4 * 0.001 ** 0.5)
    assert compare.compare((0.5, 0.01), (0.4, 0.02)) == "supported"
    assert compare.compare((0.4, 0.01), (0.5, 0.02)) == "contradicted"
    assert compare.compare((0.45, 0.03), (0.42, 0.03)) == "within the spread"
    assert compare.epochs_to_90([0.1, 0.5, 0.95, 1.0]) == 3
    assert compare.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert np.isclose(compare.svmax_weight(112, 64, 0.2), 0.2 / (math.sqrt(112 / 64) - math.sqrt(112) / 64))


def _avx2_report(**changes):
    rep = {"cpu": "Some CPU", "machine": "x86_64", "cpu_flags": {"avx2": True, "avx512f": False},
           "torch_cpu_capability": "AVX2", "onednn_isa": "Intel AVX2", "mkl": "MKL", "switches": {}}
    rep.update(changes)
    return rep


def test_isa_differs_loudly(monkeypatch):
    """The run warns unless the AVX2 pin is in effect and torch and oneDNN really run AVX2."""
    compare = _load("compare_losses")
    cpu_isa = _load("cpu_isa")
    for key, value in cpu_isa.PINS["avx2"].items():
        monkeypatch.setenv(key, value)
    args = compare.parse_args([])
    assert args.isa == compare.TABLE_ISA == "avx2"
    assert compare.check_isa(_avx2_report(), args) is None
    assert "--isa native" in compare.check_isa(_avx2_report(), compare.parse_args(["--isa", "native"]))
    wide = compare.check_isa(_avx2_report(torch_cpu_capability="AVX512", onednn_isa="Intel AVX-512"), args)
    assert "INSTRUCTION SET DIFFERS" in wide and "does not run the AVX2 code paths" in wide
    assert "judge the verdicts on the spread" in wide
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert "the pin is not in effect" in compare.check_isa(_avx2_report(), args)


def test_isa_pin_and_report(monkeypatch):
    cpu_isa = _load("cpu_isa")
    with pytest.raises(ValueError, match="unknown ISA pin 'avx9'"):
        cpu_isa.pin("avx9")
    with pytest.raises(RuntimeError, match="before torch is imported"):  # the tests imported torch
        cpu_isa.pin("avx2")
    cpu_isa.pin("native")  # sets nothing: allowed at any time
    assert set(cpu_isa.SWITCHES) == {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                                     "ONEDNN_MAX_CPU_ISA", "METRICLOSS_NATIVE_ISA"}
    rep = cpu_isa.report()
    assert rep["cpu"] and rep["torch_cpu_capability"] and rep["onednn_isa"] and rep["mkl"]
    assert set(rep["switches"]) == set(cpu_isa.SWITCHES)
    line = cpu_isa.summary(rep)
    assert rep["cpu"] in line and f"torch CPU capability {rep['torch_cpu_capability']}" in line


def test_isa_pin_reaches_torch_and_onednn(tmp_path):
    """Run as a script, the pin is set before torch loads: torch and oneDNN report AVX2 (on an x86-64 CPU
    with AVX2)."""
    import subprocess

    cpu_isa = _load("cpu_isa")
    if not cpu_isa.cpu_flags().get("avx2"):
        pytest.skip("not an x86-64 CPU with AVX2")
    code = ("import sys; sys.path.insert(0, 'examples'); import cpu_isa; cpu_isa.pin('avx2'); "
            "print(cpu_isa.summary(cpu_isa.report()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "torch CPU capability AVX2, oneDNN ISA Intel AVX2" in done.stdout


def test_results_png_puts_fine_tuning_on_its_own_axis(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compare = _load("compare_losses")
    args = compare.parse_args(["--out", str(tmp_path)])
    row = dict(epochs=8, seconds=(1.0, 0.1), mAP=(0.4, 0.01), **{"MAP@R": (0.2, 0.01)}, val_mAP_curve=[0.1, 0.2])
    summary = [dict(row, loss="(untrained network)", epochs=0), dict(row, loss="cross-entropy"),
               dict(row, loss="WARP (fine-tunes cross-entropy)", epochs=4)]
    drawn = compare.plot_results(plt, summary, args)
    assert drawn["convergence"] == ["cross-entropy"] and drawn["fine-tuning"] == ["WARP (fine-tunes cross-entropy)"]
    assert drawn["title"] == ["fonts: 8 epochs from scratch, 4 fine-tuning; mean ± std over seeds 0, 1, 2"]
    assert "[" not in drawn["title"][0] and (tmp_path / "results.png").stat().st_size > 0
