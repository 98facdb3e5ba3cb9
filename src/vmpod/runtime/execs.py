"""One ``exec`` in the monitor: stdio relayed to the caller's fds (or a new pty),
resize/signal requests read from the caller's connection, the exit status sent
back on it. A caller that goes away (killed) takes its process with it."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

from vmpod.agent.client import ProcessSink
from vmpod.errors import VmpodError
from vmpod.runtime import ipc, relay
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.state import PAUSED, RUNNING

if TYPE_CHECKING:
    from vmpod.runtime.monitor import Monitor

log = logging.getLogger(__name__)


class ExecSession:
    def __init__(self, mon: Monitor, conn: ipc.Conn, msg: dict[str, object],
                 fds: list[int]) -> None:
        self.mon, self.conn, self.msg, self.fds = mon, conn, msg, fds
        self.writers: list[relay.FdWriter] = []
        self.tasks: list[asyncio.Task[object]] = []
        self.stream = 0
        self.extra: list[int] = []          # fds we made (a pty slave)
        self.writer_fds: set[int] = set()   # closed by their writer
        self.ptys: list[int] = []

    async def run(self) -> None:
        try:
            if self.mon.status == PAUSED:
                raise RuntimeCliError("cannot exec in a paused container")
            if self.mon.status != RUNNING or self.mon.container is None:
                raise RuntimeCliError("cannot exec in a container that is not running")
            process = self.msg.get("process")
            if not isinstance(process, dict):
                raise RuntimeCliError("exec needs a process object")
            sink, stdin_fd = self._stdio(bool(process.get("terminal")))
            container = self.mon.container
            self.stream = await container.exec(process, sink, stdin=stdin_fd >= 0)
            self.mon.execs[self.stream] = sink
            await self.conn.send({"ok": True})
        except (VmpodError, OSError, ValueError) as err:
            await self.conn.send({"ok": False, "error": str(err)})
            await self._cleanup()
            return
        agent = container.sandbox.agent
        if stdin_fd >= 0:
            self.tasks.append(asyncio.ensure_future(relay.pump_input(
                stdin_fd, agent, self.stream, sink, eof_closes=stdin_fd not in self.ptys)))
        for fd in self.ptys:
            self.tasks.append(asyncio.ensure_future(relay.watch_size(
                fd, lambda r, c: container.resize(self.stream, r, c))))
        self.tasks.append(asyncio.ensure_future(self._control(sink)))
        message = ""
        try:
            ev = await sink.exited
            status, message = ev.status, ev.message
        except VmpodError as err:
            log.debug("exec %d lost: %s", self.stream, err)
            status = 128 + signal.SIGKILL
        for w in self.writers:
            await asyncio.get_running_loop().run_in_executor(None, w.close)
        self.writers = []
        await self.conn.send({"event": "exit", "status": status, "message": message})
        self.mon.execs.pop(self.stream, None)
        await self._cleanup()

    def _stdio(self, tty: bool) -> tuple[ProcessSink, int]:
        """Sink for the output and the fd to pump into stdin (-1: none)."""
        fds = self.fds
        console = str(self.msg.get("console_socket") or "")
        if tty and console:
            master, slave = relay.make_pty()
            self.extra.append(slave)
            try:
                ipc.send_console(console, master)
            finally:
                os.close(master)
            self.ptys = [slave]
            out = self._writer(os.dup(slave))
            return ProcessSink(on_stdout=out.write, on_stderr=out.write), slave
        if len(fds) != 3:
            raise RuntimeCliError("exec needs its stdio (3 fds) or a console socket")
        stdin = -1 if relay.is_null(fds[0]) else fds[0]
        out = self._writer(fds[1])
        # with a tty (the caller's own terminal, no console socket) stderr joins stdout
        err = out if tty or relay.same_file(fds[1], fds[2]) else self._writer(fds[2])
        return ProcessSink(on_stdout=out.write, on_stderr=err.write), stdin

    def _writer(self, fd: int) -> relay.FdWriter:
        w = relay.FdWriter(fd, owned=True)
        self.writers.append(w)
        self.writer_fds.add(fd)
        return w

    async def _control(self, sink: ProcessSink) -> None:
        """resize/signal from the caller; its disconnection kills the process."""
        container = self.mon.container
        assert container is not None
        while True:
            got = await self.conn.recv()
            if got is None:
                if not sink.exited.done():
                    log.debug("exec %d: caller gone, killing its process", self.stream)
                    with contextlib.suppress(VmpodError):
                        await container.signal(self.stream, signal.SIGKILL)
                return
            msg, fds = got
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(VmpodError, ValueError, TypeError):
                if msg.get("op") == "resize":
                    await container.resize(self.stream, int(msg["rows"]),  # type: ignore[call-overload]
                                           int(msg["cols"]))  # type: ignore[call-overload]
                elif msg.get("op") == "signal":
                    await container.signal(self.stream, int(msg["signal"]))  # type: ignore[call-overload]

    async def _cleanup(self) -> None:
        # Tasks first: a pump must drop its epoll registration before its fd is closed.
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        for fd in {*self.fds, *self.extra} - self.writer_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
