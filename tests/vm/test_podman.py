"""podman 4.3 (with conmon) running containers in VMs through vmpod-runtime.

A private podman store (--root/--runroot in tmp) so the host's is untouched; the
image comes from `podman import` of the busybox rootfs (no registry). The
ulimits fit this sandboxed host (see FIELD-NOTES: podman's defaults fail here
even with runc).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import tarfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.test_runtime_support import (
    assert_runtime_clean,
    run_text,
    runtime_env,
    wrapper_script,
)
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

IMAGE = "localhost/vmpod-busybox:latest"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Podman:
    def __init__(self, base: list[str]) -> None:
        self.base = base

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return run_text([*self.base, *args], input, timeout)


@contextlib.contextmanager
def private_podman(paths: Paths, busybox: Path, tmp: Path) -> Iterator[tuple[list[str], Path]]:
    """podman's argv on a private store in ``tmp`` with vmpod-runtime (its state in
    the returned root) and the busybox image imported; everything removed after."""
    if shutil.which("podman") is None or shutil.which("conmon") is None:
        pytest.skip("podman/conmon not installed")
    rt_root = tmp / "rtroot"
    env = runtime_env(paths, tmp / "runtime.json")
    # podman passes no --root to a runtime it does not know: ours keeps the test's state apart
    wrapper = wrapper_script(tmp / "vmpod-runtime", env, "--root", str(rt_root))
    base = [
        "podman",
        *("--root", str(tmp / "root"), "--runroot", str(tmp / "runroot")),
        *("--runtime", str(wrapper), "--events-backend", "file", "--cgroup-manager", "cgroupfs"),
    ]
    p = Podman(base)
    with tarfile.open(tmp / "rootfs.tar", "w") as tar:
        tar.add(busybox, arcname=".")
    res = p("import", str(tmp / "rootfs.tar"), IMAGE)
    assert res.returncode == 0, res.stderr
    yield base, rt_root
    p("rm", "--all", "--force", "--time", "0")
    p("rmi", "--all", "--force")
    assert_runtime_clean(paths, rt_root)


@pytest.fixture(scope="module")
def podman(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Podman]:
    with private_podman(paths, busybox, tmp_path_factory.mktemp("podman")) as (base, _):
        yield Podman(base)


def test_run_rm_output_and_exit_status(podman: Podman) -> None:
    script = (
        'echo "hi from $(uname -r)"; [ "$(hostname)" = "$(cat /etc/hostname)" ] && '
        "echo hostname-ok; test -f /run/.containerenv && echo containerenv; "
        "grep -q localhost /etc/hosts && echo hosts; echo oops >&2; exit 7"
    )
    res = podman("run", "--rm", *ULIMITS, IMAGE, "sh", "-c", script)
    assert res.returncode == 7, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("hi from ") and lines[0] != f"hi from {os.uname().release}"
    assert lines[1:] == ["hostname-ok", "containerenv", "hosts"]
    assert "oops" in res.stderr


def test_missing_command_is_127(podman: Podman) -> None:
    res = podman("run", "--rm", *ULIMITS, IMAGE, "no-such-command")
    assert res.returncode == 127
    assert "executable file not found" in res.stderr


def test_stdin(podman: Podman) -> None:
    res = podman("run", "--rm", "-i", *ULIMITS, IMAGE, "sh", "-c", "tr a-z A-Z", input=b"through the vm\n")
    assert (res.returncode, res.stdout) == (0, "THROUGH THE VM\n")


def _pty_run(argv: list[str], send: bytes, until: bytes, timeout: float = 120) -> tuple[int, bytes]:
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 31, 97, 0, 0))
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        out += data
        if not sent and b"# " in out:
            time.sleep(0.5)
            os.write(fd, send)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert until in out, out
    return os.waitstatus_to_exitcode(status), out


def test_interactive_tty(podman: Podman) -> None:
    code, out = _pty_run(
        [*podman.base, "run", "-it", "--rm", *ULIMITS, IMAGE, "sh"],
        b"stty size; echo $((6*7)); exit 3\r",
        b"42",
    )
    assert code == 3
    assert b"31 97" in out


def test_detached_exec_logs_ps_stop(podman: Podman) -> None:
    loop = "echo started; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.2; done"
    res = podman("run", "-d", "--name", "svc", *ULIMITS, IMAGE, "sh", "-c", loop)
    assert res.returncode == 0, res.stderr
    try:
        ps = podman("ps", "--format", "{{.Names}} {{.Status}}")
        assert "svc Up" in ps.stdout
        res = podman("exec", "svc", "sh", "-c", "echo in-exec; exit 4")
        assert (res.returncode, res.stdout) == (4, "in-exec\n")
        res = podman("exec", "-i", "svc", "cat", input=b"exec stdin\n")
        assert res.stdout == "exec stdin\n"
        code, out = _pty_run(
            [*podman.base, "exec", "-it", "svc", "sh"], b"echo tty-$((2+3)); exit 6\r", b"tty-5"
        )
        assert code == 6
        assert podman("logs", "svc").stdout.startswith("started\n")
        res = podman("stop", "-t", "20", "svc")
        assert res.returncode == 0, res.stderr
        state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "svc")
        assert state.stdout.split() == ["exited", "0"]
        assert podman("logs", "svc").stdout == "started\nstopping\n"
    finally:
        podman("rm", "--force", "--time", "0", "svc")


def test_rootfs_changes_persist_and_reach_the_host(podman: Podman, tmp_path: Path) -> None:
    """The container's writes land in its rootfs on the host: a later `start` sees
    them, `podman cp` copies them out, `podman diff` lists them."""
    script = "cat /x 2>/dev/null || echo first; echo kept > /x"
    res = podman("run", "--name", "persist", *ULIMITS, IMAGE, "sh", "-c", script)
    try:
        assert (res.returncode, res.stdout) == (0, "first\n"), res.stderr
        res = podman("start", "--attach", "persist")
        assert (res.returncode, res.stdout) == (0, "kept\n"), res.stderr
        res = podman("cp", "persist:/x", str(tmp_path / "x"))
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "x").read_text() == "kept\n"
        assert "A /x" in podman("diff", "persist").stdout.splitlines()
    finally:
        podman("rm", "--force", "--time", "0", "persist")


def test_volumes_read_write_read_only_and_named(podman: Podman, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from the host\n")
    res = podman(
        "run",
        "--rm",
        "-v",
        f"{data}:/data",
        *ULIMITS,
        IMAGE,
        "sh",
        "-c",
        "cat /data/in; echo out > /data/out",
    )
    assert (res.returncode, res.stdout) == (0, "from the host\n"), res.stderr
    assert (data / "out").read_text() == "out\n"
    res = podman("run", "--rm", "-v", f"{data}:/data:ro", *ULIMITS, IMAGE, "sh", "-c", "echo no > /data/no")
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    assert not (data / "no").exists()
    res = podman("run", "--rm", "--read-only", *ULIMITS, IMAGE, "sh", "-c", "touch /etc/x")
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    assert podman("volume", "create", "vmpodvol").returncode == 0
    try:
        res = podman("run", "--rm", "-v", "vmpodvol:/v", *ULIMITS, IMAGE, "sh", "-c", "echo named > /v/f")
        assert res.returncode == 0, res.stderr
        res = podman("run", "--rm", "-v", "vmpodvol:/v", *ULIMITS, IMAGE, "cat", "/v/f")
        assert (res.returncode, res.stdout) == (0, "named\n"), res.stderr
        where = podman("volume", "inspect", "--format", "{{.Mountpoint}}", "vmpodvol").stdout.strip()
        assert Path(where, "f").read_text() == "named\n"
    finally:
        podman("volume", "rm", "--force", "vmpodvol")
