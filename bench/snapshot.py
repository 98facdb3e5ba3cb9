#!/usr/bin/env python3
"""Sandbox snapshots (`vmpod snapshot` / `vmpod restore`) against a cold start of the
same container, as ratios measured in one run.

Each round: `vmpod run -d --root-in-vm` of a 512 MiB sandbox whose container
writes FILL MiB of random data into its writable layer (guest RAM) and waits;
then `vmpod snapshot` of it, `vmpod restore` of the snapshot, and the first
`vmpod exec` into each (a restored VM's translation cache is cold too). Prints
medians of N rounds, the state file's size, and the ratios.

Usage: sudo .venv/bin/python bench/snapshot.py [--runs N] [--fill MIB] [--rootfs DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VMPOD = [sys.executable, "-m", "vmpod.cli"]
MEMORY_MB = 512


def vmpod(*args: str, timeout: float = 600) -> tuple[float, str]:
    """Run `vmpod ARGS`; (wall seconds, stdout); exits on failure."""
    t0 = time.monotonic()
    out = subprocess.run([*VMPOD, *args], capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    if out.returncode != 0:
        sys.exit(f"vmpod {' '.join(args[:3])} failed: {out.stderr.strip()}")
    return took, out.stdout.strip()


def one_round(rootfs: Path, fill: int, work: Path, i: int) -> dict[str, float]:
    src, clone = f"bench-snap-{os.getpid()}-{i}", f"bench-clone-{os.getpid()}-{i}"
    script = f"head -c {fill}m /dev/urandom > /fill; echo ready > /ready; sleep 3600"
    snap_dir = work / f"snap{i}"
    try:
        cold, _ = vmpod(
            "run", "-d", "--root-in-vm", "--network", "none", "--memory", str(MEMORY_MB),
            "--name", src, "--rootfs", str(rootfs), "--", "sh", "-c", script,
        )  # fmt: skip
        cold_exec, _ = vmpod("exec", src, "true")
        while vmpod("exec", src, "sh", "-c", "cat /ready 2>/dev/null || true")[1] != "ready":
            time.sleep(0.5)
        save, _ = vmpod("snapshot", src, str(snap_dir))
        state = (snap_dir / "state.bin").stat().st_size
        restore, _ = vmpod("restore", str(snap_dir), "--name", clone)
        restore_exec, _ = vmpod("exec", clone, "true")
        _, size = vmpod("exec", clone, "sh", "-c", "wc -c < /fill")
        if int(size) != fill << 20:
            sys.exit(f"the restored writable layer holds {size} bytes, not {fill << 20}")
        return {
            "cold": cold,
            "cold_exec": cold_exec,
            "save": save,
            "restore": restore,
            "restore_exec": restore_exec,
            "state_mib": state / (1 << 20),
        }
    finally:
        for name in (src, clone):
            subprocess.run([*VMPOD, "rm", "-f", name], capture_output=True, timeout=120)
        shutil.rmtree(snap_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fill", type=int, default=128, help="MiB written into the writable layer")
    ap.add_argument("--rootfs", type=Path, default=None, help="a busybox root (default: built now)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmpod-bench-snap-") as tmp:
        work = Path(tmp)
        rootfs = args.rootfs
        if rootfs is None:
            rootfs = work / "rootfs"
            subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(rootfs)], check=True)
        rounds = [one_round(rootfs, args.fill, work, i) for i in range(args.runs)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    rows = [
        ("cold start (vmpod run -d --root-in-vm)", med["cold"], f"first exec {med['cold_exec']:5.2f} s"),
        ("snapshot (vmpod snapshot)", med["save"], f"state file {med['state_mib']:.0f} MiB"),
        ("restore (vmpod restore)", med["restore"], f"first exec {med['restore_exec']:5.2f} s"),
    ]
    print(f"{MEMORY_MB} MiB guest, {args.fill} MiB in its writable layer; median of {args.runs} rounds")
    for what, secs, extra in rows:
        print(f"  {what:40} {secs:6.2f} s   {extra}")
    first = (med["restore"] + med["restore_exec"]) / (med["cold"] + med["cold_exec"])
    print(f"  {'restore / cold start':40} {med['restore'] / med['cold']:6.2f} x")
    print(f"  {'(restore + exec) / (cold start + exec)':40} {first:6.2f} x")
    print(f"  {'snapshot / cold start':40} {med['save'] / med['cold']:6.2f} x")


if __name__ == "__main__":
    main()
