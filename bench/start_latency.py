#!/usr/bin/env python3
"""Start latency and idle memory of vmpod, as ratios measured in one run.

Prints, each as the median of N runs (default 5):
  raw   QEMU boot of the same kernel (same machine, accel, cmdline) with a
        minimal busybox /init that prints one line on the serial console
  run   `vmpod run --rootfs BUSYBOX -- echo ready` to its first output line,
        with runc (default) and with crun as the OCI runtime in the guest
  ratio run / raw
and the host memory (PSS) of one idle sandbox (QEMU + the vmpod process).

Usage: sudo .venv/bin/python bench/start_latency.py [--runs N] [--kernel K]
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

from vmpod.guest.assets import ensure_assets
from vmpod.hypervisor.accel import choose_accel
from vmpod.hypervisor.qemu.devices import Machine, find_qemu
from vmpod.paths import default_paths
from vmpod.proc import descendant_named, run
from vmpod.sandbox import SandboxConfig
from vmpod.sandbox.boot import kernel_cmdline

REPO = Path(__file__).resolve().parents[1]
VMPOD = [sys.executable, "-m", "vmpod.cli"]


def minimal_initramfs(work: Path) -> Path:
    stage = work / "min"
    (stage / "bin").mkdir(parents=True)
    (stage / "dev").mkdir()
    shutil.copy("/bin/busybox", stage / "bin/busybox")
    init = stage / "init"
    init.write_text(
        "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs d /dev\n"
        "echo ready > /dev/ttyS0\n/bin/busybox poweroff -f\n"
    )
    init.chmod(0o755)
    names = "\n".join([".", "bin", "bin/busybox", "dev", "init"]) + "\n"
    out = work / "min.cpio"
    out.write_bytes(
        run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=stage,
            what="pack minimal initramfs",
            input=names.encode(),
        ).stdout
    )
    return out


def time_to_line(argv: list[str], needle: bytes, env: dict[str, str] | None = None) -> float:
    """Seconds from spawning argv until a stdout line containing needle."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if needle in line:
                return time.monotonic() - start
        raise RuntimeError(f"{argv[0]} ended without printing {needle!r}")
    finally:
        proc.kill()
        proc.wait()


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def idle_sandbox_pss(rootfs: Path, env: dict[str, str]) -> tuple[int, int]:
    proc = subprocess.Popen(
        [*VMPOD, "run", "--rootfs", str(rootfs), "--", "sh", "-c", "echo ready; exec sleep 600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    try:
        proc.stdout.readline()
        time.sleep(1.0)  # let the guest settle into idle
        qemu = descendant_named(proc.pid, "qemu-system")  # jailed: below bwrap
        return (pss_kb(qemu) if qemu else 0), pss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="6.1")
    args = ap.parse_args()
    paths = default_paths()
    assets = ensure_assets(paths, args.kernel)
    accel = choose_accel("auto")
    qemu = find_qemu()
    assert qemu, "qemu-system-x86_64 not found"
    env = {**os.environ, "VMPOD_HOME": str(paths.home)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rootfs = work / "busybox"
        subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(rootfs)], check=True)
        initrd = minimal_initramfs(work)
        cmdline = kernel_cmdline(SandboxConfig(assets=assets, accel=accel))
        raw_argv = [
            qemu,
            *Machine(accel.accel, 1, 512).args(),
            "-kernel",
            str(assets.kernel.boot_image),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
            "-serial",
            "stdio",
        ]
        runs: dict[str, list[list[str]]] = {
            "runc": [[*VMPOD, "run", "--rootfs", str(rootfs), "--", "echo", "ready"]],
            "crun": [
                [*VMPOD, "run", "--guest-runtime", "crun", "--rootfs", str(rootfs), "--", "echo", "ready"]
            ],
        }
        for (argv,) in runs.values():
            subprocess.run(argv, env=env, capture_output=True, check=True)  # warm caches
        raw: list[float] = []
        ours: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.runs):  # interleaved so drift hits all alike
            raw.append(time_to_line(raw_argv, b"ready"))
            for name, (argv,) in runs.items():
                ours[name].append(time_to_line(argv, b"ready", env))
        qemu_pss, host_pss = idle_sandbox_pss(rootfs, env)
    r = statistics.median(raw)
    print(f"kernel {assets.kernel.release}, accel {accel.accel}, {args.runs} runs (median)")
    print(f"raw QEMU boot + minimal init to first line : {r:6.2f} s")
    for name, times in ours.items():
        o = statistics.median(times)
        print(f"vmpod run ({name}) to first output        : {o:6.2f} s   ratio {o / r:5.2f}")
    print(
        f"idle sandbox PSS: QEMU {qemu_pss / 1024:.0f} MiB + vmpod {host_pss / 1024:.0f} MiB"
        f" = {(qemu_pss + host_pss) / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
