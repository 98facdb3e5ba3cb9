"""Hypervisors: a small interface (``base.Hypervisor``) and one driver module per VMM,
chosen by name from one registry."""

from __future__ import annotations

from collections.abc import Callable

from vmpod.errors import ConfigError
from vmpod.hypervisor.base import Hypervisor, VmConfig


def _qemu(config: VmConfig) -> Hypervisor:
    # Imported on use, for start-up time: qemu.qmp (asyncio machinery) is not needed
    # by commands that boot nothing.
    from vmpod.hypervisor.qemu.driver import QemuVm

    return QemuVm(config)


HYPERVISORS: dict[str, Callable[[VmConfig], Hypervisor]] = {"qemu": _qemu}


def vmm_binary(name: str = "qemu") -> str | None:
    """Where hypervisor ``name``'s program is, if it is installed (for `vmpod doctor`)."""
    if name != "qemu":
        raise ConfigError(f"unknown hypervisor {name!r}")
    # Imported on use, for start-up time (as in _qemu).
    from vmpod.hypervisor.qemu.devices import find_qemu

    return find_qemu()


def vmm_jail(name: str = "qemu") -> tuple[bool, list[str], str]:
    """Whether hypervisor ``name`` runs confined here, the tools its jail lacks, and
    the setting that turns it off (for `vmpod doctor`); raises on a bad setting."""
    if name != "qemu":
        raise ConfigError(f"unknown hypervisor {name!r}")
    from vmpod.hypervisor.qemu.jail import JAIL_ENV, jail_enabled, missing_tools

    return jail_enabled(), missing_tools(), JAIL_ENV


def file_server_binary(name: str = "qemu") -> str | None:
    """Where the virtio-fs server hypervisor ``name`` uses is, if installed."""
    if name != "qemu":
        raise ConfigError(f"unknown hypervisor {name!r}")
    from vmpod.hypervisor.qemu.virtiofsd import find_virtiofsd

    return find_virtiofsd()


def create_vm(name: str, config: VmConfig) -> Hypervisor:
    """A not yet launched VM of hypervisor ``name`` (``HYPERVISORS``)."""
    factory = HYPERVISORS.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown hypervisor {name!r}", hint=f"choose one of {', '.join(sorted(HYPERVISORS))}"
        )
    return factory(config)
