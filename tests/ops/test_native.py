"""The native (C++) batch-all epilogue and semi-hard selection: same losses, counts and gradients as the
torch path; the build fallback (a failed build warns once and runs torch) and the METRICLOSS_NATIVE switch."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss.functional as MF
from metricloss.ops import native
from metricloss.ops import triplet as triplet_ops

from ..helpers import duplicate_rows, label_pattern, record_served

MININGS = ["batch_all", "semi_hard"]
DISTANCES = ["euclidean", "squared_euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]
# "pk16"/"big" give anchors more positives than the sorted-threshold heuristic's bound (both formulas run)
PATTERNS = ["random", "singletons", "one_class", "pk2", "pk3", "pk16", "big"]


def _labels(pattern, n, g, num_classes):
    if pattern == "big":  # one large class plus a few small ones
        y = torch.randint(1, 4, (n,), generator=g)
        y[: (2 * n) // 3] = 0
        return y[torch.randperm(n, generator=g)]
    return label_pattern(pattern, n, g, num_classes=num_classes)


@pytest.fixture
def native_calls(monkeypatch):
    """Records, per chunk, whether the native batch-all epilogue / semi-hard selection (fused or not) served it."""
    return record_served(monkeypatch, triplet_ops, ("native_batch_all_epilogue", "native_semi_hard_negatives",
                                                    "native_semi_hard_fused", "native_batch_all_fused",
                                                    "native_batch_all_self"))


def _run(monkeypatch, setting, mining, x, y, ref, kwargs, upstream):
    monkeypatch.setenv(native.ENV_VAR, setting)
    inputs = [x.detach().clone().requires_grad_()] + ([ref[0].detach().clone().requires_grad_()]
                                                       if ref[0] is not None else [])
    args = (inputs[0], y) + ((inputs[1], ref[1]) if len(inputs) == 2 else ())
    terms_kwargs = {k: v for k, v in kwargs.items() if k != "reduction"}
    terms = MF.triplet_loss_terms(*args, mining=mining, **terms_kwargs)
    loss = MF.triplet_loss(*args, mining=mining, **kwargs)
    w = upstream if kwargs["reduction"] == "none" else 1.0
    grads = torch.autograd.grad((loss * w).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return loss.detach(), terms.num_terms, terms.num_nonzero, terms.per_anchor.detach(), grads


def assert_native_matches_torch(monkeypatch, mining, x, y, ref, kwargs):
    """Losses, term counts, per-anchor sums and gradients: native (METRICLOSS_NATIVE=1) vs torch (=0).
    Counts are equal exactly; values up to summation order (fp64: 1e-12 relative; fp32: 1e-5)."""
    upstream = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    want = _run(monkeypatch, "0", mining, x, y, ref, kwargs, upstream)
    got = _run(monkeypatch, "1", mining, x, y, ref, kwargs, upstream)
    tol = dict(rtol=1e-12, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[3], want[3], **tol)
    for a, b in zip(got[4], want[4]):
        torch.testing.assert_close(a, b, **tol)


@st.composite
def native_cases(draw, dtype=torch.float64):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=dtype) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    y = _labels(draw(st.sampled_from(PATTERNS)), n, g, draw(st.integers(1, 5)))
    if draw(st.booleans()):
        x = duplicate_rows(x, g, count=2)
    ref = (None, None)
    ref_m = draw(st.sampled_from([0, 0, 1, 7, 30]))
    if ref_m:
        ref = (torch.randn(ref_m, d, generator=g, dtype=dtype), torch.randint(0, 3, (ref_m,), generator=g))
    kwargs = dict(margin=draw(st.sampled_from([0.0, 0.2, 1.0, "soft"])), distance=draw(st.sampled_from(DISTANCES)),
                  reduction=draw(st.sampled_from(REDUCTIONS)), normalize=draw(st.booleans()),
                  chunk_bytes=draw(st.sampled_from([None, 64, 3000])))
    return x, y, ref, kwargs


@pytest.mark.parametrize("mining", MININGS)
@given(case=native_cases())
def test_native_matches_torch_fp64(built, mining, case):
    with pytest.MonkeyPatch.context() as mp:  # a fresh environment per example
        assert_native_matches_torch(mp, mining, *case)


@pytest.mark.parametrize("mining", MININGS)
@given(case=native_cases(dtype=torch.float32))
def test_native_matches_torch_fp32(built, mining, case):
    with pytest.MonkeyPatch.context() as mp:  # a fresh environment per example
        assert_native_matches_torch(mp, mining, *case)


@pytest.mark.parametrize("mining,pattern,served", [("batch_all", "pk3", True), ("batch_all", "pk16", True),
                                                    ("semi_hard", "pk3", True), ("semi_hard", "pk48", False)])
@pytest.mark.parametrize("margin", [0.2, "soft"])
def test_native_serves_every_chunk_by_default(built, monkeypatch, native_calls, mining, pattern, served, margin):
    """Unset switch, CPU float: the native path runs for every chunk (semi-hard with many positives keeps
    the torch sort; batch-all over the batch with a hard margin is one self-pair call), with the same
    result as torch."""
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g, dtype=torch.float64)
    y = label_pattern(pattern, 96, g)
    MF.triplet_loss(x.requires_grad_(), y, mining=mining, margin=margin, chunk_bytes=20_000).backward()
    one_call = mining == "batch_all" and margin != "soft" and pattern == "pk3"
    assert len(native_calls) == 1 if one_call else len(native_calls) > 1
    assert all(c == served for c in native_calls)
    assert_native_matches_torch(monkeypatch, mining, x, y, (None, None),
                                dict(margin=margin, reduction="mean", chunk_bytes=20_000))


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_ops_tile_inside_a_chunk(built, monkeypatch, native_calls, mining, distance, dtype):
    """The fused ops compute a chunk's block in Gram tiles of their own: tiles of 8 rows
    inside chunks of many rows, a last short tile, and a tight cluster (small entries: redo rows) give
    the torch path's losses, counts and gradients."""
    monkeypatch.setattr(native, "FUSED_TILE_ROWS", 8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(61, 6, generator=g, dtype=dtype)
    x[:5] = x[0] + 1e-4 * torch.randn(5, 6, generator=g, dtype=dtype)  # near-duplicates: small entries
    y = label_pattern("pk3", 61, g)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    MF.triplet_loss(x.clone().requires_grad_(), y, mining=mining, distance=distance).backward()
    assert native_calls and all(native_calls)
    for margin in (0.2, "soft"):
        assert_native_matches_torch(monkeypatch, mining, x, y, (None, None),
                                    dict(margin=margin, reduction="mean", distance=distance))


def test_native_skips_other_dtypes(built, monkeypatch):
    """Only float32/float64 blocks are native (half inputs accumulate in fp32 before they get here)."""
    monkeypatch.setenv(native.ENV_VAR, "1")
    assert not native.native_enabled(torch.zeros(2, 2, dtype=torch.float16), "triplet")
    assert native.native_enabled(torch.zeros(2, 2, dtype=torch.float32), "triplet")


def test_switch_zero_forces_torch_and_never_builds(monkeypatch, fresh_state, native_calls):
    def no_build():
        raise AssertionError("METRICLOSS_NATIVE=0 must not build")

    monkeypatch.setattr(native, "_build", no_build)
    monkeypatch.setenv(native.ENV_VAR, "0")
    x = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    y = torch.arange(20) % 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mining in MININGS:
            MF.triplet_loss(x, y, mining=mining).backward()
    assert native_calls and not any(native_calls)
    assert not any(st["loaded"] or st["error"] is not None for st in fresh_state.values())


def test_failed_build_warns_once_naming_the_cause_and_runs_torch(monkeypatch, fresh_state, native_calls):
    def failing_build(key):
        raise native.NativeBuildError("building the native extension failed: simulated: no C++ compiler")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = label_pattern("pk3", 30, g)
    x1 = x.clone().requires_grad_()
    with pytest.warns(UserWarning, match="simulated: no C.. compiler") as record:
        loss = MF.triplet_loss(x1, y, mining="batch_all", chunk_bytes=2000)
        loss.backward()
    assert len([w for w in record if "native" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        MF.triplet_loss(x.clone().requires_grad_(), y, mining="batch_all")
    assert native_calls and not any(native_calls)
    monkeypatch.setenv(native.ENV_VAR, "0")
    x0 = x.clone().requires_grad_()
    want = MF.triplet_loss(x0, y, mining="batch_all", chunk_bytes=2000)
    want.backward()
    assert torch.equal(loss, want) and torch.equal(x1.grad, x0.grad)


def test_failed_build_with_switch_one_raises(monkeypatch, fresh_state):
    def failing_build(key):
        raise native.NativeBuildError("ninja is not installed (pip install ninja)")

    monkeypatch.setattr(native, "_build", failing_build)
    monkeypatch.setenv(native.ENV_VAR, "1")
    x = torch.randn(8, 3, requires_grad=True)
    with pytest.raises(native.NativeBuildError, match="METRICLOSS_NATIVE=1 but ninja is not installed"):
        MF.triplet_loss(x, torch.arange(8) % 2, mining="batch_all")


def test_build_reports_a_missing_ninja(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(native.NativeBuildError, match="ninja is not installed"):
        native._build("triplet")


def test_build_reports_a_compile_failure(monkeypatch):
    from torch.utils import cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError("Error building extension 'x'\nc++: fatal error: simulated")

    monkeypatch.setattr(cpp_extension, "load", broken_load)
    with pytest.raises(native.NativeBuildError, match=r"RuntimeError: c\+\+: fatal error: simulated"):
        native._build("triplet")


def test_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="METRICLOSS_NATIVE must be 0, 1 or unset"):
        MF.triplet_loss(torch.randn(6, 3), torch.arange(6) % 2, mining="batch_all")


def test_sources_ship_inside_the_package():
    """The wheel carries the sources (pyproject package-data); the build reads them from the package."""
    paths = [p for ext in native.EXTENSIONS.values() for p in ext.paths]
    assert paths and all(p.is_file() and p.parent.name == "csrc" and p.parent.parent.name == "metricloss"
                         for p in paths)


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("self_ref", [True, False])
def test_native_prepares_every_first_pass_chunk(built, monkeypatch, mining, self_ref):
    """The block preparation (clamp, cancellation test, √) is native for every first-pass chunk (semi-hard:
    inside the fused op); a near duplicate across classes makes a redo anchor, whose exact pass stays on
    torch (batch-all over the batch: one self-pair call, which refines the entry in place); same results."""
    served = record_served(monkeypatch, triplet_ops, ("native_prepare_block", "native_semi_hard_fused",
                                                      "native_batch_all_fused", "native_batch_all_self"))
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = label_pattern("pk3", 60, g)
    j = int((y != y[0]).nonzero()[0])
    x[j] = x[0] + 1e-9  # a cancellation-prone negative entry
    ref = (None, None) if self_ref else (x[:40].clone(), y[:40].clone())
    MF.triplet_loss(x.clone().requires_grad_(), y, *ref, mining=mining, chunk_bytes=10_000).backward()
    self_pairs = self_ref and mining == "batch_all"
    assert (len(served) == 1 if self_pairs else len(served) > 1) and all(served)
    kwargs = dict(margin=0.2, reduction="none", chunk_bytes=10_000)
    if self_pairs:  # weights ~1e9 on the near pair: both gradients carry ~1e-7 of cancellation
        _assert_self_pairs_as_good_as_torch(monkeypatch, x, y, kwargs)
    else:
        assert_native_matches_torch(monkeypatch, mining, x, y, ref, kwargs)


def test_extension_name_follows_torch_version_and_sources(monkeypatch, tmp_path):
    """Builds of different sources (another install or checkout) never share a build directory, and each
    extension has its own."""
    names = {key: native._extension_name(key) for key in native.EXTENSIONS}
    assert len(set(names.values())) == len(names)
    assert all(name.startswith(f"metricloss_{key}_") for key, name in names.items())
    assert names["triplet"] == native._extension_name("triplet")
    for name in ("triplet_epilogue.cpp", "triplet_common.h"):
        (tmp_path / name).write_text(f"// {name}\n")
    monkeypatch.setattr(native, "_CSRC", tmp_path)
    other = native._extension_name("triplet")
    assert other != names["triplet"]
    (tmp_path / "triplet_epilogue.cpp").write_text("// changed again\n")
    again = native._extension_name("triplet")
    assert again != other
    (tmp_path / "triplet_common.h").write_text("// the shared header is part of the sources\n")
    assert native._extension_name("triplet") != again


# ----------------------------------------------------------------------------------------------------
# batch-all over the batch itself: the self-pair op (each unordered pair once, for both its anchors)
# ----------------------------------------------------------------------------------------------------

def _class_labels(n, size, g):
    """Shuffled labels of classes of ``size`` (the last one shorter)."""
    return (torch.arange(n) // size)[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("size", [3, 5, 9, 13])  # 2, 4, 8, 12 positives: 1, 1, 2 and 3 packed slot groups
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_pairs_match_torch_over_panels_blocks_and_small_entries(built, monkeypatch, size, distance, dtype):
    """Panels of 32 anchors (the last two merged: 150 = 32 + 32 + 32 + 54) and column blocks of 8 (diagonal,
    full and short blocks), near-duplicates inside and across classes (small entries: refined in place by
    the scalar cell loop), every reduction (per-anchor upstream gradients with "none"): the torch path's
    losses, counts and gradients, one native call each."""
    monkeypatch.setattr(native, "FUSED_TILE_ROWS", 8)  # below the op's 32-row minimum: 32-row panels
    monkeypatch.setattr(native, "SELF_PAIR_COLUMN_BLOCK", 8)
    served = record_served(monkeypatch, triplet_ops, ("native_batch_all_self",))
    g = torch.Generator().manual_seed(size)
    x = torch.randn(150, 6, generator=g, dtype=dtype)
    y = _class_labels(150, size, g)
    # near-duplicates (small entries: d² < 2⁻⁶(‖x_i‖² + ‖x_j‖²)), not so near that their gradient weights
    # (1/d) make both paths' rounding exceed the tolerance
    x[:4] = x[0] + 1e-2 * torch.randn(4, 6, generator=g, dtype=dtype)
    other = int((y != y[0]).nonzero()[0])
    x[other] = x[0] + 0.05  # a small negative entry in both views
    for reduction in REDUCTIONS:
        for margin in (0.0, 0.2):
            kwargs = dict(margin=margin, reduction=reduction, distance=distance)
            if dtype == torch.float64:
                assert_native_matches_torch(monkeypatch, "batch_all", x, y, (None, None), kwargs)
            else:
                _assert_self_pairs_as_good_as_torch(monkeypatch, x, y, kwargs)
    assert served and all(served)


def _assert_self_pairs_as_good_as_torch(monkeypatch, x, y, kwargs):
    """Batch-all over the batch: losses, counts and per-anchor sums as :func:`assert_native_matches_torch`;
    the gradient no farther from the dense reference's (fp64 autograd through the exact pair differences)
    than the torch path's. Both paths form Σ_j s_ij·x_i − Σ_j s_ij·x_j, a cancellation whose rounding grows
    with the weights 1/d of the nearest pairs, but group it differently, so near-duplicate rows or fp32 put
    them farther apart than summation order alone."""
    from metricloss import reference

    upstream = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    want = _run(monkeypatch, "0", "batch_all", x, y, (None, None), kwargs, upstream)
    got = _run(monkeypatch, "1", "batch_all", x, y, (None, None), kwargs, upstream)
    tol = dict(rtol=1e-12, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol, equal_nan=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[3], want[3], **tol)
    x64 = x.detach().double().requires_grad_()
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("reduction", "chunk_bytes")}
    terms = reference.triplet_loss_terms(x64, y, mining="batch_all", **ref_kwargs)
    scale = upstream.double() if kwargs.get("reduction") == "none" else None
    loss = (terms.per_anchor * scale).sum() if scale is not None else terms.reduce(kwargs.get("reduction", "mean"))
    (exact,) = torch.autograd.grad(loss, x64)
    err_native = (got[4][0].double() - exact).abs().max().item()
    err_torch = (want[4][0].double() - exact).abs().max().item()
    floor = (1e-12 if x.dtype == torch.float64 else 1e-6) * exact.abs().max().item()
    assert err_native <= 4 * err_torch + floor, (err_native, err_torch)


@pytest.mark.parametrize("case", ["soft", "references", "many_positives", "duplicates", "semi_hard"])
def test_self_pairs_serve_only_their_case(built, monkeypatch, case):
    """The self-pair op takes batch-all over the batch itself with a hard margin and 1 to 12 positives per
    anchor (duplicate rows included: they tie exactly there too); every other call keeps the chunked path
    (same results as torch)."""
    served = record_served(monkeypatch, triplet_ops, ("native_batch_all_self",))
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 5, generator=g, dtype=torch.float64)
    y = _class_labels(80, 20 if case == "many_positives" else 4, g)
    if case == "duplicates":
        x = duplicate_rows(x, g, count=2)
    ref = (x[:30].clone(), y[:30].clone()) if case == "references" else (None, None)
    kwargs = dict(margin="soft" if case == "soft" else 0.2, reduction="mean")
    mining = "semi_hard" if case == "semi_hard" else "batch_all"
    MF.triplet_loss(x.clone().requires_grad_(), y, *ref, mining=mining, **kwargs).backward()
    assert served == ([True] if case == "duplicates" else [])
    served.clear()
    MF.triplet_loss(x.clone().requires_grad_(), y, mining="batch_all", margin=0.2).backward()
    assert served == ([] if case == "many_positives" else [True])
    assert_native_matches_torch(monkeypatch, mining, x, y, ref, kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_pairs_builds_agree(built, monkeypatch, dtype):
    """The baseline, AVX2 and AVX-512 builds of the cell loop (those this CPU runs; a wider setting than the
    CPU falls back to its widest): equal counts, values up to summation order."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 16, generator=g, dtype=dtype)
    y = _class_labels(300, 4, g)
    monkeypatch.setenv(native.ENV_VAR, "1")
    out = []
    for isa in (0, 1, 2):
        monkeypatch.setattr(native, "SELF_PAIR_MAX_ISA", isa)
        xx = x.clone().requires_grad_()
        terms = MF.triplet_loss_terms(xx, y, mining="batch_all", margin=0.3)
        terms.per_anchor.sum().backward()
        out.append((terms.per_anchor.detach(), terms.num_nonzero, xx.grad))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for other in out[1:]:
        torch.testing.assert_close(other[0], out[0][0], **tol)
        assert torch.equal(other[1], out[0][1])
        torch.testing.assert_close(other[2], out[0][2], **tol)


def _self_pair_gram_views_match_chunked(x: torch.Tensor, exact_scale: float) -> bool:
    """Whether the self-pair op's two values of every cell, (G + ‖x_i‖²) + ‖x_j‖² and (G + ‖x_j‖²) + ‖x_i‖²
    from G = x_I·(−2x)ᵀ over 128-row panels (cosine: G + 1, G = x·(−x)ᵀ), and the band GEMM of the
    positives' entries, are bitwise the chunked path's Gram entries (i, j) and (j, i). The cosine rows
    are ``x * exact_scale`` (a power of two keeps integer inputs exact)."""
    from metricloss.ops.distance import GramFactors

    n = x.shape[0]
    gram = GramFactors(x, x, "euclidean")
    full = torch.mm(gram.A, gram.R.T)
    right = -2.0 * x
    for s in range(0, n, 128):
        e = min(n, s + 128)
        block = torch.mm(x[s:e], right[s:].T)
        ni, nj = gram.a_sq[s:e].unsqueeze(1), gram.a_sq[s:].unsqueeze(0)
        if not (torch.equal((block + ni) + nj, full[s:e, s:]) and torch.equal(((block + nj) + ni).T, full[s:, s:e])):
            return False
    # the positives' entries come from a batched GEMM over 32-row blocks of a band (triplet_ops._BAND_ROWS)
    step, width = triplet_ops._BAND_ROWS, 3
    for s in range(0, n - step + 1, step):
        lo, hi = max(0, s - width), min(n, s + step + width)
        band = torch.bmm(x[s:s + step].unsqueeze(0), right[lo:hi].T.unsqueeze(0))[0]
        if not torch.equal(band, torch.mm(x, right.T)[s:s + step, lo:hi]):
            return False
    unit = x * exact_scale  # cosine: factors [x, 1] and [−x, 1], one value G + 1
    full = torch.mm(GramFactors(unit, unit, "cosine").A, GramFactors(unit, unit, "cosine").R.T)
    block = torch.mm(unit, (-unit).T) + 1.0
    return torch.equal(block, full) and torch.equal(block.T, full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(61, 6), (300, 17), (1000, 128)])
def test_self_pair_gram_values_are_the_chunked_paths_bitwise(dtype, n, d):
    """On small-integer inputs every product and partial sum is exact, so any BLAS (any ISA, any blocking,
    any summation order) gives the same Gram entries: there the op's panel values must be the chunked
    path's bitwise, which checks our composition (which norm is added first, the −2 factor, the band
    offsets), not a BLAS property. Cosine rows are scaled by a power of two so they stay exact.

    On random inputs the equality is a property of the BLAS, not of our code (a panel's dot products summed
    as in the whole product): MKL has it on some CPUs and not on others (fp64 on an AMD EPYC differs), so
    it is not asserted. What matters on every CPU, the same decisions and counts on both paths, is tested
    by the self-pair-vs-torch-path tests above on random, tied and duplicated inputs."""
    x = torch.randint(-4, 5, (n, d), generator=torch.Generator().manual_seed(n)).to(dtype)
    x[x.norm(dim=1) == 0, 0] = 1.0
    if dtype == torch.float32:
        assert float((x * x).sum(1).max()) * 4 < 2 ** 24  # every partial sum is an exact fp32 integer
    assert _self_pair_gram_views_match_chunked(x, exact_scale=2.0 ** -5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [1e-20, 1e-30, 1e-300, 1e-45])
def test_self_pair_tiny_margins_with_flushed_denormals_match_torch(built, monkeypatch, native_calls, dtype, margin):
    """With denormals flushed to zero and zero-distance positives, the threshold t = 0 + margin has a
    square that underflows: the bound on u is then found by bisection (it used to walk the denormals one
    ulp at a time: 3.4 s at N=64 in fp32, minutes in fp64). The decisions must stay the torch path's."""
    margin = max(margin, float(torch.finfo(dtype).tiny) * 2.0 ** -20)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3), dtype=dtype).repeat_interleave(4, 0)
    x[:8] *= 1e-3  # small negatives too
    y = torch.arange(16).repeat_interleave(4)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert_native_matches_torch(monkeypatch, "batch_all", x, y, (None, None),
                                    dict(margin=margin, normalize=False, reduction="sum"))
    finally:
        torch.set_flush_denormal(False)
    assert any(native_calls)  # the self-pair op served the native run
