"""Host-side stdio of sandbox processes, for every front end (``vmpod run``, the
runtime's monitor and its exec sessions): output writers, stdin pump, terminal
raw mode and size, and signal forwarding with a grace-period kill.

Output goes through one writer thread per fd: a blocking write to a pipe nobody
drains must not stall the event loop, and fds are never switched to
non-blocking mode (their open file descriptions may be shared with a shell).
Input is read when epoll says the fd is readable (regular files, which epoll
refuses, are just read).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import queue
import select
import signal
import stat
import struct
import sys
import termios
import threading
import tty
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager

from vmpod.errors import VmpodError
from vmpod.sandbox.process import Process
from vmpod.signals import FORWARDED, STOP_SIGNALS

__all__ = [
    "FORWARDED",
    "STOP_SIGNALS",
    "FdWriter",
    "Relay",
    "SignalForwarder",
    "is_null",
    "make_pty",
    "on_reader_gone",
    "SIGPIPE_STATUS",
    "pump_input",
    "raw_terminal",
    "same_file",
    "watch_size",
    "window_size",
]

log = logging.getLogger(__name__)


class FdWriter:
    """Ordered, blocking writes to ``fd`` from a thread; ``close`` flushes first.

    A reader that went away (EPIPE) or an unusable fd drops further output;
    ``broken`` tells, and ``on_broken`` (called once, from the writer thread, with
    the error) lets the owner react: ``vmpod run`` stops its container on EPIPE as
    a process would die of SIGPIPE."""

    def __init__(self, fd: int, *, owned: bool, on_broken: Callable[[OSError], None] | None = None) -> None:
        self.fd, self.owned = fd, owned
        self.broken = False
        self._on_broken = on_broken
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"out-{fd}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        if data:
            self._q.put(data)

    def _run(self) -> None:
        while (data := self._q.get()) is not None:
            view = memoryview(data)
            while view and not self.broken:
                try:
                    view = view[os.write(self.fd, view) :]
                except InterruptedError:
                    continue
                except BlockingIOError:
                    select.select([], [self.fd], [], 1.0)
                except OSError as err:
                    self.broken = True
                    if self._on_broken is not None:
                        self._on_broken(err)
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


def same_file(a: int, b: int) -> bool:
    """Whether two fds are the same open file (stdout and stderr often are)."""
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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


@contextmanager
def raw_terminal(fd: int = 0) -> Iterator[None]:
    """Raw mode on a real terminal (``-it``); always restored."""
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


async def watch_size(fd: int, resize: Callable[[int, int], Awaitable[None]], interval: float = 0.2) -> None:
    """Forward the terminal size of ``fd`` whenever it changes. Polling works with
    or without a controlling terminal (the monitor has none, so no SIGWINCH)."""
    last: tuple[int, int] | None = None
    while True:
        size = window_size(fd)
        if size and size != last:
            with contextlib.suppress(VmpodError):
                await resize(*size)
                last = size  # (a refused size is tried again on the next poll)
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


def _done_future(process: Process) -> asyncio.Future[object]:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    process.add_done_callback(lambda: None if fut.done() else fut.set_result(None))
    return fut


async def pump_input(fd: int, process: Process, *, eof_closes: bool = True) -> None:
    """Copy ``fd`` to the process's stdin until EOF (then close it) or the process ends.

    ``eof_closes`` False for a pty: EOF/EIO there means the other side went away,
    which must not end the process's input (docker keeps a -t container alive).
    """
    pollable = _pollable(fd)
    done = _done_future(process)
    while not process.done:
        if pollable:
            try:
                if not await _wait_readable(fd, done):
                    return
            except (OSError, ValueError):
                pollable = False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            if not pollable:  # a non-blocking fd epoll cannot watch: do not spin
                await asyncio.sleep(0.05)
            continue
        except OSError:
            data = b""  # EIO: a pty whose other side closed; EBADF: gone
        if not data:
            if eof_closes and not process.done:
                with contextlib.suppress(VmpodError):
                    process.close_stdin()
            return
        try:
            await process.write(data)
        except VmpodError:
            return


class SignalForwarder:
    """Passes the signals we receive on to ``process``.

    With a ``grace`` period (``vmpod run``), the first signal is forwarded and, if
    the process has not ended ``grace`` seconds later — or on a second signal — it
    is killed; if even SIGKILL cannot end it within ``grace`` (a hung or frozen
    guest does not answer), ``unresponsive`` resolves and the front end ends
    without it (its sandbox's teardown kills the VM): the front end always ends.
    Without a grace (the runtime's monitor, which podman and containerd signal
    on the user's behalf) every signal is just forwarded, as runc's signal proxy
    does.
    """

    def __init__(
        self, process: Process, signals: tuple[int, ...] = FORWARDED, grace: float | None = None
    ) -> None:
        self.process, self.signals, self.grace = process, signals, grace
        self.count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.unresponsive: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __enter__(self) -> SignalForwarder:
        loop = asyncio.get_running_loop()
        try:
            for sig in self.signals:
                loop.add_signal_handler(sig, self._spawn, sig)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.signals:
            loop.remove_signal_handler(sig)
        for task in self._tasks:
            task.cancel()

    def _spawn(self, sig: int) -> None:
        task = asyncio.ensure_future(self.forward(sig))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def forward(self, sig: int) -> None:
        self.count += 1
        if self.grace is None:
            await self._send(sig)
            return
        if self.count == 1:
            await self._within_grace(self._send(sig))
            await asyncio.sleep(self.grace)
        if not self.process.done:  # the grace ran out, or a second signal
            await self._within_grace(self._send(signal.SIGKILL))
            await asyncio.sleep(self.grace)
            if not self.process.done and not self.unresponsive.done():
                self.unresponsive.set_result(None)

    async def _send(self, sig: int) -> None:
        try:
            await self.process.signal(sig)
        except VmpodError as err:
            log.debug("signal %d not forwarded: %s", sig, err)

    async def _within_grace(self, call: Awaitable[None]) -> None:
        """A signal the agent must take within the grace (a hung guest never answers).
        (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
        that arrives as the call completes.)"""
        assert self.grace is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await call


# How a container ends whose output's reader went away: as a writer killed by SIGPIPE.
SIGPIPE_STATUS = 128 + signal.SIGPIPE


def on_reader_gone(gone: asyncio.Future[None]) -> Callable[[OSError], None]:
    """An ``on_broken`` for writers that resolves ``gone`` (in its loop) when the
    fd's reader went away (EPIPE); other write errors just drop output."""
    loop = gone.get_loop()

    def resolve() -> None:
        if not gone.done():
            gone.set_result(None)

    def broken(err: OSError) -> None:
        if err.errno == errno.EPIPE:
            # a writer still flushing after the loop closed: nobody waits any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve)

    return broken


class Relay:
    """The tasks that serve one attached process (stdin pump, size watch); ``close``
    ends them and flushes the writers, in that order."""

    def __init__(self) -> None:
        self.writers: list[FdWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    def writer(self, fd: int, *, owned: bool, on_broken: Callable[[OSError], None] | None = None) -> FdWriter:
        w = FdWriter(fd, owned=owned, on_broken=on_broken)
        self.writers.append(w)
        return w

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def pump(self, fd: int, process: Process, *, eof_closes: bool = True) -> None:
        self.spawn(pump_input(fd, process, eof_closes=eof_closes))

    def watch_size(self, fd: int, process: Process) -> None:
        self.spawn(watch_size(fd, process.resize))

    async def close(self) -> None:
        # Tasks first: a pump must drop its epoll registration before its fd is closed.
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        loop = asyncio.get_running_loop()
        for w in self.writers:
            await loop.run_in_executor(None, w.close)
        self.writers = []
