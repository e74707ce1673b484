"""The native (C++/OpenMP) CPU epilogues, built on first use; the torch path is the fallback and reference.

Design, heuristics and what bounds them: see *Kernels › The native CPU kernels (C++)* in the docs.

The sources ship inside the package (``metricloss/csrc/``). Each builds into its own extension (see
:data:`EXTENSIONS`), compiled the first time an op needs it with :func:`torch.utils.cpp_extension.load`
(a C++ compiler and ``ninja`` are needed): batch-all over a batch compiles only ``batch_all_self.cpp``,
:func:`~metricloss.metrics.retrieval_metrics` only ``retrieval_rank.cpp``. Before it compiles, one line
on standard error says what is built, why, about how long it takes, where it is cached and how to skip it.
The build is cached under ``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), keyed by
the sources and the torch version, so later processes only load it. ``python -m metricloss.native build``
builds every extension ahead of time. Nothing is compiled at install time: ``pip install`` needs neither a
compiler nor torch in the build environment.

``METRICLOSS_NATIVE`` (read at every call):

* unset: on for CPU tensors when the extension builds; if it cannot (no compiler, no ninja, a compile
  error), one ``UserWarning`` per extension names the cause, points at the caller's line, and the torch
  path runs from then on;
* ``0``: always the torch path (no build is attempted);
* ``1``: always native on CPU; a failed build raises :class:`NativeBuildError` naming the cause.

``METRICLOSS_NATIVE_ISA`` (read at every call): the widest instruction set the native code may use where
it dispatches on the CPU (the self-pair cell loop): ``avx512`` (the default: the widest the CPU has),
``avx2`` or ``baseline``. Same counts, values up to summation order; for emulating an older CPU.

What runs natively, on float32 and float64 CPU blocks, for the chunked batch-all and semi-hard triplet
losses (``csrc/triplet_epilogue.cpp``): each chunk's Gram GEMM in cache-sized tiles, each tile's
preparation (clamp, the small-entry test, √) and its epilogue while the tile is in cache
(:func:`batch_all_fused`: hinge sums, counts and the weight block of the GEMM gradient;
:func:`semi_hard_fused`: the negative selection, for anchors with few positives). The unfused pieces
(:func:`prepare_block`, :func:`batch_all_epilogue`, :func:`semi_hard_negatives`) serve the chunks the
fused ops do not: duplicate reference rows (read through a column map) and the exact redo pass. Batch-all
over the batch itself runs as one op that takes each unordered pair once (:func:`batch_all_self`,
``csrc/batch_all_self.cpp``). And the rank histogram of each float32 similarity tile of
:func:`~metricloss.metrics.retrieval_metrics` (:func:`retrieval_rank_histogram`,
``csrc/retrieval_rank.cpp``). And sampled WARP's first violators for one label per row
(:func:`warp_sample_single`, ``csrc/warp_sample.cpp``: about 1.5 passes per row on every core, its
outcome drawn from the loop's law). Everything else, and every other device or dtype, stays on torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .._warn import warn_at_caller

__all__ = ["ENV_VAR", "EXTENSIONS", "FUSED_TILE_ROWS", "ISA_ENV_VAR", "SELF_PAIR_COLUMN_BLOCK", "NativeBuildError",
           "NativeExtension", "batch_all_epilogue", "batch_all_fused", "batch_all_self", "build_directory",
           "build_extension", "fused_tile_rows", "is_built", "native_enabled", "native_library", "native_max_isa",
           "prepare_block", "retrieval_rank_histogram", "semi_hard_fused", "semi_hard_negatives", "warp_sample_single"]

ENV_VAR = "METRICLOSS_NATIVE"
ISA_ENV_VAR = "METRICLOSS_NATIVE_ISA"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_DISTANCE_KINDS = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}


@dataclass(frozen=True)
class NativeExtension:
    """One native extension: the sources it compiles from and the ops it registers.

    Attributes:
        key: its name in :data:`EXTENSIONS` (``"triplet"``, ``"self_pairs"``, ``"retrieval"``).
        sources: the ``.cpp`` files under ``metricloss/csrc/`` (compiled; with ``headers``, hashed into
            the build's name).
        headers: the headers they include from ``metricloss/csrc/``.
        serves: what it is for, in words (the build message quotes it).
        build_seconds: about how long it compiles, measured on 2 cores (the build message quotes it).
    """

    key: str
    sources: Tuple[str, ...]
    headers: Tuple[str, ...]
    serves: str
    build_seconds: int

    @property
    def paths(self) -> Tuple[Path, ...]:
        """The sources, then the headers, as paths inside the package."""
        return tuple(_CSRC / name for name in self.sources + self.headers)


# One extension per source, so an op compiles only what it runs (separate shared libraries that add their
# ops to the one ``torch.ops.metricloss_native`` namespace). build_seconds: measured with
# ``python -m metricloss.native build`` on a fresh TORCH_EXTENSIONS_DIR, 2-core AMD EPYC, g++ 12 (see
# *Native CPU path › The first build* in the docs); a slower or busy machine takes a few times longer.
EXTENSIONS: Dict[str, NativeExtension] = {
    ext.key: ext for ext in (
        NativeExtension("triplet", ("triplet_epilogue.cpp",), ("triplet_common.h",),
                        "the chunked batch-all and semi-hard triplet losses", 10),
        NativeExtension("self_pairs", ("batch_all_self.cpp",), ("triplet_common.h",),
                        "batch-all over the batch itself", 20),
        NativeExtension("retrieval", ("retrieval_rank.cpp",), (), "retrieval_metrics", 10),
        NativeExtension("warp", ("warp_sample.cpp",), (), "sampled WARP", 10),
    )
}

# Named heuristic: the fused ops compute a chunk's Gram block in tiles of this many anchor rows and reduce
# each tile while it is in cache. Fewer rows make the tile GEMM inefficient (measured on one core, (t × 130)
# @ (130 × 16384): 47 GMAC/s at t = 16, 79 at 64, 89 at 128, 91 at 256); 128 rows gave the fastest
# semi-hard and batch-all steps at N = 4096 and 16384 (a tile of 2–8 MiB, in L2 or a large L3).
FUSED_TILE_ROWS = 128
# Named heuristic: columns of a self-pair panel (:func:`batch_all_self`) that one thread takes at a time. The
# block's per-column sums and packed counts (a few KiB) stay in L1 while its t rows stream past, and a
# packed 8-bit count field holds at most this many cells of a row (so at most 255).
SELF_PAIR_COLUMN_BLOCK = 128
# The widest build of the self-pair cell loop it may run, where the CPU has it: 0 the baseline build, 1 AVX2,
# 2 AVX-512 (the default: the widest the CPU has). Same counts, values up to summation order. The tests set
# it to compare the builds; users set ``METRICLOSS_NATIVE_ISA`` (:func:`native_max_isa` takes the narrower).
SELF_PAIR_MAX_ISA = 2
_ISA_LEVELS = {"baseline": 0, "avx2": 1, "avx512": 2}
# The most positive slots the self-pair op takes (3 packed groups of 4; the chunked path's threshold-
# sorting heuristic takes over above 12).
SELF_PAIR_MAX_SLOTS = 12
_NATIVE_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
# per extension: loaded, the build error (None: not tried or loaded), whether its failure was warned about
_state: Dict[str, dict] = {key: {"loaded": False, "error": None, "warned": False} for key in EXTENSIONS}
_warned_errors: set = set()  # the causes already warned about


class NativeBuildError(RuntimeError):
    """A native extension could not be built or loaded (the message names the cause)."""


def _extension(key: str) -> NativeExtension:
    try:
        return EXTENSIONS[key]
    except KeyError:
        raise ValueError(f"unknown native extension {key!r}; expected one of {sorted(EXTENSIONS)}") from None


def _extension_name(key: str) -> str:
    """One build per torch version and per source text: an extension built against another torch's headers
    must not be loaded, and two installs (or checkouts) with different sources sharing one
    ``TORCH_EXTENSIONS_DIR`` must not rebuild over each other's build directory. The sources' directory is
    part of the key too: ninja rebuilds a cached build whose compile command names other source paths, so
    two checkouts of the same sources would otherwise recompile over each other (with no message, since the
    library is there)."""
    ext = _extension(key)
    tag = "".join(ch if ch.isalnum() else "_" for ch in torch.__version__)
    digest = hashlib.sha256(str(_CSRC).encode() + b"\0")
    for path in ext.paths:
        digest.update(path.name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
    return f"metricloss_{key}_{tag}_{digest.hexdigest()[:12]}"


def build_directory(key: str) -> Path:
    """Where extension ``key`` is (or will be) built and cached: ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions/py<version>_<accelerator>``) / its name."""
    # torch.utils.cpp_extension's own rule, without its side effect of creating the directory
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils import cpp_extension

        accelerator = ("rocm" + torch.version.hip.replace(".", "") if torch.version.hip is not None
                       else "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda is not None else "cpu")
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / _extension_name(key)


def is_built(key: str) -> bool:
    """Whether extension ``key`` is in the cache already and up to date (its first use then loads it, no
    compile). A cached library older than its sources (a fresh clone or a reinstall at the same path gives
    the same name but new file times) is rebuilt by ninja, so it does not count as built: the compile is
    announced."""
    library = build_directory(key) / f"{_extension_name(key)}.so"
    if not library.is_file():
        return False
    built = library.stat().st_mtime
    return all(path.stat().st_mtime <= built for path in _extension(key).paths if path.is_file())


def _first_error_line(text: str) -> str:
    """The compiler's first ``error:`` line of a build log (else its last non-empty line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line and not line.startswith("Error building extension"):
            return line
    return lines[-1] if lines else ""


def _build(key: str) -> None:
    """Compile (or load the cached build of) extension ``key``; adds its ops to ``torch.ops.metricloss_native``.

    Says on standard error what it compiles before a compile (not when it only loads the cached build).

    Raises:
        NativeBuildError: naming the cause (missing sources, no C++ compiler, no ninja, the compiler's
            first error line, a library that does not load).
    """
    from torch.utils import cpp_extension

    ext = _extension(key)
    missing = [str(p) for p in ext.paths if not p.is_file()]
    if missing:
        raise NativeBuildError(f"the native sources are missing: {', '.join(missing)}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C++ compiler: {compiler!r} is not on PATH; install g++ or clang (e.g. "
                               f"`apt install g++`) or set CXX")
    if not cpp_extension.is_ninja_available():
        raise NativeBuildError("ninja is not installed; pip install ninja")
    name = _extension_name(key)
    cached = is_built(key)
    if not cached:
        sources = ", ".join(ext.sources)
        print(f"metricloss: compiling the native CPU kernels for {ext.serves} ({sources}), once per torch "
              f"version: about {ext.build_seconds} s on 2 cores, longer on a slow or busy machine. Cached in "
              f"{build_directory(key)}. Skip it with {ENV_VAR}=0 (the torch path); build everything ahead "
              f"with `python -m metricloss.native build`.", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # torch's own compiler checks warn in words of their own; the cause, if any, is raised below
            warnings.simplefilter("ignore")
            cpp_extension.load(name=name, sources=[str(_CSRC / s) for s in ext.sources],
                               extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                                             "-ffp-contract=off"],
                               extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # compile or link error, unloadable library
        raise NativeBuildError(f"building the native extension {key!r} failed: {type(exc).__name__}: "
                               f"{_first_error_line(str(exc))}".rstrip(": ")) from exc
    if not cached:
        print(f"metricloss: built the native {key!r} kernels in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    if key == "warp":
        _register_warp_fake()


@torch.compiler.disable
def _uniforms_from(generator: torch.Generator, rows: int) -> torch.Tensor:
    """(rows, 2) fp64 uniforms from an explicit generator, always eagerly: Dynamo cannot take a generator
    argument, so under torch.compile this is a graph break that draws from it exactly as eager code does."""
    return torch.rand((rows, 2), dtype=torch.float64, generator=generator)


def _register_warp_fake() -> None:
    """Shapes of ``warp_sample_single`` for tracing (torch.compile, fake tensors): two (B,) int64 tensors."""
    if getattr(_register_warp_fake, "done", False):
        return

    def fake(scores, labels, uniforms, margin, max_trials):
        return labels.new_empty(scores.shape[:1]), labels.new_empty(scores.shape[:1])

    torch.library.register_fake("metricloss_native::warp_sample_single", fake)
    _register_warp_fake.done = True


def build_extension(key: str) -> None:
    """Build (or load) extension ``key`` now, whatever ``METRICLOSS_NATIVE`` says.

    Raises:
        NativeBuildError: the build failed (the message names the cause).
    """
    _extension(key)
    with _lock:
        if not _state[key]["loaded"]:
            _build(key)
            _state[key].update(loaded=True, error=None)


def native_library(extension: Optional[str] = None) -> bool:
    """Build/load extension ``extension`` (``None``: every one) once per process; True when it is loaded.

    Args:
        extension: a key of :data:`EXTENSIONS`, or None.

    Raises:
        NativeBuildError: when ``METRICLOSS_NATIVE=1`` and the build failed.
    Otherwise a failed build warns once per extension (naming the cause, pointing at the caller's line)
    and returns False from then on.
    """
    if extension is None:
        return all([native_library(key) for key in EXTENSIONS])
    _extension(extension)
    forced = os.environ.get(ENV_VAR, "") == "1"
    state = _state[extension]
    if torch.compiler.is_compiling():
        # no build and no lock inside a traced region: what an eager call has loaded serves it
        return bool(state["loaded"])
    with _lock:
        if not state["loaded"] and state["error"] is None:
            try:
                _build(extension)
                state["loaded"] = True
            except NativeBuildError as exc:
                state["error"] = str(exc)
        if state["loaded"]:
            return True
        if forced:
            raise NativeBuildError(f"{ENV_VAR}=1 but {state['error']}")
        # once per extension, and once for a cause they share (no compiler, no ninja)
        warn = not state["warned"] and state["error"] not in _warned_errors
        state["warned"] = True
        _warned_errors.add(state["error"])
    if warn:
        warn_at_caller(f"metricloss: the native CPU kernels are not available: {state['error']}. Using the torch "
                       f"path (set {ENV_VAR}=0 to silence this).", UserWarning)
    return False


def native_enabled(t: torch.Tensor, extension: str, dtypes: Tuple[torch.dtype, ...] = _NATIVE_DTYPES) -> bool:
    """Whether the native path of extension ``extension`` serves a block like ``t``: ``dtypes`` (default
    float32/float64) on CPU, ``METRICLOSS_NATIVE`` not ``0``, and the extension built (built here on first
    use)."""
    setting = os.environ.get(ENV_VAR, "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0, 1 or unset, got {setting!r}")
    if setting == "0" or t.device.type != "cpu" or t.dtype not in dtypes:
        return False
    return native_library(extension)


def native_max_isa() -> int:
    """The widest build the ISA-dispatching native code may run: the narrower of :data:`SELF_PAIR_MAX_ISA`
    and ``METRICLOSS_NATIVE_ISA`` (0 baseline, 1 AVX2, 2 AVX-512; a build the CPU lacks runs the widest
    it has)."""
    setting = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if setting and setting not in _ISA_LEVELS:
        raise ValueError(f"{ISA_ENV_VAR} must be one of {', '.join(_ISA_LEVELS)} or unset, got {setting!r}")
    return min(int(SELF_PAIR_MAX_ISA), _ISA_LEVELS.get(setting, 2))


def batch_all_epilogue(dist: torch.Tensor, d_ap: torch.Tensor, members: torch.Tensor, in_class: torch.Tensor,
                       valid: torch.Tensor, self_cols: Optional[torch.Tensor], margin: Union[float, str],
                       distance: str, sorted_thresholds: bool,
                       want_weights: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """The batch-all epilogue of one anchor chunk in one native pass per row, or None (use the torch path).

    Args:
        dist: (c, M) float32/float64 CPU distances (own cells 0), overwritten.
        d_ap: (c, W) exact positive distances; members/in_class: (c, W) int64 / bool positive table;
        valid: (c, W) bool, the slots that form triplets; self_cols: (c,) int64 own column (-1: none) or None.
        margin: a float, or ``"soft"`` (softplus); distance: one of the distance names.
        sorted_thresholds: use the sorted-threshold formula (the torch path's named heuristic,
            :func:`~metricloss.ops.triplet.use_sorted_batch_all`), so both paths use the same per-element
            arithmetic.
        want_weights: also produce the scaled weight block W̃ of :func:`~metricloss.ops.distance.gram_backward`.

    Returns:
        (sums (c,), nonzero counts (c,) int64, W̃ (c, M) written over ``dist``'s storage or None), or None
        when the native path does not serve this block (see :func:`native_enabled`).
    """
    if not native_enabled(dist, "triplet"):
        return None
    block = dist if dist.is_contiguous() else dist.contiguous()
    soft = margin == "soft"
    sums, nonzero = torch.ops.metricloss_native.batch_all_epilogue(
        block, d_ap.to(block.dtype).contiguous(), members.contiguous(), in_class.contiguous(), valid.contiguous(),
        None if self_cols is None else self_cols.to(torch.int64).contiguous(), 0.0 if soft else float(margin),
        soft, _DISTANCE_KINDS[distance], bool(sorted_thresholds), bool(want_weights))
    return sums, nonzero, (block if want_weights else None)


def semi_hard_negatives(dist: torch.Tensor, d_ap: torch.Tensor, members: torch.Tensor, in_class: torch.Tensor,
                        self_cols: Optional[torch.Tensor], sorted_selection: bool,
                        rtol: Union[float, torch.Tensor] = 0.0, distance: str = "euclidean") -> Optional[torch.Tensor]:
    """Semi-hard negatives of one anchor chunk in native passes per row, or None (use the torch path).

    The same selection as :func:`~metricloss.ops.mining.semi_hard_negative_idx` (per positive slot the nearest
    negative beyond the tie bound of d_ap, the first index within the tie bound of that nearest one, else the
    farthest negative), arguments as there. ``sorted_selection``: the torch path's many-positives heuristic
    (:func:`~metricloss.ops.mining.use_sorted_semi_hard`) holds; the native pass costs O(M·W) per row, so
    those chunks stay on the torch sort.

    Returns:
        (c, W) int64 reference indices (padding slots: arbitrary in-range indices), ``dist`` overwritten
        with the negatives' distances (own class +inf), or None.
    """
    if sorted_selection or dist.shape[1] == 0 or not native_enabled(dist, "triplet"):
        return None
    from .mining import tie_bound

    block = dist if dist.is_contiguous() else dist.contiguous()
    d_ap = d_ap.to(block.dtype)
    slot_rtol = _slot_rtol(rtol, d_ap)
    bound = tie_bound(d_ap, slot_rtol, distance).contiguous()  # as the torch path computes it
    return torch.ops.metricloss_native.semi_hard_select(
        block, bound, members.contiguous(), in_class.contiguous(),
        None if self_cols is None else self_cols.to(torch.int64).contiguous(), slot_rtol, distance == "cosine")


def _slot_rtol(rtol: Union[float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The tie tolerance as a contiguous (c, W) tensor of ``like``'s dtype (a float: the same for every slot)."""
    if isinstance(rtol, torch.Tensor):
        return rtol.to(like.dtype).expand(like.shape).contiguous()
    return torch.full_like(like, float(rtol))


def prepare_block(u: torch.Tensor, a_slack: torch.Tensor, r_slack: torch.Tensor, members: torch.Tensor,
                  in_class: torch.Tensor, self_cols: Optional[torch.Tensor], own_start: Optional[int],
                  distance: str) -> Optional[torch.Tensor]:
    """A chunk's raw Gram block made into distances, with its cancellation test, in one native pass per
    row, or None (use the torch path).

    The same as :meth:`~metricloss.ops.distance.GramFactors.squared_block`, the ``redo`` test of
    :meth:`~metricloss.ops.triplet._BlockTripletPlan.chunk` and
    :meth:`~metricloss.ops.distance.GramFactors.finish`: u clamped at 0; redo_i = min over the anchor's
    negatives of u_ij − r_slack_j < a_slack_i; the own column to 0; √ for ``euclidean``.

    Args:
        u: (c, M) raw d² (cosine: 1 − a·r) of the chunk, overwritten with the distances.
        a_slack: (c,), r_slack: (M,) the two halves of the small-entry bound.
        members, in_class, self_cols: the positive table and the own columns (as in
            :func:`~metricloss.ops.mining.mask_own_class_`).
        own_start: the reference set is the batch and the chunk starts at anchor ``own_start`` (own
            column of row i: ``own_start + i``), else None.

    Returns:
        redo (c,) bool, or None.
    """
    if not native_enabled(u, "triplet") or not u.is_contiguous():
        return None
    return torch.ops.metricloss_native.prepare_block(
        u, a_slack.to(u.dtype).contiguous(), r_slack.to(u.dtype).contiguous(), members.contiguous(),
        in_class.contiguous(), None if self_cols is None else self_cols.to(torch.int64).contiguous(),
        -1 if own_start is None else int(own_start), distance == "euclidean")


def fused_tile_rows(num_refs: int, element_size: int) -> int:
    """Anchor rows per Gram tile of the fused ops: :data:`FUSED_TILE_ROWS` (the sizes are the arguments
    so that a size-dependent rule can replace it in one place)."""
    return FUSED_TILE_ROWS


def semi_hard_fused(a_factors: torch.Tensor, r_factors: torch.Tensor, a_slack: torch.Tensor, r_slack: torch.Tensor,
                    members: torch.Tensor, in_class: torch.Tensor, self_cols: Optional[torch.Tensor],
                    own_start: Optional[int], distance: str, d_ap_exact: torch.Tensor,
                    rtol: Union[float, torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """A semi-hard chunk's Gram block, block preparation and negative selection in one native op, or None
    (use the unfused path).

    Equal to :func:`prepare_block`, the gather of d_ap (its Gram value, or ``d_ap_exact`` where the
    positive's own entry is small) and :func:`semi_hard_negatives` run one after the other, but the block
    never leaves the cache: the op computes it itself, ``a_factors @ r_factors.T``, one tile of
    :func:`fused_tile_rows` rows at a time.

    Args:
        a_factors: (c, K) the chunk's Gram factors (:class:`~metricloss.ops.distance.GramFactors` ``A``
            rows); r_factors: (M, K) the references' (``R``). float32/float64 CPU.
        a_slack: (c,), r_slack: (M,) the two halves of the small-entry bound.
        members, in_class: (c, W) int64 / bool positive table; self_cols: (c,) own columns (-1: none) or None.
        own_start: the reference set is the batch and the chunk starts at anchor ``own_start``, else None.
        distance: the distance name; d_ap_exact: (c, W) exact anchor-positive distances; rtol: the tie
            tolerance, a float or (c, W) per slot (:func:`~metricloss.ops.mining.tie_rtol_slots`).

    Returns:
        (negative indices (c, W) int64 as :func:`semi_hard_negatives`, redo (c,) bool as
        :func:`prepare_block`), or None when the native path does not serve this chunk.
    """
    if members.shape[1] == 0 or r_factors.shape[0] == 0 or not native_enabled(a_factors, "triplet"):
        return None
    dtype = a_factors.dtype
    return torch.ops.metricloss_native.semi_hard_fused(
        a_factors.contiguous(), r_factors.contiguous(), a_slack.to(dtype).contiguous(), r_slack.to(dtype).contiguous(),
        members.contiguous(), in_class.contiguous(), None if self_cols is None else self_cols.to(torch.int64).contiguous(),
        -1 if own_start is None else int(own_start), distance == "euclidean", d_ap_exact.to(dtype).contiguous(),
        _slot_rtol(rtol, d_ap_exact.to(dtype)), distance == "cosine",
        fused_tile_rows(r_factors.shape[0], a_factors.element_size()))


def batch_all_fused(a_factors: torch.Tensor, r_factors: torch.Tensor, a_slack: torch.Tensor, r_slack: torch.Tensor,
                    members: torch.Tensor, in_class: torch.Tensor, valid: torch.Tensor,
                    self_cols: Optional[torch.Tensor], own_start: Optional[int], distance: str,
                    d_ap_exact: torch.Tensor, margin: Union[float, str], sorted_thresholds: bool,
                    weights: Optional[torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A batch-all chunk's Gram block, block preparation and epilogue in one native op, or None (use the
    unfused path).

    Equal to :func:`prepare_block`, the gather of d_ap (its Gram value, or ``d_ap_exact`` where the
    positive's own entry is small) and :func:`batch_all_epilogue` run one after the other, but each tile
    of :func:`fused_tile_rows` rows is prepared and reduced while it is in cache.

    Args:
        a_factors, r_factors, a_slack, r_slack, members, in_class, self_cols, own_start, distance, d_ap_exact:
            as :func:`semi_hard_fused`; valid: (c, W) bool, the slots that form triplets.
        margin: a float, or ``"soft"``; sorted_thresholds: as :func:`batch_all_epilogue`.
        weights: a contiguous (c, M) buffer that receives the scaled weight block W̃ of
            :func:`~metricloss.ops.distance.gram_backward`, or None (no gradient wanted).

    Returns:
        (sums (c,), nonzero counts (c,) int64, redo (c,) bool), or None.
    """
    if members.shape[1] == 0 or r_factors.shape[0] == 0 or not native_enabled(a_factors, "triplet"):
        return None
    dtype = a_factors.dtype
    soft = margin == "soft"
    return torch.ops.metricloss_native.batch_all_fused(
        a_factors.contiguous(), r_factors.contiguous(), a_slack.to(dtype).contiguous(), r_slack.to(dtype).contiguous(),
        members.contiguous(), in_class.contiguous(), valid.contiguous(),
        None if self_cols is None else self_cols.to(torch.int64).contiguous(), -1 if own_start is None else int(own_start),
        distance == "euclidean", d_ap_exact.to(dtype).contiguous(), 0.0 if soft else float(margin), soft,
        _DISTANCE_KINDS[distance], bool(sorted_thresholds), weights,
        fused_tile_rows(r_factors.shape[0], a_factors.element_size()))


def batch_all_self(x: torch.Tensor, sq_norms: torch.Tensor, slack: torch.Tensor, class_ids: torch.Tensor,
                   members: torch.Tensor, valid: torch.Tensor, d_ap: torch.Tensor, margin: float, distance: str,
                   row_scale: Optional[torch.Tensor], want_grad: bool,
                   tile_rows: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Batch-all over the batch itself (the reference set is the batch), every unordered pair once, in one
    native op; or None (use the chunked path).

    The same losses, counts and gradients as the chunked path with exact anchor-positive distances
    (:class:`~metricloss.ops.triplet._BlockTripletPlan`): the distance block is symmetric, so the op walks
    panels of ``tile_rows`` anchors against the columns at or after the panel only, and one cell (i, j)
    serves anchor i (negative j) and anchor j (negative i). That halves the block GEMM and the two
    gradient GEMMs (1.5 GEMMs of N × N × D in all instead of 3). Each view keeps the Gram value the chunked
    path computes for it (bitwise, where the BLAS sums each dot product in index order), its own small-entry
    refinement and its own weight. Design: *Kernels › The native CPU kernels (C++)* in the docs.

    Args:
        x: (N, D) prepared embeddings, float32/float64 CPU, contiguous.
        sq_norms: (N,) their squared norms, the ones inside the Gram factors
            (:class:`~metricloss.ops.distance.GramFactors` ``a_sq``); slack: (N,) ``a_slack``.
        class_ids: (N,) a class id per row in x's dtype (exact integers: float32 holds them below 2**24).
        members: (N, W) int64 positive table, valid: (N, W) bool the slots that form triplets, W <= 12.
        d_ap: (N, W) exact anchor-positive distances; margin: a float (no soft margin); distance: its name.
        row_scale: optional (N,) upstream gradient per anchor (``reduction="none"``), or None (all ones).
        want_grad: also return the gradient w.r.t. ``x`` of Σ_i row_scale_i · loss_i.
        tile_rows: anchors per panel, 32 to 224 (the op merges a last panel of fewer than 32 rows into the one
            before it: the BLAS rounds GEMMs of very few rows differently). N must be at least 32.

    Returns:
        (per-anchor sums (N,), nonzero counts (N,) int64, gradient (N, D) or None), or None when the native
        path does not serve the call (see :func:`native_enabled`).
    """
    width = members.shape[1]
    if width == 0 or width > SELF_PAIR_MAX_SLOTS or x.shape[0] == 0 or not native_enabled(x, "self_pairs"):
        return None
    dtype = x.dtype
    sums, nonzero, grad = torch.ops.metricloss_native.batch_all_self(
        x.contiguous(), sq_norms.to(dtype).contiguous(), slack.to(dtype).contiguous(), class_ids.to(dtype).contiguous(),
        members.contiguous(), valid.contiguous(), d_ap.to(dtype).contiguous(), float(margin), _DISTANCE_KINDS[distance],
        None if row_scale is None else row_scale.to(dtype).contiguous(), bool(want_grad), int(tile_rows),
        SELF_PAIR_COLUMN_BLOCK, native_max_isa())
    return sums, nonzero, (grad if want_grad else None)


def retrieval_rank_histogram(tile: torch.Tensor, rel: torch.Tensor, lowest: torch.Tensor, own_start: Optional[int],
                             index_bits: int) -> Optional[torch.Tensor]:
    """The rank histogram of one similarity tile in one native pass per row, or None (use the torch path).

    The same histogram as the torch paths of :func:`metricloss.metrics._rank_tile` (both count exactly the
    same items at exactly the same positions): per row, every item with a similarity ``>= lowest[row]``
    (the own column ``own_start + row`` skipped) is counted at the position that its rank key
    ``(row << (32 + index_bits)) | (order-preserving fp32 bits << index_bits) | (G − 1 − col)`` has among
    the row's relevant keys (``torch.searchsorted(..., side="left")``). How: the items are bucketed by
    their order bits, a bucket without a relevant key counted at its one position, the items of the others
    placed exactly (see ``csrc/retrieval_rank.cpp``); about one pass over the row, no tile-sized temporary.

    Args:
        tile: (n, G) float32 CPU similarities (read only).
        rel: (n, W) int64 relevant keys of each row, ascending (padding ``row << (32 + index_bits)`` first).
        lowest: (n, 1) or (n,) float32, the lowest relevant similarity of each row (+inf for a row without
            relevant keys; a row whose relevant keys lie below it raises ``RuntimeError``).
        own_start: leave-one-out, the tile starts at query ``own_start`` (own column of row i:
            ``own_start + i``), else None.
        index_bits: the bits of a gallery index, ``max(1, (G − 1).bit_length())``.

    Returns:
        (n, W + 1) int64 histogram ``hist[row, p]`` = #{counted items of the row with exactly p relevant
        keys below theirs}, or None when the native path does not serve this tile (a non-float32 or
        non-contiguous tile, or see :func:`native_enabled`).
    """
    if tile.dtype != torch.float32 or not tile.is_contiguous() or not native_enabled(tile, "retrieval"):
        return None
    return torch.ops.metricloss_native.retrieval_rank_histogram(
        tile, rel.contiguous(), lowest.reshape(-1).contiguous(), -1 if own_start is None else int(own_start),
        int(index_bits))


def warp_sample_single(scores: torch.Tensor, labels: torch.Tensor, margin: float, max_trials: int,
                       generator: Optional[torch.Generator]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Sampled WARP's first violators for one label per row, natively, or None (use the torch path).

    The outcome of the paper's loop drawn from its law (see ``csrc/warp_sample.cpp``): per row, with r
    violators among the C − 1 negatives, the trial N ~ Geometric(r / (C − 1)) truncated at ``max_trials``
    and the violator uniform among the r, from two fp64 uniforms per row drawn here from ``generator``
    (one ``torch.rand`` call). About 1.5 passes over each row, rows split across threads; the result does not
    depend on the thread count.

    Args:
        scores: (B, C) CPU scores, any float dtype (read only; 16-bit ones compared after an exact upcast to
            float32, as on the torch path).
        labels: (B,) int64 in [0, C).
        margin: m. max_trials: the cap on N (C − 1 for the paper's loop).
        generator: the random source (None: the global CPU generator).

    Returns:
        ``(trials, chosen)``: (B,) int64, N ≥ 1 and the violator's column, or (0, −1) where none was drawn;
        None when the native path does not serve these scores (see :func:`native_enabled`).
    """
    if not native_enabled(scores, "warp", _NATIVE_DTYPES + (torch.float16, torch.bfloat16)):
        return None
    uniforms = (torch.rand((scores.shape[0], 2), dtype=torch.float64) if generator is None
                else _uniforms_from(generator, scores.shape[0]))
    return torch.ops.metricloss_native.warp_sample_single(scores.contiguous(), labels.to(torch.int64).contiguous(),
                                                          uniforms, float(margin), int(max_trials))
