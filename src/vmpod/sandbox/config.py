"""What a sandbox and its containers are made of: typed, frozen, validated once.

``SandboxConfig`` is fully resolved (assets built, accelerator chosen, modules
planned); front ends get one from ``build.prepare`` and a ``SandboxSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from vmpod.agent import protocol as p
from vmpod.guest.assets import GuestAssets
from vmpod.guest.modules import ModuleLoad
from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Disk

# What one container's definition may weigh: its OCI config travels in one agent
# message (with room for the request's other fields).
MAX_CONFIG_BYTES = p.MAX_JSON - 2048


@dataclass(frozen=True)
class SandboxConfig:
    assets: GuestAssets
    accel: AccelChoice
    cpus: int = 1
    memory_mb: int = 512
    boot_timeout: float = 60.0
    disks: tuple[Disk, ...] = ()  # container root filesystems (erofs), by path
    kernel_args: tuple[str, ...] = field(default_factory=tuple)
    verbose_console: bool = False
    agent_channel: str = "auto"  # auto | serial | vsock
    modules: tuple[ModuleLoad, ...] = ()  # shipped in an extra initramfs, loaded on request
    hypervisor: str = "qemu"  # a name in hypervisor.HYPERVISORS
    # How the guest mounts container root filesystem disks: "erofs" disks by serial,
    # or "dir": the path is visible to the agent as it is (an in-process agent in tests).
    rootfs_fstype: str = "erofs"
    # A host directory shared with the VM over virtio-fs (with its file server):
    # needed for volumes and for root filesystems that are host directories.
    shared_fs: bool = False
    # A network namespace (the engine's pod namespace, or one vmpod made with CNI):
    # each of its interfaces is mirrored to a tap and becomes a NIC of the VM with
    # the same MAC, MTU, addresses and routes. "": the VM has loopback only.
    netns: str = ""
    # (MAC, MTU) of NICs with no backend, after the wired ones: a restored
    # snapshot's (the device its state expects; frames go nowhere)
    isolated_nics: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Volume:
    """A host path (directory or file) bind-mounted into a container: it becomes the
    source of ``oci["mounts"][mount]``, shared with the VM over virtio-fs."""

    mount: int
    source: Path
    readonly: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """One container of a sandbox.

    ``rootfs`` is either a disk image the sandbox was booted with
    (``SandboxConfig.disks``: the VM has no disk hotplug, so every container's disk
    is known at boot; writes go to guest RAM) or a host directory, shared with the
    VM (``SandboxConfig.shared_fs``) and used as it is: writes land on the host.
    ``oci["root"]["readonly"]`` makes it read-only on the host side too.
    """

    id: str
    oci: dict[str, object]  # OCI runtime config (root.path is set in the guest)
    rootfs: Path
    user: str = ""  # resolved against the image's /etc/passwd in the guest
    runtime: str = "runc"  # OCI runtime inside the guest: runc or crun
    volumes: tuple[Volume, ...] = ()
    # (namespace type, container id): join that running container's ipc/uts
    # namespace, as a pod's members share its infra container's
    join_namespaces: tuple[tuple[str, str], ...] = ()


class SandboxState(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


SANDBOX_TRANSITIONS = {
    SandboxState.NEW: frozenset({SandboxState.STARTING, SandboxState.STOPPING}),
    SandboxState.STARTING: frozenset({SandboxState.RUNNING, SandboxState.STOPPING}),
    SandboxState.RUNNING: frozenset({SandboxState.STOPPING}),
    SandboxState.STOPPING: frozenset({SandboxState.STOPPED}),
}


class ContainerState(Enum):
    NEW = "new"  # known to the host, not yet prepared in the guest
    CREATED = "created"  # bundle ready in the guest, nothing runs
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


CONTAINER_TRANSITIONS = {
    ContainerState.NEW: frozenset({ContainerState.CREATED, ContainerState.STOPPED}),
    ContainerState.CREATED: frozenset({ContainerState.RUNNING, ContainerState.STOPPED}),
    ContainerState.RUNNING: frozenset({ContainerState.PAUSED, ContainerState.STOPPED}),
    ContainerState.PAUSED: frozenset({ContainerState.RUNNING, ContainerState.STOPPED}),
}
