"""Guest side: the RPC handlers. One thin ``_op_*`` per protocol op validates its
(already decoded) arguments, then calls ``_do_*``, which does the work.

Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time

from vmpod.agent import protocol as p
from vmpod.agent.guest import bundles, gkernel, memory, network, shared, stats
from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.guest.gproc import run_capture
from vmpod.agent.guest.users import resolve_user

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vmpod.agent.guest.channel import Channel
    from vmpod.agent.guest.config import AgentConfig
    from vmpod.agent.guest.process import Proc
    from vmpod.agent.guest.procs import ProcessTable

_U32 = 1 << 32
RANDOM_DEVICE = "/dev/urandom"
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def _request_id(obj: dict[str, object]) -> int:
    """The id to answer under, even when the request is malformed (0: unknown)."""
    rid = obj.get("id")
    return rid if type(rid) is int and 0 <= rid < _U32 else 0


class Handlers:
    """The operations of the protocol, answered over ``chan``."""

    def __init__(
        self, config: AgentConfig, procs: ProcessTable, chan: Channel, stop: Callable[[], None]
    ) -> None:
        self.config, self.procs, self.chan, self._stop = config, procs, chan, stop
        self.containers: dict[str, str] = {}  # id -> OCI runtime name
        self.inits: dict[str, int] = {}  # id -> stream of its init process
        self.shared_mounted = False
        self.network_configured = False
        self.criu_ready = False  # CRIU's kernel modules are loaded

    def dispatch(self, payload: bytes) -> None:
        """Answer one REQUEST frame; no request, however bad, stops the agent."""
        rid = 0
        try:
            obj = p.parse_json(payload)
            rid = _request_id(obj)
            req = p.decode(p.Request, obj)
            if req.id != rid:
                raise p.ProtocolViolation(f"request id {req.id} out of range")
            entry = p.OPS.get(req.op)
            if entry is None:
                raise AgentFailure(f"unknown operation {req.op!r}", "unsupported")
            args_cls, result_cls = entry
            args = None if args_cls is None else p.decode(args_cls, req.args)
            result = getattr(self, f"_op_{req.op}")(rid, args)
            if result is not None:  # None: answered later (wait, start waiters)
                if type(result) is not result_cls:
                    raise TypeError(f"{req.op} answered {type(result).__name__}")
                self.chan.respond(rid, result)
        except AgentFailure as err:
            self.chan.refuse(rid, str(err), err.kind)
        except p.ProtocolViolation as err:
            self.chan.refuse(rid, str(err), "invalid")
        except Exception as err:  # the agent must outlive any single request
            self.chan.refuse(rid, f"{type(err).__name__}: {err}", "internal")

    def _known(self, cid: str) -> str:
        if cid not in self.containers:
            raise AgentFailure(f"container {cid!r} does not exist", "not_found")
        return cid

    # -- guest -----------------------------------------------------------------
    def _op_ping(self, rid: int, _a: None) -> p.PingResult:
        return self._do_ping()

    def _do_ping(self) -> p.PingResult:
        return p.PingResult(uptime=gkernel.uptime())

    def _op_guest_info(self, rid: int, _a: None) -> p.GuestInfo:
        return self._do_guest_info(self.config.runtime_binary("runc"))

    def _do_guest_info(self, runc: str) -> p.GuestInfo:
        mem = gkernel.meminfo()
        _, ver, _ = run_capture([runc, "--version"], 4096)
        return p.GuestInfo(
            kernel=os.uname().release,
            uptime=gkernel.uptime(),
            mem_total_kb=mem.get("MemTotal", 0),
            mem_free_kb=mem.get("MemAvailable", 0),
            cpus=os.cpu_count() or 1,
            python=sys.version.split()[0],
            runc=ver.split("\n")[0][:200],
        )

    def _op_set_clock(self, rid: int, a: p.SetClock) -> p.Empty:
        if not 0 < a.epoch_ns < 1 << 63:
            raise AgentFailure(f"invalid clock {a.epoch_ns}", "invalid")
        return self._do_set_clock(a.epoch_ns)

    def _do_set_clock(self, epoch_ns: int) -> p.Empty:
        if self.config.set_clock:
            time.clock_settime_ns(time.CLOCK_REALTIME, epoch_ns)
        return p.Empty()

    def _op_shutdown(self, rid: int, _a: None) -> p.Empty:
        return self._do_shutdown()

    def _do_shutdown(self) -> p.Empty:
        """Kill every process, sync, and stop once the answer is out."""
        self.procs.kill_all()
        os.sync()
        self._stop()
        return p.Empty()

    # -- containers and processes ------------------------------------------------
    def _op_create_container(self, rid: int, a: p.CreateContainer) -> p.ContainerCreated:
        # everything the host sent is checked before anything is mounted
        self.config.runtime_binary(a.runtime)
        bundles.check_id(a.container_id)
        bundles.check_fstype(self.config, a.rootfs_fstype)
        if a.rootfs_fstype == "virtiofs" and not self.shared_mounted:
            raise AgentFailure("the shared directory is not mounted", "invalid")
        return self._do_create_container(a)

    def _do_create_container(self, a: p.CreateContainer) -> p.ContainerCreated:
        source = bundles.rootfs_source(self.config, a.rootfs_fstype, a.rootfs_serial)
        spec = bundles.join_namespaces(a.spec, self._namespace_paths(a.join_namespaces))
        bundle = bundles.prepare_bundle(self.config, a.container_id, spec, source, a.rootfs_fstype, a.user)
        self.containers[a.container_id] = a.runtime
        return p.ContainerCreated(bundle=bundle)

    def _namespace_paths(self, join: dict[str, str]) -> dict[str, str]:
        """ns type -> /proc/<init pid>/ns/<type> of the running container named."""
        out = {}
        for ns, cid in join.items():
            if ns not in bundles.JOINABLE_NAMESPACES:
                raise AgentFailure(f"cannot join a {ns!r} namespace", "invalid")
            stream = self.inits.get(self._known(cid))
            pr = self.procs.procs.get(stream or 0)
            why = f"container {cid} does not run: its {ns} namespace cannot be joined"
            if pr is None or pr.status is not None:
                raise AgentFailure(why)
            try:
                with open(pr.pid_file) as fh:
                    pid = int(fh.read(32))
            except (OSError, ValueError):
                raise AgentFailure(why) from None
            out[ns] = f"/proc/{pid}/ns/{ns}"
        return out

    def _op_start_container(self, rid: int, a: p.StartContainer) -> p.ProcessStarted | None:
        cid = self._known(a.container_id)
        self.procs.check_free(a.stream)
        return self._do_start_container(rid, cid, a.stream, a.stdin, a.wait_started)

    def _do_start_container(
        self, rid: int, cid: str, stream: int, stdin: bool, wait_started: bool
    ) -> p.ProcessStarted | None:
        bundle = bundles.bundle_dir(self.config, cid)
        with open(os.path.join(bundle, "config.json")) as fh:
            tty = bool((json.load(fh).get("process") or {}).get("terminal"))
        pid_file, log = f"{bundle}/init.pid", f"{bundle}/init.log"
        if os.path.exists(pid_file):  # an earlier run's: it would pass for this one's
            os.unlink(pid_file)
        argv = bundles.run_argv(
            self.config.runtime_binary(self.containers[cid]),
            bundle,
            cid,
            pid_file,
            log,
            self.config.runc_root,
        )
        pr = self.procs.spawn(stream, cid, argv, tty, stdin, pid_file, log)
        init = self.procs.procs.get(self.inits.get(cid, 0))
        if init is None or init.status is not None:
            self.inits[cid] = stream
        if not wait_started:
            return p.ProcessStarted(pid=pr.pid)
        pr.start_waiters.append(rid)
        return None  # answered by the process table once it runs or failed

    def _op_exec(self, rid: int, a: p.ExecProcess) -> p.ProcessStarted:
        cid = self._known(a.container_id)
        self.procs.check_free(a.stream)
        return self._do_exec(cid, a)

    def _do_exec(self, cid: str, a: p.ExecProcess) -> p.ProcessStarted:
        bundle = bundles.bundle_dir(self.config, cid)
        process = dict(a.process)
        if a.user:
            process["user"] = resolve_user(bundles.root_path(bundle), a.user)
        spec_file = f"{bundle}/exec-{a.stream}.json"
        with open(spec_file, "w") as fh:
            json.dump(process, fh)
        pid_file, log = f"{bundle}/exec-{a.stream}.pid", f"{bundle}/exec-{a.stream}.log"
        argv = bundles.exec_argv(
            self.config.runtime_binary(self.containers[cid]),
            cid,
            spec_file,
            pid_file,
            log,
            self.config.runc_root,
        )
        pr = self.procs.spawn(a.stream, cid, argv, bool(process.get("terminal")), a.stdin, pid_file, log)
        return p.ProcessStarted(pid=pr.pid)

    def _op_signal(self, rid: int, a: p.SignalProcess) -> p.Empty:
        pr = self.procs.get(a.stream)
        if not 0 <= a.signal <= 64:
            raise AgentFailure(f"invalid signal {a.signal}", "invalid")
        return self._do_signal(pr, a.signal)

    def _do_signal(self, pr: Proc, sig: int) -> p.Empty:
        self.procs.kill(pr, sig)
        return p.Empty()

    def _op_resize(self, rid: int, a: p.ResizeTty) -> p.Empty:
        pr = self.procs.get(a.stream)
        if pr.tty_fd is None:
            raise AgentFailure("process has no terminal", "invalid")
        if not (0 <= a.rows <= 0xFFFF and 0 <= a.cols <= 0xFFFF):
            raise AgentFailure(f"invalid terminal size {a.rows}x{a.cols}", "invalid")
        return self._do_resize(pr, a.rows, a.cols)

    def _do_resize(self, pr: Proc, rows: int, cols: int) -> p.Empty:
        import fcntl
        import termios

        assert pr.tty_fd is not None
        fcntl.ioctl(pr.tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        if pr.status is None:  # runc copies the size from its own console on SIGWINCH
            os.kill(pr.pid, signal.SIGWINCH)
        return p.Empty()

    def _op_wait(self, rid: int, a: p.WaitProcess) -> p.ExitStatus | None:
        return self._do_wait(rid, self.procs.get(a.stream))

    def _do_wait(self, rid: int, pr: Proc) -> p.ExitStatus | None:
        if pr.done and pr.status is not None:
            return p.ExitStatus(status=pr.status)
        pr.waiters.append(rid)
        return None  # answered when the process ends

    def _op_runtime(self, rid: int, a: p.RuntimeCommand) -> p.CommandResult:
        cid = self._known(a.container_id)
        resources = f"{bundles.bundle_dir(self.config, cid)}/update.json"
        extra = ["--resources", resources] if a.command == "update" else []
        argv = bundles.runtime_argv(
            self.config.runtime_binary(self.containers[cid]),
            a.command,
            list(a.args) + extra,
            cid,
            self.config.runc_root,
        )
        return self._do_runtime(argv, resources if extra else "", a.resources)

    def _do_runtime(
        self, argv: list[str], resources_file: str, resources: dict[str, object]
    ) -> p.CommandResult:
        if resources_file:
            with open(resources_file, "w") as fh:
                json.dump(resources, fh)
        return self._run(argv)

    def _op_stats(self, rid: int, a: p.GetStats) -> p.ContainerStats:
        cid = self._known(a.container_id)
        init = self.procs.procs.get(self.inits.get(cid, 0))
        pid = init.target_pid() if init is not None and init.status is None else 0
        if init is None or pid == init.pid or pid <= 0:  # no pid file: not running yet
            raise AgentFailure(f"container {cid} is not running", "invalid")
        return self._do_stats(pid)

    def _do_stats(self, pid: int) -> p.ContainerStats:
        return stats.container_stats(self.config.cgroup_root, pid)

    # -- checkpoint and restore (CRIU) -------------------------------------------
    def _op_criu_check(self, rid: int, _a: None) -> p.CommandResult:
        return self._do_criu_check()

    def _criu_modules(self) -> None:
        """Load CRIU's kernel modules (socket diagnostics, nf_tables) once."""
        if self.criu_ready:
            return
        where = self.config.criu_modules
        try:
            with open(os.path.join(where, "order")) as fh:
                names = fh.read(4096).split()
        except OSError:
            names = []  # an initramfs without them: CRIU says what it misses
        for name in names:
            if set(name) <= gkernel.MODULE_NAME_OK and not os.path.isdir(f"/sys/module/{name}"):
                run_capture([self.config.busybox, "insmod", os.path.join(where, f"{name}.ko")], 4096)
        self.criu_ready = True

    def _do_criu_check(self) -> p.CommandResult:
        """``criu check``; its stdout starts with the line of ``criu --version``."""
        self._criu_modules()
        _, version, _ = run_capture([self.config.criu, "--version"], 4096)
        res = self._run([self.config.criu, "check"])
        lines = [ln for ln in version.splitlines() if ln.startswith("Version")][:1]
        return p.CommandResult(
            status=res.status, stdout="\n".join([*lines, res.stdout]), stderr=res.stderr, error=res.error
        )

    def _criu_dirs(self, cid: str, image_dir: str, work_dir: str) -> tuple[str, str]:
        if self.containers[cid] != "runc":
            raise AgentFailure(
                f"container {cid} runs under {self.containers[cid]}: checkpoint/restore needs runc",
                "unsupported",
            )
        if not self.shared_mounted:
            raise AgentFailure("the shared directory is not mounted", "invalid")
        self._criu_modules()
        return shared.shared_path(self.config, image_dir), shared.shared_path(self.config, work_dir)

    def _op_checkpoint(self, rid: int, a: p.CheckpointContainer) -> p.CommandResult:
        cid = self._known(a.container_id)
        images, work = self._criu_dirs(cid, a.image_dir, a.work_dir)
        flags = bundles.criu_flags(a.leave_running, a.tcp_established, a.file_locks)
        return self._do_checkpoint(cid, images, work, flags)

    def _do_checkpoint(self, cid: str, images: str, work: str, flags: list[str]) -> p.CommandResult:
        binary = self.config.runtime_binary(self.containers[cid])
        argv = bundles.checkpoint_argv(binary, cid, images, work, flags, self.config.runc_root)
        code, out, err = run_capture(argv, p.MAX_OUTPUT, timeout=p.CHECKPOINT_TIMEOUT)
        error = bundles.runtime_error(err or out)[:4000] if code != 0 else ""
        return p.CommandResult(status=code, stdout=out, stderr=err, error=error)

    def _op_restore(self, rid: int, a: p.RestoreContainer) -> p.ProcessStarted | None:
        cid = self._known(a.container_id)
        self.procs.check_free(a.stream)
        images, work = self._criu_dirs(cid, a.image_dir, a.work_dir)
        if cid in self.inits:
            raise AgentFailure(f"container {cid} was started already", "exists")
        return self._do_restore(
            rid,
            cid,
            a.stream,
            images,
            work,
            bundles.criu_flags(False, a.tcp_established, a.file_locks),
            a.leave_stopped,
        )

    def _do_restore(
        self, rid: int, cid: str, stream: int, images: str, work: str, flags: list[str], stopped: bool
    ) -> p.ProcessStarted | None:
        bundle = bundles.bundle_dir(self.config, cid)
        bundles.restore_config(bundle, stopped)
        pid_file, log = f"{bundle}/init.pid", f"{bundle}/init.log"
        binary = self.config.runtime_binary(self.containers[cid])
        argv = bundles.restore_argv(
            binary, bundle, cid, images, work, flags, pid_file, log, self.config.runc_root
        )
        pr = self.procs.spawn(stream, cid, argv, False, False, pid_file, log)
        self.inits[cid] = stream
        pr.start_waiters.append(rid)
        return None  # answered by the process table once the tree runs or restore failed

    # -- forensics --------------------------------------------------------------
    def _op_dump_memory(self, rid: int, a: p.DumpMemory) -> p.MemoryDumped:
        cid = self._known(a.container_id)
        if not 0 < a.pid < 1 << 22 or a.max_bytes <= 0:
            raise AgentFailure(f"invalid pid {a.pid} or size {a.max_bytes}", "invalid")
        if not self.shared_mounted:
            raise AgentFailure("the shared directory is not mounted", "invalid")
        init = self.procs.procs.get(self.inits.get(cid, 0))
        init_pid = init.target_pid() if init is not None and init.status is None else 0
        if init is None or init_pid == init.pid or init_pid <= 0:
            raise AgentFailure(f"container {cid} is not running", "invalid")
        return self._do_dump_memory(init_pid, a.pid, shared.shared_path(self.config, a.dir), a.max_bytes)

    def _do_dump_memory(self, init_pid: int, ns_pid: int, dest: str, max_bytes: int) -> p.MemoryDumped:
        pid = memory.vm_pid(init_pid, ns_pid)
        try:
            with open(f"/proc/{pid}/comm") as fh:
                comm = fh.read(64).strip()
        except OSError:
            comm = ""
        regions, total, unreadable = memory.dump(pid, dest, max_bytes)
        return p.MemoryDumped(
            vm_pid=pid, comm=comm, regions=regions, bytes=total, unreadable=tuple(unreadable)
        )

    # -- kernel ----------------------------------------------------------------
    def _op_load_module(self, rid: int, a: p.LoadModule) -> p.CommandResult:
        path = os.path.normpath(a.path)
        where = self.config.modules_dir
        if not path.startswith(where + "/") or not path.endswith(".ko"):
            raise AgentFailure(f"module path {a.path!r} is not under {where}", "invalid")
        for param in a.params:
            if not param or "=" not in param or param.startswith("-"):
                raise AgentFailure(f"invalid module parameter {param!r}", "invalid")
        return self._do_load_module(path, a.params)

    def _do_load_module(self, path: str, params: tuple[str, ...]) -> p.CommandResult:
        return self._run([self.config.busybox, "insmod", path, *params])

    def _op_unload_module(self, rid: int, a: p.UnloadModule) -> p.CommandResult:
        if not a.name or not set(a.name) <= gkernel.MODULE_NAME_OK:
            raise AgentFailure(f"invalid module name {a.name!r}", "invalid")
        return self._do_unload_module(a.name)

    def _do_unload_module(self, name: str) -> p.CommandResult:
        return self._run([self.config.busybox, "rmmod", name])

    def _op_mount_shared(self, rid: int, _a: None) -> p.SharedMounted:
        if self.shared_mounted:
            raise AgentFailure("the shared directory is already mounted", "exists")
        return self._do_mount_shared()

    def _do_mount_shared(self) -> p.SharedMounted:
        shared.mount_shared(self.config)
        self.shared_mounted = True
        return p.SharedMounted(path=self.config.shared_dir)

    # -- network -----------------------------------------------------------------
    def _op_configure_network(self, rid: int, a: p.ConfigureNetwork) -> p.NetworkConfigured:
        plan = network.check(a)
        if self.network_configured:
            raise AgentFailure("the network is already configured", "exists")
        return self._do_configure_network(plan)

    def _do_configure_network(self, plan: network.Plan) -> p.NetworkConfigured:
        # once per VM, even after a failure: a half-applied configuration is not
        # undone, and the same request would only meet what it already added
        self.network_configured = True
        return p.NetworkConfigured(names=tuple(network.configure(self.config, plan)))

    def _op_kernel_log(self, rid: int, a: p.KernelLog) -> p.KernelLogResult:
        return self._do_kernel_log(a.since)

    def _do_kernel_log(self, since: int) -> p.KernelLogResult:
        return gkernel.kernel_log(since, p.MAX_LOG)

    # -- after a snapshot restore ---------------------------------------------------
    def _op_reseed_random(self, rid: int, a: p.ReseedRandom) -> p.Empty:
        try:
            entropy = bytes.fromhex(a.entropy)
        except ValueError:
            raise AgentFailure("entropy must be hex", "invalid") from None
        if len(entropy) != p.RESEED_BYTES:
            raise AgentFailure(f"entropy must be {p.RESEED_BYTES} bytes", "invalid")
        return self._do_reseed_random(entropy)

    def _do_reseed_random(self, entropy: bytes) -> p.Empty:
        """RNDADDENTROPY (mix in and credit the host's bytes), then RNDRESEEDCRNG: the
        kernel's CRNG reseeds now, not at its next scheduled reseed (up to a minute
        later), so a clone's /dev/urandom diverges from its twin's at once."""
        import fcntl  # only here: the agent's start-up stays lean

        info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
        fd = os.open(RANDOM_DEVICE, os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, info)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as err:
            raise AgentFailure(f"reseeding the random pool failed: {err.strerror}", "failed") from None
        finally:
            os.close(fd)
        return p.Empty()

    def _op_list_processes(self, rid: int, _a: None) -> p.ProcessList:
        return self._do_list_processes()

    def _do_list_processes(self) -> p.ProcessList:
        inits = set(self.inits.values())
        return p.ProcessList(
            processes=tuple(
                p.ProcessInfo(
                    stream=pr.stream,
                    container_id=pr.cid,
                    init=pr.stream in inits,
                    running=not pr.done,
                    status=-1 if pr.status is None or not pr.done else pr.status,
                )
                for pr in sorted(self.procs.procs.values(), key=lambda pr: pr.stream)
            )
        )

    def _run(self, argv: list[str]) -> p.CommandResult:
        """A short helper command; on failure ``error`` carries its last error line."""
        code, out, err = run_capture(argv, p.MAX_OUTPUT)
        error = bundles.runtime_error(err or out)[:4000] if code != 0 else ""
        return p.CommandResult(status=code, stdout=out, stderr=err, error=error)
