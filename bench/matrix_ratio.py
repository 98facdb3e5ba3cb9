#!/usr/bin/env python3
"""`vmpod matrix` over 3 kernels vs the slowest single kernel, as a ratio.

Runs the example module (examples/modules/vmpod_echo) through `vmpod matrix`
on each kernel alone and on all three together, N times each (default 3), and
prints the medians and  matrix(3) / slowest single  (1.0 would be perfect
parallelism; 3.0 no parallelism at all).

With --sandbox-cost it instead builds the same module against one cached
kernel's headers with and without the bubblewrap sandbox (interleaved, N runs
each) and prints the medians and  sandboxed / bare.

Usage: sudo .venv/bin/python bench/matrix_ratio.py [--runs N] [--kernels A,B,C]
       sudo .venv/bin/python bench/matrix_ratio.py --sandbox-cost [--runs N] [--kernels K]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "examples/modules/vmpod_echo"


def matrix_seconds(kernels: str, logs: Path) -> float:
    argv = [
        sys.executable,
        "-m",
        "vmpod.cli",
        "matrix",
        "--kernels",
        kernels,
        "--module-src",
        str(MODULE),
        "--test",
        str(MODULE / "test.sh"),
        "--logs",
        str(logs),
    ]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"matrix on {kernels} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return time.monotonic() - start


def sandbox_cost(kernel: str, runs: int) -> None:
    from vmpod.guest.headers import headers_dir
    from vmpod.guest.kernel import load_cached
    from vmpod.matrix.build import build_module
    from vmpod.paths import default_paths

    cached = load_cached(default_paths(), kernel)
    headers = headers_dir(cached) if cached is not None else None
    if headers is None:
        sys.exit(f"no cached headers for {kernel}: run `vmpod kernel add {kernel}` first")
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs + 1):  # the first pair warms the page cache
            for sandbox in (True, False):
                res = asyncio.run(build_module(MODULE, headers, Path(tmp) / "build", sandbox=sandbox))
                if not res.ok:
                    sys.exit(f"build failed (sandbox={sandbox}):\n{res.log[-3000:]}")
                times[sandbox].append(res.seconds)
    boxed, bare = (statistics.median(times[b][1:]) for b in (True, False))
    print(f"{runs} builds each (median), example module vmpod_echo on {kernel}")
    print(f"  in bwrap : {boxed:6.3f} s")
    print(f"  bare     : {bare:6.3f} s")
    print(f"ratio sandboxed / bare: {boxed / bare:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernels", default="6.1-generic,6.1,6.12-generic")
    ap.add_argument("--sandbox-cost", action="store_true", help="build time with and without bwrap")
    args = ap.parse_args()
    if args.sandbox_cost:
        # one kernel: the one named, else the default cloud 6.1
        sandbox_cost(args.kernels if "," not in args.kernels else "6.1", args.runs)
        return
    kernels = args.kernels.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        matrix_seconds(args.kernels, logs)  # warm: assets, headers, image disk
        single: dict[str, list[float]] = {k: [] for k in kernels}
        together: list[float] = []
        for _ in range(args.runs):  # interleaved so drift hits all alike
            for k in kernels:
                single[k].append(matrix_seconds(k, logs))
            together.append(matrix_seconds(args.kernels, logs))
    medians = {k: statistics.median(v) for k, v in single.items()}
    slowest = max(medians.values())
    both = statistics.median(together)
    print(f"{args.runs} runs each (median), example module vmpod_echo")
    for k, s in medians.items():
        print(f"  {k:<16} alone : {s:6.2f} s")
    print(f"  {len(kernels)} kernels together: {both:6.2f} s")
    print(f"ratio matrix({len(kernels)}) / slowest single: {both / slowest:.2f}")


if __name__ == "__main__":
    main()
