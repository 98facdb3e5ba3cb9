"""QEMU as a Hypervisor: launch, QMP (qemu.qmp), graceful-then-hard shutdown, kill by pid."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmpod.errors import HypervisorError
from vmpod.hypervisor.base import VM_TRANSITIONS, VmConfig, VmState, describe_exit
from vmpod.hypervisor.qemu.console import ConsoleDrain, ConsoleFiles
from vmpod.hypervisor.qemu.devices import build_argv, find_qemu
from vmpod.hypervisor.qemu.virtiofsd import Virtiofsd
from vmpod.proc import spawn_vm_helper
from vmpod.states import StateMachine

log = logging.getLogger(__name__)


class QemuVm:
    """One QEMU process. States: new -> running -> stopped (``VM_TRANSITIONS``)."""

    def __init__(self, config: VmConfig, binary: str | None = None) -> None:
        self.config = config
        self.binary = binary or find_qemu()
        self.argv: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
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
        return self._proc.pid if self._proc else None

    def exit_status(self) -> int | None:
        return self._proc.poll() if self._proc else None

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
        console_fd = self._console.open()
        self.argv = build_argv(self.binary, self.config, console=Path(f"/dev/fd/{console_fd}"))
        log.debug("launching %s", " ".join(self.argv))
        errlog = (self.config.state_dir / "qemu.log").open("wb")
        try:
            self._proc = spawn_vm_helper(
                self.argv,
                errlog,
                # the NICs' taps, under the same numbers; the caller keeps (and
                # closes) its own copies: see Nic
                # and the console pipe's write end, which QEMU opens by path
                pass_fds=(*(n.fd for n in self.config.nics), console_fd),
            )
        except OSError as err:
            self._console.close()
            if self._fs is not None:
                self._fs.kill()
            self._sm.to(VmState.STOPPED)
            raise HypervisorError(f"cannot start QEMU: {err}", argv=self.argv) from err
        finally:
            errlog.close()
            self._console.spawned()  # QEMU's exit must be the drain's EOF
        self._sm.to(VmState.RUNNING)
        try:
            await self._connect_qmp()
        except BaseException:
            self.kill()
            raise

    async def _connect_qmp(self, timeout: float = 30.0) -> None:
        sock = self.config.qmp_socket
        deadline = time.monotonic() + timeout
        while not sock.exists():
            self._raise_if_dead("QEMU exited during start-up")
            if time.monotonic() > deadline:
                raise HypervisorError(
                    "QEMU did not open its QMP socket", argv=self.argv, console_tail=self.console_tail()
                )
            await asyncio.sleep(0.005)
        # The socket file appears at bind(), a moment before QEMU listens on it:
        # a refused connection right then is a retry, not an error.
        while True:
            qmp = QMPClient("vmpod")
            try:
                await asyncio.wait_for(qmp.connect(str(sock)), max(0.1, deadline - time.monotonic()))
                break
            except (TimeoutError, QMPError, OSError) as err:
                self._raise_if_dead("QEMU exited during start-up")
                if time.monotonic() > deadline:
                    raise HypervisorError(
                        f"cannot talk QMP to QEMU: {err or 'timed out'}",
                        argv=self.argv,
                        console_tail=self.console_tail(),
                    ) from err
                await asyncio.sleep(0.01)
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
        self._console.close()  # QEMU is gone: the rest of the pipe, then EOF
        if self._fs is not None:
            self._fs.kill()
        self._sm.to(VmState.STOPPED)
        self._drop_qmp()

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
