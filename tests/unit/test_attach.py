"""Host-side stdio of a sandbox process (sandbox/attach.py) against a fake process:
output writers, stdin pump, terminal helpers, signal forwarding, the relay."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TypeVar

import pytest

from vmpod.errors import AgentError
from vmpod.sandbox.attach import (
    FdWriter,
    Relay,
    SignalForwarder,
    is_null,
    make_pty,
    pump_input,
    raw_terminal,
    same_file,
    watch_size,
    window_size,
)
from vmpod.sandbox.process import Process

TIMEOUT = 2.0
T = TypeVar("T")


class FakeProcess(Process):
    """What attach drives, without an agent: records every request; ``failures``
    makes the next N calls of a method raise AgentError; a signal in ``die_on``
    ends the process."""

    def __init__(self) -> None:  # no agent: Process.__init__ is deliberately skipped
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Event()
        self.signals: list[int] = []
        self.resizes: list[tuple[int, int]] = []
        self.written = bytearray()
        self.stdin_closed = 0
        self.calls: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.die_on: set[int] = set()

    @property
    def done(self) -> bool:
        return self.exited.done()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        self.exited.add_done_callback(lambda _f: fn())

    def finish(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        self.changed.set()

    def _call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.changed.set()
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise AgentError(f"{name} failed (fake)")

    async def signal(self, sig: int) -> None:
        self._call("signal")
        self.signals.append(sig)
        if sig in self.die_on:
            self.finish()

    async def resize(self, rows: int, cols: int) -> None:
        self._call("resize")
        self.resizes.append((rows, cols))

    async def write(self, data: bytes) -> None:
        self._call("write")
        self.written += data

    def close_stdin(self) -> None:
        self._call("close_stdin")
        self.stdin_closed += 1


def run(coro: Coroutine[object, object, T]) -> T:
    """One event loop per test; nothing may take longer than a few seconds."""
    return asyncio.run(asyncio.wait_for(coro, 3 * TIMEOUT))


async def until(proc: FakeProcess, pred: Callable[[], bool]) -> None:
    """Wait (bounded) until ``pred`` holds; re-checked whenever ``proc`` records something."""
    async with asyncio.timeout(TIMEOUT):
        while not pred():
            proc.changed.clear()
            await proc.changed.wait()


async def settle(n: int = 5) -> None:
    """Let every ready callback and task run a few loop iterations."""
    for _ in range(n):
        await asyncio.sleep(0)


def drain(fd: int) -> Callable[[], bytes]:
    """Read ``fd`` to EOF in a thread (then close it); the returned call joins and
    gives everything read."""
    chunks: list[bytes] = []

    def read_all() -> None:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        os.close(fd)

    t = threading.Thread(target=read_all, daemon=True)
    t.start()

    def result() -> bytes:
        t.join(TIMEOUT)
        assert not t.is_alive(), "reader did not see EOF"
        return b"".join(chunks)

    return result


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def closed_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def wait_for_thread(pred: Callable[[], bool]) -> None:
    """Poll a condition another thread makes true (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


# ---------------------------------------------------------------- FdWriter


def test_writer_keeps_order_and_flushes_on_close() -> None:
    r, w = os.pipe()
    result = drain(r)
    writer = FdWriter(w, owned=True)
    chunks = [f"{i:05d}|".encode() * (i % 7 + 1) for i in range(2000)]
    chunks.append(b"x" * 300_000)  # larger than the pipe: several os.write calls
    for c in chunks:
        writer.write(c)
        writer.write(b"")  # empty writes are dropped, not an end marker
    writer.close()
    assert result() == b"".join(chunks)
    assert writer.broken is False
    assert not is_open(w)


def test_writer_reader_gone_is_broken_not_fatal() -> None:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's default
    r, w = os.pipe()
    os.close(r)
    writer = FdWriter(w, owned=True)
    writer.write(b"nobody listens")
    writer.write(b"still nobody")
    writer.close()
    assert writer.broken is True  # EPIPE, no exception, and we are still alive
    assert not is_open(w)


def test_writer_unowned_fd_stays_open() -> None:
    r, w = os.pipe()
    try:
        writer = FdWriter(w, owned=False)
        writer.write(b"hello")
        writer.close()
        assert is_open(w)
        assert os.read(r, 100) == b"hello"
    finally:
        os.close(r)
        os.close(w)


def test_writer_bad_fd_is_broken() -> None:
    writer = FdWriter(closed_fd(), owned=True)
    writer.write(b"x")
    writer.close()
    assert writer.broken is True


def test_writer_full_pipe_does_not_block_the_loop() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        writer = FdWriter(w, owned=True)
        payload = bytes(range(256)) * 4096  # 1 MiB: 16 times the pipe
        t0 = time.monotonic()
        writer.write(payload)
        writer.write(b"end")
        ticked: asyncio.Future[None] = loop.create_future()
        loop.call_soon(ticked.set_result, None)
        await ticked  # the loop runs while nobody reads
        assert time.monotonic() - t0 < 0.5
        result = drain(r)
        await loop.run_in_executor(None, writer.close)
        assert result() == payload + b"end"

    run(body())


def test_writer_nonblocking_fd_waits_for_room() -> None:
    # The fd's open file description may be non-blocking (shared with a shell):
    # EAGAIN must wait for room, not drop output.
    r, w = os.pipe()
    os.set_blocking(w, False)
    capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    writer = FdWriter(w, owned=True)
    payload = os.urandom(3 * capacity)
    writer.write(payload)

    def queued() -> int:
        return int(struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0])

    wait_for_thread(lambda: queued() == capacity)  # full: the next write gets EAGAIN
    result = drain(r)
    writer.close()
    assert result() == payload
    assert writer.broken is False


# ------------------------------------------------------- fd and tty helpers


def test_is_null(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    null = os.open(os.devnull, os.O_RDONLY)
    zero = os.open("/dev/zero", os.O_RDONLY)
    reg = os.open(f, os.O_RDONLY)
    r, w = os.pipe()
    try:
        assert is_null(null) is True
        assert is_null(closed_fd()) is True
        assert is_null(r) is False
        assert is_null(reg) is False
        assert is_null(zero) is False  # a character device, but not null
    finally:
        for fd in (null, zero, reg, r, w):
            os.close(fd)


def test_same_file() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    dup = os.dup(w1)
    try:
        assert same_file(w1, dup) is True
        assert same_file(w1, w1) is True
        assert same_file(w1, w2) is False
        assert same_file(r1, w1) is True  # both ends: one pipe inode
        assert same_file(w1, closed_fd()) is False
    finally:
        for fd in (r1, w1, r2, w2, dup):
            os.close(fd)


def test_make_pty_is_raw_and_not_inheritable() -> None:
    master, slave = make_pty()
    try:
        assert os.isatty(slave)
        assert not os.get_inheritable(master)
        assert not os.get_inheritable(slave)
        lflag = termios.tcgetattr(slave)[3]
        assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        os.write(slave, b"a\nb")  # no output processing: \n stays \n
        assert os.read(master, 100) == b"a\nb"
    finally:
        os.close(master)
        os.close(slave)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_window_size() -> None:
    master, slave = make_pty()
    r, w = os.pipe()
    try:
        assert window_size(slave) is None  # a fresh pty is 0x0: unknown
        set_size(slave, 40, 120)
        assert window_size(slave) == (40, 120)
        assert window_size(master) == (40, 120)
        assert window_size(r) is None  # not a tty
        assert window_size(closed_fd()) is None
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


def test_raw_terminal_restores_attributes() -> None:
    master, slave = os.openpty()  # a cooked terminal
    try:
        saved = termios.tcgetattr(slave)
        assert saved[3] & termios.ICANON
        with raw_terminal(slave):
            assert termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO) == 0
        assert termios.tcgetattr(slave) == saved
        with pytest.raises(RuntimeError), raw_terminal(slave):
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == saved
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_on_a_pipe_is_a_no_op() -> None:
    r, w = os.pipe()
    try:
        with raw_terminal(r):
            pass
        assert is_open(r)
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------- watch_size


def test_watch_size_forwards_each_change_once_and_survives_errors() -> None:
    async def body() -> None:
        proc = FakeProcess()
        master, slave = make_pty()
        task = asyncio.ensure_future(watch_size(slave, proc.resize, interval=0))
        try:
            await settle(20)  # 0x0: nothing to tell
            assert proc.calls.get("resize", 0) == 0
            set_size(slave, 24, 80)
            await until(proc, lambda: proc.resizes == [(24, 80)])
            await settle(20)  # many polls, one unchanged size
            assert proc.resizes == [(24, 80)]  # once per change, not once per poll
            proc.failures["resize"] = 1
            set_size(master, 30, 100)
            await until(proc, lambda: proc.calls["resize"] == 2)
            await settle(20)
            assert not task.done()  # the agent's refusal is not fatal
            set_size(slave, 40, 120)
            await until(proc, lambda: proc.resizes[-1:] == [(40, 120)])
            assert proc.resizes.count((24, 80)) == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            os.close(master)
            os.close(slave)

    run(body())


# ---------------------------------------------------------------- pump_input


def test_pump_pipe_copies_then_closes_stdin_on_eof() -> None:
    async def body() -> None:
        proc = FakeProcess()
        r, w = os.pipe()
        task = asyncio.ensure_future(pump_input(r, proc))
        try:
            os.write(w, b"hello")
            await until(proc, lambda: proc.written == b"hello")
            assert proc.stdin_closed == 0
            os.write(w, b" world")
            await until(proc, lambda: proc.written == b"hello world")
            os.close(w)
            await asyncio.wait_for(task, TIMEOUT)
            assert proc.stdin_closed == 1
            assert asyncio.get_running_loop().remove_reader(r) is False  # unregistered
        finally:
            os.close(r)

    run(body())


def test_pump_regular_file(tmp_path: Path) -> None:
    data = os.urandom(200_000)  # several reads
    (tmp_path / "in").write_bytes(data)

    async def body() -> None:
        proc = FakeProcess()
        fd = os.open(tmp_path / "in", os.O_RDONLY)
        try:
            await pump_input(fd, proc)
        finally:
            os.close(fd)
        assert bytes(proc.written) == data
        assert proc.stdin_closed == 1

    run(body())


@pytest.mark.parametrize("path", [os.devnull, None], ids=["dev-null", "closed-fd"])
def test_pump_unpollable_or_gone_fd_is_eof(path: str | None) -> None:
    # /dev/null is a character device epoll refuses; a closed fd reads EBADF.
    async def body() -> None:
        proc = FakeProcess()
        fd = os.open(path, os.O_RDONLY) if path else closed_fd()
        try:
            await pump_input(fd, proc)
        finally:
            if path:
                os.close(fd)
        assert proc.written == b"" and proc.stdin_closed == 1

    run(body())


def test_pump_eof_without_closing_stdin() -> None:
    async def body() -> None:
        proc = FakeProcess()
        r, w = os.pipe()
        task = asyncio.ensure_future(pump_input(r, proc, eof_closes=False))
        os.write(w, b"data")
        await until(proc, lambda: proc.written == b"data")
        os.close(w)
        await asyncio.wait_for(task, TIMEOUT)
        os.close(r)
        assert proc.stdin_closed == 0

    run(body())


def test_pump_pty_whose_other_side_closed() -> None:
    # EIO on the master once the slave is gone: the pump ends, stdin stays open.
    async def body() -> None:
        proc = FakeProcess()
        master, slave = make_pty()
        os.close(slave)
        try:
            await asyncio.wait_for(pump_input(master, proc, eof_closes=False), TIMEOUT)
        finally:
            os.close(master)
        assert proc.written == b"" and proc.stdin_closed == 0

    run(body())


def test_pump_stops_when_the_process_ends_while_idle() -> None:
    async def body() -> None:
        proc = FakeProcess()
        r, w = os.pipe()
        task = asyncio.ensure_future(pump_input(r, proc))
        await settle()  # the pump now waits for input
        assert not task.done()
        proc.finish()
        await asyncio.wait_for(task, TIMEOUT)
        assert proc.calls == {}  # nothing written, stdin not closed
        assert asyncio.get_running_loop().remove_reader(r) is False
        os.close(r)
        os.close(w)

    run(body())


def test_pump_does_nothing_for_an_ended_process() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.finish()
        r, w = os.pipe()
        os.write(w, b"unread")
        await pump_input(r, proc)
        assert proc.calls == {}
        assert os.read(r, 100) == b"unread"
        os.close(r)
        os.close(w)

    run(body())


def test_pump_eof_after_the_process_ended_leaves_stdin_alone() -> None:
    async def body() -> None:
        proc = FakeProcess()
        r, w = os.pipe()
        task = asyncio.ensure_future(pump_input(r, proc))
        await settle()
        os.close(w)  # EOF and exit in the same iteration
        proc.finish()
        await asyncio.wait_for(task, TIMEOUT)
        assert proc.stdin_closed == 0
        os.close(r)

    run(body())


def test_pump_stops_when_write_fails() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.failures["write"] = 1
        r, w = os.pipe()
        task = asyncio.ensure_future(pump_input(r, proc))
        os.write(w, b"lost")
        await asyncio.wait_for(task, TIMEOUT)
        assert proc.calls == {"write": 1} and proc.written == b""
        assert proc.stdin_closed == 0
        os.close(r)
        os.close(w)

    run(body())


def test_pump_close_stdin_failure_is_ignored() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.failures["close_stdin"] = 1
        r, w = os.pipe()
        os.close(w)
        await asyncio.wait_for(pump_input(r, proc), TIMEOUT)
        assert proc.calls == {"close_stdin": 1}
        os.close(r)

    run(body())


def test_pump_survives_a_wakeup_without_data() -> None:
    # Another reader of the same open file (a shell sharing the tty) takes the input
    # first: the pump's non-blocking read gets EAGAIN and waits again.
    async def body() -> None:
        loop = asyncio.get_running_loop()
        proc = FakeProcess()
        r, w = os.pipe()
        os.set_blocking(r, False)
        thief = os.dup(r)
        stolen = bytearray()
        taken = asyncio.Event()

        def steal() -> None:
            stolen.extend(os.read(thief, 65536))
            taken.set()

        loop.add_reader(thief, steal)
        task = asyncio.ensure_future(pump_input(r, proc))
        try:
            await settle()
            os.write(w, b"first")
            await asyncio.wait_for(taken.wait(), TIMEOUT)
            await settle()
            loop.remove_reader(thief)
            assert stolen == b"first" and not task.done() and proc.written == b""
            os.write(w, b"second")
            await until(proc, lambda: proc.written == b"second")
            os.close(w)
            await asyncio.wait_for(task, TIMEOUT)
            assert proc.stdin_closed == 1
        finally:
            loop.remove_reader(thief)
            os.close(thief)
            os.close(r)

    run(body())


# ------------------------------------------------------------ SignalForwarder


def test_forwarder_without_grace_forwards_every_signal() -> None:
    sigs = (signal.SIGUSR1, signal.SIGTERM)

    async def body() -> None:
        proc = FakeProcess()
        loop = asyncio.get_running_loop()
        with SignalForwarder(proc, sigs) as fwd:
            assert all(signal.getsignal(s) != signal.SIG_DFL for s in sigs)
            os.kill(os.getpid(), signal.SIGUSR1)
            await until(proc, lambda: proc.signals == [signal.SIGUSR1])
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
            await until(proc, lambda: len(proc.signals) == 3)
            await settle()
            assert fwd.count == 3
        assert sorted(proc.signals) == sorted([signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM])
        assert signal.SIGKILL not in proc.signals
        # handlers removed on exit: the default disposition is back
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in sigs)
        assert not any(loop.remove_signal_handler(s) for s in sigs)

    run(body())


def test_forwarder_grace_runs_out_then_kills() -> None:
    async def body() -> None:
        proc = FakeProcess()
        t0 = time.monotonic()
        with SignalForwarder(proc, (signal.SIGTERM,), grace=0.05):
            os.kill(os.getpid(), signal.SIGTERM)
            await until(proc, lambda: proc.signals == [signal.SIGTERM, signal.SIGKILL])
        assert time.monotonic() - t0 >= 0.05
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    run(body())


def test_forwarder_second_signal_kills_at_once() -> None:
    async def body() -> None:
        proc = FakeProcess()
        before = asyncio.all_tasks()
        with SignalForwarder(proc, (signal.SIGUSR1, signal.SIGUSR2), grace=60):
            os.kill(os.getpid(), signal.SIGUSR1)
            await until(proc, lambda: proc.signals == [signal.SIGUSR1])
            os.kill(os.getpid(), signal.SIGUSR2)
            await until(proc, lambda: proc.signals == [signal.SIGUSR1, signal.SIGKILL])
            pending = asyncio.all_tasks() - before
            assert len(pending) == 2  # the first signal's grace timer, the kill's
        # leaving cancels the grace timers: no second SIGKILL later
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert proc.signals == [signal.SIGUSR1, signal.SIGKILL]

    run(body())


def test_forwarder_no_kill_when_the_process_ends_within_grace() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.die_on.add(signal.SIGTERM)
        fwd = SignalForwarder(proc, (signal.SIGTERM,), grace=0.01)
        await asyncio.wait_for(fwd.forward(signal.SIGTERM), TIMEOUT)
        assert proc.signals == [signal.SIGTERM]

    run(body())


def test_forwarder_agent_error_is_not_raised() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.failures["signal"] = 2
        fwd = SignalForwarder(proc, (signal.SIGTERM,), grace=0.01)
        await fwd.forward(signal.SIGTERM)  # forwarding fails, then the kill after the grace
        assert fwd.count == 1 and proc.calls == {"signal": 2} and proc.signals == []
        assert fwd.unresponsive.done()  # not even SIGKILL got through
        await fwd.forward(signal.SIGTERM)  # a second signal: SIGKILL at once (it works now)
        assert fwd.count == 2 and proc.signals == [signal.SIGKILL]

    run(body())


class HungProcess(FakeProcess):
    """A process whose guest never answers: signals are never acknowledged."""

    async def signal(self, sig: int) -> None:
        self._call("signal")
        await asyncio.Event().wait()


def test_forwarder_gives_up_on_a_guest_that_never_answers() -> None:
    async def body() -> None:
        proc = HungProcess()
        with SignalForwarder(proc, (signal.SIGTERM,), grace=0.05) as fwd:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(fwd.unresponsive, TIMEOUT)
        assert proc.calls == {"signal": 2}  # the signal, then SIGKILL: both unanswered
        assert not proc.done

    run(body())


def test_forwarder_does_not_give_up_on_a_process_that_ends() -> None:
    async def body() -> None:
        proc = FakeProcess()
        proc.die_on.add(signal.SIGKILL)
        fwd = SignalForwarder(proc, (signal.SIGTERM,), grace=0.01)
        await asyncio.wait_for(fwd.forward(signal.SIGTERM), TIMEOUT)
        assert proc.signals == [signal.SIGTERM, signal.SIGKILL] and not fwd.unresponsive.done()

    run(body())


# ---------------------------------------------------------------------- Relay


def test_relay_close_cancels_tasks_then_flushes_writers() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        proc = FakeProcess()
        relay = Relay()
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        master, slave = make_pty()
        try:
            result = drain(out_r)
            out = relay.writer(out_w, owned=True)
            for i in range(100):
                out.write(b"line %d\n" % i)
            relay.pump(in_r, proc)
            relay.watch_size(slave, proc)
            tasks = list(relay.tasks)
            await settle()
            assert len(tasks) == 2 and not any(t.done() for t in tasks)
            await relay.close()
            assert all(t.cancelled() for t in tasks)
            assert loop.remove_reader(in_r) is False  # the pump let go of its fd
            assert relay.tasks == [] and relay.writers == []
            assert result() == b"".join(b"line %d\n" % i for i in range(100))
            assert not is_open(out_w)
            assert proc.calls == {}  # cancelled, not EOF: stdin left open
            await relay.close()  # idempotent
        finally:
            for fd in (in_r, in_w, master, slave):
                os.close(fd)

    run(body())
