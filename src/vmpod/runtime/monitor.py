"""The per-container monitor: owns the VM and its one agent connection.

``create`` forks it (no double fork: podman's conmon and containerd's shims are
subreapers that ``waitpid()`` the pid written to --pid-file and take its exit
status as the container's). It keeps the stdio ``create`` was given and relays
the container's stdio to it; with ``process.terminal`` it makes a pty pair,
hands the master to --console-socket and relays the slave. Other commands
reach it on ``monitor.sock`` (see ``ipc``). When the container's process ends
it records the status in state.json, stops the VM and exits with that status
(re-raising the signal when the process died of one). QEMU dies with it even on
SIGKILL (PDEATHSIG), and a dead monitor reads as "stopped".
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from vmpod.agent.client import ProcessSink
from vmpod.agent.protocol import CommandResult, ExitEvent
from vmpod.errors import AgentTimeout, VmpodError
from vmpod.guest.assets import GuestAssets
from vmpod.guest.modules import ModuleLoad
from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Disk
from vmpod.paths import Paths
from vmpod.runtime import ipc, relay
from vmpod.runtime.bundle import Plan
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.state import CREATED, CREATING, PAUSED, RUNNING, STOPPED, Store, proc_start_time
from vmpod.sandbox.container import Container, ContainerConfig
from vmpod.sandbox.sandbox import Sandbox, SandboxConfig

log = logging.getLogger(__name__)
ROOTFS_SERIAL = "ctr-rootfs"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT, signal.SIGALRM)
# Signals whose default action ends a process: the ones a status of 128+N is re-raised for.
FATAL = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26, 27, 29, 30, 31}
EXEC_GRACE = 1.0     # seconds exec'd processes get to report after the init died


@dataclass(frozen=True)
class MonitorArgs:
    store_root: str
    cid: str
    plan: Plan
    assets: GuestAssets
    disk: Path
    accel: AccelChoice
    guest_runtime: str
    boot_timeout: float
    console_socket: str
    paths: Paths
    ready_fd: int
    modules: tuple[ModuleLoad, ...] = ()   # kernel modules loaded before the container
    log_path: str = ""       # --log: the monitor logs there, never to the container's stderr
    log_format: str = "text"
    debug: bool = False


def exit_like(status: int) -> NoReturn:
    """Exit with the container's status: 128+N from a fatal signal N is re-raised."""
    sig = status - 128
    if sig in FATAL:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # no core file of ours
        if sig != signal.SIGKILL:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        time.sleep(1)
    os._exit(status & 0xFF)


def monitor_main(args: MonitorArgs, keep: tuple[int, ...]) -> NoReturn:
    """Entry point in the forked child; never returns."""
    status = 255
    try:
        os.setsid()
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        _close_fds({0, 1, 2, args.ready_fd, *keep})
        _log_to(args)
        if args.plan.terminal:   # the pty is the container's stdio, not ours
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
        status = asyncio.run(Monitor(args).run())
    except BaseException as err:  # the monitor must always exit with a status
        log.error("monitor failed: %s", err, exc_info=not isinstance(err, VmpodError))
    logging.shutdown()
    exit_like(status)


def _log_to(args: MonitorArgs) -> None:
    from vmpod.runtime.cli import setup_logging
    if args.log_path:
        setup_logging(args.log_path, args.log_format, args.debug)
        logging.getLogger("vmpod").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    else:
        logging.getLogger().addHandler(logging.NullHandler())
        logging.lastResort = None


def _close_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


class Monitor:
    def __init__(self, args: MonitorArgs) -> None:
        self.a = args
        self.store = Store(args.store_root)
        self.status = CREATING
        self.sandbox: Sandbox | None = None
        self.container: Container | None = None
        self.init_stream = 0
        self.tty_slave = -1
        self.done: asyncio.Future[int] | None = None
        self.writers: list[relay.FdWriter] = []
        self.execs: dict[int, ProcessSink] = {}
        self.tasks: set[asyncio.Task[object]] = set()
        self.state_dir = self.store.dir(args.cid)

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._on_signal, sig)
        boot = asyncio.create_task(self._boot())
        self._boot_task = boot
        try:
            await boot
        except (Exception, asyncio.CancelledError) as err:
            msg = "interrupted" if isinstance(err, asyncio.CancelledError) else str(err)
            log.error("create failed: %s", msg, exc_info=not isinstance(
                err, VmpodError | asyncio.CancelledError))
            self._ready({"ok": False, "error": msg})
            await self._teardown()
            return 255
        if not self._ready({"ok": True, "pid": os.getpid()}):
            log.error("create went away before the container was ready: destroying it")
            await self._teardown()
            return 255
        status = await self.done
        await self._teardown()
        return status

    def _ready(self, msg: dict[str, object]) -> bool:
        try:
            os.write(self.a.ready_fd, json.dumps(msg).encode() + b"\n")
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.close(self.a.ready_fd)

    async def _boot(self) -> None:
        a, plan = self.a, self.a.plan
        sandbox = Sandbox(a.paths, SandboxConfig(
            assets=a.assets, accel=a.accel, cpus=plan.cpus, memory_mb=plan.memory_mb,
            boot_timeout=a.boot_timeout, disks=(Disk(a.disk, ROOTFS_SERIAL),),
            modules=a.modules))
        self.store.update(a.cid, pid=os.getpid(), monitor_start=proc_start_time(os.getpid()),
                          sandbox_dir=str(sandbox.state_dir))
        self.sandbox = sandbox
        t0 = time.monotonic()
        try:
            await sandbox.start()
        except AgentTimeout as err:
            from vmpod.runtime.config import config_path
            raise RuntimeCliError(f"{err.message} (raise boot_timeout in {config_path()})",
                                  console_tail=err.details.get("console_tail", "")) from err
        log.debug("VM of %s ready after %.2fs (%d vCPU, %d MiB)", a.cid,
                  time.monotonic() - t0, plan.cpus, plan.memory_mb)
        await sandbox.load_modules()
        self.container = Container(sandbox, ContainerConfig(
            id=a.cid, spec=plan.spec, rootfs_serial=ROOTFS_SERIAL, runtime=a.guest_runtime,
            files=plan.files))
        await self.container.create()
        if plan.terminal:
            master, self.tty_slave = relay.make_pty()
            try:
                ipc.send_console(a.console_socket, master)
            finally:
                os.close(master)
        self.server = ipc.listen_unix(self.state_dir / "monitor.sock")
        self.server.setblocking(False)
        self._spawn(self._serve())

    def _spawn(self, coro: Coroutine[object, object, object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _persist(self, **changes: object) -> None:
        try:
            self.store.update(self.a.cid, **changes)
        except (OSError, VmpodError) as err:
            log.debug("state not saved: %s", err)   # delete removed the directory

    def _set_status(self, status: str, **extra: object) -> None:
        self.status = status
        self._persist(status=status, **extra)

    def _finish(self, status: int) -> None:
        if self.done is not None and not self.done.done():
            self._set_status(STOPPED, exit_status=status)
            self.done.set_result(status)

    async def _teardown(self) -> None:
        if self.execs:   # exec'd processes die with the init's pid namespace: let them report
            pending = [s.exited for s in self.execs.values() if not s.exited.done()]
            if pending:
                await asyncio.wait(pending, timeout=EXEC_GRACE)
        with contextlib.suppress(Exception):
            if self.sandbox is not None:
                if self.sandbox.vm is not None:
                    self.sandbox.vm.kill()   # nothing to save: the writable layer is guest RAM
                await self.sandbox.stop()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)
        for w in self.writers:
            w.close()
        with contextlib.suppress(OSError):
            (self.state_dir / "monitor.sock").unlink()

    def _on_signal(self, sig: int) -> None:
        log.debug("monitor got signal %d", sig)
        if self.status == CREATING:
            if sig != signal.SIGWINCH:
                self._boot_task.cancel()
            return
        self._spawn(self._forward(sig))

    async def _forward(self, sig: int) -> None:
        try:
            await self._kill(sig, False)
        except VmpodError as err:
            log.debug("signal %d not forwarded: %s", sig, err)

    # -- control socket -------------------------------------------------------
    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.server)
            self._spawn(self._handle(ipc.Conn(sock)))

    async def _handle(self, conn: ipc.Conn) -> None:
        fds: list[int] = []
        try:
            got = await conn.recv()
            if got is None:
                return
            msg, fds = got
            op = str(msg.get("op"))
            if op == "exec":
                fds, mine = [], fds
                await self._exec(conn, msg, mine)
                return
            handler = {"created": self._op_created, "start": self._op_start,
                       "kill": self._op_kill, "runtime": self._op_runtime,
                       "destroy": self._op_destroy}.get(op)
            if handler is None:
                raise RuntimeCliError(f"unknown monitor operation {op!r}")
            await conn.send({"ok": True, **await handler(msg)})
        except (VmpodError, ValueError, OSError, KeyError, TypeError) as err:
            await conn.send({"ok": False, "error": str(err)})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    async def _op_created(self, msg: dict[str, object]) -> dict[str, object]:
        if self.status == CREATING:
            self._set_status(CREATED)
        return {}

    async def _op_destroy(self, msg: dict[str, object]) -> dict[str, object]:
        asyncio.get_running_loop().call_soon(self._finish, 128 + signal.SIGKILL)
        return {}

    async def _op_start(self, msg: dict[str, object]) -> dict[str, object]:
        if self.status in (RUNNING, PAUSED):
            raise RuntimeCliError("cannot start an already running container")
        if self.status == STOPPED:
            raise RuntimeCliError("cannot start a container that has stopped")
        if self.status != CREATED:
            raise RuntimeCliError(f"cannot start a container that is {self.status}")
        assert self.container is not None
        if self.tty_slave >= 0:
            out = err = self._writer(os.dup(self.tty_slave), owned=True)
            stdin_fd, stdin = self.tty_slave, True
        else:
            out = self._writer(1, owned=False)
            err = out if relay.same_file(1, 2) else self._writer(2, owned=False)
            stdin_fd, stdin = 0, not relay.is_null(0)
        sink = ProcessSink(on_stdout=out.write, on_stderr=err.write)
        self.init_stream = await self.container.start(sink, stdin=stdin, wait_started=True)
        self._set_status(RUNNING)
        agent = self.container.sandbox.agent
        if stdin:
            self._spawn(relay.pump_input(stdin_fd, agent, self.init_stream, sink,
                                         eof_closes=self.tty_slave < 0))
        if self.tty_slave >= 0:
            stream = self.init_stream
            self._spawn(relay.watch_size(
                self.tty_slave, lambda r, c: self.container.resize(stream, r, c)))  # type: ignore[union-attr]
        self._spawn(self._watch_init(sink, err))
        return {}

    def _writer(self, fd: int, *, owned: bool) -> relay.FdWriter:
        w = relay.FdWriter(fd, owned=owned)
        self.writers.append(w)
        return w

    async def _watch_init(self, sink: ProcessSink, err: relay.FdWriter) -> None:
        try:
            ev: ExitEvent = await sink.exited
            status = ev.status
            if ev.message:
                log.error("%s", ev.message)
                err.write(f"vmpod-runtime: {ev.message}\n".encode())
        except VmpodError as exc:
            failure = await self.sandbox.vm_failure() if self.sandbox else None
            log.error("container %s lost: %s", self.a.cid, failure or exc)
            status = 255
        self._finish(status)

    async def _kill(self, sig: int, all_: bool) -> dict[str, object]:
        assert self.container is not None
        if self.status in (STOPPED, CREATING):
            raise RuntimeCliError("container not running")
        if self.status == CREATED:
            # Nothing runs in the guest before start: a fatal signal ends the container.
            if sig in FATAL:
                self._finish(128 + sig)
            return {}
        if all_:
            await self._runtime("kill", ["--all", str(sig)])
        else:
            await self.container.signal(self.init_stream, sig)
        return {}

    async def _op_kill(self, msg: dict[str, object]) -> dict[str, object]:
        sig = msg.get("signal")
        if not isinstance(sig, int) or not 0 < sig < 65:
            raise RuntimeCliError(f"invalid signal {sig!r}")
        return await self._kill(sig, bool(msg.get("all")))

    async def _runtime(self, command: str, args: list[str],
                       resources: dict[str, object] | None = None) -> CommandResult:
        assert self.sandbox is not None
        res = await self.sandbox.agent.call(CommandResult, "runtime", {
            "container_id": self.a.cid, "command": command, "args": args,
            "resources": resources or {}}, timeout=60)
        if res.status != 0:
            raise RuntimeCliError(_runc_error(res.stderr or res.stdout)
                                  or f"{command} failed in the VM (status {res.status})")
        return res

    async def _op_runtime(self, msg: dict[str, object]) -> dict[str, object]:
        command = str(msg.get("command"))
        args = msg.get("args") or []
        resources = msg.get("resources") or {}
        if command not in ("pause", "resume", "ps", "events", "update") or not isinstance(
                args, list) or not isinstance(resources, dict):
            raise RuntimeCliError(f"invalid runtime request {command!r}")
        if self.status not in (RUNNING, PAUSED):
            raise RuntimeCliError("container not running")
        if command == "pause" and self.status == PAUSED:
            raise RuntimeCliError("container already paused")
        if command == "resume" and self.status != PAUSED:
            raise RuntimeCliError("container not paused")
        res = await self._runtime(command, [str(a) for a in args], resources)
        if command == "pause":
            self._set_status(PAUSED)
        elif command == "resume":
            self._set_status(RUNNING)
        return {"stdout": res.stdout}

    # -- exec -----------------------------------------------------------------
    async def _exec(self, conn: ipc.Conn, msg: dict[str, object], fds: list[int]) -> None:
        from vmpod.runtime.execs import ExecSession
        session = ExecSession(self, conn, msg, fds)
        await session.run()


def _runc_error(text: str) -> str:
    """The message of runc's last error line (JSON or logrus text), else the last line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict) and "msg" in obj:
                return str(obj["msg"])
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rstrip('"')
    return lines[-1] if lines else ""

