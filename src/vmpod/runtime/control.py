"""The monitor's control server: runtime commands reach a container's monitor on
``monitor.sock`` (see ``ipc``) and are dispatched to the session's operations.
An ``exec`` keeps its connection (resize, signal, the final exit event)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

from vmpod.errors import VmpodError
from vmpod.runtime import ipc
from vmpod.runtime.errors import RuntimeCliError

Msg = dict[str, object]
Op = Callable[[Msg], Awaitable[Msg]]
ExecOp = Callable[[ipc.Conn, Msg, list[int]], Awaitable[None]]


class ControlServer:
    def __init__(self, sock: socket.socket, ops: Mapping[str, Op], exec_op: ExecOp) -> None:
        self.sock, self.ops, self.exec_op = sock, ops, exec_op
        self.sock.setblocking(False)
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(self.sock)
                task = asyncio.ensure_future(self._handle(ipc.Conn(conn)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.sock.close()

    async def drain(self, timeout: float) -> None:
        """Let requests under way finish (their replies must not be lost when the
        monitor ends right after acting on them, e.g. a kill that ends the container)."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def _handle(self, conn: ipc.Conn) -> None:
        fds: list[int] = []
        try:
            got = await conn.recv()
            if got is None:
                return
            msg, fds = got
            op = str(msg.get("op"))
            if op == "exec":
                fds, mine = [], fds  # the exec session owns them now
                await self.exec_op(conn, msg, mine)
                return
            handler = self.ops.get(op)
            if handler is None:
                raise RuntimeCliError(f"unknown monitor operation {op!r}")
            await conn.send({"ok": True, **await handler(msg)})
        except (VmpodError, ValueError, OSError, KeyError, TypeError) as err:
            with contextlib.suppress(OSError):
                await conn.send({"ok": False, "error": str(err)})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
