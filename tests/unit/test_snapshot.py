"""Snapshot manifests and the refusals around them, without a VM: a manifest
round-trips through JSON, damaged ones and changed inputs are refused in one
line, unsnapshottable sandboxes are refused naming the device, and a save that
fails leaves no directory behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from tests.fixtures.fakevm import fake_config
from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Disk, Nic, VmConfig
from vmpod.hypervisor.qemu.devices import build_argv
from vmpod.paths import Paths
from vmpod.sandbox import Sandbox
from vmpod.sandbox import snapshot as snap


def vm_config(tmp: Path, disk_data: bytes = b"erofs", kernel: bytes = b"kernel") -> VmConfig:
    for name, data in (("vmlinux", kernel), ("initrd", b"initramfs"), ("disk", disk_data)):
        (tmp / name).write_bytes(data)
    return VmConfig(
        kernel=tmp / "vmlinux",
        initramfs=tmp / "initrd",
        cmdline="console=ttyS0 tsc_early_khz=2000000",
        cpus=1,
        memory_mb=512,
        accel=AccelChoice("tcg", "test"),
        disks=(Disk(tmp / "disk", "ctr-rootfs"),),
        state_dir=tmp / "state",
    )


def manifest(tmp: Path, state: bytes = b"STATE") -> snap.Manifest:
    (tmp / snap.STATE).write_bytes(state)
    st = snap.digest(tmp / snap.STATE)
    m = snap.Manifest(
        created="2026-01-01T00:00:00Z",
        source="abc",
        kernel="6.1",
        hypervisor="qemu",
        boot_timeout=60.0,
        devices=snap.device_config(dataclasses.replace(vm_config(tmp), nics=(Nic(5, "02:00:00:00:00:09"),))),
        containers=(snap.SavedContainer("c1", {"process": {"args": ["sh"]}}, str(tmp / "disk")),),
        state_size=st.size,
        state_sha256=st.sha256,
        extra={"record": {"name": "x"}},
    )
    (tmp / snap.MANIFEST).write_bytes(m.to_json())
    return m


def test_manifest_round_trips(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    assert snap.load_manifest(tmp_path) == m
    assert m.containers[0].spec().rootfs == tmp_path / "disk"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o.pop("devices"), "KeyError"),
        (lambda o: o.update(format=99), "unknown format 99"),
        (lambda o: o.update(state_size="5"), "state_size must be int"),
        (lambda o: o["devices"].update(cpus=True), "cpus must be int"),
        (lambda o: o.update(surprise=1), "unexpected keyword"),
    ],
)
def test_a_damaged_manifest_is_refused_in_one_line(tmp_path: Path, edit: object, message: str) -> None:
    manifest(tmp_path)
    obj = json.loads((tmp_path / snap.MANIFEST).read_text())
    edit(obj)  # type: ignore[operator]
    (tmp_path / snap.MANIFEST).write_text(json.dumps(obj))
    with pytest.raises(snap.SnapshotError, match=message) as err:
        snap.load_manifest(tmp_path)
    assert "\n" not in str(err.value) and "not a valid vmpod snapshot manifest" in str(err.value)


def test_a_changed_state_file_is_refused(tmp_path: Path) -> None:
    manifest(tmp_path)
    (tmp_path / snap.STATE).write_bytes(b"STAT")
    with pytest.raises(snap.SnapshotError, match="truncated or damaged"):
        snap.load_manifest(tmp_path)
    (tmp_path / snap.STATE).write_bytes(b"STATX")  # same size, other bytes
    with pytest.raises(snap.SnapshotError, match="does not match its recorded sha256"):
        snap.load_manifest(tmp_path)
    (tmp_path / snap.STATE).unlink()
    with pytest.raises(snap.SnapshotError, match="has no state.bin"):
        snap.load_manifest(tmp_path)
    with pytest.raises(snap.SnapshotError, match="is not a vmpod snapshot"):
        snap.load_manifest(tmp_path / "nowhere")


def test_changed_inputs_are_named(tmp_path: Path) -> None:
    saved = snap.device_config(vm_config(tmp_path))
    assert snap.difference(saved, snap.device_config(vm_config(tmp_path))) is None
    changed = snap.difference(saved, snap.device_config(vm_config(tmp_path, disk_data=b"other")))
    assert changed is not None and "disk ctr-rootfs" in changed and "changed" in changed
    kernel = snap.difference(saved, snap.device_config(vm_config(tmp_path, kernel=b"another")))
    assert kernel is not None and kernel.startswith("its kernel")
    bigger = snap.device_config(dataclasses.replace(vm_config(tmp_path), memory_mb=1024))
    assert "memory_mb 512" in (snap.difference(saved, bigger) or "")


def test_nics_are_part_of_the_device_config(tmp_path: Path) -> None:
    """The source's NICs are recorded (a restore gives the VM the same devices, on
    isolated taps); a VM without them does not match."""
    nics = (Nic(7, "02:00:00:00:00:01", 1400), Nic(8, "02:00:00:00:00:02"))
    saved = snap.device_config(dataclasses.replace(vm_config(tmp_path), nics=nics))
    assert saved.nics == (snap.SavedNic("02:00:00:00:00:01", 1400), snap.SavedNic("02:00:00:00:00:02", 1500))
    other_taps = tuple(Nic(n.fd + 10, n.mac, n.mtu) for n in nics)
    assert (
        snap.difference(saved, snap.device_config(dataclasses.replace(vm_config(tmp_path), nics=other_taps)))
        is None
    )
    assert "nics" in (snap.difference(saved, snap.device_config(vm_config(tmp_path))) or "")


def test_incoming_vm_starts_paused_waiting_for_its_state(tmp_path: Path) -> None:
    argv = build_argv("qemu", dataclasses.replace(vm_config(tmp_path), incoming=True))
    assert argv[-3:] == ["-S", "-incoming", "defer"]
    assert "-incoming" not in build_argv("qemu", vm_config(tmp_path))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shared_fs": True}, r"virtio-fs device \(vhost-user-fs-device.*--root-in-vm"),
    ],
)
def test_unsnapshottable_sandboxes_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    sandbox = Sandbox(Paths(home=tmp_path / "h", run=tmp_path / "r"), fake_config(tmp_path / "h", **changes))
    dest = tmp_path / "snap"
    with pytest.raises(snap.SnapshotError, match=message) as err:
        asyncio.run(snap.save(sandbox, dest))
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("snap")] == []


def test_an_existing_destination_is_refused(tmp_path: Path) -> None:
    sandbox = Sandbox(Paths(home=tmp_path / "h", run=tmp_path / "r"), fake_config(tmp_path / "h"))
    (tmp_path / "snap").mkdir()
    with pytest.raises(snap.SnapshotError, match="already exists"):
        asyncio.run(snap.save(sandbox, tmp_path / "snap"))
    with pytest.raises(snap.SnapshotError, match="is not a directory"):
        asyncio.run(snap.save(sandbox, tmp_path / "missing" / "snap"))
