"""The documentation a user gets: forward docstrings, and the docs site sections the code cites (*Page › Section*)."""

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


CITATION = re.compile(r"\*([A-Z][^*›\n]*?) › ([^*\n]+?)\*")           # *Page › Section*
PAGE_CITATION = re.compile(r"\*([A-Z][^*›\n]*?)\*\s+in\s+the\s+docs")   # *Page* in the docs
OLD_CITATION = re.compile(r"docs/\w+\.md\s*§")                           # the old file-and-number form
CODE_FOLDERS = ("metricloss", "tests", "benchmarks", "examples")


def _code_files():
    this = os.path.abspath(__file__)  # its own docstrings show the forms, they cite nothing
    return [p for folder in CODE_FOLDERS for p in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
            if os.path.abspath(p) != this]


def _site_headings():
    """{page title (its ``# `` heading): {section headings}} for every page of the docs site."""
    pages = {}
    for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
        titles = re.findall(r"^# (.+?)\s*$", text, re.M)
        assert len(titles) == 1, f"{os.path.relpath(path, ROOT)} must have exactly one '# ' title, has {titles}"
        sections = {h.replace("`", "") for h in re.findall(r"^#{2,4} (.+?)\s*$", text, re.M)}
        pages[titles[0].replace("`", "")] = sections
    return pages


def _cited_sections():
    """Every ``*Page › Section*`` (and ``*Page* in the docs``) cited in the package, tests, benchmarks and examples."""
    cited = {}
    for path in _code_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        where = os.path.relpath(path, ROOT)
        for page, section in CITATION.findall(text):
            cited.setdefault((page, section), set()).add(where)
        for page in PAGE_CITATION.findall(text):
            cited.setdefault((page, None), set()).add(where)
    return cited


def test_code_cites_docs_sections():
    cited = _cited_sections()
    # the discovery itself works: these citations exist in the package today
    assert ("Design", "Backends") in cited and ("Methods", "WARP") in cited
    assert ("Kernels", "Testing Triton without a GPU") in cited and ("Retrieval toolbox", None) in cited


def test_every_cited_docs_section_exists():
    pages = _site_headings()
    missing = []
    for (page, section), where in sorted(_cited_sections().items(), key=str):
        if page not in pages:
            missing.append(f"page *{page}* (cited by {sorted(where)}) is no docs page title: {sorted(pages)}")
        elif section is not None and section not in pages[page]:
            missing.append(f"*{page} › {section}* (cited by {sorted(where)}): no such heading; {sorted(pages[page])}")
    assert not missing, missing


def test_no_citation_of_docs_files_by_number():
    """Docstrings name site sections, never ``docs/<file>.md §N`` (docs/ is not in the wheel)."""
    own = {os.path.join(ROOT, "tests", name) for name in ("test_docs.py", "test_packaging.py")}
    old = [f"{os.path.relpath(p, ROOT)}: {m.group(0)!r}" for p in _code_files() if p not in own
           for m in OLD_CITATION.finditer(open(p, encoding="utf-8").read())]
    assert not old, old


def test_docstrings_link_nowhere_outside_the_project():
    bad = [f"{os.path.relpath(p, ROOT)}: {m.group(0)}"
           for p in glob.glob(os.path.join(ROOT, "metricloss", "**", "*.py"), recursive=True)
           for m in re.finditer(r"https?://\S+", open(p, encoding="utf-8").read())]
    assert not bad, bad


GUIDE_PAGES = ["triplet", "warp", "centroid", "cosine", "scale-out", "toolbox", "metrics", "numerics", "native",
               "benchmarks", "main-job", "gpu", "design", "methods", "kernels"]


def test_readme_links_the_docs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for doc in GUIDE_PAGES:
        assert os.path.exists(os.path.join(ROOT, "docs", f"{doc}.md")), doc
        assert f"(docs/{doc}.md)" in readme, f"README does not link docs/{doc}.md"


def test_every_docs_page_is_in_the_site_nav():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        config = f.read()
    for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, "docs")).replace(os.sep, "/")
        assert re.search(rf":\s+{re.escape(rel)}\s*$", config, re.M), f"docs/{rel} is not in mkdocs.yml's nav"


def _signature_text(obj):
    """``name=default, …`` as the docs write it (strings in double quotes)."""
    parts = []
    for p in inspect.signature(obj).parameters.values():
        if p.default is inspect.Parameter.empty:
            parts.append(p.name)
        else:
            parts.append(f'{p.name}="{p.default}"' if isinstance(p.default, str) else f"{p.name}={p.default!r}")
    return ", ".join(parts)


GUIDE_PAGE_OF = {"TripletLoss": "triplet", "WARPLoss": "warp", "CentroidTripletLoss": "centroid",
                 "NormalizeScale": "cosine", "CosineClassifier": "cosine", "NormSoftmaxLoss": "cosine",
                 "CentralizedRankingLoss": "cosine", "SCTLoss": "collapse", "EPHNLoss": "collapse",
                 "MiningSchedule": "collapse", "CollapseMonitor": "collapse", "GradCache": "scale-out"}


@pytest.mark.parametrize("page", ["design", "guide"])
@pytest.mark.parametrize("name", sorted(GUIDE_PAGE_OF))
def test_documented_constructor_signatures_are_the_real_ones(page, name):
    page = f"docs/{GUIDE_PAGE_OF[name] if page == 'guide' else page}.md"
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    assert f"ml.{name}({_signature_text(getattr(ml, name))})" in text
