"""Forensics on real VMs with real CRIU in the guests: a container that counts in
memory and appends to an open file is captured in sandbox A (which keeps
running), the archive is verified, tampered with, and restored into a fresh
sandbox B, where the count goes on from the captured value; then B's container
is captured again with --kill."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.vm.conftest import GuestKernel, VmFactory, VmpodRunner

# the count lives only in the shell's memory; fd 3 stays open (O_APPEND) all along
COUNTER = "i=0; exec 3>>/data.log; while true; do i=$((i+1)); echo $i >&3; echo n=$i; sleep 0.3; done"


def _wait(pred: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _counts(vmpod: VmpodRunner, name: str) -> list[int]:
    r = vmpod("logs", name)
    assert r.returncode == 0, r.err
    return [int(line[2:]) for line in r.out.splitlines() if line.startswith("n=")]


def _member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        fh = tar.extractfile(name)
        assert fh is not None
        return fh.read()


def _captured_log(archive: Path) -> list[str]:
    """data.log as the archive's rootfs-diff.tar holds it."""
    with tarfile.open(fileobj=io.BytesIO(_member(archive, "rootfs-diff.tar"))) as diff:
        fh = diff.extractfile("data.log")
        assert fh is not None
        return fh.read().decode().split()


def _flip_byte(src: Path, dest: Path, member: str) -> None:
    shutil.copyfile(src, dest)
    with tarfile.open(src) as tar:
        offset = tar.getmember(member).offset_data
    with open(dest, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_capture_verify_restore(
    vm_factory: VmFactory, busybox: Path, tmp_path: Path, guest_kernel: GuestKernel
) -> None:
    vmpod = vm_factory(kernel=guest_kernel.name)
    r = vmpod.run("-d", "--name", "suspect", "--rootfs", str(busybox), "--", "sh", "-c", COUNTER)
    assert r.returncode == 0, r.err
    _wait(lambda: len(_counts(vmpod, "suspect")) >= 3)

    archive = tmp_path / "evidence.tar"
    r = vmpod("forensics", "capture", "suspect", "-o", str(archive), timeout=900)
    assert r.returncode == 0, r.err
    assert r.out.strip() == str(archive) and "still running" in r.err
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for want in ("checkpoint/inventory.img", "config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files"):
        assert want in names
    # the file and the memory were captured at one moment: the file ends at the count
    lines = _captured_log(archive)
    captured = len(lines)
    assert lines == [str(i) for i in range(1, captured + 1)]

    # the original keeps counting (leave-running is the default)
    _wait(lambda: max(_counts(vmpod, "suspect")) >= captured + 3)

    r = vmpod("forensics", "verify", str(archive))
    assert r.returncode == 0 and r.out.startswith("OK:"), (r.out, r.err)
    tampered = tmp_path / "tampered.tar"
    _flip_byte(archive, tampered, "checkpoint/pages-1.img")
    r = vmpod("forensics", "verify", str(tampered))
    assert r.returncode == 1 and "CHANGED  checkpoint/pages-1.img" in r.out, (r.out, r.err)
    r = vmpod("forensics", "restore", str(tampered), "--name", "bad")
    assert r.returncode != 0 and "checkpoint/pages-1.img" in r.err
    assert "bad" not in vmpod("ps", "-a").out

    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    r = vmpod("forensics", "restore", str(truncated), "--name", "half")
    assert r.returncode != 0 and "truncated.tar" in r.err
    assert "half" not in vmpod("ps", "-a").out

    # B: a fresh VM; the archive names the --rootfs directory, which is still here
    r = vmpod("forensics", "restore", str(archive), "--name", "clone", timeout=900)
    assert r.returncode == 0, r.err
    assert r.out.strip() == "clone" and "loopback only" in r.err
    _wait(lambda: len(_counts(vmpod, "clone")) >= 3)
    counts = _counts(vmpod, "clone")
    assert counts[:3] == [captured + 1, captured + 2, captured + 3]  # memory came back
    r = vmpod("exec", "clone", "cat", "/data.log")
    assert r.returncode == 0, r.err
    restored = r.out.split()
    # appended through the restored fd at the right offset: no gap, no overwrite
    assert restored[:captured] == lines and restored == [str(i) for i in range(1, len(restored) + 1)]
    assert len(restored) > captured
    assert vmpod("exec", "clone", "ls", "/sys/class/net").out.split() == ["lo"]
    # B boots the captured container's kernel (the manifest names it)
    manifest = json.loads(_member(archive, "vmpod-manifest.json"))
    assert manifest["guest_kernel"] == guest_kernel.release
    assert vmpod("exec", "clone", "uname", "-r").out.strip() == guest_kernel.release
    assert "Running" in vmpod("ps").out.split("\n", 1)[1]
    assert max(_counts(vmpod, "suspect")) > captured + 3  # A still runs its own

    # the restored container is an ordinary one: capture it again, with --kill
    second = tmp_path / "second.tar"
    r = vmpod("forensics", "capture", "clone", "-o", str(second), "--kill", timeout=900)
    assert r.returncode == 0, r.err
    _wait(lambda: "Exited" in _status(vmpod, "clone"), timeout=60)
    assert vmpod("forensics", "verify", str(second)).returncode == 0
    assert _captured_log(second)[:captured] == lines

    # the image given by hand (--rootfs): a third VM goes on from the second capture
    counted = len(_captured_log(second))
    r = vmpod("forensics", "restore", str(second), "--name", "third", "--rootfs", str(busybox), timeout=900)
    assert r.returncode == 0, r.err
    _wait(lambda: len(_counts(vmpod, "third")) >= 1)
    assert _counts(vmpod, "third")[0] == counted + 1
    assert vmpod("stop", "third").returncode == 0
    assert vmpod("rm", "third").returncode == 0

    for name in ("clone", "suspect"):
        assert vmpod("rm", "-f", name).returncode == 0


def _status(vmpod: VmpodRunner, name: str) -> str:
    for line in vmpod("ps", "-a").out.splitlines()[1:]:
        if line.split()[-1] == name:
            return line
    return ""


def test_capture_needs_runc_in_the_guest(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    vmpod = vm_factory()
    r = vmpod.run(
        "-d", "--name", "c", "--guest-runtime", "crun", "--rootfs", str(busybox), "--", "sleep", "600"
    )
    assert r.returncode == 0, r.err
    archive = tmp_path / "a.tar"
    r = vmpod("forensics", "capture", "c", "-o", str(archive))
    assert r.returncode != 0 and "capture needs runc" in r.err and "--guest-runtime runc" in r.err
    assert not archive.exists() and not list(tmp_path.iterdir())
    assert "Running" in _status(vmpod, "c")
    r = vmpod("forensics", "capture", "nosuch", "-o", str(archive))
    assert r.returncode != 0 and "no such container: nosuch" in r.err
    assert vmpod("rm", "-f", "c").returncode == 0
