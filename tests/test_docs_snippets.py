"""Every ```python block of the README and of the docs pages runs.

The blocks of one page run in order in one fresh namespace (a page builds on its earlier blocks), in a
temporary working directory. A block that must not run is preceded by a ``<!-- norun: <reason> -->`` line;
such blocks must give a reason and stay rare. A block followed by a line starting ``Output`` and a
```text block must print exactly that text.
"""

import glob
import os
import re
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^(?P<marker><!--\s*norun:(?P<reason>.*?)-->\s*\n)?```python[^\n]*\n(?P<code>.*?)^```\n"
                   r"(?:\nOutput[^\n]*\n\n```text\n(?P<output>.*?)^```)?", re.M | re.S)
MAX_NORUN = 3
SLOW_PAGE_S = 15.0  # the whole set must stay well under 30 s


def pages():
    found = [os.path.join(ROOT, "README.md")]
    found += sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [os.path.relpath(p, ROOT) for p in found]


def blocks(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        out.append((line, m.group("code"), m.group("marker") is not None, (m.group("reason") or "").strip(),
                    m.group("output")))
    return out


PAGES_WITH_CODE = [p for p in pages() if blocks(p)]


def test_snippets_are_found_and_norun_blocks_are_rare():
    every = [b for p in pages() for b in blocks(p)]
    assert len(every) >= 10, f"only {len(every)} python blocks found: the fence pattern broke?"
    norun = [(p, line, reason) for p in pages() for line, _, skip, reason, _ in blocks(p) if skip]
    assert all(reason for _, _, reason in norun), f"a norun block gives no reason: {norun}"
    assert len(norun) <= MAX_NORUN, f"too many blocks are not run: {norun}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_snippets_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"snippets:{page}"}
    start = time.perf_counter()
    for line, code, skip, _, output in blocks(page):
        if skip:
            continue
        capsys.readouterr()
        # line numbers in tracebacks are the page's own
        exec(compile("\n" * (line - 1) + code, page, "exec"), namespace)
        if output is not None:
            assert capsys.readouterr().out == output, f"{page}:{line}: the printed output is not the page's"
    elapsed = time.perf_counter() - start
    capsys.readouterr()
    assert elapsed < SLOW_PAGE_S, f"{page}'s snippets took {elapsed:.1f} s: make them smaller"


def test_readme_quickstart_states_its_output():
    outputs = [output for *_, output in blocks("README.md") if output is not None]
    assert len(outputs) == 1 and "batch-hard loss" in outputs[0]
