"""The guest agent: PID 1 of the guest after /init, serving the host over one channel.

Standard library only, and few imports: agent start-up is on every cold start.
One selector loop multiplexes the channel, every process's pipes or pty, and
SIGCHLD. RPC handlers are thin (decode, validate) and call ``_do_*``.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import struct
import sys
import time

from vmpod.agent import gkernel, runc
from vmpod.agent import protocol as p
from vmpod.agent.channel import Channel
from vmpod.agent.gproc import run_capture, spawn
from vmpod.agent.runc import AgentFailure

# Imports are kept to what the hot path needs (no subprocess, selectors, typing,
# socket): each module costs tens of ms to import under TCG.
EVENT_READ, EVENT_WRITE = select.EPOLLIN, select.EPOLLOUT
_HANGUP = select.EPOLLHUP | select.EPOLLERR

AGENT_VERSION = "0.1.0"
_HIGH_WATER = 4 * 1024 * 1024     # stop reading process output above this backlog
_DRAIN_GRACE = 2.0                # seconds to wait for pipes after a process exits


def _log(msg: str) -> None:
    try:
        os.write(2, f"vmpod-agent: {msg}\n".encode())
    except OSError:
        pass


class Proc:
    """One process (container init or exec) and the fds that carry its stdio."""

    def __init__(self, stream: int, cid: str, pid: int,
                 outs: dict[int, int], stdin_fd: int | None, tty_fd: int | None,
                 pid_file: str, log: str) -> None:
        self.stream, self.cid, self.pid = stream, cid, pid
        self.outs = outs                  # fd -> STDOUT/STDERR frame kind
        self.stdin_fd = stdin_fd
        self.tty_fd = tty_fd
        self.pid_file, self.log = pid_file, log
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.status: int | None = None
        self.exited_at = 0.0
        self.waiters: list[int] = []
        self.start_waiters: list[int] = []   # start requests answered once it runs
        self.done = False

    def target_pid(self) -> int:
        """The container process itself when runc wrote its pid, else runc."""
        try:
            with open(self.pid_file) as fh:
                return int(fh.read(32).strip())
        except (OSError, ValueError):
            return self.pid


class Agent:
    def __init__(self) -> None:
        self.poll = select.epoll()
        self.chan = Channel()
        self.procs: dict[int, Proc] = {}
        self.by_pid: dict[int, Proc] = {}
        self.containers: dict[str, str] = {}   # id -> OCI runtime name
        self.chan_paused_until = 0.0
        self.registered: dict[int, int] = {}
        self.handlers: dict[int, object] = {}   # fd -> callable(fd, mask)
        self.running = True

    # -- fd bookkeeping -----------------------------------------------------
    def _want(self, fd: int, mask: int, handler: object = None) -> None:
        if handler is not None:
            self.handlers[fd] = handler
        old = self.registered.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self.poll.unregister(fd)
            del self.registered[fd]
        elif not old:
            self.poll.register(fd, mask)
            self.registered[fd] = mask
        else:
            self.poll.modify(fd, mask)
            self.registered[fd] = mask

    def _forget(self, fd: int) -> None:
        self._want(fd, 0)
        self.handlers.pop(fd, None)

    # -- main loop ----------------------------------------------------------
    def serve(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._want(rfd, EVENT_READ, lambda fd, _m: self._drain_wakeup(fd))
        self.chan.open()
        self._connect_channel()
        self._hello()
        while self.running:
            self._update_interest()
            timeout = self._timeout()
            for fd, mask in self.poll.poll(-1 if timeout is None else timeout):
                handler = self.handlers.get(fd)
                if mask & _HANGUP:
                    mask |= EVENT_READ   # let the read see EOF/EIO
                if handler is not None and fd in self.registered:
                    handler(fd, mask & self.registered[fd])  # type: ignore[operator]
            self._reap()
            self._answer_started()
            self._finish_exited()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [self.chan_paused_until] if self.chan_paused_until else []
        deadlines += [pr.exited_at + _DRAIN_GRACE for pr in self.procs.values()
                      if pr.status is not None and not pr.done]
        if any(pr.start_waiters for pr in self.procs.values()):
            deadlines.append(now + 0.01)   # poll for the pid file
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _drain_wakeup(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _connect_channel(self) -> None:
        if self.chan.listener is not None:
            self._want(self.chan.listener.fileno(), EVENT_READ, lambda fd, m: self._accept())
        else:
            self._want(self.chan.fd, EVENT_READ, self._on_channel)

    def _accept(self) -> None:
        assert self.chan.listener is not None
        conn, _ = self.chan.listener.accept()
        if self.chan.conn is not None:
            self._forget(self.chan.fd)
            self.chan.conn.close()
        conn.setblocking(False)
        self.chan.conn, self.chan.fd = conn, conn.fileno()
        self.chan.reader = p.FrameReader()
        self._want(self.chan.fd, EVENT_READ, self._on_channel)
        self._hello()

    def _hello(self) -> None:
        hello = p.Hello(protocol=p.PROTOCOL_VERSION, agent_version=AGENT_VERSION,
                        kernel=os.uname().release, uptime=_uptime())
        self.chan.send(p.encode_json(p.EVENT, 0, {"event": "hello", **p.encode(hello)}))

    def _update_interest(self) -> None:
        now = time.monotonic()
        if self.chan.fd >= 0:
            mask = EVENT_WRITE if self.chan.out else 0
            if self.chan_paused_until and now >= self.chan_paused_until:
                self.chan_paused_until = 0.0
            if not self.chan_paused_until:
                mask |= EVENT_READ
            self._want(self.chan.fd, mask, self._on_channel)
        backlog = len(self.chan.out) > _HIGH_WATER
        for pr in self.procs.values():
            for fd in pr.outs:
                mask = 0 if backlog else EVENT_READ
                if fd == pr.stdin_fd and pr.stdin_buf:
                    mask |= EVENT_WRITE
                self._want(fd, mask, lambda f, m, pr=pr: self._on_proc_fd(pr, f, m))
            if pr.stdin_fd is not None and pr.stdin_fd not in pr.outs:
                mask = EVENT_WRITE if pr.stdin_buf else 0
                self._want(pr.stdin_fd, mask, lambda f, m, pr=pr: self._on_proc_fd(pr, f, m))

    # -- channel ------------------------------------------------------------
    def _on_channel(self, fd: int, mask: int) -> None:
        if mask & EVENT_WRITE and self.chan.out:
            try:
                n = os.write(fd, self.chan.out)
                del self.chan.out[:n]
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
        if mask & EVENT_READ:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # virtio-serial reads EOF while the host is away; look again later.
                self.chan_paused_until = time.monotonic() + 0.1
                self.chan.reader = p.FrameReader()
                return
            try:
                frames = self.chan.reader.feed(data)
            except p.ProtocolViolation as err:
                _log(f"dropping bad input from host: {err}")
                self.chan.reader = p.FrameReader()
                return
            for kind, stream, payload in frames:
                self._on_frame(kind, stream, payload)

    def _on_frame(self, kind: int, stream: int, payload: bytes) -> None:
        if kind == p.REQUEST:
            self._on_request(payload)
        elif kind == p.STDIN:
            pr = self.procs.get(stream)
            if pr is None or pr.stdin_fd is None:
                return
            if payload:
                pr.stdin_buf += payload
            else:
                pr.stdin_eof = True
                self._flush_stdin(pr)

    def _on_request(self, payload: bytes) -> None:
        rid = 0
        try:
            obj = p.parse_json(payload)
            rid = obj.get("id", 0) if isinstance(obj.get("id"), int) else 0  # type: ignore[assignment]
            req = p.decode(p.Request, obj)
            cls = p.OPS.get(req.op)
            if cls is None:
                raise AgentFailure(f"unknown operation {req.op!r}", "unsupported")
            args = None if cls is type(None) else p.decode(cls, req.args)
            result = getattr(self, f"_op_{req.op}")(req.id, args)
            if result is not None:
                self._respond(req.id, True, result)
        except AgentFailure as err:
            self._respond(rid, False, error=str(err), kind=err.kind)
        except p.ProtocolViolation as err:
            self._respond(rid, False, error=str(err), kind="invalid")
        except Exception as err:  # the agent must outlive any single request
            self._respond(rid, False, error=f"{type(err).__name__}: {err}", kind="internal")

    def _respond(self, rid: int, ok: bool, result: dict[str, object] | None = None,
                 error: str = "", kind: str = "") -> None:
        resp = p.Response(id=rid, ok=ok, result=result or {}, error=error[:4000],
                          error_kind=kind)
        self.chan.send(p.encode_json(p.RESPONSE, rid, p.encode(resp)))

    # -- operations ---------------------------------------------------------
    def _op_ping(self, rid: int, _a: None) -> dict[str, object]:
        return {"uptime": _uptime()}

    def _op_guest_info(self, rid: int, _a: None) -> dict[str, object]:
        mem = _meminfo()
        _, ver, _ = run_capture([runc.RUNC, "--version"], 4096)
        info = p.GuestInfo(kernel=os.uname().release, uptime=_uptime(),
                           mem_total_kb=mem.get("MemTotal", 0), mem_free_kb=mem.get("MemAvailable", 0),
                           cpus=os.cpu_count() or 1, python=sys.version.split()[0],
                           runc=ver.split("\n")[0][:200])
        return p.encode(info)

    def _op_set_clock(self, rid: int, a: p.SetClock) -> dict[str, object]:
        time.clock_settime_ns(time.CLOCK_REALTIME, a.epoch_ns)
        return {}

    def _op_create_container(self, rid: int, a: p.CreateContainer) -> dict[str, object]:
        runc.runtime_binary(a.runtime)   # validate before mounting anything
        bundle = runc.prepare_bundle(a.container_id, a.spec, a.rootfs_serial,
                                     a.rootfs_fstype, a.user, a.files)
        self.containers[a.container_id] = a.runtime
        return {"bundle": bundle}

    def _op_start_container(self, rid: int, a: p.StartContainer) -> dict[str, object] | None:
        cid = self._known(a.container_id)
        bundle = runc.bundle_dir(cid)
        with open(os.path.join(bundle, "config.json")) as fh:
            tty = bool((json.load(fh).get("process") or {}).get("terminal"))
        pid_file, log = f"{bundle}/init.pid", f"{bundle}/init.log"
        result = self._spawn(a.stream, cid, runc.run_argv(self.containers[cid], cid, pid_file, log),
                             tty, a.stdin, pid_file, log)
        if not a.wait_started:
            return result
        self.procs[a.stream].start_waiters.append(rid)
        return None   # answered by _answer_started

    def _answer_started(self) -> None:
        for pr in self.procs.values():
            if pr.start_waiters and (pr.status is not None or os.path.exists(pr.pid_file)):
                for rid in pr.start_waiters:
                    self._respond(rid, True, {"pid": pr.pid, "started": pr.status is None})
                pr.start_waiters = []

    def _op_exec(self, rid: int, a: p.ExecProcess) -> dict[str, object]:
        cid = self._known(a.container_id)
        bundle = runc.bundle_dir(cid)
        process = dict(a.process)
        if a.user:
            process["user"] = runc.resolve_user(f"{bundle}/rootfs", a.user)
        spec_file = f"{bundle}/exec-{a.stream}.json"
        with open(spec_file, "w") as fh:
            json.dump(process, fh)
        pid_file, log = f"{bundle}/exec-{a.stream}.pid", f"{bundle}/exec-{a.stream}.log"
        argv = runc.exec_argv(self.containers[cid], cid, spec_file, pid_file, log)
        return self._spawn(a.stream, cid, argv,
                           bool(process.get("terminal")), a.stdin, pid_file, log)

    def _op_signal(self, rid: int, a: p.SignalProcess) -> dict[str, object]:
        pr = self._proc(a.stream)
        if pr.status is None:
            try:
                os.kill(pr.target_pid(), a.signal)
            except ProcessLookupError:
                pass
        return {}

    def _op_resize(self, rid: int, a: p.ResizeTty) -> dict[str, object]:
        pr = self._proc(a.stream)
        if pr.tty_fd is None:
            raise AgentFailure("process has no terminal", "invalid")
        import fcntl
        import termios
        fcntl.ioctl(pr.tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", a.rows, a.cols, 0, 0))
        # runc copies the size from its own console when it gets SIGWINCH.
        os.kill(pr.pid, signal.SIGWINCH)
        return {}

    def _op_wait(self, rid: int, a: p.WaitProcess) -> dict[str, object] | None:
        pr = self._proc(a.stream)
        if pr.done:
            return {"status": pr.status}
        pr.waiters.append(rid)
        return None  # answered when the process ends

    def _op_shutdown(self, rid: int, _a: None) -> dict[str, object]:
        for pr in self.procs.values():
            if pr.status is None:
                try:
                    os.kill(pr.target_pid(), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        os.sync()
        return {}

    def _op_runtime(self, rid: int, a: p.RuntimeCommand) -> dict[str, object]:
        cid = self._known(a.container_id)
        extra: list[str] = []
        if a.command == "update":
            path = f"{runc.bundle_dir(cid)}/update.json"
            with open(path, "w") as fh:
                json.dump(a.resources, fh)
            extra = ["--resources", path]
        argv = runc.runtime_argv(self.containers[cid], a.command, list(a.args) + extra, cid)
        code, out, err = run_capture(argv, p.MAX_OUTPUT)
        return p.encode(p.CommandResult(status=code, stdout=out, stderr=err))

    def _op_load_module(self, rid: int, a: p.LoadModule) -> dict[str, object]:
        path = os.path.normpath(a.path)
        if not path.startswith(p.MODULES_DIR + "/") or not path.endswith(".ko"):
            raise AgentFailure(f"module path {a.path!r} is not under {p.MODULES_DIR}", "invalid")
        for param in a.params:
            if not param or "=" not in param or param.startswith("-"):
                raise AgentFailure(f"invalid module parameter {param!r}", "invalid")
        code, out, err = run_capture([runc.BUSYBOX, "insmod", path, *a.params], p.MAX_OUTPUT)
        return p.encode(p.CommandResult(status=code, stdout=out, stderr=err))

    def _op_unload_module(self, rid: int, a: p.UnloadModule) -> dict[str, object]:
        if not a.name or not set(a.name) <= gkernel.MODULE_NAME_OK:
            raise AgentFailure(f"invalid module name {a.name!r}", "invalid")
        code, out, err = run_capture([runc.BUSYBOX, "rmmod", a.name], p.MAX_OUTPUT)
        return p.encode(p.CommandResult(status=code, stdout=out, stderr=err))

    def _op_kernel_log(self, rid: int, a: p.KernelLog) -> dict[str, object]:
        return p.encode(gkernel.kernel_log(a.since, p.MAX_LOG))

    def _known(self, cid: str) -> str:
        if cid not in self.containers:
            raise AgentFailure(f"container {cid!r} does not exist", "not_found")
        return cid

    def _proc(self, stream: int) -> Proc:
        pr = self.procs.get(stream)
        if pr is None:
            raise AgentFailure(f"no process on stream {stream}", "not_found")
        return pr

    # -- processes ----------------------------------------------------------
    def _spawn(self, stream: int, cid: str, argv: list[str], tty: bool, stdin: bool,
               pid_file: str, log: str) -> dict[str, object]:
        if stream <= 0 or stream in self.procs:
            raise AgentFailure(f"stream {stream} is invalid or in use", "invalid")
        # Raw fds we own (not Popen's pipe objects): the loop closes them itself.
        if tty:
            master, slave = os.openpty()
            child = (slave, slave, slave)
            outs, stdin_fd, tty_fd, mine = {master: p.STDOUT}, master if stdin else None, master, [master]
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
            child = (in_r, out_w, err_w)
            outs, stdin_fd, tty_fd = {out_r: p.STDOUT, err_r: p.STDERR}, (in_w if stdin else None), None
            mine = [out_r, err_r] + ([in_w] if stdin else [])
        try:
            pid = spawn(argv, *child)
        finally:
            for fd in set(child):
                os.close(fd)
        for fd in mine:
            os.set_blocking(fd, False)
        pr = Proc(stream, cid, pid, outs, stdin_fd, tty_fd, pid_file, log)
        self.procs[stream] = pr
        self.by_pid[pid] = pr
        return {"pid": pid}

    def _on_proc_fd(self, pr: Proc, fd: int, mask: int) -> None:
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
                n = os.write(fd, pr.stdin_buf[:1 << 16])
                del pr.stdin_buf[:n]
                written += n
        except BlockingIOError:
            pass
        except OSError:
            written += len(pr.stdin_buf)   # reader gone: drop, but keep credits flowing
            pr.stdin_buf.clear()
            pr.stdin_eof = True
        if written:
            self.chan.send(p.encode_frame(p.CREDIT, pr.stream, struct.pack("!I", written)))
        if pr.stdin_eof and not pr.stdin_buf and pr.tty_fd is None:
            self._forget(fd)
            os.close(fd)
            pr.stdin_fd = None

    def _close_out(self, pr: Proc, fd: int) -> None:
        self._forget(fd)
        del pr.outs[fd]
        if fd == pr.tty_fd:
            pr.stdin_fd = None   # closed together with the pty in _finish_exited
        else:
            os.close(fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pr = self.by_pid.pop(pid, None)
            if pr is None:
                continue  # an orphan re-parented to PID 1
            code = os.waitstatus_to_exitcode(wstatus)
            pr.status = 128 - code if code < 0 else code
            pr.exited_at = time.monotonic()

    def _finish_exited(self) -> None:
        now = time.monotonic()
        for pr in list(self.procs.values()):
            if pr.done or pr.status is None:
                continue
            if pr.outs and now < pr.exited_at + _DRAIN_GRACE:
                continue
            for fd in list(pr.outs):
                self._close_out(pr, fd)
            if pr.tty_fd is not None:
                os.close(pr.tty_fd)
            elif pr.stdin_fd is not None:
                self._forget(pr.stdin_fd)
                os.close(pr.stdin_fd)
                pr.stdin_fd = None
            pr.done = True
            message = ""
            failure = runc.start_failure(pr.log) if pr.status in (1, 255) else None
            if failure is not None and not os.path.exists(pr.pid_file):
                pr.status, message = failure
            ev = p.ExitEvent(event="exit", stream=pr.stream, status=pr.status, message=message)
            self.chan.send(p.encode_json(p.EVENT, pr.stream, p.encode(ev)))
            for rid in pr.waiters:
                self._respond(rid, True, {"status": pr.status})


def _uptime() -> float:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError):
        return 0.0


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def main() -> None:
    os.umask(0o022)
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    try:
        Agent().serve()
    except BaseException as err:  # PID 1 exiting panics the kernel: say why first
        _log(f"fatal: {type(err).__name__}: {err}")
        import traceback
        traceback.print_exc()
        os.sync()
        os.execv(runc.BUSYBOX, [runc.BUSYBOX, "poweroff", "-f"])
