#!/usr/bin/env python3
"""Registers, spills and shared memory of every Triton kernel configuration, for sm_80 and sm_90.

Compiles each configuration the tile heuristics can pick ahead of time (no GPU needed: Triton's wheel
bundles ptxas and cuobjdump) and prints a markdown table read from the cubins.

Needs Triton (the test extra).

Usage:
    python benchmarks/kernel_resources.py
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    # imported after the arguments are parsed, so that --help works (and is quick) without Triton
    from metricloss.kernels.aot import inspect_in_subprocess
    from metricloss.kernels.centroid import all_centroid_configs, centroid_aot_jobs
    from metricloss.kernels.mining import SMEM_LIMIT_BYTES, aot_job, all_mining_configs

    cases = [(arch, dtype, cfg, variant) for arch, dtype, cfg in all_mining_configs()
             for variant in ("self_euclidean", "ref_cosine")]
    jobs = [aot_job(arch, dtype, cfg, cosine=v == "ref_cosine", self_ref=v == "self_euclidean")
            for arch, dtype, cfg, v in cases]
    print("| kernel | arch | dtype | tiles (BLOCK_M×N×K) | warps | stages | variant | registers "
          "| spills (stack B / STL / LDL) "
          "| shared (B, limit) | tensor-core ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("batch_hard_mining", arch, dtype, f"{cfg.BLOCK_M}×{cfg.BLOCK_N}×{cfg.BLOCK_K}", cfg, variant)
            for arch, dtype, cfg, variant in cases]
    for arch, dtype, cfg in all_centroid_configs():
        for job in centroid_aot_jobs(arch, dtype, cfg):
            name = job["kernel"].split(":")[1].replace("_kernel", "")
            tiles = f"{cfg.BLOCK_M}×{cfg.BLOCK_N}×{cfg.BLOCK_K}" + (f", v {cfg.BLOCK_D}" if "weighted" in name else "")
            rows.append((name, arch, dtype, tiles, cfg, "-"))
            jobs.append(job)
    reports = inspect_in_subprocess(jobs)
    for (name, arch, dtype, tiles, cfg, variant), rep in zip(rows, reports):
        print(f"| {name} | sm_{arch} | {str(dtype)[6:]} | {tiles} | "
              f"{cfg.num_warps} | {cfg.num_stages} | {variant} | {rep.registers} | "
              f"{rep.stack_bytes} / {rep.spill_stores} / {rep.spill_loads} | "
              f"{rep.shared_bytes} ({SMEM_LIMIT_BYTES[arch]}) | {rep.mma_count} × {', '.join(rep.mma)} |")


if __name__ == "__main__":
    main()
