"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton: the flag is read when ``@triton.jit``
decorates a kernel (*Kernels › Testing Triton without a GPU*), so kernels run on CPU tensors under the interpreter in the tests.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="module")
def built():
    """The native extension, built here (CI must build it: a runner without a compiler fails, not skips)."""
    import shutil
    from unittest import mock

    from metricloss.ops import native

    if shutil.which("c++") is None and not os.environ.get("CI"):
        pytest.skip("no C++ compiler: the native path cannot be built here")
    with mock.patch.dict(os.environ, {native.ENV_VAR: "1"}):
        assert native.native_library()
    return True


@pytest.fixture
def fresh_state():
    """A process that has not tried the native build yet (restored afterwards)."""
    from metricloss.ops import native

    saved = dict(native._state)
    native._state.update(loaded=False, error=None, warned=False)
    yield native._state
    native._state.clear()
    native._state.update(saved)
