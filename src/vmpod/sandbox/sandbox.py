"""A Sandbox is one VM (one pod): hypervisor + agent connection + state directory.

Lifecycle: ``start`` (launch VM, wait for the agent's hello) -> use ``agent`` ->
``stop`` (agent shutdown, QEMU quit, hard kill, state dir removed). ``stop`` is
idempotent and runs in ``finally`` paths, so nothing is left behind.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from typing import IO

from vmpod.agent.client import AgentClient
from vmpod.agent.protocol import MODULES_DIR, VSOCK_PORT, CommandResult, KernelLogResult
from vmpod.errors import AgentError, AgentTimeout, HypervisorError, SandboxError
from vmpod.guest.assets import GuestAssets
from vmpod.guest.initramfs import with_modules
from vmpod.guest.modules import ModuleLoad, read_module
from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Disk, VmConfig
from vmpod.hypervisor.qemu.driver import QemuVm, describe_exit
from vmpod.paths import Paths

log = logging.getLogger(__name__)
ROOT_SERIAL = "vmpod-root"


@dataclass(frozen=True)
class SandboxConfig:
    assets: GuestAssets
    accel: AccelChoice
    cpus: int = 1
    memory_mb: int = 512
    boot_timeout: float = 60.0
    disks: tuple[Disk, ...] = ()
    kernel_args: tuple[str, ...] = field(default_factory=tuple)
    verbose_console: bool = False
    agent_channel: str = "auto"    # auto | serial | vsock
    modules: tuple[ModuleLoad, ...] = ()   # shipped in an extra initramfs, loaded on request


def choose_channel(requested: str = "auto") -> str:
    """vsock where the host has a usable vhost-vsock, virtio-serial otherwise."""
    if requested != "auto":
        return requested
    dev = "/dev/vhost-vsock"
    return "vsock" if os.path.exists(dev) and os.access(dev, os.R_OK | os.W_OK) else "serial"


def host_tsc_khz() -> int | None:
    """Host TSC rate: passing it avoids a random early-boot hang (field notes)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(cfg: SandboxConfig, channel: str = "serial") -> str:
    args = [f"vmpod.channel={channel}", "console=ttyS0", "panic=-1", "reboot=t", "8250.nr_uarts=1",
            "cryptomgr.notests", "no_timer_check", "random.trust_cpu=on"]
    if not cfg.verbose_console:
        args.append("quiet")
    khz = host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
    if not cfg.assets.kernel.pvh:
        # a bzImage's decompressor reports a corrupt image only on an early console
        args.append("earlyprintk=serial,ttyS0,115200")
    return " ".join([*args, *cfg.kernel_args])


def collect_stale(paths: Paths) -> list[str]:
    """Remove state dirs of sandboxes whose owner died (e.g. vmpod killed with -9).

    A live owner holds the flock on ``lock``; its QEMU died with it (PDEATHSIG).
    """
    removed: list[str] = []
    if not paths.sandboxes.is_dir():
        return removed
    for d in paths.sandboxes.iterdir():
        try:
            with (d / "lock").open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue    # alive
        except OSError:
            pass        # no lock file: half-created, the owner is gone too
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed


class Sandbox:
    def __init__(self, paths: Paths, config: SandboxConfig, sandbox_id: str | None = None) -> None:
        self.paths = paths
        self.config = config
        self.id = sandbox_id or secrets.token_hex(6)
        self.state_dir = paths.sandboxes / self.id
        self.agent = AgentClient()
        self.vm: QemuVm | None = None
        self._lock: IO[str] | None = None

    async def __aenter__(self) -> Sandbox:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._make_state_dir()
        a = self.config.assets
        initramfs = a.initramfs
        if self.config.modules:
            initramfs = with_modules(a.initramfs, {
                f"{m.name}.ko": read_module(m.file) for m in self.config.modules},
                self.state_dir / "initramfs.cpio")
        channel = choose_channel(self.config.agent_channel)
        cid = secrets.randbelow(2**31) + 3 if channel == "vsock" else 0
        vm_config = VmConfig(
            kernel=a.kernel.boot_image, initramfs=initramfs,
            cmdline=kernel_cmdline(self.config, channel), cpus=self.config.cpus,
            memory_mb=self.config.memory_mb, accel=self.config.accel,
            disks=(Disk(a.rootfs, ROOT_SERIAL), *self.config.disks),
            state_dir=self.state_dir, agent_channel=channel, vsock_cid=cid)
        self.vm = QemuVm(vm_config)
        await self.vm.launch()
        try:
            target = vm_config.agent_socket if channel == "serial" else (cid, VSOCK_PORT)
            await self.agent.connect(target, self.config.boot_timeout, self._check_alive)
        except AgentTimeout as err:
            raise AgentTimeout(
                f"guest agent did not answer within {self.config.boot_timeout:g}s "
                f"(kernel {a.kernel.release}, {self.config.accel.accel})",
                hint="raise --boot-timeout on slow hosts",
                console_tail=self.console_tail()) from err
        except AgentError as err:
            # The channel dropped: usually the VM stopped (panic, init failure).
            failure = await self.vm_failure()
            if failure is None:
                raise
            raise HypervisorError(
                f"the VM stopped during boot ({failure.details.get('how', '')}): "
                f"{self._last_console_line()}", console_tail=self.console_tail()) from err
        await self.agent.request("set_clock", {"epoch_ns": time.time_ns()})
        log.info("guest uptime at hello: %.2fs", self.agent.hello.uptime if self.agent.hello else -1)

    async def load_modules(self) -> None:
        """insmod the configured modules in order; a failure names the module."""
        for m in self.config.modules:
            res = await self.load_module(m)
            if res.status != 0:
                raise SandboxError(f"loading kernel module {m.name} failed: "
                                   f"{(res.stderr or res.stdout).strip() or f'status {res.status}'}",
                                   hint="see the kernel log (dmesg) of the guest")

    async def load_module(self, m: ModuleLoad) -> CommandResult:
        return await self.agent.call(CommandResult, "load_module", {
            "path": f"{MODULES_DIR}/{m.name}.ko", "params": list(m.params)}, timeout=60)

    async def unload_module(self, name: str) -> CommandResult:
        return await self.agent.call(CommandResult, "unload_module", {"name": name}, timeout=60)

    async def kernel_log(self, since: int = -1) -> KernelLogResult:
        return await self.agent.call(KernelLogResult, "kernel_log", {"since": since})

    def _make_state_dir(self) -> None:
        collect_stale(self.paths)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError as err:
            raise SandboxError(f"sandbox {self.id} already exists") from err
        self._lock = (self.state_dir / "lock").open("w")
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (self.state_dir / "pid").write_text(str(os.getpid()))

    def _check_alive(self) -> None:
        """Raise if the VM stopped (boot failure, kernel panic, QEMU killed)."""
        code = self.vm.exit_status() if self.vm else None
        if code is not None:
            assert self.vm is not None
            raise HypervisorError(
                f"the VM stopped during boot ({describe_exit(code)}): "
                f"{self._last_console_line()}",
                console_tail=self.console_tail())

    def _last_console_line(self) -> str:
        """The most telling console line: our init's complaint, a panic, else the last."""
        lines = [ln.strip() for ln in self.console_tail(40).splitlines() if ln.strip()]
        for marker in ("Kernel panic", "vmpod-init:", "vmpod-agent:"):
            found = [ln for ln in lines if marker in ln]
            if found:
                return found[-1]
        return lines[-1] if lines else "no console output"

    async def vm_failure(self, grace: float = 2.0) -> HypervisorError | None:
        """Why the VM is gone, if it is (used when the agent channel drops).

        The channel closes while the dying QEMU is still exiting: wait a moment.
        """
        if self.vm is None:
            return None
        deadline = time.monotonic() + grace
        while (code := self.vm.exit_status()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if code is None:
            return None
        return HypervisorError(f"the VM stopped unexpectedly (QEMU {describe_exit(code)})",
                               console_tail=self.console_tail(), how=f"QEMU {describe_exit(code)}")

    def console_tail(self, lines: int = 20) -> str:
        return self.vm.console_tail(lines) if self.vm else ""

    async def stop(self) -> None:
        """Graceful, then hard; always removes the state directory."""
        try:
            if self.vm is not None and self.vm.exit_status() is None:
                try:
                    await self.agent.request("shutdown", timeout=2.0)
                except AgentError as err:
                    log.debug("agent shutdown: %s", err)
            await self.agent.close()
            if self.vm is not None:
                await self.vm.shutdown(timeout=3.0)
        finally:
            if self.vm is not None:
                self.vm.kill()
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            shutil.rmtree(self.state_dir, ignore_errors=True)
