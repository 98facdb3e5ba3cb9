"""One process in a sandbox (a container's init or an exec), as the host sees it:
its stdio stream, its exit, and the requests that act on it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, ProcessSink
from vmpod.errors import AgentError, ProtocolError, VmpodError


@dataclass(frozen=True)
class Output:
    """Where a process's output goes: called with each chunk, in order."""

    stdout: Callable[[bytes], None]
    stderr: Callable[[bytes], None]


@dataclass(frozen=True)
class Exit:
    """How a process ended: shell convention (128+N for signal N, 127 not found)."""

    status: int
    message: str = ""  # why it failed to start, when it did


class Process:
    """Handle on one process; ``wait`` explains a lost VM instead of a lost channel."""

    def __init__(
        self,
        agent: AgentClient,
        stream: int,
        sink: ProcessSink,
        explain: Callable[[], Awaitable[VmpodError | None]],
    ) -> None:
        self._agent = agent
        self.stream = stream
        self._sink = sink
        self._explain = explain
        # False when the guest runtime failed before the process ran (its exit then
        # carries the runtime's message); known for a start that waited for it
        self.started = True

    @property
    def done(self) -> bool:
        return self._sink.exited.done()

    def result(self) -> Exit | None:
        """The exit, if the process ended normally (None while running or if lost)."""
        f = self._sink.exited
        if not f.done() or f.cancelled() or f.exception() is not None:
            return None
        ev = f.result()
        return Exit(ev.status, ev.message)

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        self._sink.exited.add_done_callback(lambda _f: fn())

    async def wait(self) -> Exit:
        """The exit; raises (VM failure if the VM died) when the channel was lost."""
        try:
            ev = await asyncio.shield(self._sink.exited)
        except AgentError as err:
            if isinstance(err, ProtocolError):
                raise  # the guest broke the protocol: the VM did not die, nothing to explain
            failure = await self._explain()
            if failure is not None:
                raise failure from err
            raise
        return Exit(ev.status, ev.message)

    async def signal(self, sig: int) -> None:
        await self._agent.signal(p.SignalProcess(stream=self.stream, signal=int(sig)))

    async def resize(self, rows: int, cols: int) -> None:
        await self._agent.resize(p.ResizeTty(stream=self.stream, rows=rows, cols=cols))

    async def write(self, data: bytes) -> None:
        """Feed stdin (waits for the guest's credit window)."""
        await self._agent.write_stdin(self.stream, data)

    def close_stdin(self) -> None:
        self._agent.close_stdin(self.stream)
