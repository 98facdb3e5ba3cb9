"""The Hypervisor interface: what the sandbox needs from any VMM, nothing more."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmpod.hypervisor.accel import AccelChoice


@dataclass(frozen=True)
class Disk:
    """A raw disk image exposed as virtio-blk; the guest finds it by ``serial``."""
    path: Path
    serial: str
    readonly: bool = True


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initramfs: Path
    cmdline: str
    cpus: int
    memory_mb: int
    accel: AccelChoice
    disks: tuple[Disk, ...]
    state_dir: Path        # sockets and logs of this VM live here
    agent_channel: str = "serial"   # "serial" (virtio-serial) | "vsock"
    vsock_cid: int = 0

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"


class Hypervisor(Protocol):
    """One VM. ``launch`` starts it; ``shutdown`` is graceful-then-hard; ``kill`` is
    idempotent and always leaves no process behind."""

    config: VmConfig

    async def launch(self) -> None: ...

    async def shutdown(self, timeout: float = 5.0) -> None: ...

    def kill(self) -> None: ...

    @property
    def pid(self) -> int | None: ...

    def exit_status(self) -> int | None:
        """None while running; the process exit code (negative: signal) after."""
        ...

    def console_tail(self, lines: int = 20) -> str: ...
