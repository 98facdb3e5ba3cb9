"""`vmpod run` end to end: real VMs, real runc in the guest, the real CLI."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.fixtures.oci import make_docker_archive, make_oci_layout
from tests.vm.conftest import GuestKernel, VmFactory, VmpodRunner


def test_container_runs_in_guest_kernel(
    vm_factory: VmFactory, busybox: Path, guest_kernel: GuestKernel
) -> None:
    vmpod = vm_factory(kernel=guest_kernel.name)
    r = vmpod.run("--rootfs", str(busybox), "--", "sh", "-c", "echo hello; uname -r; echo oops >&2; exit 3")
    assert r.returncode == 3, r.err
    assert r.out.splitlines() == ["hello", guest_kernel.release]
    assert guest_kernel.release.startswith(f"{guest_kernel.name}.")
    assert guest_kernel.release != os.uname().release
    assert "oops" in r.err and "oops" not in r.out


def test_env_workdir_user_hostname(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod(
        "run",
        "--rootfs",
        str(busybox),
        "-e",
        "FOO=bar",
        "-w",
        "/tmp",
        "-u",
        "alice",
        "--hostname",
        "box1",
        "--",
        "sh",
        "-c",
        'echo "$FOO"; pwd; id; hostname',
    )
    assert r.returncode == 0, r.err
    assert r.out.splitlines() == ["bar", "/tmp", "uid=1000(alice) gid=1000(alice)", "box1"]


def test_numeric_user_and_group(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod("run", "--rootfs", str(busybox), "-u", "1000:50", "--", "id", "-u")
    assert r.returncode == 0, r.err
    assert r.out.strip() == "1000"
    r = vmpod("run", "--rootfs", str(busybox), "-u", "nosuchuser", "--", "true")
    assert r.returncode == 125 and "nosuchuser" in r.err


def test_stdin_is_forwarded_beyond_the_window(vmpod: VmpodRunner, busybox: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # > the 1 MiB stdin credit window
    r = vmpod("run", "-i", "--rootfs", str(busybox), "--", "sha256sum", input=data)
    assert r.returncode == 0, r.err
    assert r.out.split()[0] == hashlib.sha256(data).hexdigest()


def test_large_binary_output_is_exact(vmpod: VmpodRunner, busybox: Path) -> None:
    script = (
        "dd if=/dev/urandom of=/tmp/blob bs=1M count=8 2>/dev/null; sha256sum /tmp/blob >&2; cat /tmp/blob"
    )
    r = vmpod("run", "--rootfs", str(busybox), "--", "sh", "-c", script)
    assert r.returncode == 0
    assert len(r.stdout) == 8 * 1024 * 1024
    assert hashlib.sha256(r.stdout).hexdigest() in r.err


def test_missing_command_exits_127(vm_factory: VmFactory, busybox: Path, guest_runtime: str) -> None:
    vmpod = vm_factory(guest_runtime=guest_runtime)
    r = vmpod.run("--rootfs", str(busybox), "--", "no-such-command")
    assert r.returncode == 127
    assert "no-such-command" in r.err


def test_user_workdir_and_exit_status(vm_factory: VmFactory, busybox: Path, guest_runtime: str) -> None:
    vmpod = vm_factory(guest_runtime=guest_runtime)
    r = vmpod.run(
        "--rootfs", str(busybox), "-u", "alice", "-w", "/tmp", "--", "sh", "-c", "id -u; pwd; exit 6"
    )
    assert r.returncode == 6, r.err
    assert r.out.splitlines() == ["1000", "/tmp"]


def test_read_only_root(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod("run", "--read-only", "--rootfs", str(busybox), "--", "touch", "/x")
    assert r.returncode != 0 and "Read-only" in r.err
    r = vmpod("run", "--rootfs", str(busybox), "--", "sh", "-c", "touch /x && echo wrote")
    assert r.out.strip() == "wrote"


def test_oci_layout_image_uses_its_config(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    layout = make_oci_layout(
        busybox,
        tmp_path / "layout",
        tag="v1",
        config={
            "Env": ["FOO=from-image", "PATH=/bin"],
            "WorkingDir": "/home/alice",
            "Cmd": ["sh", "-c", 'echo "$FOO"; pwd'],
        },
    )
    r = vmpod("run", f"{layout}:v1")
    assert r.returncode == 0, r.err
    assert r.out.splitlines() == ["from-image", "/home/alice"]
    r = vmpod("run", "-e", "FOO=cli", f"{layout}:v1", "--", "sh", "-c", 'echo "$FOO"')
    assert r.out.strip() == "cli"


def test_docker_archive_image(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    archive = make_docker_archive(
        busybox, tmp_path / "img.tar", repo_tag="bb:test", config={"Entrypoint": ["echo"], "Cmd": ["default"]}
    )
    r = vmpod("run", f"{archive}:bb:test", "--", "from", "archive")
    assert r.returncode == 0, r.err
    assert r.out.strip() == "from archive"


def test_interactive_tty(vmpod: VmpodRunner, busybox: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:
        # A known window size: vmpod must pass it on to the container's terminal.
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        os.execve(
            sys.executable,
            [sys.executable, "-m", "vmpod.cli", "run", "-it", "--rootfs", str(busybox), "--", "sh"],
            vmpod.env,
        )
    out = b""
    sent = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if not sent and b"# " in out:  # the shell's prompt: it runs on a terminal
            os.write(fd, b"tty; echo $((6*7)); stty size; exit 5\r")
            sent = True
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 5, text
    assert "/dev/pts/" in text and "42" in text
    assert "33 101" in text, text


@pytest.mark.parametrize("sig, expected", [(signal.SIGTERM, 42)])
def test_signal_reaches_container(vmpod: VmpodRunner, busybox: Path, sig: int, expected: int) -> None:
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        'trap "echo got-term; exit 42" TERM; echo ready; while true; do sleep 0.2; done',
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected, err
    assert b"got-term" in out


def test_sigterm_kills_a_container_that_ignores_it(vmpod: VmpodRunner, busybox: Path) -> None:
    # PID 1 of a container ignores SIGTERM without a handler: vmpod escalates.
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        "echo ready; exec sleep 600",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
