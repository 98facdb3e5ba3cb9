"""Hostile guest (issue 11), sandbox level: when the guest's end of the agent channel
sends garbage, the sandbox fails with one clear ProtocolError line and is torn
down: the "VM" (FakeVm: the real agent in a thread, the fake OCI runtime running
processes on this host) stopped, its processes gone, its state directory removed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import hostile as h
from tests.fixtures.fakevm import FakeVm, fake_config, fake_rootfs, registered
from vmpod.agent import protocol as p
from vmpod.errors import ProtocolError
from vmpod.hypervisor import HYPERVISORS
from vmpod.paths import Paths
from vmpod.sandbox import ContainerSpec, Output, Sandbox, SandboxState
from vmpod.sandbox.build import with_rootfs

GARBAGE = {
    "bad magic": b"\x00" * 64,
    "4 GiB header": p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.STDOUT, 1, 2**32 - 1) + b"x" * 1000,
    "second hello": h.jframe(p.EVENT, 0, {"event": "hello", **h.HELLO}),
    "not an object": h.frame(p.RESPONSE, 1, b"[" * 30000),
    "unknown stream": h.frame(p.STDOUT, 4_000_000, b"x"),
}


class GarbageAtBoot(FakeVm):
    """Says hello like an agent, then answers the host's first request with
    ``garbage`` and holds the line until the host hangs up."""

    garbage = b""

    def _serve(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self._conn = conn
        with contextlib.suppress(OSError):
            conn.sendall(h.jframe(p.EVENT, 0, {"event": "hello", **h.HELLO}))
            conn.recv(1 << 16)
            conn.sendall(self.garbage)
            while conn.recv(1 << 16):
                pass


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    with registered():
        HYPERVISORS["hostile"] = GarbageAtBoot
        try:
            yield Paths(home=tmp_path / "home", run=tmp_path / "run")
        finally:
            HYPERVISORS.pop("hostile", None)


def _sandbox(paths: Paths, rootfs: Path, hypervisor: str) -> Sandbox:
    return Sandbox(paths, with_rootfs(fake_config(paths.home, hypervisor=hypervisor), rootfs))


def _assert_torn_down(sb: Sandbox) -> None:
    assert sb.state is SandboxState.STOPPED and not sb.state_dir.exists()
    vm = FakeVm.launched[-1]
    assert vm.exit_status() is not None and vm._thread is not None and not vm._thread.is_alive()


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # (the fake runtime's children may be ours)
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_at_boot_fails_the_start_and_stops_the_vm(paths: Paths, tmp_path: Path, name: str) -> None:
    GarbageAtBoot.garbage = GARBAGE[name]
    sb = _sandbox(paths, fake_rootfs(tmp_path), "hostile")
    with pytest.raises(ProtocolError, match="guest broke the agent protocol") as info:
        asyncio.run(asyncio.wait_for(sb.__aenter__(), 30))
    assert "\n" not in str(info.value) and len(str(info.value)) < 200, str(info.value)
    _assert_torn_down(sb)


@pytest.mark.parametrize("name", ["4 GiB header", "second hello"])  # 2.4 s each (see report)
def test_garbage_while_a_container_runs_ends_it_and_the_vm(paths: Paths, tmp_path: Path, name: str) -> None:
    """The real agent runs a container; then garbage arrives on its channel (written
    by the "guest" between the agent's own frames): waiters get the protocol error,
    and leaving the sandbox stops the VM and the container's process."""
    rootfs = fake_rootfs(tmp_path)
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 60"
    oci: dict[str, object] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/usr/bin:/bin"]},
    }

    async def scenario() -> tuple[Sandbox, int, ProtocolError]:
        sb = _sandbox(paths, rootfs, "fake")
        async with sb:
            c = await sb.create_container(ContainerSpec(id="c", rootfs=rootfs, oci=oci))
            proc = await c.start(Output(lambda _b: None, lambda _b: None), stdin=False)
            while not pidfile.exists():
                await asyncio.sleep(0.02)
            conn = FakeVm.launched[-1]._conn
            assert conn is not None
            conn.sendall(GARBAGE[name])
            with pytest.raises(ProtocolError) as info:
                await proc.wait()
        return sb, int(pidfile.read_text()), info.value

    sb, pid, err = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "\n" not in str(err) and len(str(err)) < 200, str(err)
    _assert_torn_down(sb)
    assert _gone(pid), f"the container's process {pid} outlived its sandbox"
