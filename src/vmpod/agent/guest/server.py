"""The agent: one epoll loop multiplexing the host channel and every process's stdio.

``Agent`` wires the loop, the channel, the process table and the handlers;
``run_agent`` runs one in-process over a connected socket (unit tests), the
guest's ``main`` over virtio-serial or vsock. Standard library only.
"""

from __future__ import annotations

import os
import time

from vmpod.agent import protocol as p
from vmpod.agent.guest import gkernel
from vmpod.agent.guest.channel import Channel, socket_channel
from vmpod.agent.guest.handlers import Handlers
from vmpod.agent.guest.loop import EVENT_READ, EVENT_WRITE, Loop
from vmpod.agent.guest.procs import HIGH_WATER, ProcessTable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from vmpod.agent.guest.config import AgentConfig

    class HasFileno(Protocol):
        def fileno(self) -> int: ...


AGENT_VERSION = "0.1.0"
_FLUSH_TIMEOUT = 2.0  # after shutdown: how long the answer may take to leave


class Agent:
    """Serves the host on ``chan`` with the tools and paths of ``config``."""

    def __init__(self, chan: Channel, config: AgentConfig) -> None:
        self.chan = chan
        self.loop = Loop()
        self.procs = ProcessTable(self.loop, chan)
        self.handlers = Handlers(config, self.procs, chan, self.stop)
        self.running = True

    def stop(self) -> None:
        """Leave ``serve`` once the current batch of events is handled."""
        self.running = False

    def serve(self) -> None:
        """Until ``stop`` (then the queued output is flushed) or the channel closes."""
        if self.chan.listener is not None:
            self.loop.want(self.chan.listener.fileno(), EVENT_READ, lambda _f, _m: self._accept())
        else:
            self._hello()
        while self.running and not self.chan.closed:
            self._update_interest()
            self.loop.poll(self._timeout())
            self.procs.after_poll()
        if not self.running:
            self.chan.flush(_FLUSH_TIMEOUT)

    def close(self) -> None:
        """Kill and reap what still runs, close every fd the agent holds."""
        self.procs.close()
        self.loop.close()
        self.chan.close()

    def _accept(self) -> None:
        if self.chan.fd >= 0:
            self.loop.forget(self.chan.fd)
        self.chan.accept()
        self.loop.want(self.chan.fd, EVENT_READ, self._on_channel)
        self._hello()

    def _hello(self) -> None:
        hello = p.Hello(
            protocol=p.PROTOCOL_VERSION,
            agent_version=AGENT_VERSION,
            kernel=os.uname().release,
            uptime=gkernel.uptime(),
        )
        self.chan.send(p.encode_json(p.EVENT, 0, {"event": "hello", **p.encode(hello)}))

    def _on_channel(self, fd: int, mask: int) -> None:
        if mask & EVENT_WRITE and self.chan.out:
            self.chan.write_ready()
        if mask & EVENT_READ:
            for kind, stream, payload in self.chan.read_ready():
                if kind == p.REQUEST:
                    self.handlers.dispatch(payload)
                elif kind == p.STDIN:
                    self.procs.on_stdin(stream, payload)
                # anything else the host sends is not for the guest: ignored
            if self.chan.rehello:  # the host went away: greet the next one
                self.chan.rehello = False
                self._hello()

    def _update_interest(self) -> None:
        if self.chan.fd >= 0:
            self.loop.want(self.chan.fd, self.chan.mask(time.monotonic()), self._on_channel)
        self.procs.update_interest(len(self.chan.out) > HIGH_WATER)

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = self.procs.deadlines(now)
        if self.chan.paused_until:
            deadlines.append(self.chan.paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else None


def run_agent(sock_or_fd: int | HasFileno, config: AgentConfig) -> None:
    """Serve the host on a connected stream socket; blocking.

    Returns when the host closes its end or after ``shutdown``; then every
    process the agent started is killed and reaped. Works in any thread and
    without being PID 1. The caller keeps its socket: the agent works on a
    duplicate (which makes the shared file description non-blocking).
    """
    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    agent = Agent(socket_channel(os.dup(fd)), config)
    try:
        agent.serve()
    finally:
        agent.close()
