"""The native build as a user meets it: a message before a compile (and none when the build is cached), one
extension per source (an op compiles only what it runs), failure causes named (no compiler, no ninja,
the compiler's first error line), the warning pointing at the caller's line, the ISA switch and the
``python -m metricloss.native`` command line."""

import os
import subprocess
import sys
from pathlib import Path
import warnings

import pytest
import torch

import metricloss.functional as MF
from metricloss import native as native_cli
from metricloss.ops import native

from ..helpers import label_pattern

# torch's message when ninja runs the compiler and it fails (shape of cpp_extension._run_ninja_build's text)
NINJA_FAILURE = """Error building extension 'metricloss_triplet_x': [1/2] c++ -MMD -MF triplet_epilogue.o.d -O3 -c \
triplet_epilogue.cpp -o triplet_epilogue.o
FAILED: triplet_epilogue.o
c++ -MMD -MF triplet_epilogue.o.d -O3 -c /pkg/metricloss/csrc/triplet_epilogue.cpp -o triplet_epilogue.o
/pkg/metricloss/csrc/triplet_epilogue.cpp: In function 'void f()':
/pkg/metricloss/csrc/triplet_epilogue.cpp:12:3: error: 'foo' was not declared in this scope
   12 |   foo();
      |   ^~~
/pkg/metricloss/csrc/triplet_epilogue.cpp:14:3: error: 'bar' was not declared in this scope
ninja: build stopped: subcommand failed.
"""


@pytest.fixture
def fake_load(monkeypatch):
    """cpp_extension.load replaced by a recorder (nothing is compiled); returns the recorded kwargs."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    return calls


def test_message_before_a_compile_says_what_why_how_long_where_and_how_to_skip(monkeypatch, capsys, fake_load):
    monkeypatch.setattr(native, "is_built", lambda key: False)
    native._build("self_pairs")
    err = capsys.readouterr().err
    first, done = err.strip().splitlines()
    assert first.startswith("metricloss: compiling the native CPU kernels for batch-all over the batch itself "
                            "(batch_all_self.cpp), once per torch version: about ")
    assert str(native.build_directory("self_pairs")) in first
    assert "METRICLOSS_NATIVE=0" in first and "python -m metricloss.native build" in first
    assert done.startswith("metricloss: built the native 'self_pairs' kernels in ")
    assert [c["sources"] for c in fake_load] == [[str(native._CSRC / "batch_all_self.cpp")]]


def test_no_message_when_the_build_is_cached(monkeypatch, capsys, fake_load):
    monkeypatch.setattr(native, "is_built", lambda key: True)
    native._build("retrieval")
    assert capsys.readouterr().err == ""
    assert len(fake_load) == 1


def test_each_extension_compiles_its_own_source():
    sources = [ext.sources for ext in native.EXTENSIONS.values()]
    assert sorted(s for group in sources for s in group) == ["batch_all_self.cpp", "retrieval_rank.cpp",
                                                             "triplet_epilogue.cpp", "warp_sample.cpp"]
    assert all(len(group) == 1 for group in sources)
    assert all(ext.build_seconds > 0 and ext.serves for ext in native.EXTENSIONS.values())


def test_unknown_extension_is_refused():
    with pytest.raises(ValueError, match="unknown native extension 'gpu'"):
        native.native_library("gpu")


def test_no_compiler_is_named(monkeypatch, fake_load):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(native.NativeBuildError, match="no C\\+\\+ compiler: 'no-such-compiler-here' is not on PATH"):
        native._build("triplet")
    assert fake_load == []


def test_compile_error_reports_the_first_error_line(monkeypatch):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError(NINJA_FAILURE)

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(native.NativeBuildError) as info:
        native._build("triplet")
    assert str(info.value) == ("building the native extension 'triplet' failed: RuntimeError: "
                               "/pkg/metricloss/csrc/triplet_epilogue.cpp:12:3: error: 'foo' was not declared "
                               "in this scope")


def test_torch_compiler_banner_is_not_passed_on(monkeypatch, recwarn):
    from torch.utils import cpp_extension

    def noisy_load(**kwargs):
        warnings.warn("Your compiler (c++) is not compatible with the compiler Pytorch wasbuilt with", UserWarning)

    monkeypatch.setattr(cpp_extension, "load", noisy_load)
    monkeypatch.setattr(native, "is_built", lambda key: True)
    native._build("triplet")
    assert not [w for w in recwarn if "wasbuilt" in str(w.message)]


def test_failure_warning_points_at_the_callers_line(monkeypatch, fresh_state):
    def failing_build(key):
        raise native.NativeBuildError(f"building the native extension {key!r} failed: simulated")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.arange(40) % 5
    with pytest.warns(UserWarning, match="not available: building the native extension .triplet.") as record:
        MF.triplet_loss(x, y, mining="semi_hard")
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("mining,margin,wanted", [("batch_all", 0.2, ["self_pairs"]), ("semi_hard", 0.2, ["triplet"]),
                                                  ("batch_all", "soft", ["triplet"])])
def test_an_op_builds_only_the_extension_it_runs(built, monkeypatch, fresh_state, mining, margin, wanted):
    """batch-all over a batch with a hard margin runs the self-pair op only; semi-hard and the soft margin
    the chunked ops only (the builds are cached: each is a load here)."""
    asked = []
    real = native._build

    def recording_build(key):
        asked.append(key)
        real(key)

    monkeypatch.setattr(native, "_build", recording_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64, requires_grad=True)
    MF.triplet_loss(x, label_pattern("pk3", 64, g), mining=mining, margin=margin).backward()
    assert asked == wanted


def test_isa_switch(monkeypatch):
    monkeypatch.delenv(native.ISA_ENV_VAR, raising=False)
    assert native.native_max_isa() == 2
    for value, level in (("avx512", 2), ("AVX2", 1), ("baseline", 0)):
        monkeypatch.setenv(native.ISA_ENV_VAR, value)
        assert native.native_max_isa() == level
    monkeypatch.setattr(native, "SELF_PAIR_MAX_ISA", 0)  # the narrower of the two
    monkeypatch.setenv(native.ISA_ENV_VAR, "avx512")
    assert native.native_max_isa() == 0
    monkeypatch.setenv(native.ISA_ENV_VAR, "sse")
    with pytest.raises(ValueError, match="METRICLOSS_NATIVE_ISA must be one of baseline, avx2, avx512"):
        native.native_max_isa()


@pytest.mark.parametrize("value,level", [("baseline", 0), ("avx2", 1)])
def test_isa_switch_reaches_the_self_pair_op(built, monkeypatch, value, level):
    """The environment switch gives bitwise what the module setting of that level gives."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 16, generator=g)
    y = label_pattern("pk3", 200, g)
    monkeypatch.setenv(native.ENV_VAR, "1")
    monkeypatch.setenv(native.ISA_ENV_VAR, value)
    by_env = MF.triplet_loss_terms(x, y, mining="batch_all", margin=0.3).per_anchor
    monkeypatch.delenv(native.ISA_ENV_VAR)
    monkeypatch.setattr(native, "SELF_PAIR_MAX_ISA", level)
    by_setting = MF.triplet_loss_terms(x, y, mining="batch_all", margin=0.3).per_anchor
    assert torch.equal(by_env, by_setting)


def test_cli_build_reports_each_extension(monkeypatch, capsys):
    built_keys = []
    monkeypatch.setattr(native, "build_extension", built_keys.append)
    monkeypatch.setattr(native, "is_built", lambda key: key == "retrieval")
    assert native_cli.main(["build"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert built_keys == list(native.EXTENSIONS)
    assert [line.split(" ")[0] for line in out] == list(native.EXTENSIONS)
    assert "retrieval (retrieval_rank.cpp): loaded from the cache in " in out[2]
    assert out[0].startswith("triplet (triplet_epilogue.cpp): compiled in ")


def test_cli_build_fails_naming_the_cause(monkeypatch, capsys):
    def failing(key):
        raise native.NativeBuildError("ninja is not installed (pip install ninja)")

    monkeypatch.setattr(native, "build_extension", failing)
    assert native_cli.main(["build", "retrieval"]) == 1
    assert capsys.readouterr().err == "retrieval: FAILED: ninja is not installed (pip install ninja)\n"


def test_cli_refuses_an_unknown_extension(capsys):
    with pytest.raises(SystemExit) as info:
        native_cli.main(["build", "cuda"])
    assert info.value.code == 2 and "unknown extension(s) ['cuda']" in capsys.readouterr().err


def test_cli_info_runs_as_a_module_and_compiles_nothing(tmp_path):
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-W", "error", "-m", "metricloss.native", "info"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines[2:]] == list(native.EXTENSIONS)
    assert all(": not built: " + str(tmp_path) in line for line in lines[2:])
    assert list(tmp_path.iterdir()) == []


def test_build_directory_is_torchs(tmp_path, monkeypatch):
    """The directory the message names is the one torch builds in (with and without TORCH_EXTENSIONS_DIR)."""
    from torch.utils import cpp_extension

    for root in (str(tmp_path), None):
        if root is None:
            monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
            monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "default"))
        else:
            monkeypatch.setenv("TORCH_EXTENSIONS_DIR", root)
        name = native._extension_name("triplet")
        assert native.build_directory("triplet") == Path(cpp_extension._get_build_directory(name, verbose=False))


def test_a_shared_cause_warns_once(monkeypatch, fresh_state):
    """No ninja stops every extension: batch-all tries the self-pair op, then the chunked ops; one warning."""
    def failing_build(key):
        raise native.NativeBuildError("ninja is not installed; pip install ninja")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    x = torch.randn(64, 8, dtype=torch.float64)
    y = torch.arange(64) % 16
    with pytest.warns(UserWarning) as record:
        MF.triplet_loss(x, y, mining="batch_all")
        MF.triplet_loss(x, y, mining="semi_hard")
    assert [str(w.message) for w in record] == [
        "metricloss: the native CPU kernels are not available: ninja is not installed; pip install ninja. "
        "Using the torch path (set METRICLOSS_NATIVE=0 to silence this)."]
    assert fresh_state["self_pairs"]["error"] == fresh_state["triplet"]["error"]


def test_two_checkouts_do_not_share_a_build(monkeypatch, tmp_path):
    """Same sources, another directory: another build (ninja would recompile a build whose command names
    other paths, silently, over the first checkout's)."""
    name = native._extension_name("retrieval")
    (tmp_path / "retrieval_rank.cpp").write_bytes((native._CSRC / "retrieval_rank.cpp").read_bytes())
    monkeypatch.setattr(native, "_CSRC", tmp_path)
    assert native._extension_name("retrieval") != name


def test_a_cached_build_older_than_its_sources_is_not_built(monkeypatch, tmp_path):
    # a fresh clone or a reinstall at the same path: the same build name, newer source files, which ninja
    # rebuilds; the compile must then be announced, not called a cache load
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    key = "retrieval"
    library = native.build_directory(key) / f"{native._extension_name(key)}.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    newest = max(p.stat().st_mtime for p in native.EXTENSIONS[key].paths)
    os.utime(library, (newest + 10, newest + 10))
    assert native.is_built(key)
    os.utime(library, (newest - 10, newest - 10))
    assert not native.is_built(key)
