"""The sandbox API and the agent's operations on one shared booted sandbox: two
containers in one VM (a pod), exec, signals, stats, and the agent's refusals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.vm.conftest import assert_nothing_left
from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, AgentRequestError
from vmpod.errors import StateError
from vmpod.guest.assets import GuestAssets
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec
from vmpod.sandbox import (
    Container,
    ContainerSpec,
    ContainerState,
    Output,
    Process,
    Sandbox,
    SandboxSpec,
    prepare,
)
from vmpod.storage.erofs import rootfs_disk

T = TypeVar("T")


class Booted:
    """A sandbox with one long-running container, driven from a private loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sandbox: Sandbox, disk: Path, busybox: Path) -> None:
        self.loop, self.sandbox, self.disk, self.busybox = loop, sandbox, disk, busybox

    def run(self, coro: Coroutine[object, object, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def agent(self) -> AgentClient:
        """The raw agent client: these tests probe the agent itself."""
        return self.sandbox._agent

    def spec(self, cid: str, *args: str) -> ContainerSpec:
        oci = build_spec(resolve_rootfs(self.busybox).config, ProcessOptions(args=args))
        return ContainerSpec(id=cid, oci=oci, rootfs=self.disk)


@pytest.fixture(scope="module")
def booted(paths: Paths, assets: GuestAssets, busybox: Path) -> Iterator[Booted]:
    loop = asyncio.new_event_loop()
    disk = rootfs_disk(paths, resolve_rootfs(busybox))
    sandbox = Sandbox(paths, prepare(paths, SandboxSpec(rootfs=(disk,))))
    loop.run_until_complete(sandbox.start())
    try:
        yield Booted(loop, sandbox, disk, busybox)
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        assert_nothing_left(paths)


def _collect() -> tuple[Output, bytearray, bytearray]:
    out, err = bytearray(), bytearray()
    return Output(out.extend, err.extend), out, err


async def _started(c: Container) -> tuple[Process, bytearray]:
    output, out, _ = _collect()
    proc = await c.start(output, stdin=False)
    while b"up\n" not in out:
        await asyncio.sleep(0.05)
    return proc, out


def test_guest_info(booted: Booted, assets: GuestAssets) -> None:
    info = booted.run(booted.sandbox.guest_info())
    assert info.kernel == assets.kernel.release
    assert info.cpus == 1
    assert info.runc.startswith("runc version")
    assert 0 < info.mem_free_kb < info.mem_total_kb


def test_two_containers_in_one_vm(booted: Booted) -> None:
    """A pod: two containers, each its own rootfs mount and process tree, one VM."""

    async def scenario() -> None:
        a = await booted.sandbox.create_container(
            booted.spec("pod-a", "sh", "-c", "echo a > /tmp/mine; echo up; sleep 600; true")
        )
        b = await booted.sandbox.create_container(booted.spec("pod-b", "sh", "-c", "echo up; sleep 600"))
        assert {a.state, b.state} == {ContainerState.CREATED}
        pa, _ = await asyncio.wait_for(_started(a), 60)
        pb, _ = await asyncio.wait_for(_started(b), 60)
        # b does not see a's writes (own overlay) nor a's processes (own pid namespace)
        # (mi""ne and [m]ine: the probe's own command lines must not match the marker)
        script = 'test -e /tmp/mi""ne && echo visible; grep -l "[m]ine" /proc/[0-9]*/cmdline | wc -l'

        async def probe(c: Container) -> list[bytes]:
            output, out, _ = _collect()
            proc = await c.exec(
                {"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"}, output, stdin=False
            )
            assert (await asyncio.wait_for(proc.wait(), 60)).status == 0
            return bytes(out).split()

        assert await probe(a) == [b"visible", b"1"]  # its own container's file and init
        assert await probe(b) == [b"0"]
        await a.kill(signal.SIGKILL)
        assert (await asyncio.wait_for(pa.wait(), 60)).status == 128 + signal.SIGKILL
        assert a.state is ContainerState.STOPPED and b.state is ContainerState.RUNNING
        with pytest.raises(StateError, match="pod-a is stopped"):
            await a.exec({"args": ["true"]}, _collect()[0], stdin=False)
        await b.kill(signal.SIGKILL)  # (PID 1 of its namespace: TERM would be ignored)
        assert (await asyncio.wait_for(pb.wait(), 60)).status == 128 + signal.SIGKILL

    booted.run(scenario())


def test_start_exec_signal_wait(booted: Booted) -> None:
    async def scenario() -> None:
        c = await booted.sandbox.create_container(booted.spec("shared", "sh", "-c", "echo up; sleep 600"))
        proc, out = await asyncio.wait_for(_started(c), 60)
        output, ex_out, ex_err = _collect()
        process = {
            "args": ["sh", "-c", 'echo "in $X as $(id -u)"; echo e >&2; exit 4'],
            "env": ["X=exec", "PATH=/bin"],
            "cwd": "/tmp",
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
        }
        ex_proc = await c.exec(process, output, stdin=False, user="alice")
        ex = await asyncio.wait_for(ex_proc.wait(), 60)
        assert (ex.status, bytes(ex_out), bytes(ex_err)) == (4, b"in exec as 1000\n", b"e\n")
        stats = await c.stats()
        assert stats.pids >= 1 and stats.memory_bytes > 0 and stats.cpu_usage_usec > 0
        # wait on a finished process answers at once with the same status
        assert await booted.agent.request("wait", {"stream": ex_proc.stream}) == {"status": 4}
        # resize needs a terminal
        with pytest.raises(AgentRequestError) as exc:
            await ex_proc.resize(24, 80)
        assert exc.value.kind == "invalid"
        await c.kill(signal.SIGKILL)
        assert (await asyncio.wait_for(c.wait(), 60)).status == 128 + signal.SIGKILL
        assert bytes(out) == b"up\n" and proc.done

    booted.run(scenario())


def test_unknown_operations_and_bad_arguments_are_refused(booted: Booted) -> None:
    agent = booted.agent
    with pytest.raises(AgentRequestError) as exc:
        booted.run(agent.request("format_disk"))
    assert exc.value.kind == "unsupported"
    with pytest.raises(AgentRequestError) as exc:
        booted.run(agent.request("signal", {"stream": "1", "signal": 9}))
    assert exc.value.kind == "invalid"
    with pytest.raises(AgentRequestError) as exc:
        booted.run(
            agent.request("create_container", {"container_id": "../escape", "spec": {}, "rootfs_serial": "x"})
        )
    assert exc.value.kind == "invalid"


def test_agent_survives_garbage_from_the_host(booted: Booted) -> None:
    agent = booted.agent
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
