"""Hardening of `vmpod run` and the VM's helper processes (issue 10: defects 1, 2,
3 and 9), without a VM: fake QEMU and virtiofsd, the attach layer, start-up fds."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_cli_run import opts
from tests.unit.test_cli_run import paths as cli_paths  # noqa: F401 (fixture)
from tests.unit.test_cli_run import rootfs as cli_rootfs  # noqa: F401 (fixture)
from tests.unit.test_qemu_driver import Fleet, fleet, run  # noqa: F401 (fixture)
from tests.unit.test_qemu_virtiofs import shared_vm, source  # noqa: F401 (fixture)
from vmpod.cli.run import run as run_cli
from vmpod.guest.progress import silent
from vmpod.hypervisor.qemu.console import ConsoleDrain, ConsoleFiles
from vmpod.paths import Paths
from vmpod.sandbox.attach import FdWriter, on_reader_gone

# -- 1: helpers are out of the user's process group ------------------------------------


def _session_and_group(pid: int) -> tuple[int, int]:
    return os.getsid(pid), os.getpgid(pid)


def test_qemu_and_virtiofsd_run_in_their_own_session(
    fleet: Fleet,  # noqa: F811
    source: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground process group) must reach vmpod
    only: QEMU and virtiofsd lead sessions of their own, so no group signal of the
    user's can hit them, and vmpod forwards it to the container instead."""
    vm = shared_vm(fleet, source, monkeypatch)
    run(vm.launch())
    try:
        ours = _session_and_group(0)
        fs = vm._fs
        assert vm.pid is not None and fs is not None and fs.pid is not None
        for pid in (vm.pid, fs.pid):
            sid, pgid = _session_and_group(pid)
            assert (sid, pgid) != ours and sid != ours[0] and pgid != ours[1]
            assert sid == pgid  # a session leader's own group (setsid)
            # PDEATHSIG survives setsid: still SIGKILL when the owner dies
            status = Path(f"/proc/{pid}/status").read_text()
            assert "PPid:\t" + str(os.getpid()) in status
    finally:
        vm.kill()


# -- 2: the reader of our output goes away -----------------------------------------------


def test_reader_gone_stops_the_container_with_sigpipe_status(
    cli_paths: Paths,  # noqa: F811
    cli_rootfs: Path,  # noqa: F811
) -> None:
    """`vmpod run IMAGE -- yes | head -1`: once the reader closes the pipe, the
    container is killed and vmpod ends as a process killed by SIGPIPE would."""
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)
    os.close(w)
    forever = opts(cli_rootfs, "sh", "-c", "while :; do echo y; done")

    async def scenario() -> int:
        task = asyncio.ensure_future(run_cli(cli_paths, forever, silent))
        assert await asyncio.get_running_loop().run_in_executor(None, os.read, r, 2) == b"y\n"
        os.close(r)  # head -1 has its line
        return await asyncio.wait_for(task, 20)

    try:
        status = asyncio.run(scenario())
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert status == 128 + signal.SIGPIPE == 141
    assert list((cli_paths.run / "sandboxes").iterdir()) == []


def test_writer_reports_epipe_once_to_its_owner() -> None:
    r, w = os.pipe()
    os.close(r)
    errors: list[int | None] = []
    writer = FdWriter(w, owned=True, on_broken=lambda err: errors.append(err.errno))
    for _ in range(3):
        writer.write(b"x")
    writer.close()
    assert writer.broken and errors == [errno.EPIPE]


def test_on_reader_gone_resolves_only_for_epipe() -> None:
    async def scenario() -> tuple[bool, bool]:
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        broken = on_reader_gone(gone)
        broken(OSError(errno.EBADF, "bad fd"))
        await asyncio.sleep(0.01)
        before = gone.done()
        await asyncio.get_running_loop().run_in_executor(None, broken, OSError(errno.EPIPE, "pipe"))
        await asyncio.wait_for(gone, 2)
        return before, gone.done()

    assert asyncio.run(scenario()) == (False, True)


# -- 3: closed stdio fds at start-up -------------------------------------------------------

_PROBE = """
import os, socket, sys
{setup}
s = socket.socket()
links = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in (0, 1, 2)]
print(s.fileno(), *links, sorted(closed), sys.stdout is not None, file=sys.stderr)
"""


def _probe(setup: str, redirect: str) -> list[str]:
    """Run ``setup`` in a Python whose std fds ``redirect`` closed; what it saw."""
    code = _PROBE.format(setup=setup)
    r = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-c", code],
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode()
    return r.stderr.decode().split()


def test_reserve_stdio_fills_closed_fds_with_dev_null() -> None:
    setup = "from vmpod.stdio import reserve_stdio\nclosed = reserve_stdio()"
    sock, fd0, fd1, fd2, *rest = _probe(setup, ">&- <&-")
    assert int(sock) >= 3  # the next fd opened is not a std one
    assert (fd0, fd1) == ("/dev/null", "/dev/null") and fd2.startswith("pipe:")
    assert rest == ["[0,", "1]", "True"]


@pytest.mark.parametrize(
    "module, entry",
    [("vmpod.cli.main", "m.cli = lambda **k: None"), ("vmpod.runtime.cli", "m.cli = Cli()")],
)
def test_both_clis_reserve_stdio_before_anything_else(module: str, entry: str) -> None:
    """`vmpod … >&-` and `vmpod-runtime … >&-`: the entry point reserves fd 1 before
    its command runs (which opens event loops and sockets)."""
    setup = (
        f"import {module} as m\nfrom vmpod.stdio import closed_at_start\n"
        "class Cli:\n    def main(self, **kw): pass\n"
        f"{entry}\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "closed = closed_at_start()"
    )
    sock, _, fd1, *_ = _probe(setup, ">&-")
    assert fd1 == "/dev/null" and int(sock) >= 3


# -- 9: the guest's console log is capped --------------------------------------------------


def test_console_drain_caps_the_log_and_keeps_the_tail(tmp_path: Path) -> None:
    """30 MB through the console pipe (a flooding guest) leaves at most the cap on
    disk, and the tail — what boot-failure messages quote — is the latest output."""
    files = ConsoleFiles(tmp_path / "console.log", cap=64 * 1024)
    drain = ConsoleDrain(files)
    wfd = drain.open()
    line = b"x" * 99 + b"\n"
    with os.fdopen(os.dup(wfd), "wb") as guest:
        drain.spawned()  # as after QEMU's start: the guest's end is the only one
        for _ in range(30 * 1024 * 1024 // len(line)):
            guest.write(line)
        guest.write(b"Kernel panic - not syncing: the last words\n")
    drain.close()
    on_disk = files.path.stat().st_size + files.previous.stat().st_size
    assert on_disk <= files.cap
    assert files.tail(3).splitlines() == ["x" * 99, "x" * 99, "Kernel panic - not syncing: the last words"]


def test_console_tail_reaches_across_the_rotation(tmp_path: Path) -> None:
    files = ConsoleFiles(tmp_path / "console.log", cap=64)
    files.previous.write_bytes(b"old 1\nold 2\n")
    files.path.write_bytes(b"new 1\n")
    assert files.tail(2) == "old 2\nnew 1"
    assert ConsoleFiles(tmp_path / "none.log").tail(5) == ""


def test_qemu_writes_its_console_through_the_capped_drain(fleet: Fleet) -> None:  # noqa: F811
    """QEMU gets a pipe (never a file it grows itself); the tail still works."""
    vm = fleet.vm()
    run(vm.launch())
    try:
        console = [a for a in vm.argv if a.startswith("file,id=console,")]
        assert console and "path=/dev/fd/" in console[0], vm.argv
        deadline = time.monotonic() + 3
        while not vm.console_tail() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vm.console_tail()  # the fake's boot line, through the pipe
    finally:
        vm.kill()
    assert vm.console_tail()  # kept after the VM is gone
