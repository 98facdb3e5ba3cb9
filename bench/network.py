#!/usr/bin/env python3
"""Network throughput and request latency under podman: vmpod-runtime vs runc, as ratios.

Both runtimes serve the same directory (a read-only volume) with busybox
`httpd -f -p 8080 -h /www` in the same image, each in a container on podman's
default CNI network with its port published on loopback (`-p 127.0.0.1:PORT:8080`:
portmap DNAT -> bridge -> veth; under vmpod-runtime also tc mirroring -> tap ->
virtio-net -> the VM). Both servers run at the same time and the measurements
alternate between them, so a busy machine hurts both alike:
  start       `podman run -d` until the first answer (once per runtime)
  throughput  MB/s of a download of a random file of --mb MB (urllib on the host),
              median of --runs downloads
  latency     one small GET (index.html, a new TCP connection each) in ms,
              median and 90th percentile of --requests requests
and each vmpod-runtime figure ÷ the runc one. No figure is judged: this prints.

A private podman store (--root/--runroot) in a temporary directory; the image is
`podman import` of examples/busybox; vmpod-runtime gets a private --root. The
containers, the image and the directory are removed at the end, also on Ctrl-C
or SIGTERM. Usage (as root):
  .venv/bin/python bench/network.py [--quick] [--mb N] [--runs N] [--requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vmpod.hypervisor.accel import choose_accel

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/vmpod-bench-net:latest"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
INDEX = b"vmpod network bench\n"
RUNTIMES = ("runc", "vmpod-runtime")


class Failed(Exception):
    pass


@dataclass
class Server:
    runtime: str  # a name in RUNTIMES
    binary: str  # what podman --runtime gets
    port: int = 0
    start_s: float = 0.0
    mbps: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)

    @property
    def container(self) -> str:
        return f"vmpod-bench-net-{self.runtime}"


@dataclass
class Work:
    dir: Path
    base: list[str]  # podman with the private store
    www: Path
    digest: str = ""


def podman(work: Work, *args: str, runtime: str | None = None, timeout: float = 300) -> str:
    """Run podman to completion in a session of its own (a Ctrl-C at the terminal
    reaches only this script, which lets the command finish before cleaning up)."""
    argv = [*work.base, *(["--runtime", runtime] if runtime else []), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except BaseException:
            finish(proc)
            raise
        out.seek(0)
        err.seek(0)
        if rc != 0:
            raise Failed(f"{' '.join(argv)} failed ({rc}): {err.read().decode(errors='replace').strip()}")
        return out.read().decode(errors="replace")


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait for ``proc`` despite more interrupts: a podman killed half-way leaves a
    container its store does not know how to remove. Killed after ``timeout``."""
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


def quiet(argv: list[str], timeout: float = 120) -> str:
    try:
        res = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout


def pids_under(where: Path) -> list[int]:
    """Processes whose command line names a path below ``where`` (conmon, its exit
    command, the vmpod-runtime monitor)."""
    marker = f"{where}/".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
    return found


def wait_gone(where: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := pids_under(where)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def vmpod_wrapper(work: Path) -> Path:
    """vmpod-runtime with a private --root (podman passes none to a runtime it does
    not know)."""
    binary = Path(sys.executable).parent / "vmpod-runtime"
    script = work / "vmpod-runtime"
    script.write_text(f"#!/bin/sh\nexec '{binary}' --root '{work}/rtroot' \"$@\"\n")
    script.chmod(0o755)
    return script


def make_www(where: Path, mb: int) -> str:
    where.mkdir()
    (where / "index.html").write_bytes(INDEX)
    h = hashlib.sha256()
    with open(where / "big", "wb") as f:
        for _ in range(mb):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def get(port: int, path: str, timeout: float = 10) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise Failed(f"GET {path} on port {port}: HTTP {resp.status}")
        return body
    finally:
        conn.close()


def start(work: Work, server: Server) -> None:
    server.port = free_port()
    began = time.monotonic()
    podman(
        work,
        "run",
        "-d",
        "--name",
        server.container,
        "-p",
        f"127.0.0.1:{server.port}:8080",
        "-v",
        f"{work.www}:/www:ro",
        *ULIMITS,
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
        runtime=server.binary,
    )
    deadline = began + 180
    while True:
        try:
            if get(server.port, "/index.html", timeout=5) == INDEX:
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise Failed(f"{server.runtime}: no answer on port {server.port} in 180 s")
        time.sleep(0.05)
    server.start_s = time.monotonic() - began


def download(work: Work, server: Server, mb: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    size = 0
    try:
        began = time.monotonic()
        conn.request("GET", "/big")
        resp = conn.getresponse()
        while n := resp.readinto(buf):
            h.update(view[:n])
            size += n
        elapsed = time.monotonic() - began
    finally:
        conn.close()
    if size != mb << 20 or h.hexdigest() != work.digest:
        raise Failed(f"{server.runtime}: the download is corrupt ({size} bytes)")
    server.mbps.append(size / 1e6 / elapsed)


def latency(server: Server, n: int) -> None:
    for _ in range(n):
        began = time.perf_counter()
        if get(server.port, "/index.html") != INDEX:
            raise Failed(f"{server.runtime}: wrong index.html")
        server.latency_ms.append((time.perf_counter() - began) * 1000)


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]


def report(servers: dict[str, Server], mb: int) -> None:
    runc, vm = servers["runc"], servers["vmpod-runtime"]
    print(f"\n{'':<24}{'runc':>12}{'vmpod-runtime':>16}{'ratio vmpod/runc':>20}")

    def row(what: str, a: float, b: float, fmt: str) -> None:
        print(f"{what:<24}{a:>12{fmt}}{b:>16{fmt}}{b / a:>19.2f}x")

    row("start to first answer s", runc.start_s, vm.start_s, ".2f")
    row(f"throughput MB/s ({mb} MB)", statistics.median(runc.mbps), statistics.median(vm.mbps), ".1f")
    row("GET latency median ms", statistics.median(runc.latency_ms), statistics.median(vm.latency_ms), ".3f")
    row("GET latency p90 ms", p90(runc.latency_ms), p90(vm.latency_ms), ".3f")
    for s in (runc, vm):
        print(f"  {s.runtime} downloads MB/s: {', '.join(f'{x:.1f}' for x in s.mbps)}")
    print("(throughput ratio < 1: vmpod-runtime is slower; latency ratio > 1: vmpod-runtime is slower)")


def mounts_under(where: Path) -> list[str]:
    """Mount points below ``where`` (all of them made by this script's podman)."""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [m for m in points if m.startswith(f"{where}/")]


def cleanup(work: Work) -> None:
    for rt in RUNTIMES:
        quiet([*work.base, "rm", "--force", "--time", "0", f"vmpod-bench-net-{rt}"])
    quiet([*work.base, "rm", "--all", "--force", "--time", "0"])
    quiet([*work.base, "rmi", "--all", "--force"])
    # conmon's exit command (`podman container cleanup`) runs after the container ends
    left = wait_gone(work.dir, 30)
    rtroot = work.dir / "rtroot"
    if left and rtroot.is_dir():  # a container podman's store lost track of
        runtime = str(Path(sys.executable).parent / "vmpod-runtime")
        for cid in quiet([runtime, "--root", str(rtroot), "list", "--quiet"]).split():
            quiet([runtime, "--root", str(rtroot), "delete", "--force", cid])
        left = wait_gone(work.dir, 10)
    if left:
        print(f"network.py: killing processes left under {work.dir}: {left}", file=sys.stderr)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(work.dir, 10)
    if rtroot.is_dir() and any(rtroot.iterdir()):
        print(f"network.py: vmpod-runtime state left in {rtroot}", file=sys.stderr)
    # a podman killed mid-command (SIGTERM to this script) leaves its storage's own mount
    for mount in sorted(mounts_under(work.dir), reverse=True):
        quiet(["umount", mount])
    if left := mounts_under(work.dir):
        print(f"network.py: mounts left under {work.dir}, not removing it: {left}", file=sys.stderr)
        return
    shutil.rmtree(work.dir, ignore_errors=True)


@contextlib.contextmanager
def workdir() -> Iterator[Work]:
    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    tmp = Path(tempfile.mkdtemp(prefix="vmpod-bench-net-", dir="/var/tmp"))
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
    ]
    work = Work(tmp, base, tmp / "www")
    try:
        yield work
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            cleanup(work)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def bench(work: Work, mb: int, runs: int, requests: int) -> dict[str, Server]:
    rootfs = REPO / "examples/busybox"
    if not rootfs.is_dir():
        rootfs = work.dir / "busybox"
        subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(rootfs)], check=True)
    with tarfile.open(work.dir / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    podman(work, "import", str(work.dir / "rootfs.tar"), IMAGE)
    work.digest = make_www(work.www, mb)
    servers = {
        "runc": Server("runc", shutil.which("runc") or "runc"),
        "vmpod-runtime": Server("vmpod-runtime", str(vmpod_wrapper(work.dir))),
    }
    for s in servers.values():
        print(f"starting {s.runtime} ...", flush=True)
        start(work, s)
    for s in servers.values():  # warm-up: page cache, TCG translation of the data path
        download(work, s, mb)
        latency(s, 5)
        s.mbps.clear()
        s.latency_ms.clear()
    for i in range(runs):
        print(f"download {i + 1}/{runs} ...", flush=True)
        for s in servers.values():
            download(work, s, mb)
    print(f"{requests} GETs each ...", flush=True)
    block = 10
    for done in range(0, requests, block):
        for s in servers.values():
            latency(s, min(block, requests - done))
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 MB, 1 download, 50 GETs")
    ap.add_argument("--mb", type=int, help="size of the downloaded file (default 100, 20 with --quick)")
    ap.add_argument("--runs", type=int, help="downloads per runtime (default 3, 1 with --quick)")
    ap.add_argument("--requests", type=int, help="small GETs per runtime (default 200, 50 with --quick)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("network.py: run as root (podman with CNI, vmpod-runtime)")
    for tool in ("podman", "conmon", "runc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"network.py: {tool} is not installed")
    mb = args.mb or (20 if args.quick else 100)
    runs = args.runs or (1 if args.quick else 3)
    requests = args.requests or (50 if args.quick else 200)
    began = time.monotonic()
    try:
        with workdir() as work:
            servers = bench(work, mb, runs, requests)
    except Failed as err:
        raise SystemExit(f"network.py: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("network.py: interrupted (cleaned up)") from None
    print(f"\naccel {choose_accel('auto').accel}, {os.cpu_count()} host CPUs, podman CNI default network")
    report(servers, mb)
    print(f"\n(total {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
