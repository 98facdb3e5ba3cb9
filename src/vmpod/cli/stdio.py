"""Host-side stdio for one attached process: output to our fds, stdin pump,
terminal raw mode and window size."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def writer(fd: int) -> Callable[[bytes], None]:
    """Blocking full write to ``fd``; a closed reader (EPIPE) drops output quietly."""
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except OSError as err:
                if err.errno == errno.EPIPE:
                    return
                raise
            view = view[n:]
    return write


def stdin_reader(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[bytes]:
    """Chunks of our stdin (b"" at EOF). A daemon thread works for ttys, pipes and
    regular files alike (epoll refuses regular files) and never blocks exit."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)

    def pump() -> None:
        while True:
            try:
                data = os.read(0, 1 << 16)
            except OSError:
                data = b""
            fut = asyncio.run_coroutine_threadsafe(queue.put(data), loop)
            try:
                fut.result()
            except Exception:
                return
            if not data:
                return

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue


def window_size(fd: int = 1) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


@contextmanager
def raw_terminal(fd: int = 0) -> Iterator[None]:
    """Raw mode for -t on a real terminal; always restored."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.flush()
