"""The command line of the native CPU kernels: build them ahead of time, or see what is built.

``python -m metricloss.native build`` compiles every native extension into the cache (or loads the cached
build), one after the other, and prints per extension the seconds it took and where it lives; it exits
with status 1 naming the cause when one does not build. Run it once after ``pip install`` (or in a
container image, a CI job) so that no training run waits for a compiler.

``python -m metricloss.native info`` prints the cache directory, which extensions are built, the CPU's
instruction sets and the ``METRICLOSS_NATIVE`` / ``METRICLOSS_NATIVE_ISA`` settings; it compiles nothing.

The kernels themselves, and the switches: :mod:`metricloss.ops.native`; *Native CPU path* in the docs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .ops import native as _native

__all__ = ["main"]


def _build(keys: List[str]) -> int:
    failed = 0
    for key in keys:
        ext = _native.EXTENSIONS[key]
        cached = _native.is_built(key)
        start = time.perf_counter()
        try:
            _native.build_extension(key)
        except _native.NativeBuildError as exc:
            print(f"{key}: FAILED: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        how = "loaded from the cache" if cached else "compiled"
        print(f"{key} ({', '.join(ext.sources)}): {how} in {time.perf_counter() - start:.1f} s: "
              f"{_native.build_directory(key)}", flush=True)
    return 1 if failed else 0


def _info() -> int:
    import torch

    print(f"torch {torch.__version__}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"{_native.ENV_VAR}={os.environ.get(_native.ENV_VAR, '(unset)')}  "
          f"{_native.ISA_ENV_VAR}={os.environ.get(_native.ISA_ENV_VAR, '(unset)')}")
    for key, ext in _native.EXTENSIONS.items():
        state = "built" if _native.is_built(key) else "not built"
        print(f"{key} ({', '.join(ext.sources)}; {ext.serves}): {state}: {_native.build_directory(key)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line (``argv`` without the program name; default ``sys.argv[1:]``); returns the exit
    status."""
    parser = argparse.ArgumentParser(prog="python -m metricloss.native",
                                     description="Build the native CPU kernels ahead of time, or see what is built.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile every native extension into the cache (or load it)")
    build.add_argument("extensions", nargs="*", metavar="EXTENSION",
                       help=f"which ones (default: all of {', '.join(_native.EXTENSIONS)})")
    sub.add_parser("info", help="the cache directory, what is built, the CPU's instruction sets")
    args = parser.parse_args(argv)
    if args.command == "build":
        unknown = [k for k in args.extensions if k not in _native.EXTENSIONS]
        if unknown:
            parser.error(f"unknown extension(s) {unknown}; choose from {list(_native.EXTENSIONS)}")
        return _build(args.extensions or list(_native.EXTENSIONS))
    return _info()


if __name__ == "__main__":
    sys.exit(main())
