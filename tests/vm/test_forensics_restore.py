"""Restores an analyst needs beyond the plain round trip, on real VMs and real
CRIU: a podman-layout archive (no manifest, zstd) restored with every task left
stopped until `vmpod forensics resume`; a capture whose VM dies mid-dump."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from tests.vm.conftest import VMPOD, VmFactory, VmpodRunner, qemu_pids
from tests.vm.test_forensics import COUNTER, _counts, _status, _wait
from vmpod.guest.kernel import DEFAULT_KERNEL, ensure_kernel


def _podman_layout(src: Path, dest: Path) -> None:
    """``src`` (a vmpod archive) as podman exports one: no manifest, podman's
    config.dump keys only, zstd-compressed."""
    plain = dest.with_suffix("")
    with tarfile.open(src) as tin, tarfile.open(plain, "w") as tout:
        for info in tin:
            if info.name == "vmpod-manifest.json":
                continue
            data = tin.extractfile(info) if info.isreg() else None
            if info.name == "config.dump":
                assert data is not None
                config = json.loads(data.read())
                slim = json.dumps({k: config[k] for k in ("id", "name", "createdTime")}).encode()
                info.size, data = len(slim), io.BytesIO(slim)
            tout.addfile(info, data)
    subprocess.run(["zstd", "-q", "--rm", "-o", str(dest), str(plain)], check=True)


def test_paused_restore_of_a_podman_layout_archive(
    vm_factory: VmFactory, busybox: Path, tmp_path: Path
) -> None:
    vmpod = vm_factory()
    r = vmpod.run("-d", "--name", "suspect", "--rootfs", str(busybox), "--", "sh", "-c", COUNTER)
    assert r.returncode == 0, r.err
    _wait(lambda: len(_counts(vmpod, "suspect")) >= 2)
    archive = tmp_path / "evidence.tar"
    r = vmpod("forensics", "capture", "suspect", "-o", str(archive), "--kill", timeout=900)
    assert r.returncode == 0, r.err
    captured = max(_counts(vmpod, "suspect"))
    assert vmpod("rm", "suspect").returncode == 0
    podman = tmp_path / "podman.tar.zst"
    _podman_layout(archive, podman)

    # a guest kernel built without checkpoint/restore (the same image, catalogued
    # with a config that says so) is refused before anything is made
    k = ensure_kernel(vmpod.paths, DEFAULT_KERNEL)
    mods = tmp_path / "nocr" / k.release
    shutil.copytree(k.modules_dir, mods, symlinks=True)
    (mods / "build").mkdir()
    config = [ln for ln in k.config.read_text().splitlines() if "CONFIG_CHECKPOINT_RESTORE" not in ln]
    (mods / "build" / ".config").write_text("\n".join([*config, "# CONFIG_CHECKPOINT_RESTORE is not set\n"]))
    r = vmpod("kernel", "add", "nocr", "--vmlinuz", str(k.boot_image), "--modules", str(mods))
    assert r.returncode == 0, r.err
    r = vmpod("forensics", "restore", str(archive), "--kernel", "nocr", "--name", "nocr")
    assert r.returncode != 0 and "kernel local-nocr has no checkpoint/restore support" in r.err
    assert "nocr" not in vmpod("ps", "-a").out and qemu_pids(str(vmpod.paths.run)) == []
    assert vmpod("kernel", "rm", "nocr").returncode == 0

    r = vmpod("forensics", "verify", str(podman))
    assert r.returncode != 0 and "no vmpod-manifest.json" in r.err
    r = vmpod("forensics", "inspect", str(podman), "--format", "json")
    assert r.returncode == 0 and "nothing was verified" in r.err, r.err
    seen = json.loads(r.out)
    assert seen["verified"] is False and [p["pid"] for p in seen["processes"]][:1] == [1]
    r = vmpod("forensics", "restore", str(podman), "--name", "clone", "--paused", timeout=900)
    assert r.returncode != 0 and "names no image" in r.err and "--rootfs" in r.err  # podman's has none here
    assert "clone" not in vmpod("ps", "-a").out
    r = vmpod(
        "forensics",
        "restore",
        str(podman),
        "--name",
        "clone",
        "--rootfs",
        str(busybox),
        "--paused",
        timeout=900,
    )
    assert r.returncode == 0, r.err
    assert "nothing was verified" in r.err and "stopped until `vmpod forensics resume clone`" in r.err
    # every restored task is stopped, yet the analyst can look inside
    r = vmpod("exec", "clone", "grep", "State", "/proc/1/status")
    assert r.returncode == 0 and "T (stopped)" in r.out, (r.out, r.err)
    assert _counts(vmpod, "clone") == []
    assert vmpod("forensics", "resume", "clone").out.strip() == "clone"
    _wait(lambda: len(_counts(vmpod, "clone")) >= 2)
    assert _counts(vmpod, "clone")[:2] == [captured + 1, captured + 2]
    r = vmpod("stop", "clone")
    assert r.returncode == 0, r.err
    r = vmpod("forensics", "resume", "clone")
    assert r.returncode != 0 and "container clone is not running" in r.err
    assert vmpod("rm", "clone").returncode == 0


def test_vm_killed_mid_dump_leaves_nothing(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    vmpod = vm_factory()
    # 40 MB held in the shell's memory: the dump takes long enough to be caught in it
    big = "x=$(head -c 40000000 /dev/zero | tr '\\0' a); echo ready; sleep 1000"
    r = vmpod.run("-d", "--name", "big", "--rootfs", str(busybox), "--", "sh", "-c", big)
    assert r.returncode == 0, r.err
    _wait(lambda: "ready" in vmpod("logs", "big").out, timeout=300)
    scratch = vmpod.paths.tmp
    before = set(scratch.glob("forensics-*"))
    archive = tmp_path / "a.tar"
    capture = subprocess.Popen(
        [*VMPOD, "forensics", "capture", "big", "-o", str(archive)],
        env=vmpod.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # CRIU has started once its log exists in the capture's scratch directory
        _wait(lambda: any(scratch.glob("forensics-*/criu/work/dump.log")) or capture.poll() is not None)
        assert capture.poll() is None, capture.communicate()
        (qemu,) = qemu_pids(str(vmpod.paths.run))
        os.kill(qemu, signal.SIGKILL)
        out, err = capture.communicate(timeout=300)
    finally:
        if capture.poll() is None:
            capture.kill()
    assert capture.returncode != 0
    lines = err.decode().strip().splitlines()
    assert lines and lines[0].startswith("vmpod: error: "), lines
    assert not archive.exists() and list(tmp_path.iterdir()) == []
    assert set(scratch.glob("forensics-*")) == before
    _wait(lambda: "Exited" in _status(vmpod, "big"), timeout=60)
    assert vmpod("rm", "big").returncode == 0
    deadline = time.monotonic() + 30
    while qemu_pids(str(vmpod.paths.run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_pids(str(vmpod.paths.run)) == []


# a client streaming to a server over loopback: an established TCP connection
TALKER = (
    "sleep 100000 | nc -l -p 9000 > /dev/null & sleep 1; "
    "(while true; do echo x; sleep 0.5; done) | nc 127.0.0.1 9000 & "
    "i=0; while true; do i=$((i+1)); echo n=$i; sleep 0.3; done"
)


def _established(vmpod: VmpodRunner, name: str) -> int:
    r = vmpod("exec", name, "netstat", "-tn")
    assert r.returncode == 0, r.err
    return r.out.count("ESTABLISHED")


def test_established_tcp_is_captured_and_restored_closed(
    vm_factory: VmFactory, busybox: Path, tmp_path: Path
) -> None:
    vmpod = vm_factory()
    r = vmpod.run("-d", "--name", "talker", "--rootfs", str(busybox), "--", "sh", "-c", TALKER)
    assert r.returncode == 0, r.err
    _wait(lambda: _established(vmpod, "talker") == 2)  # both ends, in the container
    refused = tmp_path / "refused.tar"
    r = vmpod("forensics", "capture", "talker", "-o", str(refused), timeout=900)
    assert r.returncode != 0 and "consider using --tcp-established" in r.err and not refused.exists()
    archive = tmp_path / "evidence.tar"
    r = vmpod("forensics", "capture", "talker", "--tcp-established", "-o", str(archive), timeout=900)
    assert r.returncode == 0, r.err
    # CRIU's network lock (iptables in the VM) is lifted: the original talks on
    assert _established(vmpod, "talker") == 2
    r = vmpod("forensics", "restore", str(archive), "--name", "clone", timeout=900)
    assert r.returncode == 0 and "restored closed" in r.err, r.err
    captured = max(_counts(vmpod, "talker"))
    _wait(lambda: len(_counts(vmpod, "clone")) >= 2)
    assert 1 < _counts(vmpod, "clone")[0] <= captured + 1  # the count went on in the clone
    assert _established(vmpod, "clone") == 0
    for name in ("clone", "talker"):
        assert vmpod("rm", "-f", name).returncode == 0
