"""The agent's channel kinds beyond the test socket: a virtio-serial-like fd whose
EOF only means "host away", and a listener (vsock's way) whose connections
replace each other."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import TIMEOUT, Host, agent_config
from vmpod.agent import protocol as p
from vmpod.agent.guest import channel as ch
from vmpod.agent.guest.server import Agent


class Served:
    """``Agent.serve`` on a channel, in a thread."""

    def __init__(self, chan: ch.Channel, tmp_path: Path) -> None:
        self.agent = Agent(chan, agent_config(tmp_path))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.agent.serve()
        except BaseException as err:
            self.error = err

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve did not return"
        self.agent.close()
        if self.error is not None:
            raise self.error


def test_port_eof_means_host_away_not_goodbye() -> None:
    a, b = socket.socketpair()
    chan = ch.Channel(a.detach())  # a virtio-serial port: EOF is not final
    b.close()
    before = time.monotonic()
    assert chan.read_ready() == [] and not chan.closed
    assert chan.paused_until > before
    assert not chan.mask(before) & select.EPOLLIN  # look again later...
    assert chan.mask(chan.paused_until) & select.EPOLLIN  # ...0.1 s on
    assert chan.paused_until == 0.0
    chan.close()


def test_port_channel_serves_until_shutdown(tmp_path: Path) -> None:
    host_sock, guest_sock = socket.socketpair()
    served = Served(ch.Channel(guest_sock.detach()), tmp_path)
    host = Host(host_sock)
    host.hello()
    assert isinstance(host.call("ping"), p.PingResult)
    assert host.call("shutdown") == p.Empty()
    served.join()
    host_sock.close()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def test_listener_takes_the_newest_connection(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(1)
    served = Served(ch.Channel(listener=listener), tmp_path)
    first = Host(_connect(tmp_path / "agent.sock"))
    assert first.hello()["protocol"] == p.PROTOCOL_VERSION
    assert isinstance(first.call("ping"), p.PingResult)
    second = Host(_connect(tmp_path / "agent.sock"))
    second.hello()
    first.wait_for(lambda: first.eof, "the first connection to close")
    assert len([e for e in second.events if e["event"] == "hello"]) == 1
    assert second.call("shutdown") == p.Empty()
    served.join()
    for host in (first, second):
        host.sock.close()


def test_flush_gives_up_on_a_peer_that_is_gone() -> None:
    a, b = socket.socketpair()
    chan = ch.socket_channel(a.detach())
    b.close()
    chan.send(b"x" * 100)
    chan.flush(TIMEOUT)  # EPIPE: returns at once instead of waiting out the timeout
    assert chan.out
    chan.close()
    assert chan.fd == -1
    ch.Channel().flush(TIMEOUT)  # nothing to write to: nothing to wait for


def test_guest_channel_opens_the_named_virtio_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = tmp_path / "vport0p1"
    os.mkfifo(port)
    monkeypatch.setattr(ch, "_cmdline", lambda: "console=ttyS0 quiet")
    monkeypatch.setattr(ch, "_find_port", lambda name: str(port) if name == p.PORT_NAME else None)
    chan = ch.guest_channel()
    assert chan.fd >= 0 and not chan.eof_closes and chan.listener is None
    chan.close()


def test_find_port_reads_virtio_port_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ch._find_port("org.example.none") is None or os.path.isdir("/sys/class/virtio-ports")
    assert isinstance(ch._cmdline(), str)
