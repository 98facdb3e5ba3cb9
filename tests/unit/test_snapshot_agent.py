"""What a restored snapshot needs of the agent, without a VM: the reseed and
process-list ops, a port agent that greets its next host after the previous one
went away, the host client's resync past frames meant for the previous
host, and a failed save that leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.unit.test_agent_harness import InProcessAgent, agent_config, create, in_process_agent, start
from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient
from vmpod.agent.guest import channel as ch
from vmpod.agent.guest import handlers
from vmpod.agent.guest.server import Agent
from vmpod.errors import HypervisorError
from vmpod.sandbox import snapshot as snap


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    yield from in_process_agent(tmp_path)


def test_reseed_arguments_are_checked(agent: InProcessAgent, tmp_path: Path, monkeypatch: Any) -> None:
    assert agent.refused("reseed_random", {"entropy": "zz" * p.RESEED_BYTES})[0] == "invalid"
    assert agent.refused("reseed_random", {"entropy": "00" * (p.RESEED_BYTES - 1)})[0] == "invalid"
    # not a random device: the ioctls fail, and the agent says so
    monkeypatch.setattr(handlers, "RANDOM_DEVICE", str(tmp_path / "not-random"))
    (tmp_path / "not-random").write_bytes(b"")
    kind, error = agent.refused("reseed_random", {"entropy": "ab" * p.RESEED_BYTES})
    assert kind == "failed" and "reseeding the random pool failed" in error


def test_list_processes_tells_inits_and_their_ends(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    start(agent, "c1", 3, stdin=True)
    listed = agent.call("list_processes")
    assert listed == p.ProcessList(
        processes=(p.ProcessInfo(stream=3, container_id="c1", init=True, running=True, status=-1),)
    )
    agent.close_stdin(3)
    agent.exit_event(3)
    listed = agent.call("list_processes")
    assert isinstance(listed, p.ProcessList)
    assert listed.processes == (
        p.ProcessInfo(stream=3, container_id="c1", init=True, running=False, status=0),
    )


def test_a_port_agent_greets_its_next_host(tmp_path: Path) -> None:
    """EOF on a port: the host went away (a restored snapshot's QEMU has a new,
    not yet connected chardev). What was queued for it is dropped — a frame half
    written to the old host would garble the new one's stream — and one hello
    waits for the next host."""
    a, b = socket.socketpair()
    agent = Agent(ch.Channel(a.detach()), agent_config(tmp_path))
    agent.chan.send(b"stale half frame")
    b.shutdown(socket.SHUT_WR)  # the agent's reads see EOF
    agent._on_channel(agent.chan.fd, select.EPOLLIN)
    assert agent.chan.host_away
    frames = p.FrameReader().feed(bytes(agent.chan.out))
    assert [(kind, p.parse_json(payload)["event"]) for kind, _s, payload in frames] == [(p.EVENT, "hello")]
    agent.chan.paused_until = 0.0
    agent._on_channel(agent.chan.fd, select.EPOLLIN)  # still away: no second hello
    assert len(p.FrameReader().feed(bytes(agent.chan.out))) == 1
    agent.close()
    b.close()


def test_client_resync_skips_what_was_meant_for_the_previous_host(tmp_path: Path) -> None:
    path = tmp_path / "channel.sock"

    async def fake_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # what the guest had queued before the snapshot: output and an answer
        writer.write(p.encode_frame(p.STDOUT, 7, b"old output"))
        writer.write(p.encode_json(p.RESPONSE, 5, {"id": 5, "ok": True, "result": {}}))
        frames = p.FrameReader()
        while True:
            for kind, _s, payload in frames.feed(await reader.read(4096)):
                req = p.parse_json(payload)
                assert kind == p.REQUEST and req["op"] == "ping" and int(str(req["id"])) >= 1 << 30
                resp = {"id": req["id"], "ok": True, "result": {"uptime": 42.5}}
                writer.write(p.encode_json(p.RESPONSE, int(str(req["id"])), resp))
                await writer.drain()

    async def scenario() -> float:
        server = await asyncio.start_unix_server(fake_agent, str(path))
        client = AgentClient()
        try:
            hello = await client.connect(path, 10.0, lambda: None, resync=True)
            assert (await client.ping()).uptime == 42.5  # the channel works after the resync
            return hello.uptime
        finally:
            await client.close()
            server.close()

    assert asyncio.run(scenario()) == 42.5


class FailingSave:
    """Just enough of a Sandbox for ``snapshot.save``: QEMU fails mid-save."""

    def __init__(self, tmp: Path) -> None:
        self.id, self.alive, self.resumed = "s1", True, 0
        self.containers: dict[str, object] = {}
        self.config = cast(Any, type("C", (), {"modules": (), "shared_fs": False}))
        (tmp / "k").write_bytes(b"k")
        self.vm_config = cast(
            Any,
            type(
                "V",
                (),
                {
                    "kernel": tmp / "k",
                    "initramfs": tmp / "k",
                    "cmdline": "",
                    "cpus": 1,
                    "memory_mb": 512,
                    "disks": (),
                    "nics": (),
                    "accel": type("A", (), {"accel": "tcg"}),
                    "channel": type("H", (), {"kind": "serial"}),
                },
            ),
        )

    def snapshot_refusal(self) -> None:
        return None

    async def save_state(self, fd: int) -> int:
        os.write(fd, b"half a state")
        raise HypervisorError("saving the VM state failed: disk full")

    async def resume_vm(self) -> None:
        self.resumed += 1


def test_a_failed_save_leaves_nothing_and_resumes_the_vm(tmp_path: Path) -> None:
    sandbox = FailingSave(tmp_path)
    with pytest.raises(HypervisorError, match="disk full"):
        asyncio.run(snap.save(cast(Any, sandbox), tmp_path / "snap"))
    assert sandbox.resumed == 1
    assert [n for n in os.listdir(tmp_path) if n.startswith("snap")] == []
