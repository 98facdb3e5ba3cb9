"""Host-side stdio of container processes, in the monitor.

Output goes to the fds the caller gave (create's own stdio, or fds passed by
``exec``) through one writer thread per fd: a blocking write to a pipe nobody
drains must not stall the monitor, and the fds are never switched to
non-blocking mode (their open file descriptions may be shared with a shell).
Input is read when epoll says the fd is readable (regular files, which epoll
refuses, are just read).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import stat
import struct
import termios
import threading
import tty
from collections.abc import Awaitable, Callable

from vmpod.agent.client import AgentClient, ProcessSink


class FdWriter:
    """Ordered, blocking writes to ``fd`` from a thread; ``close`` flushes first."""

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd, self.owned = fd, owned
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"out-{fd}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        if data:
            self._q.put(data)

    def _run(self) -> None:
        broken = False
        while (data := self._q.get()) is not None:
            view = memoryview(data)
            while view and not broken:
                try:
                    view = view[os.write(self.fd, view):]
                except InterruptedError:
                    continue
                except BlockingIOError:
                    import select
                    select.select([], [self.fd], [], 1.0)
                except OSError:
                    broken = True   # reader gone (EPIPE) or fd unusable: drop output
        if self.owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def close(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)


def is_null(fd: int) -> bool:
    """True when ``fd`` is closed or /dev/null: the process gets no stdin."""
    try:
        st = os.fstat(fd)
    except OSError:
        return True
    if not stat.S_ISCHR(st.st_mode):
        return False
    return st.st_rdev == os.stat(os.devnull).st_rdev


def make_pty() -> tuple[int, int]:
    """(master, slave), the slave in raw mode: the guest's own pty does the line
    discipline (echo, ^C), the host pty only carries bytes."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_inheritable(master, False)
    os.set_inheritable(slave, False)
    return master, slave


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


async def watch_size(fd: int, resize: Callable[[int, int], Awaitable[None]],
                     interval: float = 0.2) -> None:
    """Forward the terminal size of ``fd`` whenever it changes (the monitor has no
    controlling terminal, so no SIGWINCH: poll, it is cheap)."""
    last: tuple[int, int] | None = None
    while True:
        size = window_size(fd)
        if size and size != last:
            last = size
            with contextlib.suppress(Exception):
                await resize(*size)
        await asyncio.sleep(interval)


async def _wait_readable(fd: int, done: asyncio.Future[object]) -> bool:
    """Wait until ``fd`` is readable (True) or ``done`` resolves (False)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await asyncio.wait({ready, done}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
    return ready.done()


def _pollable(fd: int) -> bool:
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


async def pump_input(fd: int, agent: AgentClient, stream: int, sink: ProcessSink,
                     *, eof_closes: bool = True) -> None:
    """Copy ``fd`` to the process's stdin until EOF (then close it) or the process ends.

    ``eof_closes`` False for a pty: EOF/EIO there means the other side went away,
    which must not end the process's input (docker keeps a -t container alive).
    """
    pollable = _pollable(fd)
    done: asyncio.Future[object] = sink.exited  # type: ignore[assignment]
    while not sink.exited.done():
        if pollable:
            try:
                if not await _wait_readable(fd, done):
                    return
            except (OSError, ValueError):
                pollable = False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""    # EIO: a pty whose other side closed; EBADF: gone
        if not data:
            if eof_closes and not sink.exited.done():
                with contextlib.suppress(Exception):
                    agent.close_stdin(stream)
            return
        try:
            await agent.write_stdin(stream, data)
        except Exception:
            return


def same_file(a: int, b: int) -> bool:
    """Whether two fds are the same open file (stdout and stderr often are)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
