"""The agent's operations through the host client, on one shared booted sandbox."""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import assert_nothing_left
from vmpod.agent import protocol as p
from vmpod.agent.client import AgentRequestError, ProcessSink
from vmpod.guest.assets import GuestAssets
from vmpod.hypervisor.accel import choose_accel
from vmpod.hypervisor.base import Disk
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.sandbox.container import Container, ContainerConfig
from vmpod.sandbox.sandbox import Sandbox, SandboxConfig
from vmpod.sandbox.spec import ProcessOptions, build_spec
from vmpod.storage.erofs import rootfs_disk


class Booted:
    """A sandbox with one long-running container, driven from a private loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sandbox: Sandbox,
                 container: Container) -> None:
        self.loop, self.sandbox, self.container = loop, sandbox, container

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def booted(paths: Paths, assets: GuestAssets, busybox: Path) -> Iterator[Booted]:
    loop = asyncio.new_event_loop()
    source = resolve_rootfs(busybox)
    disk = rootfs_disk(paths, source)
    sandbox = Sandbox(paths, SandboxConfig(assets=assets, accel=choose_accel(),
                                           disks=(Disk(disk, "ctr-rootfs"),)))
    spec = build_spec(source.config, ProcessOptions(args=("sh", "-c", "echo up; sleep 600")))
    container = Container(sandbox, ContainerConfig(id="shared", spec=spec,
                                                   rootfs_serial="ctr-rootfs"))
    loop.run_until_complete(sandbox.start())
    try:
        loop.run_until_complete(container.create())
        yield Booted(loop, sandbox, container)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        assert_nothing_left(paths)


def _collect() -> tuple[ProcessSink, bytearray, bytearray]:
    out, err = bytearray(), bytearray()
    return ProcessSink(on_stdout=out.extend, on_stderr=err.extend), out, err


def test_guest_info(booted: Booted, assets: GuestAssets) -> None:
    info = booted.run(booted.sandbox.agent.request("guest_info"))
    assert isinstance(info, dict)
    assert info["kernel"] == assets.kernel.release
    assert info["cpus"] == 1
    assert str(info["runc"]).startswith("runc version")
    assert 0 < int(info["mem_free_kb"]) < int(info["mem_total_kb"])  # type: ignore[call-overload]


def test_start_exec_signal_wait(booted: Booted) -> None:
    async def scenario() -> None:
        c = booted.container
        sink, out, _ = await asyncio.wait_for(_started(c), 60)
        ex_sink, ex_out, ex_err = _collect()
        process = {"args": ["sh", "-c", 'echo "in $X as $(id -u)"; echo e >&2; exit 4'],
                   "env": ["X=exec", "PATH=/bin"], "cwd": "/tmp", "terminal": False,
                   "user": {"uid": 0, "gid": 0}}
        stream = await c.exec(process, ex_sink, stdin=False, user="alice")
        ev = await asyncio.wait_for(ex_sink.exited, 60)
        assert (ev.status, bytes(ex_out), bytes(ex_err)) == (4, b"in exec as 1000\n", b"e\n")
        # wait on a finished process answers at once with the same status
        assert await booted.sandbox.agent.request("wait", {"stream": stream}) == {"status": 4}
        # resize needs a terminal
        with pytest.raises(AgentRequestError) as exc:
            await c.resize(stream, 24, 80)
        assert exc.value.kind == "invalid"
        await c.signal(1, signal.SIGKILL)
        ev = await asyncio.wait_for(sink.exited, 60)
        assert ev.status == 128 + signal.SIGKILL
        assert bytes(out) == b"up\n"
    booted.run(scenario())


async def _started(c: Container) -> tuple[ProcessSink, bytearray, bytearray]:
    sink, out, err = _collect()
    await c.start(sink, stdin=False)
    while b"up\n" not in out:
        await asyncio.sleep(0.05)
    return sink, out, err


def test_unknown_operations_and_bad_arguments_are_refused(booted: Booted) -> None:
    agent = booted.sandbox.agent
    with pytest.raises(AgentRequestError) as exc:
        booted.run(agent.request("format_disk"))
    assert exc.value.kind == "unsupported"
    with pytest.raises(AgentRequestError) as exc:
        booted.run(agent.request("signal", {"stream": "1", "signal": 9}))
    assert exc.value.kind == "invalid"
    with pytest.raises(AgentRequestError) as exc:
        booted.run(agent.request("create_container", {
            "container_id": "../escape", "spec": {}, "rootfs_serial": "x"}))
    assert exc.value.kind == "invalid"


def test_agent_survives_garbage_from_the_host(booted: Booted) -> None:
    agent = booted.sandbox.agent
    agent._send(b"\x00garbage that is not a frame" * 10)
    agent._send(p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.REQUEST, 1, 1 << 30))
    # The agent drops what it cannot parse and resynchronises on the next read.
    async def ping_until_ok() -> object:
        for _ in range(50):
            try:
                return await agent.request("ping", timeout=2)
            except Exception:
                await asyncio.sleep(0.2)
        raise AssertionError("agent never recovered")
    result = booted.run(ping_until_ok())
    assert isinstance(result, dict) and "uptime" in result
