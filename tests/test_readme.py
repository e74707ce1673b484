"""The README stays true: its quickstart runs as written and its commands name files that exist."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs(capsys):
    blocks = python_blocks(README)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quickstart", "exec"), namespace)
    # the quickstart ends by printing the retrieval metrics of its embedding
    printed = capsys.readouterr().out
    for name in ("R@1", "mAP", "MAP@R", "R-precision"):
        assert name in printed
    assert namespace["loss"].requires_grad


@pytest.mark.parametrize("script", sorted(set(re.findall(r"python ((?:benchmarks|examples)/[\w/]+\.py)", README))))
def test_commands_name_existing_scripts(script):
    assert os.path.isfile(os.path.join(ROOT, script)), f"README names {script}, which does not exist"


def test_test_command_is_the_ci_command():
    command = 'pip install ".[test]" && python -m metricloss.native build && pytest'
    assert f"| tests (what CI runs) | `{command}` |" in README
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert f"{command} --durations=20" in ci
