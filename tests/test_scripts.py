"""Every script in benchmarks/ and examples/ takes --help: it prints its usage and does nothing else.

A script is a file with a ``if __name__ == "__main__":`` guard; the other files there are pytest suites
(``bench_*.py``, ``conftest.py``) or modules the scripts import (``harness.py`` is both).
"""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripts():
    found = []
    for folder in ("benchmarks", "examples"):
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.py"))):
            with open(path, encoding="utf-8") as f:
                if 'if __name__ == "__main__":' in f.read():
                    found.append(os.path.relpath(path, ROOT))
    return found


SCRIPTS = _scripts()


def test_the_scripts_are_found():
    # the discovery must see the scripts the README names, or the test below would check nothing
    for script in ("benchmarks/kernel_resources.py", "benchmarks/memory_triplet.py", "benchmarks/report.py",
                   "examples/compare_losses.py"):
        assert script in SCRIPTS, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_does_nothing_else(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage:"), p.stdout[:500]
    assert "-h, --help" in p.stdout
    assert p.stderr == "", p.stderr[-2000:]
    # nothing written where it ran (a script that ran its job would leave its outputs or a table on stdout)
    assert list(tmp_path.iterdir()) == []
    assert "|---|" not in p.stdout
