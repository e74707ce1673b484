"""Packaging: the sdist is a complete source release, the wheel holds only the package, the build warns
about nothing deprecated, and no file anywhere refers to a document a user does not have."""

import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Documents that exist only outside the project (research notes), and absolute paths of a build machine.
# The regexes are written so that this file does not match itself.
UNAVAILABLE = re.compile(r"\b(?:DESIGN|METHODS|KERNELS|PML|DATASETS)\.md\b|shared\s+notes|\.\./shared|/wor[k]/")
TEXT_SUFFIXES = (".py", ".md", ".toml", ".cfg", ".in", ".txt", ".json", "PKG-INFO", "METADATA", "run")
# What the sdist must hold for its tests, examples and benchmarks to run from the unpacked folder.
SOURCE_DIRS = ("metricloss", "tests", "examples", "benchmarks", "docs", ".ci")
TOP_FILES = ("README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "setup.py", "MANIFEST.in")
SKIP_PARTS = {"__pycache__", ".benchmarks", ".hypothesis", ".pytest_cache", "out"}


def project_files():
    """The project's source files, relative to the root (what a checkout or the unpacked sdist holds)."""
    found = list(TOP_FILES)
    for folder in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d not in SKIP_PARTS]
            for name in filenames:
                if not name.endswith((".pyc", ".pyo", ".cubin")):
                    found.append(os.path.relpath(os.path.join(dirpath, name), ROOT))
    return sorted(found)


def unavailable_references(name, text):
    return [f"{name}: {m.group(0)!r}" for m in UNAVAILABLE.finditer(text)]


def test_project_files_refer_to_no_unavailable_document():
    bad = []
    for rel in project_files():
        if rel.endswith(TEXT_SUFFIXES):
            with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
                bad += unavailable_references(rel, f.read())
    assert not bad, bad


def test_the_check_would_catch_a_reference():
    assert unavailable_references("x", "see " + "DESIGN" + ".md §4") and unavailable_references("x", "../" + "shared")
    assert not unavailable_references("x", "see docs/design.md §4 and (methods.md)")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 (the build-system requirement)")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools (no index needed); sdist, then the wheel
    # built from the unpacked sdist, as pip would
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sdist = next(out.glob("*.tar.gz"))
    wheel = next(out.glob("*.whl"))
    return sdist, wheel, p.stdout + p.stderr


def test_build_warns_about_nothing_deprecated(dists):
    log = dists[2]
    assert not re.search(r"deprecat", log, re.I), [line for line in log.splitlines() if re.search("deprecat", line, re.I)]
    assert "SetuptoolsDeprecationWarning" not in log and "License classifiers" not in log


def test_sdist_is_complete(dists):
    sdist = dists[0]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    members = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    missing = [rel for rel in project_files() if rel not in members]
    assert not missing, missing
    for required in ("tests/conftest.py", "tests/helpers.py", "tests/kernels/test_aot.py", "tests/losses/test_triplet.py",
                     "tests/ops/test_mining.py", "examples/compare_losses.py", "benchmarks/report.py",
                     "docs/design.md", "docs/methods.md", "docs/kernels.md", "CHANGELOG.md", ".ci/run"):
        assert required in members, required
    assert not [n for n in members if "__pycache__" in n or n.endswith(".pyc")]


def test_sdist_refers_to_no_unavailable_document(dists):
    bad = []
    with tarfile.open(dists[0]) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(TEXT_SUFFIXES):
                bad += unavailable_references(member.name, tar.extractfile(member).read().decode("utf-8"))
    assert not bad, bad


def test_wheel_holds_only_the_package(dists):
    with zipfile.ZipFile(dists[1]) as whl:
        names = whl.namelist()
        bad = []
        for name in names:
            if name.endswith(TEXT_SUFFIXES):
                bad += unavailable_references(name, whl.read(name).decode("utf-8"))
    outside = [n for n in names if not (n.startswith("metricloss/") or re.match(r"metricloss-[^/]+\.dist-info/", n))]
    assert not outside, outside
    assert "metricloss/kernels/mining.py" in names and not [n for n in names if n.startswith(("tests/", "docs/"))]
    assert not bad, bad


def test_license_metadata_is_spdx(dists):
    with zipfile.ZipFile(dists[1]) as whl:
        meta = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode("utf-8")
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in whl.namelist())
    assert "License-Expression: MIT" in meta
    assert "Classifier: License ::" not in meta
