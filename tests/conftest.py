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
    """A process that has not tried any native build yet (restored afterwards); yields the per-extension
    states (``{key: {"loaded", "error", "warned"}}``)."""
    from metricloss.ops import native

    saved = {key: dict(state) for key, state in native._state.items()}
    saved_errors = set(native._warned_errors)
    for state in native._state.values():
        state.update(loaded=False, error=None, warned=False)
    native._warned_errors.clear()
    yield native._state
    for key, state in native._state.items():
        state.clear()
        state.update(saved[key])
    native._warned_errors.clear()
    native._warned_errors.update(saved_errors)
