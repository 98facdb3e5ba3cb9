"""virtio-net NICs: the ``Nic`` record, its QEMU arguments, and the tap fds the
driver hands to QEMU (a wrapper around tests/fixtures/fake_qemu.py reports what
it inherited; no VM boots)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmpod.errors import HypervisorError
from vmpod.hypervisor.accel import AccelChoice
from vmpod.hypervisor.base import Nic, VmConfig, VmState
from vmpod.hypervisor.qemu.devices import NetDevice, build_argv
from vmpod.hypervisor.qemu.driver import QemuVm

QEMU = "/usr/bin/qemu-system-x86_64"
FAKE_QEMU = Path(__file__).resolve().parents[1] / "fixtures" / "fake_qemu.py"
MAC = "52:54:00:12:34:56"


def config(state_dir: Path, nics: tuple[Nic, ...] = ()) -> VmConfig:
    return VmConfig(
        kernel=Path("/k/vmlinux"),
        initramfs=Path("/k/initrd.img"),
        cmdline="console=ttyS0",
        cpus=1,
        memory_mb=256,
        accel=AccelChoice("tcg", "test"),
        disks=(),
        state_dir=state_dir,
        nics=nics,
    )


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- the record ------------------------------------------------------------------


def test_nic_defaults_and_normalises_the_mac() -> None:
    nic = Nic(fd=7, mac="52:54:00:AB:cd:EF")
    assert nic.mac == "52:54:00:ab:cd:ef"
    assert nic.mtu == 1500


@pytest.mark.parametrize(
    "mac",
    [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52-54-00-12-34-56",
        "5254.0012.3456",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:5",
        "01:00:5e:00:00:01",  # multicast
        "ff:ff:ff:ff:ff:ff",  # broadcast
        "00:00:00:00:00:00",
        "52:54:00:12:34:56,id=x",  # would inject QEMU options
    ],
)
def test_nic_refuses_a_bad_mac(mac: str) -> None:
    with pytest.raises(ValueError, match="MAC"):
        Nic(fd=7, mac=mac)


@pytest.mark.parametrize("mtu", [0, 67, 65536, -1])
def test_nic_refuses_a_bad_mtu(mtu: int) -> None:
    with pytest.raises(ValueError, match="MTU"):
        Nic(fd=7, mac=MAC, mtu=mtu)


def test_nic_refuses_a_negative_fd() -> None:
    with pytest.raises(ValueError, match="fd"):
        Nic(fd=-1, mac=MAC)


# -- QEMU arguments ----------------------------------------------------------------


def test_net_device_args() -> None:
    assert NetDevice(0, Nic(fd=9, mac=MAC, mtu=1400)).args() == [
        "-netdev",
        "tap,id=net0,fd=9",
        "-device",
        f"virtio-net-device,netdev=net0,mac={MAC},host_mtu=1400",
    ]


def test_no_nics_no_network_devices(tmp_path: Path) -> None:
    argv = build_argv(QEMU, config(tmp_path))
    assert values(argv, "-netdev") == []
    assert not any(v.startswith("virtio-net") for v in values(argv, "-device"))


def test_each_nic_is_a_tap_netdev_and_a_virtio_net_device_in_order(tmp_path: Path) -> None:
    nics = (Nic(fd=11, mac=MAC), Nic(fd=12, mac="52:54:00:00:00:02", mtu=9000))
    argv = build_argv(QEMU, config(tmp_path, nics))
    assert values(argv, "-netdev") == ["tap,id=net0,fd=11", "tap,id=net1,fd=12"]
    net_devices = [d for d in values(argv, "-device") if d.startswith("virtio-net-device")]
    assert net_devices == [
        f"virtio-net-device,netdev=net0,mac={MAC},host_mtu=1500",
        "virtio-net-device,netdev=net1,mac=52:54:00:00:00:02,host_mtu=9000",
    ]
    # QEMU refuses vnet_hdr= next to fd= (it probes the tap): never rendered
    assert not any("vnet_hdr" in a for a in argv)


# -- fd passing ------------------------------------------------------------------------

WRAPPER = """#!{python}
import json, os, sys
argv = sys.argv[1:]
taps = [v for i, v in enumerate(argv) if i and argv[i - 1] == "-netdev"]
fds = [int(v.split("fd=")[1].split(",")[0]) for v in taps]
inherited = sorted(int(n) for n in os.listdir("/proc/self/fd"))
with open({report!r}, "w") as fh:
    json.dump({{"fds": fds, "open": inherited,
               "links": {{str(fd): os.readlink(f"/proc/self/fd/{{fd}}") for fd in fds}}}}, fh)
os.execv(sys.executable, [sys.executable, {fake!r}, *argv])
"""


@pytest.fixture
def wrapper(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A QEMU binary that reports the fds it inherited, then becomes the fake QEMU."""
    report = tmp_path / "report.json"
    script = tmp_path / "qemu-wrapper"
    script.write_text(WRAPPER.format(python=sys.executable, report=str(report), fake=str(FAKE_QEMU)))
    script.chmod(0o755)
    yield str(script), report


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


def test_launch_passes_the_tap_fds_and_nothing_else(tmp_path: Path, wrapper: tuple[str, Path]) -> None:
    binary, report = wrapper
    tap_r, tap_w = os.pipe()  # stand-ins for two tap fds
    other_r, other_w = os.pipe()  # open in the caller, not given to QEMU
    vm = QemuVm(
        config(tmp_path / "vm", (Nic(fd=tap_r, mac=MAC), Nic(fd=tap_w, mac="52:54:00:00:00:02"))), binary
    )

    async def body() -> None:
        await vm.launch()
        try:
            got = json.loads(report.read_text())
            assert got["fds"] == [tap_r, tap_w]
            assert got["links"] == {str(fd): os.readlink(f"/proc/self/fd/{fd}") for fd in (tap_r, tap_w)}
            assert other_r not in got["open"] and other_w not in got["open"]
            # the caller's copies stay open (it owns them) ...
            os.fstat(tap_r)
            os.fstat(tap_w)
            # ... and closing them leaves QEMU's own
            link = os.readlink(f"/proc/self/fd/{tap_r}")
            os.close(tap_r)
            os.close(tap_w)
            assert vm.pid is not None
            assert os.readlink(f"/proc/{vm.pid}/fd/{tap_r}") == link
        finally:
            await vm.shutdown()

    try:
        run(body())
        assert vm.state is VmState.STOPPED
    finally:
        for fd in (tap_r, tap_w, other_r, other_w):
            try:
                os.close(fd)
            except OSError:
                pass


def test_a_closed_tap_fd_fails_launch_naming_the_nic(tmp_path: Path, wrapper: tuple[str, Path]) -> None:
    binary, report = wrapper
    # far above anything open (a just-closed low fd would be reused by the event loop)
    r = max(int(n) for n in os.listdir("/proc/self/fd")) + 500
    vm = QemuVm(config(tmp_path / "vm", (Nic(fd=r, mac=MAC),)), binary)
    with pytest.raises(HypervisorError, match=rf"NIC 0 \({MAC}\): tap fd {r} is not open"):
        run(vm.launch())
    assert vm.state is VmState.STOPPED
    assert vm.pid is None
    assert not report.exists()  # QEMU never started


@pytest.mark.parametrize("which", ["stdin", "stderr", "twice"])
def test_stdio_or_repeated_tap_fds_are_refused(tmp_path: Path, which: str) -> None:
    r, w = os.pipe()
    try:
        fds = {"stdin": (0,), "stderr": (2,), "twice": (r, r)}[which]
        nics = tuple(Nic(fd=fd, mac=f"52:54:00:00:00:0{i + 1}") for i, fd in enumerate(fds))
        vm = QemuVm(config(tmp_path / "vm", nics), "/bin/false")
        with pytest.raises(HypervisorError, match="is stdio or used twice"):
            run(vm.launch())
        assert vm.state is VmState.STOPPED
        assert vm.pid is None
    finally:
        os.close(r)
        os.close(w)
