"""Sandbox snapshots: a running sandbox's whole VM state (RAM with the containers'
writable layers, devices) saved to a directory, and started again as a new sandbox.

    DIR/manifest.json   Manifest: device config, containers, digests
    DIR/state.bin       QEMU's migration stream (written by the jailed QEMU to an fd)

What can be saved: a sandbox whose devices QEMU 7.2 can migrate and whose writes
all live in guest RAM — container roots on read-only erofs disks with a tmpfs
upper layer in the VM. A virtio-fs device (``vhost-user-fs``) blocks migration:
refused (``Sandbox.snapshot_refusal``). NICs are saved as devices; a restored
VM gets each one on a tap alone in a fresh, empty network namespace (the same
device with virtio-net headers, as the state expects), so a clone reaches nothing.

A restore needs exactly the same device configuration (kernel, initramfs, disks —
by content —, vCPUs, memory, accelerator, kernel command line); the manifest
records it and a restore whose inputs differ is refused before anything boots.
DIR is written as ``DIR.tmp-*`` and renamed: it exists complete or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmpod.agent import protocol as p
from vmpod.errors import SandboxError
from vmpod.fsutil import atomic_write
from vmpod.hypervisor.base import VmConfig
from vmpod.jsonsafe import parse_json
from vmpod.paths import Paths
from vmpod.sandbox.build import SandboxSpec, prepare
from vmpod.sandbox.config import ContainerSpec, SandboxConfig
from vmpod.sandbox.sandbox import ROOT_SERIAL, Sandbox

log = logging.getLogger(__name__)
FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.bin"
MAX_MANIFEST = 4 << 20


class SnapshotError(SandboxError):
    """A snapshot that cannot be taken, or a snapshot directory that cannot be restored."""


@dataclass(frozen=True)
class FileDigest:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SavedDisk:
    serial: str
    readonly: bool
    file: FileDigest


@dataclass(frozen=True)
class SavedNic:
    mac: str
    mtu: int


@dataclass(frozen=True)
class DeviceConfig:
    """What the restored QEMU must be started with: equal, or the state cannot load."""

    kernel: FileDigest
    initramfs: FileDigest
    cmdline: str
    cpus: int
    memory_mb: int
    accel: str
    channel: str
    disks: tuple[SavedDisk, ...]
    # restored on isolated taps (frames go nowhere): a clone is network-isolated
    nics: tuple[SavedNic, ...] = ()


@dataclass(frozen=True)
class SavedContainer:
    id: str
    oci: dict[str, object]
    rootfs: str
    user: str = ""
    runtime: str = "runc"

    def spec(self) -> ContainerSpec:
        return ContainerSpec(
            id=self.id, oci=self.oci, rootfs=Path(self.rootfs), user=self.user, runtime=self.runtime
        )


@dataclass(frozen=True)
class Manifest:
    created: str
    source: str  # the sandbox it was taken from
    kernel: str  # the kernel's name in the catalog (SandboxSpec.kernel)
    hypervisor: str
    boot_timeout: float
    devices: DeviceConfig
    containers: tuple[SavedContainer, ...]
    state_size: int
    state_sha256: str
    ram_bytes: int = 0
    # a front end's own description of what it runs (e.g. a container record)
    extra: dict[str, object] = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> Manifest:
        """Parse and type-check; any defect is one SnapshotError naming ``where``."""
        try:
            obj = parse_json(data)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise ValueError(f"unknown format {obj.get('format') if isinstance(obj, dict) else None!r}")
            dev = dict(obj["devices"])
            devices = DeviceConfig(
                kernel=FileDigest(**dev.pop("kernel")),
                initramfs=FileDigest(**dev.pop("initramfs")),
                disks=tuple(
                    SavedDisk(d["serial"], d["readonly"], FileDigest(**d["file"])) for d in dev.pop("disks")
                ),
                nics=tuple(SavedNic(**n) for n in dev.pop("nics", ())),
                **dev,
            )
            manifest = cls(
                **{
                    **obj,
                    "devices": devices,
                    "containers": tuple(SavedContainer(**c) for c in obj["containers"]),
                }
            )
            _check_types(manifest)
        except (ValueError, KeyError, TypeError) as err:
            raise SnapshotError(
                f"{where} is not a valid vmpod snapshot manifest ({type(err).__name__}: {err})",
                hint="give a directory written by vmpod snapshot",
            ) from None
        return manifest


_SCALAR_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
}


def _check_types(obj: object) -> None:
    """Every field of these (nested) dataclasses holds what its annotation says."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        want = _SCALAR_TYPES.get(str(f.type))
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise TypeError(f"{f.name} must be {f.type}")
        if str(f.type).startswith("dict") and not isinstance(value, dict):
            raise TypeError(f"{f.name} must be an object")
        for item in value if isinstance(value, tuple) else (value,):
            _check_types(item)


def digest(path: Path) -> FileDigest:
    try:
        with open(path, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
            size = os.fstat(fh.fileno()).st_size
    except OSError as err:
        raise SnapshotError(f"cannot read {path}: {err.strerror}") from err
    return FileDigest(str(path), size, sha)


def device_config(vm: VmConfig) -> DeviceConfig:
    return DeviceConfig(
        kernel=digest(vm.kernel),
        initramfs=digest(vm.initramfs),
        cmdline=vm.cmdline,
        cpus=vm.cpus,
        memory_mb=vm.memory_mb,
        accel=vm.accel.accel,
        channel=vm.channel.kind,
        disks=tuple(SavedDisk(d.serial, d.readonly, digest(d.path)) for d in vm.disks),
        nics=tuple(SavedNic(n.mac, n.mtu) for n in vm.nics),
    )


def difference(saved: DeviceConfig, here: DeviceConfig) -> str | None:
    """The first way ``here`` differs from ``saved``, in words (None: equal)."""
    for name in ("kernel", "initramfs"):
        a, b = getattr(saved, name), getattr(here, name)
        if a.sha256 != b.sha256:
            return f"its {name} {a.path} (sha256 {a.sha256[:12]}) is now {b.path} (sha256 {b.sha256[:12]})"
    for name in ("cpus", "memory_mb", "accel", "channel", "cmdline", "nics"):
        if getattr(saved, name) != getattr(here, name):
            was, now = getattr(saved, name), getattr(here, name)
            return f"it was taken with {name} {was!r}, this VM would have {now!r}"
    if [d.serial for d in saved.disks] != [d.serial for d in here.disks]:
        return "its disks differ from the ones this VM would have"
    for a, b in zip(saved.disks, here.disks, strict=True):
        if a.file.sha256 != b.file.sha256 or a.readonly != b.readonly:
            return f"its disk {a.serial} ({a.file.path}, sha256 {a.file.sha256[:12]}) changed"
    return None


# -- save ---------------------------------------------------------------------------


async def save(
    sandbox: Sandbox, dest: Path, *, stop: bool = False, extra: dict[str, object] | None = None
) -> Manifest:
    """Save ``sandbox`` into the new directory ``dest``. The VM is paused for the
    save and resumed after it, unless ``stop``: then it stays paused and the caller
    stops it. On any failure nothing is left at ``dest`` and the VM runs on."""
    dest = dest.absolute()
    _check_dest(dest)
    why = sandbox.snapshot_refusal()
    if why is None and sandbox.config.modules:
        why = f"sandbox {sandbox.id} loaded kernel modules from the host: snapshots of it are not supported"
    vm = sandbox.vm_config
    if why is None and vm is None:
        why = f"sandbox {sandbox.id} is not running"
    if why is not None:
        raise SnapshotError(why)
    assert vm is not None
    devices = device_config(vm)  # before the pause: hashing the disks takes a while
    tmp = dest.with_name(f"{dest.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(mode=0o700)
    paused = False
    try:
        t0 = time.monotonic()
        fd = os.open(tmp / STATE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            paused = True  # (save_state pauses first; resuming a running VM is harmless)
            ram = await sandbox.save_state(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not stop:
            await sandbox.resume_vm()
            paused = False
        log.info("sandbox %s saved in %.2fs", sandbox.id, time.monotonic() - t0)
        state = digest(tmp / STATE)
        manifest = Manifest(
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source=sandbox.id,
            kernel=sandbox.config.assets.kernel.id,
            hypervisor=sandbox.config.hypervisor,
            boot_timeout=sandbox.config.boot_timeout,
            devices=devices,
            containers=tuple(
                SavedContainer(c.spec.id, c.spec.oci, str(c.spec.rootfs), c.spec.user, c.spec.runtime)
                for c in sandbox.containers.values()
            ),
            state_size=state.size,
            state_sha256=state.sha256,
            ram_bytes=ram,
            extra=dict(extra or {}),
        )
        atomic_write(tmp / MANIFEST, manifest.to_json(), mode=0o600, fsync=True)
        os.rename(tmp, dest)  # DIR appears complete (a second snapshot to DIR fails here)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if paused and not stop and sandbox.alive:
            with contextlib.suppress(Exception):
                await sandbox.resume_vm()  # the original keeps running
        raise
    return manifest


def _check_dest(dest: Path) -> None:
    if os.path.lexists(dest):
        raise SnapshotError(f"{dest} already exists", hint="name a new directory for the snapshot")
    if not dest.parent.is_dir():
        raise SnapshotError(f"{dest.parent} is not a directory", hint="create it first")


# -- restore ------------------------------------------------------------------------


def load_manifest(src: Path, *, verify: bool = True) -> Manifest:
    """The manifest of snapshot ``src``, with its state file checked against it
    (its size always, its digest with ``verify``; ``start`` checks it again on the
    very descriptor QEMU reads)."""
    path = src / MANIFEST
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST + 1)
    except OSError as err:
        raise SnapshotError(
            f"{src} is not a vmpod snapshot ({MANIFEST}: {err.strerror})",
            hint="give a directory written by vmpod snapshot",
        ) from err
    if len(data) > MAX_MANIFEST:
        raise SnapshotError(f"{path} is larger than {MAX_MANIFEST} bytes: not a vmpod snapshot manifest")
    manifest = Manifest.from_json(data, path)
    try:
        fd = os.open(src / STATE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SnapshotError(f"snapshot {src} has no {STATE}: {err.strerror}") from err
    try:
        _check_state(fd, src / STATE, manifest, verify)
    finally:
        os.close(fd)
    return manifest


def _check_state(fd: int, state: Path, manifest: Manifest, verify: bool = True) -> None:
    size = os.fstat(fd).st_size
    if size != manifest.state_size:
        raise SnapshotError(
            f"{state} has {size} bytes, the snapshot recorded {manifest.state_size}: "
            "it is truncated or damaged"
        )
    if verify:
        with open(fd, "rb", closefd=False) as fh:
            fh.seek(0)
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
            fh.seek(0)
        if sha != manifest.state_sha256:
            raise SnapshotError(f"{state} does not match its recorded sha256: the snapshot is damaged")


def restore_sandbox_config(paths: Paths, m: Manifest) -> SandboxConfig:
    """The config of a sandbox like the snapshot's (checked against it at ``start``);
    its NICs get isolated taps: a clone is network-isolated."""
    disks = tuple(Path(d.file.path) for d in m.devices.disks if d.serial != ROOT_SERIAL)
    config = prepare(
        paths,
        SandboxSpec(
            kernel=m.kernel,
            accel=m.devices.accel,
            cpus=m.devices.cpus,
            memory_mb=m.devices.memory_mb,
            boot_timeout=m.boot_timeout,
            rootfs=disks,
            agent_channel=m.devices.channel,
            hypervisor=m.hypervisor,
        ),
    )
    return dataclasses.replace(config, isolated_nics=tuple((n.mac, n.mtu) for n in m.devices.nics))


def restore_config(paths: Paths, m: Manifest) -> Sandbox:
    """A new (not started) sandbox configured as the snapshot's was."""
    return Sandbox(paths, restore_sandbox_config(paths, m))


async def start(sandbox: Sandbox, src: Path, m: Manifest) -> p.ProcessList:
    """Start ``sandbox`` (from ``restore_config``) from snapshot ``src``; refuses
    before anything boots when the device configuration differs. The caller stops
    the sandbox on failure (as with ``Sandbox.start``)."""

    def check(vm: VmConfig) -> None:
        why = difference(m.devices, device_config(vm))
        if why is not None:
            raise SnapshotError(
                f"cannot restore {src}: {why}", hint="restore it where the same guest assets are"
            )

    try:
        fd = os.open(src / STATE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise SnapshotError(f"snapshot {src} has no {STATE}: {err.strerror}") from err
    try:
        _check_state(fd, src / STATE, m)  # what QEMU reads is what the manifest vouches for
        return await sandbox.start_restored(fd, m.devices.cmdline, check)
    finally:
        os.close(fd)
