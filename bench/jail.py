#!/usr/bin/env python3
"""What confining QEMU costs (hypervisor/qemu/jail.py), as ratios measured in one run.

Runs `vmpod run --rootfs BUSYBOX -- echo ready` N times with the jail on and N
times with it off (``VMPOD_QEMU_JAIL=off``), interleaved so that both see the
same machine noise, and prints the median wall time of each and their ratio,
plus QEMU's resident memory (RSS) in one idle sandbox of each kind.

Usage: sudo .venv/bin/python bench/jail.py [--runs N] [--rootfs DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VMPOD = [sys.executable, "-m", "vmpod.cli"]


def env(jail: bool) -> dict[str, str]:
    return {**os.environ, "VMPOD_QEMU_JAIL": "on" if jail else "off"}


def one_run(rootfs: Path, jail: bool) -> float:
    t0 = time.monotonic()
    out = subprocess.run(
        [*VMPOD, "run", "--network", "none", "--rootfs", str(rootfs), "--", "echo", "ready"],
        capture_output=True,
        env=env(jail),
        timeout=300,
        check=True,
    )
    if out.stdout.strip() != b"ready":
        sys.exit(f"unexpected output: {out.stdout!r} {out.stderr!r}")
    return time.monotonic() - t0


def _qemus() -> set[int]:
    ps = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True)
    return {int(p) for p in ps.stdout.split()}


def qemu_rss_kib(rootfs: Path, jail: bool) -> int:
    """QEMU's VmRSS in an idle detached sandbox (the QEMU that appeared for it)."""
    name = f"bench-jail-{'on' if jail else 'off'}-{os.getpid()}"
    before = _qemus()
    argv = [
        *VMPOD,
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        name,
        "--rootfs",
        str(rootfs),
        "--",
        "sleep",
        "600",
    ]
    subprocess.run(argv, capture_output=True, env=env(jail), timeout=300, check=True)
    try:
        time.sleep(3)  # settle: the guest finished booting and is idle
        new = sorted(_qemus() - before)
        if len(new) != 1:
            sys.exit(f"cannot tell this sandbox's QEMU among {new}")
        for line in Path(f"/proc/{new[0]}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0
    finally:
        subprocess.run([*VMPOD, "rm", "-f", name], capture_output=True, env=env(jail), timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rootfs", type=Path, default=REPO / "examples" / "busybox")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the jail needs it)")
    one_run(a.rootfs, True)  # warm the caches (guest assets, page cache) for both
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.runs):
        for jail in (True, False):
            times[jail].append(one_run(a.rootfs, jail))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"{'':28}{'seconds':>10}")
    print(f"{'vmpod run, QEMU unconfined':28}{off:>10.2f}")
    print(f"{'vmpod run, QEMU jailed':28}{on:>10.2f}")
    print(f"ratio jailed / unconfined: {on / off:.3f} (median of {a.runs} each, interleaved)")
    rss_on, rss_off = qemu_rss_kib(a.rootfs, True), qemu_rss_kib(a.rootfs, False)
    print(f"QEMU RSS idle: jailed {rss_on / 1024:.0f} MiB, unconfined {rss_off / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
