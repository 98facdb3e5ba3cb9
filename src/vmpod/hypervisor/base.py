"""The Hypervisor interface: what the sandbox needs from any VMM, nothing more."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol, runtime_checkable

from vmpod.hypervisor.accel import AccelChoice


class VmState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


# new -> running (launched) -> stopped; a failed launch goes straight to stopped.
VM_TRANSITIONS = {
    VmState.NEW: frozenset({VmState.RUNNING, VmState.STOPPED}),
    VmState.RUNNING: frozenset({VmState.STOPPED}),
}


@dataclass(frozen=True)
class Disk:
    """A raw disk image exposed as virtio-blk; the guest finds it by ``serial``."""

    path: Path
    serial: str
    readonly: bool = True


@dataclass(frozen=True)
class HostChannel:
    """A byte stream between host and guest, for whatever the guest runs on it.

    ``serial``: a virtio-serial port named ``name`` (a unix socket on the host);
    ``vsock``: the guest listens on vsock, the host connects to ``vsock_cid``.
    """

    kind: str = "serial"
    name: str = "org.vmpod.channel"
    vsock_cid: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("serial", "vsock"):
            raise ValueError(f"unknown host channel kind {self.kind!r}")
        if self.kind == "vsock" and self.vsock_cid < 3:
            raise ValueError(f"vsock guest CID must be >= 3, not {self.vsock_cid}")


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC whose backend is an open tap file descriptor.

    The caller owns ``fd``: it must stay open until ``launch`` returns (QEMU
    inherits it under the same number) and the caller closes its own copy after
    that — QEMU's copy keeps the tap attached for the life of the VM. Whether the
    tap carries virtio-net headers is decided when the tap is opened
    (IFF_VNET_HDR): QEMU probes the fd and refuses ``vnet_hdr=`` next to ``fd=``.
    ``mtu`` is told to the guest driver (virtio-net ``host_mtu``); ``mac`` is the
    guest's address, lower-case.
    """

    fd: int
    mac: str
    mtu: int = 1500

    def __post_init__(self) -> None:
        if self.fd < 0:
            raise ValueError(f"invalid tap fd {self.fd}")
        mac = self.mac.lower()
        if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise ValueError(f"invalid NIC MAC address {self.mac!r} (need a unicast xx:xx:xx:xx:xx:xx)")
        object.__setattr__(self, "mac", mac)
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"invalid NIC MTU {self.mtu} (68..65535)")


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initramfs: Path
    cmdline: str
    cpus: int
    memory_mb: int
    accel: AccelChoice
    disks: tuple[Disk, ...]
    state_dir: Path  # sockets and logs of this VM live here
    channel: HostChannel = field(default_factory=HostChannel)
    # A host directory the guest mounts with virtio-fs by ``shared_tag``; its file
    # server lives and dies with the VM. None: no shared directory.
    shared_dir: Path | None = None
    shared_tag: str = "shared"
    # virtio-net NICs on tap fds the caller opened (and closes after launch).
    nics: tuple[Nic, ...] = ()
    # Start paused, waiting for a saved state (``load_state``) instead of booting.
    incoming: bool = False

    @property
    def channel_socket(self) -> Path:
        """Host end of a ``serial`` channel."""
        return self.state_dir / "channel.sock"

    @property
    def fs_socket(self) -> Path:
        """vhost-user socket between QEMU and the virtio-fs server."""
        return self.state_dir / "fs.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"


class Hypervisor(Protocol):
    """One VM. ``launch`` starts it (new -> running); ``shutdown`` is
    graceful-then-hard; ``kill`` is idempotent and always leaves no process behind.
    Drivers know nothing of containers or of what runs on the channel."""

    config: VmConfig

    @property
    def state(self) -> VmState: ...

    async def launch(self) -> None: ...

    async def shutdown(self, timeout: float = 5.0) -> None: ...

    def kill(self) -> None: ...

    @property
    def pid(self) -> int | None: ...

    def exit_status(self) -> int | None:
        """None while running; the process exit code (negative: signal) after."""
        ...

    def console_tail(self, lines: int = 20) -> str: ...

    def shared_fs_failure(self) -> str | None:
        """Why the shared directory's file server is gone (None while it serves, or
        when the VM has no shared directory)."""
        ...


@runtime_checkable
class SavesState(Protocol):
    """A Hypervisor that can save and load a whole VM's state (sandbox snapshots)."""

    async def save_state(self, fd: int) -> int:
        """Pause the VM and write its whole state (RAM, devices) to ``fd``; it stays
        paused until ``resume``. Returns the bytes of RAM written."""
        ...

    async def load_state(self, fd: int) -> None:
        """Load a state ``save_state`` wrote into a VM launched with ``incoming``."""
        ...

    async def resume(self) -> None:
        """Run a paused VM."""
        ...


def describe_exit(code: int) -> str:
    """A VMM process exit code in words (negative: killed by that signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit status {code}"
