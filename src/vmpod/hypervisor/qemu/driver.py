"""QEMU as a Hypervisor: launch, QMP (qemu.qmp), graceful-then-hard shutdown, kill by pid."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmpod.errors import HypervisorError
from vmpod.hypervisor.base import VM_TRANSITIONS, VmConfig, VmState, describe_exit
from vmpod.hypervisor.qemu.console import ConsoleDrain, ConsoleFiles
from vmpod.hypervisor.qemu.devices import HostSockets, build_argv, find_qemu
from vmpod.hypervisor.qemu.jail import SECCOMP, Jail, jail_enabled, make_jail, wrap_argv
from vmpod.hypervisor.qemu.virtiofsd import Virtiofsd
from vmpod.proc import descendant_named, spawn_vm_helper
from vmpod.states import StateMachine

log = logging.getLogger(__name__)


class QemuVm:
    """One QEMU process. States: new -> running -> stopped (``VM_TRANSITIONS``)."""

    def __init__(self, config: VmConfig, binary: str | None = None) -> None:
        self.config = config
        self.binary = binary or find_qemu()
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        # QEMU itself when jailed (a grandchild, under bwrap): reaped through a pidfd
        self._qemu_pidfd = -1
        self._jailed = False
        self._qmp: QMPClient | None = None
        self._fs: Virtiofsd | None = None
        if config.shared_dir is not None:
            sd = config.state_dir
            self._fs = Virtiofsd(config.shared_dir, config.fs_socket, sd / "virtiofsd.log")
        self._sm = StateMachine("the VM", VmState.NEW, VM_TRANSITIONS)
        # the console goes through a pipe into a capped log (see console.py)
        self._console_files = ConsoleFiles(config.console_log)
        self._console = ConsoleDrain(self._console_files)

    @property
    def state(self) -> VmState:
        return self._sm.state

    @property
    def pid(self) -> int | None:
        """The process vmpod started: QEMU, or the jail (bwrap) that runs it."""
        return self._proc.pid if self._proc else None

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's own pid (inside the jail, a descendant of ``pid``)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return descendant_named(self._proc.pid, "qemu-system")

    def exit_status(self) -> int | None:
        """QEMU's exit status, negative for a signal as with Popen."""
        code = self._proc.poll() if self._proc else None
        if code is not None and self._jailed and code > 128:
            return -(code - 128)  # bwrap reports a command killed by signal N as 128+N
        return code

    async def launch(self) -> None:
        self._sm.require("launch", VmState.NEW)
        if self.binary is None:
            self._sm.to(VmState.STOPPED)
            raise HypervisorError(
                "qemu-system-x86_64 not found",
                hint="run the README set-up command (apt-get install qemu-system-x86)",
            )
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.argv = build_argv(self.binary, self.config)
        try:
            _check_nic_fds(self.config)
        except HypervisorError:
            self._sm.to(VmState.STOPPED)
            raise
        if self._fs is not None:
            try:
                self._fs.start()
                await self._fs.wait_ready()
            except BaseException:
                self.kill()
                raise
        try:
            jail = self._jail() if jail_enabled() else None
            sockets = await self._open_sockets()
        except BaseException:
            self.kill()
            raise
        console_fd = self._console.open()
        if jail is not None:
            os.fchown(console_fd, jail.uid, jail.gid)  # it reopens /dev/fd/N as its uid
        qemu_argv = build_argv(
            self.binary, self.config, console=Path(f"/dev/fd/{console_fd}"), sockets=sockets, seccomp=SECCOMP
        )
        # the NICs' taps, under the same numbers (the caller keeps and closes its
        # own copies: see Nic), the console pipe's write end, which QEMU opens by
        # path, and the sockets: QEMU needs no path it could write to
        fds = (*(n.fd for n in self.config.nics), console_fd, *sockets.fds())
        self.argv = qemu_argv if jail is None else wrap_argv(jail, qemu_argv)
        self._jailed = jail is not None
        log.debug("launching %s", " ".join(self.argv))
        errlog = (self.config.state_dir / "qemu.log").open("wb")
        try:
            self._proc = spawn_vm_helper(self.argv, errlog, pass_fds=fds)
        except OSError as err:
            self._console.close()
            if self._fs is not None:
                self._fs.kill()
            self._sm.to(VmState.STOPPED)
            raise HypervisorError(f"cannot start QEMU: {err}", argv=self.argv) from err
        finally:
            errlog.close()
            self._console.spawned()  # QEMU's exit must be the drain's EOF
            for fd in sockets.fds():
                os.close(fd)  # QEMU's copies serve; we connect by path
        self._sm.to(VmState.RUNNING)
        try:
            await self._connect_qmp()
            if jail is not None:
                self._track_qemu()
        except BaseException:
            self.kill()
            raise

    def _track_qemu(self) -> None:
        """Hold a pidfd of the jailed QEMU: ``kill`` must return only once it is
        gone (it holds disk locks and the guest's RAM), not just its jail."""
        pid = self.qemu_pid
        if pid is None:
            self._raise_if_dead("QEMU exited during start-up")
            raise HypervisorError("cannot find QEMU inside its jail", argv=self.argv)
        self._qemu_pidfd = os.pidfd_open(pid)

    def _jail(self) -> Jail:
        """What this VM's QEMU may open: its kernel, initramfs and disks, and the
        accelerator's or channel's device node."""
        cfg = self.config
        devices = []
        if cfg.accel.accel == "kvm":
            devices.append(Path("/dev/kvm"))
        if cfg.channel.kind == "vsock":
            devices.append(Path("/dev/vhost-vsock"))
        return make_jail(
            cfg.state_dir,
            readable=(cfg.kernel, cfg.initramfs, *(d.path for d in cfg.disks if d.readonly)),
            writable=tuple(d.path for d in cfg.disks if not d.readonly),
            devices=tuple(devices),
        )

    async def _open_sockets(self) -> HostSockets:
        """QMP's and the channel's listening sockets, bound here (root-owned, 0600)
        and the file server's connection, all handed to QEMU as fds."""
        cfg, opened = self.config, []
        try:
            qmp = _listen(cfg.qmp_socket)
            opened.append(qmp)
            channel = None
            if cfg.channel.kind == "serial":
                channel = _listen(cfg.channel_socket)
                opened.append(channel)
            fs = None
            if self._fs is not None:
                fs = await _connect(cfg.fs_socket, self._fs.exit_status)
                opened.append(fs)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return HostSockets(qmp=qmp, channel=channel, fs=fs)

    async def _connect_qmp(self, timeout: float = 30.0) -> None:
        """Connect to the QMP socket (listening from the start) and wait for the
        greeting, failing at once if QEMU exits first."""
        deadline = time.monotonic() + timeout
        qmp = QMPClient("vmpod")
        task = asyncio.create_task(qmp.connect(str(self.config.qmp_socket)))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.05)
                if task.done():
                    break
                self._raise_if_dead("QEMU exited during start-up")
                if time.monotonic() > deadline:
                    raise HypervisorError(
                        "QEMU did not answer on QMP", argv=self.argv, console_tail=self.console_tail()
                    )
            try:
                task.result()
            except (QMPError, OSError, EOFError) as err:
                # an exiting QEMU closes its sockets a moment before it can be
                # reaped: give its exit status the chance to be the message
                await self._wait_exit(1.0)
                self._raise_if_dead("QEMU exited during start-up")
                raise HypervisorError(
                    f"cannot talk QMP to QEMU: {err}", argv=self.argv, console_tail=self.console_tail()
                ) from err
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        self._qmp = qmp

    def _raise_if_dead(self, what: str) -> None:
        code = self.exit_status()
        if code is not None:
            raise HypervisorError(
                f"{what} ({describe_exit(code)}): {self.qemu_error()}",
                argv=self.argv,
                returncode=code,
                console_tail=self.console_tail(),
            )

    async def qmp(self, cmd: str, **args: object) -> object:
        """One QMP command (for snapshots, status and quit)."""
        self._sm.require("send a QMP command", VmState.RUNNING)
        if self._qmp is None:
            raise HypervisorError("QMP is not connected")
        return await self._qmp.execute(cmd, args or None)

    async def save_state(self, fd: int) -> int:
        from vmpod.hypervisor.qemu import migrate

        return await migrate.save(self._connected_qmp(), fd)

    async def load_state(self, fd: int) -> None:
        from vmpod.hypervisor.qemu import migrate

        try:
            await migrate.load(self._connected_qmp(), fd)
        except HypervisorError as err:
            await self._wait_exit(1.0)  # QEMU exits when a load fails: its log says why
            if self.exit_status() is None:
                raise
            raise HypervisorError(
                f"loading the VM state failed: {self.qemu_error()}", argv=self.argv
            ) from err

    async def resume(self) -> None:
        from vmpod.hypervisor.qemu import migrate

        await migrate.resume(self._connected_qmp())

    def _connected_qmp(self) -> QMPClient:
        self._sm.require("send a QMP command", VmState.RUNNING)
        if self._qmp is None:
            raise HypervisorError("QMP is not connected")
        return self._qmp

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Ask QEMU to quit over QMP, wait, then SIGKILL by pid; always cleans up.

        A VM that already stopped is left as it is (teardown paths call this)."""
        self._sm.require("shut down", VmState.RUNNING, VmState.STOPPED)
        if self._sm.state is VmState.STOPPED:
            return
        try:
            if self._qmp is not None and self.exit_status() is None:
                await asyncio.wait_for(self._qmp.execute("quit"), timeout)
            await self._wait_exit(timeout)
        except (TimeoutError, QMPError, OSError, EOFError) as err:
            log.debug("graceful QEMU shutdown failed: %s", err)
        finally:
            await self._close_qmp()
            self.kill()

    async def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.exit_status() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _close_qmp(self) -> None:
        if self._qmp is not None:
            try:
                await asyncio.wait_for(self._qmp.disconnect(), 2)
            except (TimeoutError, QMPError, OSError, EOFError):
                pass
            self._qmp = None

    def kill(self) -> None:
        """Idempotent hard stop by pid; reaps the process (and the file server)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._reap_jailed()
        self._console.close()  # QEMU is gone: the rest of the pipe, then EOF
        if self._fs is not None:
            self._fs.kill()
        self._sm.to(VmState.STOPPED)
        self._drop_qmp()

    def _reap_jailed(self) -> None:
        """The jail's pid namespace dies with it; wait until QEMU really has."""
        fd, self._qemu_pidfd = self._qemu_pidfd, -1
        if fd < 0:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(10_000):
                log.warning("QEMU (pidfd %d) still alive 10 s after SIGKILL", fd)
        finally:
            os.close(fd)

    def _drop_qmp(self) -> None:
        """Disconnect a QMP client a hard stop left behind (else qemu.qmp logs its
        EOFError as never retrieved); in the background when a loop runs."""
        qmp, self._qmp = self._qmp, None
        if qmp is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(_quietly_disconnect(qmp))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def console_tail(self, lines: int = 20) -> str:
        return self._console_files.tail(lines)

    def shared_fs_failure(self) -> str | None:
        if self._fs is None or self._sm.state is not VmState.RUNNING:
            return None
        code = self._fs.exit_status()
        if code is None:
            return None
        return f"virtiofsd {describe_exit(code)}: {self._fs.error()}"

    def qemu_error(self) -> str:
        text = _tail(self.config.state_dir / "qemu.log", 3)
        return text.replace("\n", " ") or "no error output"


def _listen(path: Path) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock.detach()


async def _connect(path: Path, exited: Callable[[], int | None], timeout: float = 10.0) -> int:
    """A connection to a helper's listening socket; the socket file appears at
    bind(), a moment before it listens: a refusal then is a retry."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
            return sock.detach()
        except (ConnectionRefusedError, FileNotFoundError) as err:
            sock.close()
            if exited() is not None or time.monotonic() > deadline:
                raise HypervisorError(f"cannot connect to {path}: {err.strerror}") from err
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(0.01)


def _check_nic_fds(config: VmConfig) -> None:
    """Every NIC's fd is open, distinct and not stdio (which QEMU's own replaces)."""
    seen: set[int] = set()
    for i, nic in enumerate(config.nics):
        what = f"NIC {i} ({nic.mac})"
        if nic.fd < 3 or nic.fd in seen:
            raise HypervisorError(f"{what}: tap fd {nic.fd} is stdio or used twice")
        seen.add(nic.fd)
        try:
            os.fstat(nic.fd)
        except OSError as err:
            raise HypervisorError(f"{what}: tap fd {nic.fd} is not open: {err.strerror}") from err


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _quietly_disconnect(qmp: QMPClient) -> None:
    try:
        await asyncio.wait_for(qmp.disconnect(), 2)
    except (TimeoutError, QMPError, OSError, EOFError):
        pass


def _tail(path: os.PathLike[str], lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.replace("\r", "").splitlines()[-lines:])
