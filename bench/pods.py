#!/usr/bin/env python3
"""Pods: a container in an existing pod VM vs a cold start (a new VM), as ratios in one run.

Measures, each as the median of N runs (default 5, 2 with --quick), the wall time of
one command from spawn to exit (the container runs `true`; --network none throughout):
  vmpod   cold  `vmpod run --rm --network none --rootfs BUSYBOX -- true`    (a new VM)
          pod   `vmpod run --rm --pod benchpod --rootfs BUSYBOX -- true`     (after
                `vmpod pod create benchpod --network none`: the pod's VM is up)
  podman  cold  `podman --runtime vmpod-runtime run --rm --network none IMAGE true`
          pod   `podman --runtime vmpod-runtime run --rm --pod P IMAGE true` (after
                `podman pod create --network none P`: its infra container holds the VM)
and for each front end the ratio pod ÷ cold. The four series are sampled interleaved
(cold, pod, cold, pod, ...) after one warm-up of each, so machine noise hits all alike.
No figure is judged: this prints.

vmpod gets its own cache home (hard links of the built guest assets, as the VM tests
do) and run dir in a temporary directory, so the pod's name and the leak checks are
this script's alone. podman gets a private store (--root/--runroot) there, the image
is `podman import` of examples/busybox, and the global --runtime is a wrapper that
runs vmpod-runtime with that home, run dir and a private --root (the pod's infra
container goes through it too). Pods, containers, the image and the directory are
removed at the end, also on Ctrl-C or SIGTERM; afterwards the script checks that no
QEMU process and no mount of its own is left.

Usage (as root): .venv/bin/python bench/pods.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from vmpod.hypervisor.accel import choose_accel
from vmpod.paths import default_paths

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMAGE = "localhost/vmpod-bench-pods:latest"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
VMPOD_POD = "benchpod"
PODMAN_POD = "vmpod-bench-pod"
SEEDED = ("kernels", "guest")  # cache dirs the private home gets from the normal one


class Failed(Exception):
    pass


@dataclass
class Work:
    dir: Path
    env: dict[str, str]  # the environment of every vmpod command (private home and run dir)
    podman: list[str]  # podman with the private store and the vmpod-runtime wrapper
    rootfs: Path = REPO / "examples/busybox"

    @property
    def vmpod(self) -> list[str]:
        return [str(BIN / "vmpod")]

    @property
    def rtroot(self) -> Path:
        return self.dir / "rtroot"


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait for ``proc`` despite more interrupts (a vmpod or podman killed half-way
    leaves state behind); killed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def call(argv: list[str], env: dict[str, str], timeout: float = 300) -> tuple[float, str]:
    """Run argv to completion in a session of its own (a Ctrl-C at the terminal reaches
    only this script, which lets the command finish before cleaning up); returns the
    seconds from spawn to exit and its stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except BaseException:
            finish(proc)
            raise
        elapsed = time.monotonic() - began
        out.seek(0)
        err.seek(0)
        if rc != 0:
            raise Failed(f"{' '.join(argv)} failed ({rc}): {err.read().decode(errors='replace').strip()}")
        return elapsed, out.read().decode(errors="replace")


def quiet(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> str:
    try:
        res = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            start_new_session=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout


# -- the private cache home -------------------------------------------------------------


def seed_home(cache: Path, home: Path) -> None:
    """Give ``home`` the guest assets built in ``cache`` without writing to ``cache``:
    hard links on one file system (vmpod never rewrites a cached asset in place),
    real copies of what it does rewrite (a guest tree's agent dir, kernel metadata)."""
    (home / "tmp").mkdir(parents=True)
    names = [n for n in SEEDED if (cache / n).is_dir()]
    if not names:
        return  # nothing built yet: the warm-up builds into the private home
    how = "--link" if cache.stat().st_dev == home.stat().st_dev else "--reflink=auto"
    lock = None
    with contextlib.suppress(OSError):
        lock = os.open(cache / ".build.lock", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_SH)  # no build renames files while we link them
        for name in names:
            subprocess.run(["cp", "-a", how, "--", str(cache / name), str(home / name)], check=True)
        for agent in home.glob("guest/tree-*/opt/vmpod"):
            shutil.rmtree(agent)
            shutil.copytree(cache / agent.relative_to(home), agent, symlinks=True)
    finally:
        if lock is not None:
            os.close(lock)
    for meta in [home / "kernels/aliases.json", *home.glob("kernels/*/kernel.json")]:
        if meta.is_file() and meta.stat().st_nlink > 1:
            data = meta.read_bytes()
            meta.unlink()
            meta.write_bytes(data)


def runtime_wrapper(work: Path, env: dict[str, str]) -> Path:
    """vmpod-runtime with our environment (podman does not pass its own through) and a
    private --root (podman passes none to a runtime it does not know)."""
    keep = ("VMPOD_HOME", "VMPOD_RUN", "VMPOD_RUNTIME_CONFIG")
    exports = "".join(f"export {k}='{env[k]}'\n" for k in keep)
    script = work / "vmpod-runtime"
    script.write_text(f"#!/bin/sh\n{exports}exec '{BIN / 'vmpod-runtime'}' --root '{work}/rtroot' \"$@\"\n")
    script.chmod(0o755)
    return script


# -- clean-up ---------------------------------------------------------------------------


def pids_under(where: Path, needle: str = "") -> list[int]:
    """Processes whose command line names a path below ``where`` (and ``needle``)."""
    marker = f"{where}/".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (d / "cmdline").read_bytes()
                if marker in cmdline and needle.encode() in cmdline:
                    found.append(int(d.name))
    return found


def wait_gone(where: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := pids_under(where)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def mounts_under(where: Path) -> list[str]:
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [m for m in points if m == str(where) or m.startswith(f"{where}/")]


def cleanup(work: Work) -> None:
    env = work.env
    quiet([*work.vmpod, "pod", "rm", "-f", VMPOD_POD], env)
    for cid in quiet([*work.vmpod, "ps", "-a", "-q"], env).split():
        quiet([*work.vmpod, "rm", "-f", cid], env)
    quiet([*work.podman, "pod", "rm", "--force", "--time", "0", PODMAN_POD])
    quiet([*work.podman, "rm", "--all", "--force", "--time", "0"])
    quiet([*work.podman, "pod", "rm", "--all", "--force", "--time", "0"])
    quiet([*work.podman, "rmi", "--all", "--force"])
    # conmon's exit command (`podman container cleanup`) runs after the container ends
    left = wait_gone(work.dir, 30)
    if left and work.rtroot.is_dir():  # a container podman's store lost track of
        runtime = [str(BIN / "vmpod-runtime"), "--root", str(work.rtroot)]
        for cid in quiet([*runtime, "list", "--quiet"], env).split():
            quiet([*runtime, "delete", "--force", cid], env)
        left = wait_gone(work.dir, 10)
    if left:
        print(f"pods.py: killing processes left under {work.dir}: {left}", file=sys.stderr)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(work.dir, 10)
    for mount in sorted(mounts_under(work.dir), reverse=True):
        quiet(["umount", mount])
    if left := mounts_under(work.dir):
        print(f"pods.py: mounts left under {work.dir}, not removing it: {left}", file=sys.stderr)
        return
    shutil.rmtree(work.dir, ignore_errors=True)


def verify_clean(work: Work) -> str:
    qemu = pids_under(work.dir, "qemu-system")
    mounts = mounts_under(work.dir)
    if qemu or mounts or work.dir.exists():
        return (
            f"LEFT BEHIND: QEMU {qemu or 'none'}, mounts {mounts or 'none'}, "
            f"{work.dir} {'exists' if work.dir.exists() else 'removed'}"
        )
    return f"clean: no QEMU process and no mount under {work.dir}, the directory is removed"


def make_work() -> Work:
    tmp = Path(tempfile.mkdtemp(prefix="vmpod-bench-pods-", dir="/var/tmp"))
    env = {
        **os.environ,
        "VMPOD_HOME": str(tmp / "home"),
        "VMPOD_RUN": str(tmp / "run"),
        "VMPOD_RUNTIME_CONFIG": str(tmp / "runtime.json"),  # absent: the defaults
    }
    base = [
        "podman",
        "--root",
        str(tmp / "root"),
        "--runroot",
        str(tmp / "runroot"),
        "--events-backend",
        "file",
        "--cgroup-manager",
        "cgroupfs",
        "--runtime",
        str(runtime_wrapper(tmp, env)),
    ]
    return Work(tmp, env, base)


@contextlib.contextmanager
def cleaned_up(work: Work) -> Iterator[None]:
    """Clean up after the block, also on Ctrl-C, SIGTERM and SIGHUP."""

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            cleanup(work)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.signal(signal.SIGINT, signal.default_int_handler)


# -- the measurement ---------------------------------------------------------------------


def setup(work: Work) -> dict[str, list[str]]:
    """Seed the home, import the image, create both pods; the four timed commands."""
    seed_home(default_paths().home, work.dir / "home")
    (work.dir / "run").mkdir()
    if not work.rootfs.is_dir():
        work.rootfs = work.dir / "busybox"
        subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(work.rootfs)], check=True)
    with tarfile.open(work.dir / "rootfs.tar", "w") as tar:
        tar.add(work.rootfs, arcname=".")
    call([*work.podman, "import", str(work.dir / "rootfs.tar"), IMAGE], work.env)
    rootfs = ["--rootfs", str(work.rootfs)]
    runs = {
        "vmpod cold": [*work.vmpod, "run", "--rm", "--network", "none", *rootfs, "--", "true"],
        "vmpod pod": [*work.vmpod, "run", "--rm", "--pod", VMPOD_POD, *rootfs, "--", "true"],
        "podman cold": [*work.podman, "run", "--rm", "--network", "none", *ULIMITS, IMAGE, "true"],
        "podman pod": [*work.podman, "run", "--rm", "--pod", PODMAN_POD, *ULIMITS, IMAGE, "true"],
    }
    print("warm-up: a cold start of each front end ...", flush=True)
    call(runs["vmpod cold"], work.env, timeout=900)  # may build guest assets in the private home
    call(runs["podman cold"], work.env)
    print("creating the pods ...", flush=True)
    call([*work.vmpod, "pod", "create", "--network", "none", VMPOD_POD], work.env)
    call([*work.podman, "pod", "create", "--network", "none", PODMAN_POD], work.env)
    call(runs["vmpod pod"], work.env)  # warm-up in the pods (and the pods' VMs settle)
    call(runs["podman pod"], work.env)
    return runs


def bench(work: Work, n: int) -> dict[str, list[float]]:
    runs = setup(work)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(n):  # interleaved: cold, pod, cold, pod, ...
        print(f"round {i + 1}/{n} ...", flush=True)
        for name, argv in runs.items():
            samples[name].append(call(argv, work.env)[0])
    return samples


def report(samples: dict[str, list[float]]) -> None:
    print(f"\n{'':<44}{'median s':>9}   samples s")
    what = {
        "cold": "cold start (a new VM)",
        "pod": "second container in the pod's VM",
    }
    for front in ("vmpod", "podman"):
        for kind in ("cold", "pod"):
            xs = samples[f"{front} {kind}"]
            label = f"{front:<7}{what[kind]}"
            print(f"{label:<44}{statistics.median(xs):>9.2f}   {', '.join(f'{x:.2f}' for x in xs)}")
    print()
    for front in ("vmpod", "podman"):
        ratio = statistics.median(samples[f"{front} pod"]) / statistics.median(samples[f"{front} cold"])
        print(f"{front:<7}second container in a pod ÷ cold start: {ratio:5.2f}")
    print("(ratio < 1: joining a running pod VM is faster than booting a new one)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 runs of each")
    ap.add_argument("--runs", type=int, help="runs of each command (default 5, 2 with --quick)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("pods.py: run as root (vmpod pods, podman with vmpod-runtime)")
    for tool in ("podman", "conmon"):
        if shutil.which(tool) is None:
            raise SystemExit(f"pods.py: {tool} is not installed")
    n = args.runs or (2 if args.quick else 5)
    began = time.monotonic()
    work = make_work()
    try:
        with cleaned_up(work):
            samples = bench(work, n)
    except Failed as err:
        print(f"pods.py: after clean-up: {verify_clean(work)}", file=sys.stderr)
        raise SystemExit(f"pods.py: {err}") from None
    except KeyboardInterrupt:
        print(f"pods.py: after clean-up: {verify_clean(work)}", file=sys.stderr)
        raise SystemExit("pods.py: interrupted (cleaned up)") from None
    print(
        f"\naccel {choose_accel('auto').accel}, {os.cpu_count()} host CPUs, --network none, "
        f"{n} runs of each (median), sampled interleaved"
    )
    report(samples)
    print(f"\nafter clean-up: {verify_clean(work)}")
    print(f"(total {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
