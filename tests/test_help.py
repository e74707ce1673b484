"""``help()`` on every public class shows our own text: the class docstring first, a real ``__init__``
signature (named arguments with defaults), and no method of ours inheriting torch's generic docstrings."""

import importlib
import inspect
import pkgutil
import pydoc

import pytest
import torch.nn as nn

import metricloss as ml


def _public_classes():
    modules = [ml] + [importlib.import_module(f"metricloss.{m.name}") for m in pkgutil.walk_packages(ml.__path__)
                      if not any(part.startswith("_") for part in m.name.split("."))]
    seen = {}
    for mod in modules:
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if inspect.isclass(obj) and obj.__module__.startswith("metricloss") and not issubclass(obj, Warning):
                seen.setdefault(obj.__qualname__, obj)
    return sorted(seen.values(), key=lambda c: c.__qualname__)


CLASSES = _public_classes()
GENERIC = {inspect.getdoc(nn.Module.__init__), inspect.getdoc(nn.Module.extra_repr), inspect.getdoc(object.__init__)}


def test_the_public_classes_are_found():
    names = {c.__name__ for c in CLASSES}
    assert {"TripletLoss", "WARPLoss", "NormSoftmaxLoss", "CrossBatchMemory", "PKSampler", "DistributedLoss"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_methods_defined_here_have_their_own_docstring(cls):
    for name, member in vars(cls).items():
        if callable(member) and (name == "__init__" or not name.startswith("_")):
            doc = inspect.getdoc(getattr(cls, name))
            assert doc and doc not in GENERIC, f"{cls.__name__}.{name} shows an inherited or empty docstring"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_help_shows_our_text_first_and_a_real_signature(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    first_line = inspect.getdoc(cls).splitlines()[0]
    head = text.split("Method resolution order")[0]
    assert first_line in head, f"help({cls.__name__}) does not open with its docstring"
    params = inspect.signature(cls).parameters.values()
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params), \
        f"{cls.__name__}'s signature hides its arguments behind *args/**kwargs"
