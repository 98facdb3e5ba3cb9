"""Guest side: the process table. Every container init or exec process, its stdio
(pipes or a pty) relayed as frames, stdin buffered and credited, and its exit.

Exits are seen through a pidfd per process (``os.pidfd_open``, Linux >= 5.3) in
the agent's epoll and collected with ``waitpid(pid)``: no SIGCHLD handler, which
only the main thread could install. Only an agent that is really PID 1 also
reaps orphans with ``waitpid(-1)``; anywhere else that would steal other code's
children. Standard library only.
"""

from __future__ import annotations

import os
import signal
import struct
import time

from vmpod.agent import protocol as p
from vmpod.agent.guest.bundles import start_failure
from vmpod.agent.guest.errors import AgentFailure, log
from vmpod.agent.guest.gproc import spawn
from vmpod.agent.guest.loop import EVENT_READ, EVENT_WRITE
from vmpod.agent.guest.process import Proc, open_stdio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmpod.agent.guest.channel import Channel
    from vmpod.agent.guest.loop import Handler, Loop

HIGH_WATER = 4 * 1024 * 1024  # stop reading process output above this channel backlog
_DRAIN_GRACE = 2.0  # seconds to wait for pipes after a process exits
_START_POLL = 0.01  # how often to look for the pid file of a start waiter
_EXIT_POLL = 0.05  # how often to waitpid a process that has no pidfd
_ORPHAN_REAP = 5.0  # PID 1: reap orphans at least this often


class ProcessTable:
    """The processes by stream, relaying their stdio over ``chan``."""

    def __init__(self, loop: Loop, chan: Channel) -> None:
        self.loop, self.chan = loop, chan
        self.procs: dict[int, Proc] = {}
        self._live: dict[int, Proc] = {}  # pid -> not yet reaped
        self._fd_handlers: dict[int, Handler] = {}  # stream -> its stdio fds' handler
        self._pid1 = os.getpid() == 1

    def get(self, stream: int) -> Proc:
        pr = self.procs.get(stream)
        if pr is None:
            raise AgentFailure(f"no process on stream {stream}", "not_found")
        return pr

    def check_free(self, stream: int) -> None:
        if stream <= 0 or stream >= 1 << 32 or stream in self.procs:
            raise AgentFailure(f"stream {stream} is invalid or in use", "invalid")

    def spawn(
        self, stream: int, cid: str, argv: list[str], tty: bool, stdin: bool, pid_file: str, log_file: str
    ) -> Proc:
        """Start ``argv`` (an OCI runtime run/exec) with its stdio on ``stream``."""
        child, outs, stdin_fd, tty_fd = open_stdio(tty, stdin)
        mine = set(outs) | ({stdin_fd} if stdin_fd is not None else set())
        try:
            pid = spawn(argv, *child)
        except BaseException:
            for fd in mine:
                os.close(fd)
            raise
        finally:
            for fd in set(child):
                os.close(fd)
        for fd in mine:
            os.set_blocking(fd, False)
        pr = Proc(stream, cid, pid, outs, stdin_fd, tty_fd, pid_file, log_file)
        self.procs[stream] = pr
        self._live[pid] = pr
        self._fd_handlers[stream] = lambda fd, mask: self._on_fd(pr, fd, mask)
        try:  # no race: the child stays a zombie until we wait for it
            pr.pidfd = os.pidfd_open(pid)
        except OSError as err:  # Linux < 5.3: after_poll polls waitpid instead
            log(f"pidfd_open({pid}): {err}; polling for its exit")
        else:
            self.loop.want(pr.pidfd, EVENT_READ, lambda _fd, _m: self._poll_exit(pr))
        return pr

    def kill(self, pr: Proc, sig: int) -> None:
        """Signal the container process (or its runtime, before it wrote the pid)."""
        if pr.status is None:
            try:
                os.kill(pr.target_pid(), sig)
            except ProcessLookupError:
                pass

    def kill_all(self) -> None:
        for pr in self.procs.values():
            self.kill(pr, signal.SIGKILL)

    # -- stdio ---------------------------------------------------------------
    def on_stdin(self, stream: int, payload: bytes) -> None:
        """A STDIN frame: buffer it (written as the pipe takes it); b"" is EOF."""
        pr = self.procs.get(stream)
        if pr is None or pr.stdin_fd is None:
            return
        if payload:
            pr.stdin_buf += payload
        else:
            pr.stdin_eof = True
            self._flush_stdin(pr)

    def update_interest(self, backlog: bool) -> None:
        """Watch output unless the channel is ``backlog``ged, stdin while it has data."""
        for pr in self.procs.values():
            for fd in pr.outs:
                mask = 0 if backlog else EVENT_READ
                if fd == pr.stdin_fd and pr.stdin_buf:
                    mask |= EVENT_WRITE
                self.loop.want(fd, mask, self._fd_handlers[pr.stream])
            if pr.stdin_fd is not None and pr.stdin_fd not in pr.outs:
                mask = EVENT_WRITE if pr.stdin_buf else 0
                self.loop.want(pr.stdin_fd, mask, self._fd_handlers[pr.stream])

    def _on_fd(self, pr: Proc, fd: int, mask: int) -> None:
        if mask & EVENT_WRITE and fd == pr.stdin_fd:
            self._flush_stdin(pr)
        if mask & EVENT_READ and fd in pr.outs:
            try:
                data = os.read(fd, p.MAX_DATA)
            except BlockingIOError:
                return
            except OSError:
                data = b""  # EIO: the pty's other side closed
            if data:
                self.chan.send(p.encode_frame(pr.outs[fd], pr.stream, data))
            else:
                self._close_out(pr, fd)

    def _flush_stdin(self, pr: Proc) -> None:
        fd = pr.stdin_fd
        if fd is None:
            return
        written = 0
        try:
            while pr.stdin_buf:
                n = os.write(fd, pr.stdin_buf[: 1 << 16])
                del pr.stdin_buf[:n]
                written += n
        except BlockingIOError:
            pass
        except OSError:
            written += len(pr.stdin_buf)  # reader gone: drop, but keep credits flowing
            pr.stdin_buf.clear()
            pr.stdin_eof = True
        if written:
            self.chan.send(p.encode_frame(p.CREDIT, pr.stream, struct.pack("!I", written)))
        if pr.stdin_eof and not pr.stdin_buf and pr.tty_fd is None:
            self.loop.forget(fd)
            os.close(fd)
            pr.stdin_fd = None

    def _close_out(self, pr: Proc, fd: int) -> None:
        self.loop.forget(fd)
        del pr.outs[fd]
        if fd == pr.tty_fd:
            pr.stdin_fd = None  # closed together with the pty in _finish
        else:
            os.close(fd)

    # -- exits ---------------------------------------------------------------
    def deadlines(self, now: float) -> list[float]:
        """When the loop must look again even if no fd is ready."""
        out = [
            pr.exited_at + _DRAIN_GRACE for pr in self.procs.values() if pr.status is not None and not pr.done
        ]
        if any(pr.start_waiters for pr in self.procs.values()):
            out.append(now + _START_POLL)
        if any(pr.pidfd < 0 for pr in self._live.values()):
            out.append(now + _EXIT_POLL)
        if self._pid1:
            out.append(now + _ORPHAN_REAP)
        return out

    def after_poll(self) -> None:
        """Collect exits, answer start waiters, finish processes whose output drained."""
        for pr in [pr for pr in self._live.values() if pr.pidfd < 0]:
            self._poll_exit(pr)
        if self._pid1:
            self._reap_orphans()
        self._answer_started()
        now = time.monotonic()
        for pr in list(self.procs.values()):
            if pr.done or pr.status is None:
                continue
            if not pr.outs or now >= pr.exited_at + _DRAIN_GRACE:
                self._finish(pr)

    def _poll_exit(self, pr: Proc) -> None:
        try:
            pid, wstatus = os.waitpid(pr.pid, os.WNOHANG)
        except ChildProcessError:  # someone else reaped it: its status is lost
            log(f"process {pr.pid} was reaped elsewhere")
            self._exited(pr, 255)
            return
        if pid:
            code = os.waitstatus_to_exitcode(wstatus)
            self._exited(pr, 128 - code if code < 0 else code)

    def _reap_orphans(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pr = self._live.get(pid)
            if pr is not None:  # else an orphan re-parented to PID 1
                code = os.waitstatus_to_exitcode(wstatus)
                self._exited(pr, 128 - code if code < 0 else code)

    def _exited(self, pr: Proc, status: int) -> None:
        """Shell convention: 128+N for signal N."""
        pr.status = status
        pr.exited_at = time.monotonic()
        self._live.pop(pr.pid, None)
        if pr.pidfd >= 0:
            self.loop.forget(pr.pidfd)
            os.close(pr.pidfd)
            pr.pidfd = -1

    def _answer_started(self) -> None:
        for pr in self.procs.values():
            ran = os.path.exists(pr.pid_file)  # the runtime wrote it: the process ran
            if pr.start_waiters and (pr.status is not None or ran):
                # a fast command may have ended already: it still started
                for rid in pr.start_waiters:
                    self.chan.respond(rid, p.ProcessStarted(pid=pr.pid, started=ran or pr.status is None))
                pr.start_waiters = []

    def _finish(self, pr: Proc) -> None:
        """Close its fds, send the ExitEvent (after all output), answer waiters."""
        self._close_fds(pr)
        pr.done = True
        assert pr.status is not None
        message = ""
        failure = start_failure(pr.log_file) if pr.status in (1, 255) else None
        if failure is not None and not os.path.exists(pr.pid_file):
            pr.status, message = failure
        ev = p.ExitEvent(event="exit", stream=pr.stream, status=pr.status, message=message)
        self.chan.send(p.encode_json(p.EVENT, pr.stream, p.encode(ev)))
        for rid in pr.waiters:
            self.chan.respond(rid, p.ExitStatus(status=pr.status))
        pr.waiters = []

    def _close_fds(self, pr: Proc) -> None:
        for fd in list(pr.outs):
            self._close_out(pr, fd)
        if pr.tty_fd is not None:
            os.close(pr.tty_fd)
            pr.tty_fd = None
        elif pr.stdin_fd is not None:
            self.loop.forget(pr.stdin_fd)
            os.close(pr.stdin_fd)
        pr.stdin_fd = None

    def close(self) -> None:
        """Kill and reap what still runs, close every fd (an in-process agent's exit)."""
        for pr in self.procs.values():
            if pr.status is None:
                self.kill(pr, signal.SIGKILL)
                try:
                    os.kill(pr.pid, signal.SIGKILL)
                    os.waitpid(pr.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self._exited(pr, 128 + signal.SIGKILL)
            if not pr.done:
                self._close_fds(pr)
                pr.done = True
