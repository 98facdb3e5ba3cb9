"""`vmpod doctor`: what works on this host and why."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from vmpod.guest.assets import assets_state
from vmpod.guest.kernel import load_cached
from vmpod.hypervisor import file_server_binary, vmm_binary
from vmpod.hypervisor.accel import choose_accel
from vmpod.paths import Paths

_MIN_FREE = 1 << 30
_TOOLS = {
    "mmdebstrap": "builds the guest root",
    "mkfs.erofs": "makes root images (erofs-utils)",
    "cpio": "packs the initramfs",
    "depmod": "indexes kernel modules (kmod)",
    "apt-get": "fetches Debian kernels",
    "dpkg-deb": "unpacks kernels",
    "lz4": "unpacks LZ4 kernels",
}
# Kernel features the guest needs; built in (=y) or module (=m) both work.
_KERNEL_FEATURES = (
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_CONSOLE",
    "CONFIG_EROFS_FS",
    "CONFIG_OVERLAY_FS",
    "CONFIG_FUSE_FS",
    "CONFIG_VIRTIO_FS",
    "CONFIG_VIRTIO_NET",
    "CONFIG_CGROUPS",
    "CONFIG_PID_NS",
    "CONFIG_DEVTMPFS",
    "CONFIG_BLK_DEV_INITRD",
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def checks(paths: Paths, kernel: str, accel: str) -> list[Check]:
    out = []
    qemu = vmm_binary("qemu")
    out.append(
        Check(
            "qemu",
            qemu is not None,
            qemu or "qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)",
        )
    )
    fsd = file_server_binary("qemu")
    out.append(
        Check(
            "virtiofsd",
            fsd is not None,
            f"{fsd}: volumes and vmpod-runtime root filesystems over virtio-fs"
            if fsd
            else "missing: volumes and vmpod-runtime need it (apt-get install qemu-system-common)",
        )
    )
    choice = choose_accel(accel)
    out.append(Check("accelerator", True, f"{choice.accel}: {choice.reason}"))
    out.append(_jail_check())
    vsock = Path("/dev/vhost-vsock").exists()
    out.append(
        Check(
            "agent channel",
            True,
            "vsock available (/dev/vhost-vsock)"
            if vsock
            else "virtio-serial (no /dev/vhost-vsock on this host)",
            required=False,
        )
    )
    for tool, why in _TOOLS.items():
        found = shutil.which(tool)
        out.append(Check(f"tool {tool}", found is not None, found or f"missing: {why}"))
    out.append(
        Check(
            "root",
            os.geteuid() == 0,
            "running as root"
            if os.geteuid() == 0
            else "building guest assets needs root (mknod, chroot, mmdebstrap)",
        )
    )
    probe = paths.home if paths.home.exists() else Path("/")
    free = shutil.disk_usage(probe).free
    out.append(
        Check("free disk", free >= _MIN_FREE, f"{free / 2**30:.1f} GiB free at {probe} (need ≥ 1 GiB)")
    )
    state = assets_state(paths, kernel)
    built = all(bool(v) for v in state.values())
    out.append(
        Check(
            "guest assets",
            True,
            "ready: " + ", ".join(f"{k}={v}" for k, v in state.items())
            if built
            else f"not built yet (first `vmpod run` or `vmpod assets build` builds them): {state}",
            required=False,
        )
    )
    k = load_cached(paths, kernel)
    if k is not None:
        config = k.config.read_text().splitlines()
        missing = [f for f in _KERNEL_FEATURES if f"{f}=y" not in config and f"{f}=m" not in config]
        out.append(
            Check(
                f"kernel {k.release}",
                not missing,
                f"PVH boot={'yes' if k.pvh else 'no'}; "
                + (f"missing {', '.join(missing)}" if missing else "required features present"),
            )
        )
    from vmpod.network.doctor import host_checks  # pyroute2: only when asked

    out += [Check(c.name, c.ok, c.detail, c.required) for c in host_checks()]
    out.append(_host_criu_check())
    return out


def _host_criu_check() -> Check:
    """Whether host-side forensics capture (--runc, --podman) can work; vmpod's own
    containers are captured by CRIU inside their VMs whatever this says."""
    from vmpod.errors import VmpodError
    from vmpod.forensics.host import host_criu

    try:
        found = host_criu()
    except VmpodError as err:
        return Check("host criu", False, f"cannot run criu: {err}", required=False)
    if found.ok:
        return Check("host criu", True, f"{found.detail}: host-side capture (--runc, --podman) works")
    return Check(
        "host criu",
        False,
        f"host-side capture (--runc, --podman) unavailable: {found.detail} "
        "(vmpod containers are captured by CRIU in their VMs)",
        required=False,
    )


def _jail_check() -> Check:
    """Whether QEMU runs confined (hypervisor/qemu/jail.py) and, if not, why."""
    from vmpod.errors import HypervisorError
    from vmpod.hypervisor import vmm_jail

    try:
        enabled, missing, setting = vmm_jail()
    except HypervisorError as err:
        return Check("qemu jail", False, str(err))
    if not enabled:
        why = "not root" if os.geteuid() != 0 else f"turned off by {setting}"
        return Check("qemu jail", False, f"off ({why}): QEMU runs with vmpod's privileges", required=False)
    if missing:
        return Check(
            "qemu jail",
            False,
            f"missing {', '.join(missing)}: QEMU's jail and `vmpod matrix` builds need it "
            "(apt-get install bubblewrap)",
        )
    return Check(
        "qemu jail",
        True,
        "bubblewrap namespaces, a uid of its own per sandbox, no capabilities, seccomp (-sandbox)",
    )


def diagnose(paths: Paths, kernel: str, accel: str) -> bool:
    ok = True
    for c in checks(paths, kernel, accel):
        mark = "ok " if c.ok else ("FAIL" if c.required else "warn")
        click.echo(f"[{mark:4}] {c.name:<16} {c.detail}")
        ok = ok and (c.ok or not c.required)
    click.echo("vmpod can run containers here" if ok else "vmpod cannot run containers here")
    return ok
