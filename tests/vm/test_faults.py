"""Bad input and faults: one clear line, non-zero exit, nothing left behind
(the ``vmpod`` fixture checks for stray QEMU, sandbox dirs, mounts, temp dirs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.vm.conftest import VmpodRunner, qemu_pids


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("vmpod: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_image(vmpod: VmpodRunner, tmp_path: Path) -> None:
    r = vmpod("run", str(tmp_path / "nope"), "--", "true")
    assert r.returncode == 125
    assert "not found" in _one_error_line(r.err)


def test_plain_directory_is_not_an_image(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod("run", str(busybox), "--", "true")
    assert r.returncode == 125
    assert "--rootfs" in _one_error_line(r.err)


def test_missing_or_unreadable_rootfs(vmpod: VmpodRunner, tmp_path: Path) -> None:
    r = vmpod("run", "--rootfs", str(tmp_path / "missing"), "--", "true")
    assert r.returncode == 125
    _one_error_line(r.err)
    afile = tmp_path / "file"
    afile.write_text("not a directory")
    r = vmpod("run", "--rootfs", str(afile), "--", "true")
    assert r.returncode == 125
    _one_error_line(r.err)


def test_unknown_kernel(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod("run", "--kernel", "linux-2.4", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125
    assert "unknown kernel" in _one_error_line(r.err)
    r = vmpod("run", "--kernel", "debian:9.9.9-99-cloud-amd64", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125
    assert "not found" in _one_error_line(r.err)


def test_agent_that_never_answers_times_out_with_console(vmpod: VmpodRunner, busybox: Path) -> None:
    # No guest boots to its agent in 0.3 s, even with KVM: a real timeout path.
    r = vmpod("run", "--boot-timeout", "0.3", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125
    assert "did not answer within 0.3s" in _one_error_line(r.err)
    assert "guest console" in r.err


def test_qemu_killed_during_run(vmpod: VmpodRunner, busybox: Path) -> None:
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    pids = qemu_pids(str(vmpod.paths.run))
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 125
    assert "SIGKILL" in _one_error_line(err.decode())


def test_vmpod_killed_leaves_no_qemu(vmpod: VmpodRunner, busybox: Path) -> None:
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while qemu_pids(str(vmpod.paths.run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids(str(vmpod.paths.run)) == []
    # The dead run's state dir is collected by the next run.
    r = vmpod("run", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 0, r.err


def test_disk_full_while_building_assets(vmpod: VmpodRunner, tmp_path: Path) -> None:
    home = tmp_path / "small-home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(home)], check=True)
    try:
        r = vmpod("assets", "build", env={"VMPOD_HOME": str(home)}, timeout=600)
        assert r.returncode == 125
        assert "disk full" in _one_error_line(r.err)
        assert not (home / "tmp").exists() or list((home / "tmp").iterdir()) == []
        assert not list((home / "kernels").glob("*/kernel.json"))
    finally:
        subprocess.run(["umount", str(home)], check=True)
