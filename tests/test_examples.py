"""The main job (examples/compare_losses.py) runs end to end on a tiny setting."""

import importlib.util
import math
import os
import sys

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


def test_compare_losses_smoke(tmp_path):
    compare = _load("compare_losses")
    rows = compare.main(["--epochs", "1", "--finetune-epochs", "1", "--max-fonts", "8", "--renders", "1",
                         "--batch", "64", "--no-progress", "--out", str(tmp_path)])
    names = [r["loss"] for r in rows]
    assert names == ["(untrained network)"] + [m.name for m in compare.METHODS]
    for r in rows:
        for key in ("mAP", "MAP@R", "R@1"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (r["loss"], key, r[key])
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "results.json").exists()


def test_datasets_clean_fonts_and_class_split():
    datasets = _load("datasets")
    images, labels, names = datasets.load_fonts(size=16, renders=1, max_fonts=5)
    assert images.shape[1:] == (16, 16) and len(names) == 5 and len(set(names)) == 5
    assert set(labels.tolist()) == set(range(5))
    train, test = datasets.class_split(labels, 0.6, seed=0)
    assert not (set(labels[train].tolist()) & set(labels[test].tolist()))
    assert (train | test).all()
