"""The one pre-boot pipeline every front end uses: a typed ``SandboxSpec`` (kernel,
resources, devices, modules) becomes a resolved ``SandboxConfig`` — accelerator
chosen, guest assets built or found, kernel modules planned — before anything boots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from vmpod.errors import ConfigError
from vmpod.guest.assets import ensure_assets
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.guest.modules import plan_modules
from vmpod.guest.progress import Progress, silent
from vmpod.hypervisor.accel import choose_accel
from vmpod.hypervisor.base import Disk
from vmpod.paths import Paths
from vmpod.sandbox.config import MAX_CONFIG_BYTES, SandboxConfig

log = logging.getLogger(__name__)
MIN_MEMORY_MB = 128


@dataclass(frozen=True)
class SandboxSpec:
    """What a front end asks for; ``prepare`` resolves it."""

    kernel: str = DEFAULT_KERNEL
    accel: str = "auto"  # auto | kvm | tcg
    cpus: int = 1
    memory_mb: int = 512
    boot_timeout: float = 60.0
    verbose_console: bool = False
    rootfs: tuple[Path, ...] = ()  # container root filesystem disks (erofs)
    kernel_modules: tuple[str, ...] = ()  # NAME[=params] from the kernel's own tree
    module_files: tuple[str, ...] = ()  # FILE.ko[=params] built elsewhere
    agent_channel: str = "auto"  # auto | serial | vsock
    hypervisor: str = "qemu"
    shared_fs: bool = False  # virtio-fs: volumes, host-directory root filesystems
    netns: str = ""  # a network namespace whose interfaces become the VM's NICs


def check_resources(cpus: int, memory_mb: int) -> None:
    """Refuse a VM too small to boot (front ends call it before any image work)."""
    if cpus < 1 or memory_mb < MIN_MEMORY_MB:
        raise ConfigError(
            f"the VM needs at least 1 CPU and {MIN_MEMORY_MB} MiB", hint="raise --cpus / --memory"
        )


def check_text(value: object, where: str = "config") -> None:
    """Refuse a string that is not valid Unicode (an argument or variable that
    held non-UTF-8 bytes, which Python keeps as lone surrogates): the OCI config
    is JSON, and runc would silently get U+FFFD in their place. Never altered."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogateescape")
            raise ConfigError(
                f"{where} is not valid UTF-8 ({raw[:60]!r}): an OCI runtime config is JSON text "
                "and cannot carry other bytes",
                hint="pass UTF-8 text (encode binary data, e.g. with base64)",
            ) from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_text(k, f"{where} key")
            check_text(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


def check_config_size(oci: Mapping[str, object], what: str = "the container's configuration") -> None:
    """Refuse an OCI config too large for the one agent message that carries it
    (huge argv or environment), or with text that is not UTF-8 (``check_text``):
    front ends call it before anything boots."""
    check_text(oci)
    size = len(json.dumps(oci, separators=(",", ":")))  # as the agent channel encodes it
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} takes {size} bytes in the VM: too large for the agent channel "
            f"(limit {MAX_CONFIG_BYTES})",
            hint="pass fewer or shorter arguments and environment variables",
        )


def prepare(paths: Paths, spec: SandboxSpec, progress: Progress = silent) -> SandboxConfig:
    """Validate and resolve ``spec``; raises before anything boots."""
    check_resources(spec.cpus, spec.memory_mb)
    accel = choose_accel(spec.accel)
    log.info("accelerator: %s (%s)", accel.accel, accel.reason)
    assets = ensure_assets(paths, spec.kernel, progress)
    modules = plan_modules(
        assets.kernel.modules_dir, assets.kernel.release, spec.kernel_modules, spec.module_files
    )
    config = SandboxConfig(
        assets=assets,
        accel=accel,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        boot_timeout=spec.boot_timeout,
        verbose_console=spec.verbose_console,
        agent_channel=spec.agent_channel,
        modules=tuple(modules),
        hypervisor=spec.hypervisor,
        shared_fs=spec.shared_fs,
        netns=spec.netns,
    )
    return with_rootfs(config, *spec.rootfs)


def with_rootfs(config: SandboxConfig, *disks: Path) -> SandboxConfig:
    """``config`` with these container root filesystem disks attached (in order)."""
    unique = dict.fromkeys((*(d.path for d in config.disks), *disks))
    return replace(config, disks=tuple(Disk(path, rootfs_serial(i)) for i, path in enumerate(unique)))


def rootfs_serial(index: int) -> str:
    """The virtio serial of the index-th container disk (the guest finds it by that)."""
    return "ctr-rootfs" if index == 0 else f"ctr-rootfs-{index}"
