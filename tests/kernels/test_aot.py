"""Every kernel configuration the heuristics can pick compiles for sm_80 and sm_90, without spills,
within the target's shared memory, and with tensor-core instructions in the mining kernel.

The compilations run in one clean subprocess (metricloss.kernels.aot.inspect_in_subprocess): this test
process runs under TRITON_INTERPRET=1, where Triton cannot compile a kernel repeatedly.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from metricloss.kernels.aot import cuobjdump_path, inspect_in_subprocess  # noqa: E402
from metricloss.kernels.centroid import all_centroid_configs, centroid_aot_jobs  # noqa: E402
from metricloss.kernels.mining import SMEM_LIMIT_BYTES, all_mining_configs, aot_job  # noqa: E402
from metricloss.kernels.warp import warp_aot_jobs  # noqa: E402

import triton  # noqa: E402

if not os.path.exists(cuobjdump_path()):
    pytest.skip("Triton's bundled cuobjdump is missing", allow_module_level=True)

CASES = [(arch, dtype, cfg, variant) for arch, dtype, cfg in all_mining_configs()
         for variant in ("self_euclidean", "ref_cosine")]
IDS = [f"sm{a}-{str(d)[6:]}-{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}-{v}" for a, d, c, v in CASES]


# Spills measured per Triton version, allowed as they are (spill stores per configuration) and no more. The
# test extra accepts Triton 3.7.1 to 3.9.x (3.7.1 is what torch 2.13's CUDA wheels require); 3.9.0 compiles
# every configuration without a spill. 3.7.1 spills in two sm_90 fp32 centroid configurations (a slowdown of
# those tiles on H100, not a wrong result).
KNOWN_SPILL_STORES = {
    "3.7.1": {"sm90-float32-centroid_weighted_sums_kernel-64x64x16-d64-w4": 28,
              "sm90-float32-centroid_weighted_sums_kernel-64x64x32-d64-w4": 28},
}


def assert_spills_within_budget(rep, case_id: str) -> None:
    allowed = KNOWN_SPILL_STORES.get(triton.__version__, {}).get(case_id, 0)
    if allowed:
        assert rep.spill_stores <= allowed, rep  # the known spill, and no worse
    else:
        assert not rep.spills, rep


CENTROID_CASES = [(arch, dtype, cfg, job) for arch, dtype, cfg in all_centroid_configs()
                  for job in centroid_aot_jobs(arch, dtype, cfg)]
CENTROID_IDS = [f"sm{a}-{str(d)[6:]}-{j['kernel'].split(':')[1]}-{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-d{c.BLOCK_D}"
                f"-w{c.num_warps}" for a, d, c, j in CENTROID_CASES]


WARP_JOBS = [job for arch in (80, 90) for job in warp_aot_jobs(arch)]
WARP_IDS = [f"sm{j['arch']}-{j['types'].get('S_ptr', j['types'].get('DS_ptr'))[1:]}-{j['kernel'].split(':')[1]}"
            f"-{j['constexprs']['BLOCK_R']}x{j['constexprs']['BLOCK_C']}"
            + ("-log" if j["constexprs"].get("LOG_WEIGHT") else "") for j in WARP_JOBS]


@pytest.fixture(scope="module")
def reports():
    jobs = [aot_job(arch, dtype, cfg, cosine=variant == "ref_cosine", self_ref=variant == "self_euclidean")
            for arch, dtype, cfg, variant in CASES] + [job for _, _, _, job in CENTROID_CASES] + WARP_JOBS
    return dict(zip(IDS + CENTROID_IDS + WARP_IDS, inspect_in_subprocess(jobs)))


@pytest.mark.parametrize("case_id", IDS)
def test_mining_kernel_compiles_clean(reports, case_id):
    rep = reports[case_id]
    assert_spills_within_budget(rep, case_id)
    assert rep.shared_bytes <= SMEM_LIMIT_BYTES[rep.arch], rep
    assert rep.mma_count > 0, rep
    prefixes = ("HMMA",) if rep.arch == 80 else ("HGMMA", "HMMA")
    assert all(op.startswith(prefixes) for op in rep.mma), rep


@pytest.mark.parametrize("case_id", CENTROID_IDS)
def test_centroid_kernels_compile_clean(reports, case_id):
    rep = reports[case_id]
    assert_spills_within_budget(rep, case_id)
    assert rep.shared_bytes <= SMEM_LIMIT_BYTES[rep.arch], rep
    assert rep.mma_count > 0, rep  # both kernels run their Gram term (and v) on tensor cores


def test_every_dtype_and_arch_is_covered():
    assert {(a, d) for a, d, _, _ in CASES} == {(a, d) for a in (80, 90)
                                                for d in (torch.float32, torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("case_id", WARP_IDS)
def test_warp_kernels_compile_clean(reports, case_id):
    # both sampled-WARP kernels, every scores dtype (fp64 included: the fp64 logarithms lower on both
    # targets), weight kind and tile shape the heuristics pick
    rep = reports[case_id]
    if "sample_kernel" in case_id:
        # The per-row epilogue divides in fp64 (p = r/n, the geometric inversion): ptxas calls the division's
        # out-of-line slow path there and saves a register or two around the call (a stack frame of 8 to 16
        # bytes, read once per row, outside the tile loops). Nothing more is allowed.
        assert rep.stack_bytes <= 16 and rep.local_bytes == 0 and rep.spill_stores <= 3, rep
    else:
        assert not rep.spills, rep
    assert rep.shared_bytes <= SMEM_LIMIT_BYTES[rep.arch], rep


def test_warp_ids_are_unique():
    assert len(set(WARP_IDS)) == len(WARP_IDS) == 2 * 4 * 3 * 3
