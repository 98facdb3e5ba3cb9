"""The QEMU command line built from a VmConfig (no QEMU is started)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Disk, HostChannel, VmConfig
from vmpod.hypervisor.qemu import devices
from vmpod.hypervisor.qemu.devices import build_argv, q

QEMU = "/usr/bin/qemu-system-x86_64"


def config(
    state: Path,
    *,
    accel: str = "tcg",
    disks: tuple[Disk, ...] = (),
    channel: HostChannel | None = None,
    shared_dir: Path | None = None,
) -> VmConfig:
    return VmConfig(
        kernel=Path("/k/vmlinux"),
        initramfs=Path("/k/initrd.img"),
        cmdline="console=ttyS0 quiet vmpod.agent=serial,fast",
        cpus=2,
        memory_mb=512,
        accel=AccelChoice(accel, "test"),
        disks=disks,
        state_dir=state,
        channel=channel if channel is not None else HostChannel(),
        shared_dir=shared_dir,
    )


def values(argv: list[str], flag: str) -> list[str]:
    """Every value following ``flag`` in argv."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_starts_with_binary_and_is_all_strings(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert argv[0] == QEMU
    assert all(isinstance(a, str) for a in argv)


def test_tcg_machine(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert values(argv, "-M") == ["microvm,x-option-roms=off,isa-serial=on,rtc=on"]
    # several vCPUs: single-threaded TCG (a 2-vCPU guest livelocked under MTTCG)
    assert values(argv, "-accel") == ["tcg,thread=single,tb-size=128"]
    assert values(argv, "-cpu") == ["max"]
    assert values(argv, "-smp") == ["2"]
    assert values(argv, "-m") == ["512M"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert argv.count(flag) == 1, flag
    assert "-enable-kvm" not in argv


def test_kvm_machine(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path, accel="kvm"))
    assert values(argv, "-accel") == ["kvm"]
    assert values(argv, "-cpu") == ["host"]
    assert values(argv, "-M")[0].startswith("microvm,")


def test_kernel_boot_cmdline_is_not_escaped(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert values(argv, "-kernel") == ["/k/vmlinux"]
    assert values(argv, "-initrd") == ["/k/initrd.img"]
    # -append is a plain string, not an option list
    assert values(argv, "-append") == ["console=ttyS0 quiet vmpod.agent=serial,fast"]


def test_disks_with_serial_and_readonly(tmp_path: Path) -> None:
    disks = (
        Disk(Path("/img/guest.img"), "guest"),
        Disk(Path("/img/rootfs.erofs"), "ctr-rootfs", readonly=False),
    )
    argv = build_argv(QEMU, config(tmp_path, disks=disks))
    assert values(argv, "-drive") == [
        "id=disk0,file=/img/guest.img,format=raw,if=none,readonly=on",
        "id=disk1,file=/img/rootfs.erofs,format=raw,if=none,readonly=off",
    ]
    blk = [d for d in values(argv, "-device") if d.startswith("virtio-blk-device")]
    assert blk == [
        "virtio-blk-device,drive=disk0,serial=guest",
        "virtio-blk-device,drive=disk1,serial=ctr-rootfs",
    ]


def test_no_disks_no_drive(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert "-drive" not in argv
    assert not any(d.startswith("virtio-blk") for d in values(argv, "-device"))


def test_commas_in_paths_and_serials_are_doubled(tmp_path: Path) -> None:
    state = tmp_path / "st,ate"
    disks = (Disk(Path("/img/a,b.img"), "se,r"),)
    argv = build_argv(QEMU, config(state, disks=disks))
    s = str(state).replace(",", ",,")
    assert values(argv, "-drive") == ["id=disk0,file=/img/a,,b.img,format=raw,if=none,readonly=on"]
    assert "virtio-blk-device,drive=disk0,serial=se,,r" in values(argv, "-device")
    assert values(argv, "-qmp") == [f"unix:{s}/qmp.sock,server=on,wait=off"]
    assert f"file,id=console,path={s}/console.log" in values(argv, "-chardev")
    assert f"socket,id=channel,path={s}/channel.sock,server=on,wait=off" in values(argv, "-chardev")


def test_virtio_serial_port(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path, channel=HostChannel("serial", "org.example.port")))
    dev = values(argv, "-device")
    assert "virtio-serial-device" in dev
    assert "virtserialport,chardev=channel,name=org.example.port" in dev
    assert f"socket,id=channel,path={tmp_path}/channel.sock,server=on,wait=off" in values(argv, "-chardev")
    assert dev.index("virtio-serial-device") < dev.index(
        "virtserialport,chardev=channel,name=org.example.port"
    )
    assert not any("vsock" in d for d in dev)


def test_vsock_channel(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path, channel=HostChannel("vsock", vsock_cid=42)))
    dev = values(argv, "-device")
    assert "vhost-vsock-device,guest-cid=42" in dev
    assert not any(d.startswith(("virtio-serial", "virtserialport")) for d in dev)
    assert not any("id=channel" in c for c in values(argv, "-chardev"))


@pytest.mark.parametrize("kind,cid", [("tcp", 0), ("vsock", 2)])
def test_bad_channel_refused(kind: str, cid: int) -> None:
    with pytest.raises(ValueError):
        HostChannel(kind, vsock_cid=cid)


def test_qmp_socket_and_console_log(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    argv = build_argv(QEMU, cfg)
    assert values(argv, "-qmp") == [f"unix:{tmp_path}/qmp.sock,server=on,wait=off"]
    assert cfg.qmp_socket == tmp_path / "qmp.sock"
    assert f"file,id=console,path={cfg.console_log}" in values(argv, "-chardev")
    assert values(argv, "-serial") == ["chardev:console"]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("plain", "plain"),
        ("a,b", "a,,b"),
        (",,", ",,,,"),
        (Path("/x,y"), "/x,,y"),
        (3, "3"),
    ],
)
def test_q_escapes_commas(value: object, expected: str) -> None:
    assert q(value) == expected


def test_find_qemu_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty, bindir = tmp_path / "empty", tmp_path / "bin"
    empty.mkdir()
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}{bindir}")
    assert devices.find_qemu() is None
    exe = bindir / "qemu-system-x86_64"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o644)
    assert devices.find_qemu() is None  # not executable
    exe.chmod(0o755)
    assert devices.find_qemu() == str(exe)


def test_a_shared_directory_needs_shared_memory_and_modern_virtio(tmp_path: Path) -> None:
    state = tmp_path / "vm,1"
    argv = build_argv(
        QEMU, dataclasses.replace(config(state, shared_dir=tmp_path / "shared"), shared_tag="vmpod")
    )
    assert values(argv, "-M") == ["microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem"]
    # guest RAM virtiofsd can map: a shared memfd, as big as the VM's memory
    assert values(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert values(argv, "-m") == ["512M"]
    assert values(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    fs_chardev = f"socket,id=fs0,path={q(str(state / 'fs.sock'))}"
    assert fs_chardev in values(argv, "-chardev") and ",," in fs_chardev  # the comma escaped
    assert "vhost-user-fs-device,chardev=fs0,tag=vmpod" in values(argv, "-device")
    # the shared directory itself is virtiofsd's business: it is not on QEMU's command line
    assert not any(str(tmp_path / "shared") in a for a in argv)


def test_no_shared_directory_no_virtio_fs(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert values(argv, "-object") == [] and values(argv, "-global") == []
    assert not any("memory-backend" in a or "vhost-user-fs" in a or "force-legacy" in a for a in argv)
    assert not any(a.startswith("socket,id=fs0") for a in values(argv, "-chardev"))


def test_one_vcpu_keeps_multithreaded_tcg(tmp_path: Path) -> None:
    argv = build_argv(QEMU, dataclasses.replace(config(tmp_path), cpus=1))
    assert values(argv, "-accel") == ["tcg,thread=multi,tb-size=128"]
