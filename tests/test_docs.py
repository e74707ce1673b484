"""The documentation a user gets: forward docstrings, and the docs/ sections the code cites."""

import glob
import inspect
import os
import pydoc
import re

import pytest
import torch.nn as nn

import metricloss as ml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = [ml.TripletLoss, ml.BatchHardTripletLoss, ml.BatchAllTripletLoss, ml.SemiHardTripletLoss, ml.WARPLoss,
           ml.NormSoftmaxLoss, ml.CentroidTripletLoss, ml.CentralizedRankingLoss, ml.CosineClassifier,
           ml.NormalizeScale, ml.SVMaxRegularizer, ml.TwoHeadLoss, ml.EmbeddingHead, ml.CrossBatchMemory,
           ml.distributed.DistributedLoss]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_forward_docstring_documents_arguments_shapes_and_return(module):
    doc = inspect.getdoc(module.forward)
    assert doc and doc != inspect.getdoc(nn.Module.forward), f"{module.__name__}.forward has torch's generic doc"
    args, _, returns = doc.partition("Returns:")
    assert returns.strip(), f"{module.__name__}.forward documents no return value"
    for name in list(inspect.signature(module.forward).parameters)[1:]:
        assert re.search(rf"^\s+{name}: ", args, re.M), f"{module.__name__}.forward does not document `{name}`"
    # shapes and dtypes of the inputs and of the output
    assert re.search(r"\((?:N|B), (?:D|C)\)", args), doc
    assert "float" in args and "fp32" in returns, doc
    # and help() shows it (not "Define the computation performed at every call")
    rendered = pydoc.render_doc(module.forward, renderer=pydoc.plaintext)
    assert doc.splitlines()[0] in rendered and "Define the computation" not in rendered


def _cited_sections():
    """Every ``docs/<name>.md §N`` cited in the package, tests, benchmarks, examples and README."""
    cited = {}
    files = [os.path.join(ROOT, "README.md")] + [
        p for folder in ("metricloss", "tests", "benchmarks", "examples", "docs")
        for p in glob.glob(os.path.join(ROOT, folder, "**", "*.*"), recursive=True)
        if p.endswith((".py", ".md"))]
    for path in files:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for doc, sections in re.findall(r"docs/(\w+)\.md((?:\s*(?:§|,|and)\s*\d+)+)", text):
            for number in re.findall(r"\d+", sections):
                cited.setdefault((doc, int(number)), set()).add(os.path.relpath(path, ROOT))
    return cited


def test_code_cites_docs_sections():
    cited = _cited_sections()
    # the discovery itself works: these citations exist in the package today
    assert ("design", 4) in cited and ("methods", 1) in cited and ("kernels", 6) in cited


def test_every_cited_docs_section_exists():
    missing = []
    for (doc, number), where in sorted(_cited_sections().items()):
        path = os.path.join(ROOT, "docs", f"{doc}.md")
        assert os.path.exists(path), f"docs/{doc}.md is cited by {sorted(where)} but does not exist"
        with open(path, encoding="utf-8") as f:
            headings = re.findall(r"^## (\d+)\. ", f.read(), re.M)
        if str(number) not in headings:
            missing.append(f"docs/{doc}.md §{number} (cited by {sorted(where)})")
    assert not missing, missing


def test_readme_links_the_docs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for doc in ("design", "methods", "kernels"):
        assert f"(docs/{doc}.md)" in readme


def _signature_text(obj):
    """``name=default, …`` as the docs write it (strings in double quotes)."""
    parts = []
    for p in inspect.signature(obj).parameters.values():
        if p.default is inspect.Parameter.empty:
            parts.append(p.name)
        else:
            parts.append(f'{p.name}="{p.default}"' if isinstance(p.default, str) else f"{p.name}={p.default!r}")
    return ", ".join(parts)


@pytest.mark.parametrize("page", ["docs/design.md", "README.md"])
@pytest.mark.parametrize("name", ["TripletLoss", "WARPLoss", "CentroidTripletLoss", "NormalizeScale", "CosineClassifier",
                                  "NormSoftmaxLoss", "CentralizedRankingLoss"])
def test_documented_constructor_signatures_are_the_real_ones(page, name):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    assert f"ml.{name}({_signature_text(getattr(ml, name))})" in text
