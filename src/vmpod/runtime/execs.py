"""One ``exec`` in the monitor: stdio relayed to the caller's fds (or a new pty),
resize/signal requests read from the caller's connection, the exit status sent
back on it. A caller that goes away (killed) takes its process with it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from vmpod.errors import VmpodError
from vmpod.runtime import ipc
from vmpod.runtime.errors import RuntimeCliError
from vmpod.sandbox import Container, Output, Process
from vmpod.sandbox.attach import FdWriter, Relay, is_null, make_pty, same_file

log = logging.getLogger(__name__)


class ExecSession:
    def __init__(self, container: Container, conn: ipc.Conn, msg: dict[str, object], fds: list[int]) -> None:
        self.container, self.conn, self.msg, self.fds = container, conn, msg, fds
        self.relay = Relay()
        self.extra: list[int] = []  # fds we made (a pty slave)
        self.writer_fds: set[int] = set()  # closed by their writer
        self.ptys: list[int] = []

    async def run(self) -> None:
        try:
            process = self.msg.get("process")
            if not isinstance(process, dict):
                raise RuntimeCliError("exec needs a process object")
            output, stdin_fd = self._stdio(bool(process.get("terminal")))
            proc = await self.container.exec(process, output, stdin=stdin_fd >= 0)
            await self.conn.send({"ok": True})
        except (VmpodError, OSError, ValueError) as err:
            await self.conn.send({"ok": False, "error": str(err)})
            await self._cleanup()
            return
        if stdin_fd >= 0:
            self.relay.pump(stdin_fd, proc, eof_closes=stdin_fd not in self.ptys)
        for fd in self.ptys:
            self.relay.watch_size(fd, proc)
        self.relay.spawn(self._control(proc))
        message = ""
        try:
            ex = await proc.wait()
            status, message = ex.status, ex.message
        except VmpodError as err:
            log.debug("exec %d lost: %s", proc.stream, err)
            status = 128 + signal.SIGKILL
        await self.relay.close()  # output flushed before the exit event
        await self.conn.send({"event": "exit", "status": status, "message": message})
        await self._cleanup()

    def _stdio(self, tty: bool) -> tuple[Output, int]:
        """Where the output goes and the fd to pump into stdin (-1: none)."""
        fds = self.fds
        console = str(self.msg.get("console_socket") or "")
        if tty and console:
            master, slave = make_pty()
            self.extra.append(slave)
            try:
                ipc.send_console(console, master)
            finally:
                os.close(master)
            self.ptys = [slave]
            out = self._writer(os.dup(slave))
            return Output(out.write, out.write), slave
        if len(fds) != 3:
            raise RuntimeCliError("exec needs its stdio (3 fds) or a console socket")
        stdin = -1 if is_null(fds[0]) else fds[0]
        out = self._writer(fds[1])
        # with a tty (the caller's own terminal, no console socket) stderr joins stdout
        err = out if tty or same_file(fds[1], fds[2]) else self._writer(fds[2])
        return Output(out.write, err.write), stdin

    def _writer(self, fd: int) -> FdWriter:
        w = self.relay.writer(fd, owned=True)
        self.writer_fds.add(fd)
        return w

    async def _control(self, proc: Process) -> None:
        """resize/signal from the caller; its disconnection kills the process."""
        while True:
            got = await self.conn.recv()
            if got is None:
                if not proc.done:
                    log.debug("exec %d: caller gone, killing its process", proc.stream)
                    with contextlib.suppress(VmpodError):
                        await proc.signal(signal.SIGKILL)
                return
            msg, fds = got
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(VmpodError, ValueError, TypeError, KeyError):
                if msg.get("op") == "resize":
                    await proc.resize(_int(msg["rows"]), _int(msg["cols"]))
                elif msg.get("op") == "signal":
                    await proc.signal(_int(msg["signal"]))

    async def _cleanup(self) -> None:
        await self.relay.close()
        for fd in {*self.fds, *self.extra} - self.writer_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
