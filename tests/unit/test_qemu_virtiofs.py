"""virtiofsd beside QEMU (no VM: tests/fixtures/fake_virtiofsd.py and fake_qemu.py):
its command line, its start-up checks, and a QemuVm that starts it first, reports
its death and reaps it."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_qemu_driver import Fleet, assert_gone, config, is_our_child, run, wait_until
from vmpod.errors import HypervisorError
from vmpod.hypervisor.base import VmState
from vmpod.hypervisor.qemu import virtiofsd
from vmpod.hypervisor.qemu.driver import QemuVm
from vmpod.hypervisor.qemu.virtiofsd import Virtiofsd, find_virtiofsd

FAKE_VIRTIOFSD = Path(__file__).resolve().parents[1] / "fixtures" / "fake_virtiofsd.py"


def fake_virtiofsd(root: Path, mode: str = "normal") -> str:
    """A virtiofsd stand-in that runs the fake with FAKE_VIRTIOFSD_MODE=mode."""
    exe = root / "bin" / f"virtiofsd-{mode}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text(
            f"#!/bin/sh\nexport FAKE_VIRTIOFSD_MODE={mode}\n"
            f'exec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_VIRTIOFSD))} "$@"\n'
        )
        exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    for vm in f.vms:
        vm.kill()  # QEMU and its virtiofsd


@pytest.fixture
def source(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    return d


def shared_vm(fleet: Fleet, source: Path, monkeypatch: pytest.MonkeyPatch, fs_mode: str = "normal") -> QemuVm:
    monkeypatch.setenv(virtiofsd.BINARY_ENV, fake_virtiofsd(fleet.root, fs_mode))
    state = fleet.root / f"vm{len(fleet.vms)}"
    vm = QemuVm(dataclasses.replace(config(state), shared_dir=source), binary=fleet.binary("normal"))
    fleet.vms.append(vm)
    return vm


def test_virtiofsd_argv(tmp_path: Path) -> None:
    fs = Virtiofsd(tmp_path / "shared dir", tmp_path / "fs.sock", tmp_path / "log", binary="/bin/vfsd")
    argv = fs.argv()
    assert argv[:2] == ["/bin/vfsd", f"--socket-path={tmp_path}/fs.sock"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert len(argv) == 2 + 2 * len(opts)  # nothing but -o options after the socket
    assert f"source={tmp_path}/shared dir" in opts  # one argv item: no quoting needed
    assert {"no_xattr", "announce_submounts", "cache=auto", "log_level=err"} <= set(opts)
    assert not any(o.startswith(("xattr", "sandbox=none", "writeback")) for o in opts)


def test_find_virtiofsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = fake_virtiofsd(tmp_path)
    monkeypatch.setattr(virtiofsd, "DEFAULT_BINARY", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv(virtiofsd.BINARY_ENV, exe)
    assert find_virtiofsd() == exe
    monkeypatch.setenv(virtiofsd.BINARY_ENV, str(tmp_path / "missing"))
    assert find_virtiofsd() is None
    on_path = tmp_path / "path" / "virtiofsd"
    on_path.parent.mkdir()
    on_path.symlink_to(exe)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_virtiofsd() == str(on_path)
    monkeypatch.setattr(virtiofsd, "DEFAULT_BINARY", exe)  # QEMU's own comes before PATH
    assert find_virtiofsd() == exe


def test_no_virtiofsd_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virtiofsd, "DEFAULT_BINARY", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(virtiofsd.BINARY_ENV, raising=False)
    fs = Virtiofsd(tmp_path, tmp_path / "fs.sock", tmp_path / "log")
    with pytest.raises(HypervisorError, match="virtiofsd not found") as exc:
        fs.start()
    assert "qemu-system-common" in exc.value.hint and virtiofsd.BINARY_ENV in exc.value.hint
    fs.kill()  # nothing to kill: fine


def test_virtiofsd_start_ready_and_kill(tmp_path: Path, source: Path) -> None:
    sock = tmp_path / "fs.sock"
    sock.write_text("stale")  # left by a previous run: replaced
    fs = Virtiofsd(source, sock, tmp_path / "log", binary=fake_virtiofsd(tmp_path))
    fs.start()
    try:
        run(fs.wait_ready())
        assert sock.is_socket() and fs.exit_status() is None and fs.pid is not None
        assert json.loads(Path(f"{sock}.argv").read_text()) == fs.argv()[1:]
    finally:
        fs.kill()
    assert fs.exit_status() == -signal.SIGKILL and not sock.exists()
    assert fs.pid is not None and not is_our_child(fs.pid)
    fs.kill()  # idempotent


def test_virtiofsd_that_exits_at_start_up(tmp_path: Path, source: Path) -> None:
    fs = Virtiofsd(
        source, tmp_path / "fs.sock", tmp_path / "log", binary=fake_virtiofsd(tmp_path, "exit_early")
    )
    fs.start()
    with pytest.raises(
        HypervisorError, match="virtiofsd exited during start-up: .*ERROR virtiofsd. source"
    ) as exc:
        run(fs.wait_ready())
    assert exc.value.details["argv"] == fs.argv()
    assert fs.exit_status() == 1


def test_virtiofsd_that_never_opens_its_socket(tmp_path: Path, source: Path) -> None:
    fs = Virtiofsd(
        source, tmp_path / "fs.sock", tmp_path / "log", binary=fake_virtiofsd(tmp_path, "no_socket")
    )
    fs.start()
    with pytest.raises(HypervisorError, match="virtiofsd did not open its socket"):
        run(fs.wait_ready(timeout=0.5))
    assert fs.exit_status() == -signal.SIGKILL  # killed, and reaped


def test_error_is_the_last_log_line(tmp_path: Path) -> None:
    fs = Virtiofsd(tmp_path, tmp_path / "fs.sock", tmp_path / "log", binary="/unused")
    assert fs.error() == "no error output"  # no log yet
    (tmp_path / "log").write_bytes(b"x" * 5000 + b"\nfirst\nfuse: session lost \xff\n\n")
    assert fs.error() == "fuse: session lost \ufffd"


def test_qemu_vm_runs_virtiofsd_first_and_reaps_it(
    fleet: Fleet, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = shared_vm(fleet, source, monkeypatch)

    async def main() -> None:
        await vm.launch()
        assert vm.state is VmState.RUNNING and vm.shared_fs_failure() is None
        assert vm.config.fs_socket.is_socket()
        assert "vhost-user-fs-device,chardev=fs0,tag=shared" in vm.argv
        fs_argv = json.loads(Path(f"{vm.config.fs_socket}.argv").read_text())  # it ran
        assert f"source={source}" in fs_argv
        vm.kill()

    run(main())
    assert_gone(vm)
    assert not vm.config.fs_socket.exists() and vm.shared_fs_failure() is None


def test_a_dead_virtiofsd_is_reported(fleet: Fleet, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = shared_vm(fleet, source, monkeypatch)

    async def main() -> None:
        await vm.launch()
        fs = vm._fs
        assert fs is not None and fs.pid is not None
        (vm.config.state_dir / "virtiofsd.log").write_text("[ERROR virtiofsd] fuse: device gone\n")
        os.kill(fs.pid, signal.SIGKILL)
        await wait_until(lambda: vm.shared_fs_failure() is not None)
        assert vm.shared_fs_failure() == "virtiofsd killed by SIGKILL: [ERROR virtiofsd] fuse: device gone"
        assert vm.exit_status() is None  # QEMU itself runs on: the sandbox stops it
        await vm.shutdown(timeout=2)
        assert vm.shared_fs_failure() is None  # the VM is stopped: nothing to report

    run(main())
    assert_gone(vm)


def test_a_virtiofsd_failing_at_start_up_means_no_qemu(
    fleet: Fleet, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = shared_vm(fleet, source, monkeypatch, "exit_early")
    with pytest.raises(HypervisorError, match="virtiofsd exited during start-up"):
        run(vm.launch())
    assert (vm.state, vm.pid) == (VmState.STOPPED, None)
    assert not vm.config.fs_socket.exists()


def test_without_a_shared_directory_there_is_no_virtiofsd(fleet: Fleet) -> None:
    vm = fleet.vm()

    async def main() -> None:
        await vm.launch()
        assert vm._fs is None and vm.shared_fs_failure() is None
        assert not any("vhost-user-fs" in a or "memory-backend" in a for a in vm.argv)
        await vm.shutdown()

    run(main())
    assert_gone(vm)
