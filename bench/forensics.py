#!/usr/bin/env python3
"""Forensics latency: capture of a running container and capture-to-running
(capture + restore into a fresh VM, until the restored process prints), as the
median of N runs, next to `vmpod run -d` of the same container for scale; for
a small process and for one with --rss-mb MB resident (default 100).

The process counts in a shell loop (memory) and appends to an open file.
Prints seconds and ratios to `run -d`; the archive size and archive ÷ RSS too.

Usage: sudo .venv/bin/python bench/forensics.py [--runs N]
(VMPOD_HOME: the cache to use; the run dir is a temporary one.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VMPOD = [sys.executable, "-m", "vmpod.cli"]
COUNTER = "i=0; exec 3>>/data.log; while true; do i=$((i+1)); echo $i >&3; echo n=$i; sleep 0.2; done"


def vmpod(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([*VMPOD, *args], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"vmpod {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def wait_output(env: dict[str, str], name: str, lines: int = 1) -> None:
    while len(vmpod(env, "logs", name).splitlines()) < lines:
        time.sleep(0.05)


def rss_kib(env: dict[str, str], name: str) -> int:
    for line in vmpod(env, "exec", name, "cat", "/proc/1/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    sys.exit(f"no VmRSS for {name}")


def workload(env: dict[str, str], root: Path, tmp: Path, runs: int, rss_mb: int) -> None:
    # the shell holds rss_mb MB in a variable built at run time (resident, never on disk)
    hold = f"x=$(head -c {rss_mb * 1000 * 1000} /dev/zero | tr '\\0' a); " if rss_mb else ""
    starts, captures, restores, sizes, rss = [], [], [], [], []
    for i in range(runs):
        name, clone, archive = f"fx{rss_mb}-{i}", f"fx{rss_mb}-{i}-clone", tmp / f"fx{rss_mb}-{i}.tar"
        t0 = time.monotonic()
        vmpod(
            env,
            "run",
            "-d",
            "--name",
            name,
            "--memory",
            "1024",
            "--rootfs",
            str(root),
            "--",
            "sh",
            "-c",
            hold + COUNTER,
        )
        wait_output(env, name)
        starts.append(time.monotonic() - t0)
        rss.append(rss_kib(env, name) * 1024)
        t1 = time.monotonic()
        vmpod(env, "forensics", "capture", name, "-o", str(archive))
        t2 = time.monotonic()
        vmpod(env, "forensics", "restore", str(archive), "--name", clone)
        wait_output(env, clone)
        t3 = time.monotonic()
        captures.append(t2 - t1)
        restores.append(t3 - t1)
        sizes.append(archive.stat().st_size)
        vmpod(env, "rm", "-f", name, clone)
        archive.unlink()
    run_s, cap_s, c2r_s, size, res = (statistics.median(x) for x in (starts, captures, restores, sizes, rss))
    print(f"-- process holding {rss_mb} MB: {runs} runs (medians), RSS {res / 2**20:.1f} MiB")
    print(f"run -d to first output      {run_s:6.2f} s")
    rate = size / 2**20 / cap_s
    print(f"capture                     {cap_s:6.2f} s   ({cap_s / run_s:.2f} x run -d; {rate:.1f} MiB/s)")
    print(f"capture to restored running {c2r_s:6.2f} s   ({c2r_s / run_s:.2f} x run -d)")
    print(f"archive size                {size / 2**20:6.1f} MiB ({size / res:.2f} x RSS)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-mb", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmpod-bench-fx-") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(root)], check=True)
        env = {**os.environ, "VMPOD_RUN": str(Path(tmp) / "run")}
        workload(env, root, Path(tmp), args.runs, 0)
        workload(env, root, Path(tmp), args.runs, args.rss_mb)


if __name__ == "__main__":
    main()
