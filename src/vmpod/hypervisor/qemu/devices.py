"""QEMU command line, one frozen dataclass per device, each rendering its own args."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmpod.hypervisor.base import Disk, Nic, VmConfig


def q(value: object) -> str:
    """Escape a value for a QEMU option list (commas are doubled)."""
    return str(value).replace(",", ",,")


def endpoint(where: Path | int) -> str:
    """A socket chardev's address: a path, or an inherited socket fd (listening
    for a server, connected for a client) so that a jailed QEMU needs no path."""
    return f"fd={where}" if isinstance(where, int) else f"path={q(where)}"


@dataclass(frozen=True)
class Machine:
    accel: str
    cpus: int
    memory_mb: int
    # Guest RAM a vhost-user backend (virtiofsd) can map: a memfd shared with it.
    # memfd, not a file: nothing to leak on kill -9, and no tmpfs quota to fit in.
    shared_memory: bool = False

    def args(self) -> list[str]:
        # microvm: virtio-mmio only, no PCI, no firmware option ROMs: fastest boot.
        # tb-size: the translation cache's default is 1 GiB; 128 MiB is ample for a
        # container and cut an idle sandbox's PSS by ~35 MiB.
        # thread=single when the guest has several vCPUs: with QEMU 7.2's multi-
        # threaded TCG, a 2-vCPU guest intermittently livelocked in runc's start
        # (both vCPUs "soft lockup" in runc and its child; about 1 run in 10, see
        # README's limits). One host thread runs all vCPUs then; 1 vCPU is as before.
        thread = "single" if self.cpus > 1 else "multi"
        accel = f"tcg,thread={thread},tb-size=128" if self.accel == "tcg" else "kvm"
        cpu = "max" if self.accel == "tcg" else "host"
        machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on"
        shared: list[str] = []
        if self.shared_memory:
            machine += ",memory-backend=mem"
            shared = [
                "-object",
                f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
                # microvm's legacy virtio-mmio makes virtiofsd refuse the device
                # (field notes): modern virtio for every device of this VM
                "-global",
                "virtio-mmio.force-legacy=false",
            ]
        return [
            "-M",
            machine,
            *shared,
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-smp",
            str(self.cpus),
            "-m",
            f"{self.memory_mb}M",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ]


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path
    initramfs: Path
    cmdline: str

    def args(self) -> list[str]:
        return ["-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", self.cmdline]


@dataclass(frozen=True)
class BlockDevice:
    index: int
    disk: Disk

    def args(self) -> list[str]:
        node = f"disk{self.index}"
        ro = "on" if self.disk.readonly else "off"
        return [
            "-drive",
            f"id={node},file={q(self.disk.path)},format=raw,if=none,readonly={ro}",
            "-device",
            f"virtio-blk-device,drive={node},serial={q(self.disk.serial)}",
        ]


@dataclass(frozen=True)
class NetDevice:
    """virtio-net on a tap the caller opened; QEMU inherits ``nic.fd`` (see ``Nic``)."""

    index: int
    nic: Nic

    def args(self) -> list[str]:
        node = f"net{self.index}"
        return [
            "-netdev",
            f"tap,id={node},fd={self.nic.fd}",
            "-device",
            f"virtio-net-device,netdev={node},mac={self.nic.mac},host_mtu={self.nic.mtu}",
        ]


@dataclass(frozen=True)
class SerialConsole:
    """The guest's console (ttyS0) into ``log``: in vmpod a pipe's /dev/fd path,
    drained into a capped log (see console.py), never a file QEMU grows itself."""

    log: Path

    def args(self) -> list[str]:
        return ["-chardev", f"file,id=console,path={q(self.log)}", "-serial", "chardev:console"]


@dataclass(frozen=True)
class SerialPort:
    """A named virtio-serial port whose host end is a listening unix socket."""

    socket: Path | int
    name: str

    def args(self) -> list[str]:
        return [
            "-device",
            "virtio-serial-device",
            "-chardev",
            f"socket,id=channel,{endpoint(self.socket)},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=channel,name={q(self.name)}",
        ]


@dataclass(frozen=True)
class SharedFs:
    """A vhost-user-fs device served by virtiofsd on ``socket``; the guest mounts ``tag``."""

    socket: Path | int
    tag: str

    def args(self) -> list[str]:
        return [
            "-chardev",
            f"socket,id=fs0,{endpoint(self.socket)}",
            "-device",
            f"vhost-user-fs-device,chardev=fs0,tag={q(self.tag)}",
        ]


@dataclass(frozen=True)
class VsockDevice:
    cid: int

    def args(self) -> list[str]:
        return ["-device", f"vhost-vsock-device,guest-cid={self.cid}"]


@dataclass(frozen=True)
class QmpSocket:
    socket: Path | int

    def args(self) -> list[str]:
        if isinstance(self.socket, int):
            chardev = f"socket,id=qmp,{endpoint(self.socket)},server=on,wait=off"
            return ["-chardev", chardev, "-mon", "chardev=qmp,mode=control"]
        return ["-qmp", f"unix:{q(self.socket)},server=on,wait=off"]


@dataclass(frozen=True)
class HostSockets:
    """Sockets the VM's owner opened for QEMU, passed as fds (see ``endpoint``)."""

    qmp: int
    channel: int | None = None  # listening, for a serial channel
    fs: int | None = None  # connected to virtiofsd

    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.qmp, self.channel, self.fs) if fd is not None)


@dataclass(frozen=True)
class Name:
    """The VM's name: its state directory, so ``ps`` ties a QEMU to its sandbox."""

    state_dir: Path

    def args(self) -> list[str]:
        return ["-name", f"guest={q(self.state_dir)}"]


@dataclass(frozen=True)
class Seccomp:
    policy: str

    def args(self) -> list[str]:
        return ["-sandbox", self.policy]


def build_argv(
    binary: str,
    cfg: VmConfig,
    console: Path | None = None,
    sockets: HostSockets | None = None,
    seccomp: str | None = None,
) -> list[str]:
    """QEMU's argv for ``cfg``; ``console`` is where the serial console goes
    (default: ``cfg.console_log`` itself); ``sockets`` replace the socket paths
    with inherited fds; ``seccomp`` is a ``-sandbox`` policy."""
    ch = cfg.channel
    shared = cfg.shared_dir is not None
    qmp: Path | int = sockets.qmp if sockets else cfg.qmp_socket
    channel: Path | int = cfg.channel_socket
    fs: Path | int = cfg.fs_socket
    if sockets is not None:
        channel = sockets.channel if sockets.channel is not None else channel
        fs = sockets.fs if sockets.fs is not None else fs
    devices: list[
        Machine
        | KernelBoot
        | BlockDevice
        | SerialConsole
        | SerialPort
        | VsockDevice
        | QmpSocket
        | SharedFs
        | NetDevice
        | Name
        | Seccomp
    ] = [
        Name(cfg.state_dir),
        Machine(cfg.accel.accel, cfg.cpus, cfg.memory_mb, shared_memory=shared),
        *([Seccomp(seccomp)] if seccomp else []),
        KernelBoot(cfg.kernel, cfg.initramfs, cfg.cmdline),
        SerialConsole(console or cfg.console_log),
        QmpSocket(qmp),
        *(BlockDevice(i, d) for i, d in enumerate(cfg.disks)),
        SerialPort(channel, ch.name) if ch.kind == "serial" else VsockDevice(ch.vsock_cid),
        *([SharedFs(fs, cfg.shared_tag)] if shared else []),
        *(NetDevice(i, n) for i, n in enumerate(cfg.nics)),
    ]
    argv = [binary]
    for dev in devices:
        argv += dev.args()
    if cfg.incoming:  # paused, its state comes over QMP (migrate.py)
        argv += ["-S", "-incoming", "defer"]
    return argv


def find_qemu() -> str | None:
    for d in os.environ.get("PATH", "/usr/bin").split(os.pathsep):
        cand = os.path.join(d, "qemu-system-x86_64")
        if os.access(cand, os.X_OK):
            return cand
    return None
