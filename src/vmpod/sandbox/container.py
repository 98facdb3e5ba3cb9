"""A container inside a sandbox: prepared in the guest, started, exec'd into,
signalled, paused, measured. Its state is an explicit machine (``ContainerState``)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, ProcessSink
from vmpod.errors import SandboxError, VmpodError
from vmpod.sandbox.config import CONTAINER_TRANSITIONS, ContainerSpec, ContainerState
from vmpod.sandbox.process import Exit, Output, Process
from vmpod.signals import FATAL
from vmpod.states import StateMachine

if TYPE_CHECKING:
    from vmpod.sandbox.sandbox import Sandbox

RUNTIME_QUERIES = ("ps", "events", "update")
CRIU_LOG_TAIL = 8  # lines of CRIU's log in an error
LEAVE_STOPPED = "leave-stopped"  # a file in a restore directory: CRIU leaves the tree stopped


def criu_log_tail(log: Path) -> str:
    """The last error lines of a CRIU log the guest wrote (bounded read), for a message."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 64 * 1024))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln or "error" in ln][-CRIU_LOG_TAIL:]
    return ("\n  " + "\n  ".join(ln[:300] for ln in errors)) if errors else ""


class Container:
    def __init__(
        self,
        sandbox: Sandbox,
        agent: AgentClient,
        spec: ContainerSpec,
        oci: dict[str, object],
        rootfs: tuple[str, str],
        explain: Callable[[], Awaitable[VmpodError | None]],
    ) -> None:
        self.sandbox = sandbox
        self.spec = spec
        self.id = spec.id
        self._agent = agent
        self._oci = oci  # spec.oci with volume sources as the guest sees them
        self._rootfs = rootfs  # (fstype, disk serial or directory in the guest)
        self._explain = explain
        self._sm = StateMachine(f"container {spec.id}", ContainerState.NEW, CONTAINER_TRANSITIONS)
        self.init: Process | None = None
        self._exit: Exit | None = None
        self._execs: dict[int, Process] = {}

    @property
    def state(self) -> ContainerState:
        return self._sm.state

    @property
    def exit(self) -> Exit | None:
        """How the container ended, once it has."""
        return self._exit

    async def create(self) -> None:
        """Prepare the bundle in the guest (rootfs mounted, config written)."""
        self._sm.require("create the container", ContainerState.NEW)
        s = self.spec
        await self._agent.create_container(
            p.CreateContainer(
                container_id=s.id,
                spec=self._oci,
                user=s.user,
                runtime=s.runtime,
                rootfs_fstype=self._rootfs[0],
                rootfs_serial=self._rootfs[1],
                join_namespaces=dict(s.join_namespaces),
            )
        )
        self._sm.to(ContainerState.CREATED)

    def _process(self, output: Output) -> tuple[int, ProcessSink]:
        sink = ProcessSink(on_stdout=output.stdout, on_stderr=output.stderr)
        stream = self.sandbox.next_stream()
        self._agent.attach(stream, sink)
        return stream, sink

    async def start(self, output: Output, *, stdin: bool, wait_started: bool = False) -> Process:
        """Run the container's process; its output goes to ``output``.

        ``wait_started``: return only once the process runs (or failed to), as
        ``runc start`` does, instead of as soon as the guest runtime was spawned.
        """
        self._sm.require("start the container", ContainerState.CREATED)
        stream, sink = self._process(output)
        started = await self._agent.start_container(
            p.StartContainer(container_id=self.id, stream=stream, stdin=stdin, wait_started=wait_started)
        )
        self.init = Process(self._agent, stream, sink, self._explain)
        self.init.started = started.started
        self._sm.to(ContainerState.RUNNING)
        self.init.add_done_callback(self._init_ended)
        return self.init

    def adopt(self, stream: int, output: Output, ended: int | None = None) -> None:
        """This container already runs in a restored VM, its init on ``stream``
        (``ended``: the status it ended with while no host was connected)."""
        self._sm.require("adopt the container", ContainerState.NEW)
        self._sm.to(ContainerState.CREATED)
        if ended is not None:
            self._exit = Exit(ended)
            self._sm.to(ContainerState.STOPPED)
            return
        sink = ProcessSink(on_stdout=output.stdout, on_stderr=output.stderr)
        self._agent.attach(stream, sink)
        self.init = Process(self._agent, stream, sink, self._explain)
        self._sm.to(ContainerState.RUNNING)
        self.init.add_done_callback(self._init_ended)

    def _init_ended(self) -> None:
        if self.init is not None:
            self._exit = self._exit or self.init.result()
        self._sm.to(ContainerState.STOPPED)

    async def exec(
        self, process: dict[str, object], output: Output, *, stdin: bool, user: str = ""
    ) -> Process:
        """Run another process (an OCI process object) in the running container."""
        self._sm.require("exec in the container", ContainerState.RUNNING)
        stream, sink = self._process(output)
        await self._agent.exec(
            p.ExecProcess(container_id=self.id, stream=stream, process=process, stdin=stdin, user=user)
        )
        proc = Process(self._agent, stream, sink, self._explain)
        self._execs[stream] = proc
        proc.add_done_callback(lambda: self._forget_exec(stream))
        return proc

    def _forget_exec(self, stream: int) -> None:
        self._execs.pop(stream, None)

    @property
    def execs(self) -> tuple[Process, ...]:
        """Exec'd processes still running."""
        return tuple(self._execs.values())

    async def kill(self, sig: int, *, all_processes: bool = False) -> None:
        """Signal the container's init (or, with ``all_processes``, every process).

        Before ``start`` nothing runs in the guest: a fatal signal just ends the
        container (status 128+N), like runc's kill of a created container."""
        if self.state is ContainerState.CREATED:
            if sig in FATAL:
                self._exit = Exit(128 + sig)
                self._sm.to(ContainerState.STOPPED)
            return
        self._sm.require("signal the container", ContainerState.RUNNING, ContainerState.PAUSED)
        if all_processes:
            await self._runtime("kill", ["--all", str(sig)])
        else:
            assert self.init is not None
            await self.init.signal(sig)

    async def wait(self) -> Exit:
        """The container's exit status, once its init has ended."""
        if self.init is None:
            self._sm.require("wait for the container", ContainerState.STOPPED)
            assert self._exit is not None
            return self._exit
        return await self.init.wait()

    async def resize(self, rows: int, cols: int) -> None:
        self._sm.require("resize the terminal", ContainerState.RUNNING, ContainerState.PAUSED)
        assert self.init is not None
        await self.init.resize(rows, cols)

    async def pause(self) -> None:
        self._sm.require("pause the container", ContainerState.RUNNING)
        await self._runtime("pause", [])
        self._sm.to(ContainerState.PAUSED)

    async def resume(self) -> None:
        self._sm.require("resume the container", ContainerState.PAUSED)
        await self._runtime("resume", [])
        self._sm.to(ContainerState.RUNNING)

    async def checkpoint(
        self,
        host_dir: Path,
        *,
        leave_running: bool = True,
        tcp_established: bool = False,
        file_locks: bool = False,
    ) -> None:
        """``runc checkpoint`` in the guest: CRIU's images land in ``host_dir``/checkpoint,
        its log in ``host_dir``/work (both made here). Without ``leave_running``
        the container ends once it is dumped."""
        self._sm.require("checkpoint the container", ContainerState.RUNNING, ContainerState.PAUSED)
        rel = self._share_criu(host_dir)
        try:
            res = await self._agent.checkpoint(
                p.CheckpointContainer(
                    container_id=self.id,
                    image_dir=f"{rel}/checkpoint",
                    work_dir=f"{rel}/work",
                    leave_running=leave_running,
                    tcp_established=tcp_established,
                    file_locks=file_locks,
                )
            )
        finally:
            self.sandbox.unshare(rel)
        if res.status != 0:
            raise SandboxError(
                f"checkpoint of container {self.id} failed in the VM: {res.error or res.status}"
                + criu_log_tail(host_dir / "work" / "dump.log")
            )

    async def restore(self, host_dir: Path, output: Output) -> Process:
        """``runc restore`` of this created container from the CRIU images in
        ``host_dir``/checkpoint; the restored tree's output goes to ``output``.
        A file ``host_dir``/leave-stopped asks CRIU to leave every task stopped."""
        self._sm.require("restore the container", ContainerState.CREATED)
        rel = self._share_criu(host_dir)
        # the evidence is read-only to the VM: only CRIU's log is written back
        images = self.sandbox.share_scratch(
            _fresh(f"{self.id}/criu-images"), host_dir / "checkpoint", readonly=True
        )
        try:
            stream, sink = self._process(output)
            started = await self._agent.restore(
                p.RestoreContainer(
                    container_id=self.id,
                    stream=stream,
                    image_dir=images,
                    work_dir=f"{rel}/work",
                    leave_stopped=(host_dir / LEAVE_STOPPED).is_file(),
                )
            )
        finally:
            self.sandbox.unshare(images)
            self.sandbox.unshare(rel)
        self.init = Process(self._agent, stream, sink, self._explain)
        self.init.started = started.started
        self._sm.to(ContainerState.RUNNING)
        self.init.add_done_callback(self._init_ended)
        if not started.started:
            ex = await self.init.wait()
            raise SandboxError(
                f"restore of container {self.id} failed in the VM: {ex.message or ex.status}"
                + criu_log_tail(host_dir / "work" / "restore.log")
            )
        return self.init

    async def dump_memory(self, pid: int, host_dir: Path, max_bytes: int) -> p.MemoryDumped:
        """The memory of the container's process ``pid`` (in its pid namespace) into
        the empty host directory ``host_dir``: maps.txt and one file per readable
        region (``protocol.DumpMemory``)."""
        self._sm.require("dump a process's memory", ContainerState.RUNNING, ContainerState.PAUSED)
        rel = self.sandbox.share_scratch(_fresh(f"{self.id}/memory"), host_dir)
        try:
            return await self._agent.dump_memory(
                p.DumpMemory(container_id=self.id, pid=pid, dir=rel, max_bytes=max_bytes)
            )
        finally:
            self.sandbox.unshare(rel)

    def _share_criu(self, host_dir: Path) -> str:
        for sub in ("checkpoint", "work"):
            (host_dir / sub).mkdir(mode=0o700, exist_ok=True)
        return self.sandbox.share_scratch(_fresh(f"{self.id}/criu"), host_dir)

    async def query(self, command: str, args: list[str], resources: dict[str, object] | None = None) -> str:
        """``ps``, ``events`` or ``update`` by the guest runtime; returns its stdout."""
        if command not in RUNTIME_QUERIES:
            raise SandboxError(f"unsupported runtime query {command!r}")
        self._sm.require(f"run {command}", ContainerState.RUNNING, ContainerState.PAUSED)
        return (await self._runtime(command, args, resources)).stdout

    async def stats(self) -> p.ContainerStats:
        """CPU time, memory and process count of the container (its guest cgroup)."""
        self._sm.require("measure the container", ContainerState.RUNNING, ContainerState.PAUSED)
        return await self._agent.stats(p.GetStats(container_id=self.id))

    async def _runtime(
        self, command: str, args: list[str], resources: dict[str, object] | None = None
    ) -> p.CommandResult:
        res = await self._agent.runtime(
            p.RuntimeCommand(
                container_id=self.id, command=command, args=tuple(args), resources=resources or {}
            )
        )
        if res.status != 0:
            raise SandboxError(res.error or f"{command} failed in the VM (status {res.status})")
        return res

    def stopped(self, status: int) -> None:
        """Record an end decided on the host (the VM is going away)."""
        if self.state is not ContainerState.STOPPED:
            self._exit = self._exit or Exit(status)
            self._sm.to(ContainerState.STOPPED)


def _fresh(name: str) -> str:
    """A share name never used before: the guest's virtio-fs may still cache the
    directory an earlier share of the same name held (writes to it then fail)."""
    return f"{name}-{secrets.token_hex(6)}"
