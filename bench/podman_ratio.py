#!/usr/bin/env python3
"""`podman run --rm IMAGE true` with vmpod-runtime vs runc, as a ratio.

Prints the median of N runs (default 5, after one warm-up run each) of the
whole podman command, wall clock, for:
  runc                 the host's runc (the baseline)
  vmpod-runtime/runc   vmpod-runtime, runc inside the VM
  vmpod-runtime/crun   vmpod-runtime, crun inside the VM
and each vmpod-runtime median divided by the runc one.

A private podman store in a temporary directory; the image is `podman import`
of a busybox root filesystem. Usage:
  sudo .venv/bin/python bench/podman_ratio.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/vmpod-bench:latest"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def wrapper(work: Path, guest_runtime: str) -> Path:
    config = work / f"runtime-{guest_runtime}.json"
    config.write_text(json.dumps({"guest_runtime": guest_runtime}))
    binary = Path(sys.executable).parent / "vmpod-runtime"
    script = work / f"vmpod-runtime-{guest_runtime}"
    script.write_text(
        f"#!/bin/sh\nexport VMPOD_RUNTIME_CONFIG='{config}'\nexec '{binary}' --root '{work}/rtroot' \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.decode()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmpod-bench-") as tmp:
        work = Path(tmp)
        rootfs = REPO / "examples/busybox"
        if not rootfs.is_dir():
            rootfs = work / "busybox"
            subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(rootfs)], check=True)
        base = [
            "podman",
            "--root",
            str(work / "root"),
            "--runroot",
            str(work / "runroot"),
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ]
        with tarfile.open(work / "rootfs.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        subprocess.run([*base, "import", str(work / "rootfs.tar"), IMAGE], check=True, capture_output=True)
        runc = shutil.which("runc") or "runc"
        runtimes = {
            "runc": runc,
            "vmpod-runtime/runc": str(wrapper(work, "runc")),
            "vmpod-runtime/crun": str(wrapper(work, "crun")),
        }
        medians: dict[str, float] = {}
        try:
            for name, runtime in runtimes.items():
                argv = [*base, "--runtime", runtime, "run", "--rm", *ULIMITS, IMAGE, "true"]
                timed(argv)  # warm-up: caches, the rootfs disk of a fresh layer
                samples = [timed(argv) for _ in range(args.runs)]
                medians[name] = statistics.median(samples)
                print(
                    f"{name:<20} median {medians[name]:6.3f} s   ({', '.join(f'{s:.2f}' for s in samples)})",
                    flush=True,
                )
        finally:
            subprocess.run([*base, "rm", "--all", "--force"], capture_output=True)
            subprocess.run([*base, "rmi", "--all", "--force"], capture_output=True)
        for name in runtimes:
            if name != "runc":
                print(f"ratio {name} / runc: {medians[name] / medians['runc']:.1f}x")


if __name__ == "__main__":
    main()
