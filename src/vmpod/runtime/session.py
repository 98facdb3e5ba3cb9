"""One container's session in its monitor: boot the sandbox, create the container,
start it with the stdio ``create`` was given (or a pty handed to
--console-socket), signal and query it, and tear everything down when its
process ends. The status it persists is the one ``rules`` checks commands against.

Pods: the first container's monitor owns the sandbox (the VM) and listens on
``pod.sock`` in its state dir; a later container of the pod (member.py) joins
there, handing over its stdio, and gets a session of its own in this process,
with its own ``monitor.sock``, in the same VM. The VM ends with the first
container (the pod's infra container, which engines stop last); its members end
with it as SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import AgentTimeout, VmpodError
from vmpod.paths import Paths
from vmpod.runtime import ipc, state_ops
from vmpod.runtime.bundle import Plan
from vmpod.runtime.cgroups import HostCgroup
from vmpod.runtime.config import config_path
from vmpod.runtime.control import ControlServer, Msg
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.execs import ExecSession
from vmpod.runtime.outputlog import LogSink, RotatingLog
from vmpod.runtime.rules import require
from vmpod.runtime.state import CREATING, STOPPED, Store, proc_start_time
from vmpod.sandbox import Container, ContainerSpec, ContainerState, Output, Process, Sandbox, SandboxConfig
from vmpod.sandbox.attach import (
    FORWARDED,
    SIGPIPE_STATUS,
    Relay,
    is_null,
    make_pty,
    on_reader_gone,
    same_file,
)

log = logging.getLogger(__name__)
OutputFn = Callable[[bytes], None]
EXEC_GRACE = 1.0  # seconds exec'd processes get to report after the init died
# The monitor also passes on SIGWINCH, as runc's signal proxy does.
MONITOR_SIGNALS = (*FORWARDED, signal.SIGWINCH)


@dataclass(frozen=True)
class MonitorArgs:
    store_root: str
    cid: str
    plan: Plan
    sandbox: SandboxConfig  # resolved by create: assets, accelerator, modules
    guest_runtime: str
    console_socket: str
    paths: Paths
    ready_fd: int
    log_path: str = ""  # --log: the monitor logs there, never to the container's stderr
    log_format: str = "text"
    debug: bool = False
    output_log: LogSink | None = None  # the container's stdout/stderr go to this file
    host_cgroup: HostCgroup | None = None  # the VM's cgroup on the host (the first container's)
    # `vmpod run -d --root-in-vm`: the container's root is this erofs disk, its writes
    # stay in the VM, and the VM has no virtio-fs device (so it can be snapshotted)
    root_disk: str = ""
    snapshot: str = ""  # `vmpod restore`: start the VM from this snapshot directory


class Session:
    def __init__(
        self, args: MonitorArgs, *, pod: Sandbox | None = None, stdio: tuple[int, int, int] = (0, 1, 2)
    ) -> None:
        """``pod``: join that running sandbox instead of booting one (a pod member,
        whose ``stdio`` came from its own monitor process)."""
        self.a = args
        self.pod = pod
        self.pod_id = ""  # a member: the pod's first container (its namespaces are shared)
        self.stdio = stdio
        self.members: dict[str, Session] = {}  # the pod's other containers (first container only)
        self.store = Store(args.store_root)
        self.sandbox: Sandbox | None = None
        self.container: Container | None = None
        self.announced = False  # `create` finished its hooks: "created" from now on
        self.tty_slave = -1
        self.done: asyncio.Future[int] | None = None
        self.relay = Relay()
        self.reader_gone = False  # the output's reader went away: the container ends 141
        self.tasks: set[asyncio.Task[object]] = set()
        self.state_dir = self.store.dir(args.cid)
        self._boot_task: asyncio.Task[None] | None = None
        self.server: ControlServer | None = None
        self.output_log: RotatingLog | None = None
        self.pod_server: socket.socket | None = None

    @property
    def status(self) -> str:
        """The OCI status: "creating" until create's hooks ran, then the container's."""
        if self.done is not None and self.done.done():
            return STOPPED
        if self.container is None or not self.announced:
            return CREATING
        state = self.container.state
        return CREATING if state is ContainerState.NEW else state.value

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for sig in MONITOR_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._boot_task = asyncio.create_task(self._boot())
        try:
            await self._boot_task
        except (Exception, asyncio.CancelledError) as err:
            msg = "interrupted" if isinstance(err, asyncio.CancelledError) else str(err)
            log.error(
                "create failed: %s", msg, exc_info=not isinstance(err, VmpodError | asyncio.CancelledError)
            )
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
        # before QEMU and virtiofsd start: they and all their threads are born in it
        if a.host_cgroup is not None and a.host_cgroup.setup(self.state_dir):
            a.host_cgroup.enter()
        sandbox = Sandbox(a.paths, a.sandbox)
        self.store.update(
            a.cid,
            pid=os.getpid(),
            monitor_start=proc_start_time(os.getpid()),
            sandbox_dir=str(sandbox.state_dir),
            shared_dir=str(sandbox.shared_dir or ""),
        )
        self.sandbox = sandbox
        t0 = time.monotonic()
        if a.snapshot:
            await self._restore_in(sandbox)
            return
        try:
            await sandbox.start()
        except AgentTimeout as err:
            raise RuntimeCliError(
                f"{err.message} (raise boot_timeout in {config_path()})",
                console_tail=err.details.get("console_tail", ""),
            ) from err
        log.debug(
            "VM of %s ready after %.2fs (%d vCPU, %d MiB)",
            a.cid,
            time.monotonic() - t0,
            plan.cpus,
            plan.memory_mb,
        )
        await sandbox.load_modules()
        await self._create_in(sandbox)
        self.pod_server = ipc.listen_unix(self.state_dir / "pod.sock")
        self.spawn(self._serve_joins(self.pod_server))

    async def join(self) -> None:
        """A pod member: its container in the pod's running sandbox."""
        assert self.pod is not None
        self.done = asyncio.get_running_loop().create_future()
        self.sandbox = self.pod
        await self._create_in(self.pod)

    async def _create_in(self, sandbox: Sandbox) -> None:
        a, plan = self.a, self.a.plan
        self.container = await sandbox.create_container(
            ContainerSpec(
                id=a.cid,
                oci=plan.spec,
                rootfs=Path(a.root_disk) if a.root_disk else plan.rootfs,
                runtime=a.guest_runtime,
                volumes=plan.volumes,
                join_namespaces=tuple((ns, self.pod_id) for ns in plan.shared_namespaces if self.pod_id),
            )
        )
        if plan.terminal:
            master, self.tty_slave = make_pty()
            try:
                ipc.send_console(a.console_socket, master)
            finally:
                os.close(master)
        self._serve_control()

    async def _restore_in(self, sandbox: Sandbox) -> None:
        """`vmpod restore`: the VM comes back from a snapshot with the container
        running in it (see sandbox/snapshot.py); it is adopted, not created."""
        from vmpod.sandbox import snapshot as snap

        src = Path(self.a.snapshot)
        m = snap.load_manifest(src, verify=False)  # (start checks the state it loads)
        running = await snap.start(sandbox, src, m)
        if len(m.containers) != 1:
            raise RuntimeCliError(f"snapshot {src} holds {len(m.containers)} containers: restore needs one")
        saved = m.containers[0]
        info = next((i for i in running.processes if i.init and i.container_id == saved.id), None)
        if info is None:
            raise RuntimeCliError(f"the restored VM runs no container {saved.id}")
        output = self._output(Output(lambda _b: None, lambda _b: None))
        self.container = container = sandbox.adopt(saved.spec(), info, output)
        self._serve_control()
        self.announced = True
        if container.init is None:
            self.finish(container.exit.status if container.exit else 128 + signal.SIGKILL)
        else:
            self.spawn(self._watch_init(container.init, output.stderr))
        self.persist()

    def _serve_control(self) -> None:
        self.server = server = ControlServer(
            ipc.listen_unix(self.state_dir / "monitor.sock"),
            {
                "created": self._op_created,
                "start": self._op_start,
                "kill": self._op_kill,
                "runtime": self._op_runtime,
                "destroy": self._op_destroy,
                **state_ops.handlers(self),
            },
            self._op_exec,
        )
        self.spawn(server.serve())

    def spawn(self, coro: Coroutine[object, object, object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def persist(self, **changes: object) -> None:
        try:
            self.store.update(self.a.cid, status=self.status, **changes)
        except (OSError, VmpodError) as err:
            log.debug("state not saved: %s", err)  # delete removed the directory

    def finish(self, status: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(status)
            self.persist(exit_status=status)

    async def _teardown(self) -> None:
        for member in list(self.members.values()):  # they die with the VM
            member.finish(128 + signal.SIGKILL)
        if self.pod is not None:
            await self._leave()
        execs = self.container.execs if self.container else ()
        if execs:  # exec'd processes die with the init's pid namespace: let them report
            # (gathered with their errors: a lost channel is no news here, and an
            # unretrieved task exception would be logged at exit)
            waiting = asyncio.gather(*(e.wait() for e in execs), return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiting, EXEC_GRACE)
        with contextlib.suppress(Exception):
            if self.sandbox is not None and self.pod is None:
                await self.sandbox.kill()  # the container's writes are on the host already
        if self.server is not None:
            await self.server.drain(timeout=2)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)
        await self.relay.close()
        if self.pod is not None:
            for fd in set(self.stdio):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.stdio = (-1, -1, -1)
        if self.output_log is not None:
            self.output_log.close()
        with contextlib.suppress(OSError):
            (self.state_dir / "monitor.sock").unlink()
        if self.pod_server is not None:
            self.pod_server.close()
            with contextlib.suppress(OSError):
                (self.state_dir / "pod.sock").unlink()
        if self.a.host_cgroup is not None and self.pod is None:  # the VM is gone: its cgroup goes
            self.a.host_cgroup.leave(self.state_dir)

    async def _leave(self) -> None:
        """A member's end: its processes go, the pod's VM stays."""
        assert self.pod is not None
        if self.container is None:  # its join failed before the container was made
            return
        if self.container.state in (ContainerState.RUNNING, ContainerState.PAUSED):
            with contextlib.suppress(VmpodError):
                await self.container.kill(signal.SIGKILL, all_processes=True)
                init = self.container.init
                if init is not None:
                    await asyncio.wait_for(init.wait(), 10)
        try:
            self.pod.forget_container(self.a.cid)
        except VmpodError as err:
            log.warning("pod member %s: %s", self.a.cid, err)

    # -- pod members (first container only) -------------------------------------------
    async def _serve_joins(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            self.spawn(self._join(ipc.Conn(conn)))

    async def _join(self, conn: ipc.Conn) -> None:
        """One member, from its join to its exit: the member's monitor process waits
        on this connection for the status it exits with."""
        fds: list[int] = []
        member: Session | None = None
        try:
            got = await conn.recv()
            if got is None:
                return
            msg, fds = got
            member = self._member(msg, fds)
            fds = []  # the member's session owns them now
            self.members[member.a.cid] = member
            await member.join()
            await conn.send({"ok": True})
            done = member.done
            assert done is not None
            # its monitor dies: EOF on the connection
            closed: asyncio.Future[object] = asyncio.ensure_future(conn.recv())
            ended: asyncio.Future[object] = asyncio.ensure_future(asyncio.shield(done))
            await asyncio.wait([ended, closed], return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            if not done.done():
                member.finish(128 + signal.SIGKILL)
            closed.cancel()
            status = await done
            await member._teardown()
            await conn.send({"event": "exit", "status": status})
        except (VmpodError, ValueError, OSError, KeyError, TypeError) as err:
            log.error("pod member: %s", err)
            with contextlib.suppress(OSError):
                await conn.send({"ok": False, "error": str(err)})
            if member is not None:
                await member._teardown()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if member is not None:
                self.members.pop(member.a.cid, None)
            conn.close()

    def _member(self, msg: Msg, fds: list[int]) -> Session:
        """The session of the member ``msg`` describes (its bundle, read here)."""
        from vmpod.runtime.bundle import load_spec, translate
        from vmpod.runtime.config import load_config

        cid, bundle, console = msg.get("cid"), msg.get("bundle"), msg.get("console_socket") or ""
        sink = msg.get("output_log")
        output_log = LogSink(**sink) if isinstance(sink, dict) else None
        if not isinstance(cid, str) or not isinstance(bundle, str) or not isinstance(console, str):
            raise RuntimeCliError("invalid join request")
        if len(fds) != 3:
            raise RuntimeCliError("a pod member must hand over its stdin, stdout and stderr")
        if self.sandbox is None or self.status == STOPPED:
            raise RuntimeCliError(f"the pod's sandbox ({self.a.cid}) is not running")
        path = Path(bundle)
        plan = translate(load_spec(path), path, cid, load_config())
        args = dataclasses.replace(
            self.a,
            cid=cid,
            plan=plan,
            console_socket=console,
            ready_fd=-1,
            output_log=output_log,
            host_cgroup=None,  # its own monitor process holds its cgroup (member.py)
        )
        member = Session(args, pod=self.sandbox, stdio=(fds[0], fds[1], fds[2]))
        member.pod_id = self.a.cid
        return member

    def _on_signal(self, sig: int) -> None:
        log.debug("monitor got signal %d", sig)
        if self.status == CREATING and self.container is None:
            if sig != signal.SIGWINCH and self._boot_task is not None:
                self._boot_task.cancel()
            return
        self.spawn(self._forward(sig))

    async def _forward(self, sig: int) -> None:
        try:
            await self.kill(sig, False)
        except VmpodError as err:
            log.debug("signal %d not forwarded: %s", sig, err)

    # -- operations (called by the control server) ------------------------------
    async def _op_created(self, msg: Msg) -> Msg:
        self.announced = True
        self.persist()
        return {}

    async def _op_destroy(self, msg: Msg) -> Msg:
        asyncio.get_running_loop().call_soon(self.finish, 128 + signal.SIGKILL)
        return {}

    async def _op_start(self, msg: Msg) -> Msg:
        restore = msg.get("restore") or ""
        if not isinstance(restore, str) or (restore and not os.path.isabs(restore)):
            raise RuntimeCliError(f"start: invalid restore directory {restore!r}")
        await self.start(Path(restore) if restore else None)
        return {}

    async def _op_kill(self, msg: Msg) -> Msg:
        sig = msg.get("signal")
        if not isinstance(sig, int) or not 0 < sig < 65:
            raise RuntimeCliError(f"invalid signal {sig!r}")
        await self.kill(sig, bool(msg.get("all")))
        return {}

    async def _op_runtime(self, msg: Msg) -> Msg:
        command, args, resources = msg.get("command"), msg.get("args") or [], msg.get("resources") or {}
        if (
            command not in ("pause", "resume", "ps", "events", "update")
            or not isinstance(args, list)
            or not isinstance(resources, dict)
        ):
            raise RuntimeCliError(f"invalid runtime request {command!r}")
        return {"stdout": await self.query(str(command), [str(a) for a in args], resources)}

    async def _op_exec(self, conn: ipc.Conn, msg: Msg, fds: list[int]) -> None:
        require("exec", self.status)
        assert self.container is not None
        await ExecSession(self.container, conn, msg, fds).run()

    async def start(self, restore: Path | None = None) -> None:
        """Run the container's process, or (``restore``) restore its CRIU images."""
        require("start", self.status)
        assert self.container is not None
        if self.tty_slave >= 0:
            out = err = self.relay.writer(os.dup(self.tty_slave), owned=True)
            stdin_fd, stdin = self.tty_slave, True
        else:
            i, o, e = self.stdio  # (a member's came over its join: closed at teardown)
            gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            out = self.relay.writer(o, owned=False, on_broken=on_reader_gone(gone))
            err = (
                out if same_file(o, e) else self.relay.writer(e, owned=False, on_broken=on_reader_gone(gone))
            )
            self.spawn(self._stop_when_reader_gone(gone))
            stdin_fd, stdin = i, not is_null(i)
        output = self._output(Output(out.write, err.write))
        if restore is not None:
            try:
                proc = await self.container.restore(restore, output)
            except VmpodError as exc:
                self.finish(125)
                raise RuntimeCliError(str(exc)) from exc
        else:
            proc = await self.container.start(output, stdin=stdin, wait_started=True)
        if not proc.started:
            # runc's start fails when the process cannot run: so does ours, with
            # the guest runtime's message (the container is stopped, as runc's is)
            ex = await proc.wait()
            self.finish(ex.status)
            raise RuntimeCliError(ex.message or f"the container's process did not start (status {ex.status})")
        self.persist()
        if stdin:
            self.relay.pump(stdin_fd, proc, eof_closes=self.tty_slave < 0)
        if self.tty_slave >= 0:
            self.relay.watch_size(self.tty_slave, proc)
        self.spawn(self._watch_init(proc, err.write))

    def _output(self, fds: Output) -> Output:
        """The container's output: its fds, or the log file (or both, ``tee``)."""
        sink = self.a.output_log
        if sink is None:
            return fds
        self.output_log = log_ = RotatingLog(sink)
        if not sink.tee:
            return Output(log_.writer("stdout"), log_.writer("stderr"))

        def both(fd_write: OutputFn, stream: str) -> OutputFn:
            def write(data: bytes) -> None:
                fd_write(data)
                log_.write(stream, data)

            return write

        return Output(both(fds.stdout, "stdout"), both(fds.stderr, "stderr"))

    async def _stop_when_reader_gone(self, gone: asyncio.Future[None]) -> None:
        """When the reader of the container's stdout or stderr goes away (`vmpod
        run --name x IMG -- yes | head -1`), end the container as SIGPIPE would
        end a writer on the host: its output has nowhere to go, and it must not
        run (a VM at full speed) forever. Not SIGPIPE itself: a PID 1 without a
        handler ignores it. Its status reads 141 (``_watch_init``)."""
        await gone
        log.info("the reader of the container's output went away: stopping it")
        self.reader_gone = True
        if self.container is not None:
            with contextlib.suppress(VmpodError):
                await self.container.kill(signal.SIGKILL, all_processes=False)

    async def _watch_init(self, proc: Process, err: OutputFn) -> None:
        try:
            ex = await proc.wait()
            status = SIGPIPE_STATUS if self.reader_gone else ex.status
            if ex.message:
                log.error("%s", ex.message)
                err(f"vmpod-runtime: {ex.message}\n".encode())
        except VmpodError as exc:
            # The VM died under the container: every process in it is gone as if
            # SIGKILLed, which is what runc (and the shims above it) report then.
            log.error("container %s lost: %s", self.a.cid, exc)
            status = 128 + signal.SIGKILL
        self.finish(status)

    async def kill(self, sig: int, all_: bool) -> None:
        require("kill", self.status)
        assert self.container is not None
        await self.container.kill(sig, all_processes=all_)
        if self.container.state is ContainerState.STOPPED and self.container.init is None:
            ex = self.container.exit
            self.finish(ex.status if ex else 128 + sig)

    async def query(self, command: str, args: list[str], resources: dict[str, object]) -> str:
        """pause, resume, ps, events, update; the runtime's rules decide first."""
        require(command, self.status)
        assert self.container is not None
        try:
            if command == "pause":
                await self.container.pause()
            elif command == "resume":
                await self.container.resume()
            else:
                out = await self.container.query(command, args, resources)
                if command == "update" and self.a.host_cgroup is not None and self.pod is None:
                    self.a.host_cgroup.update(resources)  # the VM's cgroup follows (CPU, pids)
                return out
        finally:
            self.persist()
        return ""
