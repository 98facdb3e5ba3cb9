"""Volumes (virtio-fs) under faults, through the real vmpod-runtime: big writes arrive
byte for byte, fsync'ed data survives a killed VM, and a dead file server ends the
container with a clear error instead of a hang."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import qemu_below, virtiofsd_pids
from tests.vm.test_runtime_support import (
    Runtime,
    assert_runtime_clean,
    fresh_dir,
    make_bundle,
    runtime_env,
)
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

GIB = 1 << 30
MIB = 1 << 20
LINE = b"0123456789abcdef" * 3 + b"vmpod-volume\n"  # 61 bytes, like `yes` would repeat it


@pytest.fixture
def rt(paths: Paths, assets: GuestAssets, tmp_path: Path) -> Iterator[Runtime]:
    runtime = Runtime(tmp_path / "root", runtime_env(paths, tmp_path / "runtime.json"), tmp_path / "log.json")
    yield runtime
    for cid in runtime("list", "--quiet").stdout.decode().split():
        runtime("delete", "--force", cid)
    assert_runtime_clean(paths, runtime.root)


def _volume_bundle(tmp: Path, busybox: Path, script: str) -> tuple[Path, Path]:
    data = fresh_dir(tmp / "data")
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]},
    ]
    return make_bundle(tmp / "bundle", busybox, ["sh", "-c", script], mounts=mounts), data


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


def _expected_sha256(size: int) -> str:
    h = hashlib.sha256()
    block = (LINE * (MIB // len(LINE) + 1))[:MIB]
    for _ in range(size // MIB):
        h.update(block)
    return h.hexdigest()


def test_a_gigabyte_reaches_the_host_byte_for_byte(rt: Runtime, busybox: Path, tmp_path: Path) -> None:
    # a 1 MiB pattern block repeated (generating 1 GiB under TCG would take minutes)
    line = LINE.decode().rstrip("\n")
    script = (
        f"yes {line} | head -c {MIB} > /tmp/blk && i=0 && "
        f"while [ $i -lt {GIB // MIB} ]; do cat /tmp/blk; i=$((i+1)); done > /data/big && echo done"
    )
    bundle, data = _volume_bundle(tmp_path, busybox, script)
    ctr = rt.create("big", bundle, tmp_path)
    ctr.wait_created()
    rt("start", "big", check=True)
    assert ctr.result(timeout=600)["status"] == 0, ctr.output()
    assert ctr.output()[0] == "done\n"
    rt("delete", "big", check=True)
    assert (data / "big").stat().st_size == GIB
    with open(data / "big", "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == _expected_sha256(GIB)


def test_fsynced_data_survives_a_killed_vm(rt: Runtime, busybox: Path, tmp_path: Path) -> None:
    script = (
        "i=0; while [ $i -lt 200 ]; do echo line-$i; i=$((i+1)); done > /data/log; "
        "fsync /data/log 2>/dev/null || sync; echo synced; "
        "while true; do echo unsynced >> /data/log; sleep 0.1; done"
    )
    bundle, data = _volume_bundle(tmp_path, busybox, script)
    ctr = rt.create("crash", bundle, tmp_path)
    monitor = ctr.wait_created()
    rt("start", "crash", check=True)
    _wait_for(ctr.out, "synced\n")
    qemu = qemu_below(monitor)
    assert len(qemu) == 1, qemu
    os.kill(qemu[0], signal.SIGKILL)
    ctr.result()
    lines = (data / "log").read_text().splitlines()
    assert lines[:200] == [f"line-{i}" for i in range(200)]
    rt("delete", "crash", check=True)


def test_a_dead_file_server_ends_the_container_clearly(
    rt: Runtime, paths: Paths, busybox: Path, tmp_path: Path
) -> None:
    script = "echo up; while true; do date > /data/now; sleep 0.1; done"
    bundle, _ = _volume_bundle(tmp_path, busybox, script)
    ctr = rt.create("nofs", bundle, tmp_path)
    ctr.wait_created()
    rt("start", "nofs", check=True)
    _wait_for(ctr.out, "up\n")
    # virtiofsd forks into its own namespaces: kill the server itself, the child
    servers = virtiofsd_pids(str(paths.run))
    assert len(servers) == 2, servers
    os.kill(max(servers), signal.SIGKILL)
    # the container ends (as SIGKILL, its VM is gone) instead of hanging on I/O
    result = ctr.result(timeout=60)
    assert result.get("signal") == signal.SIGKILL, result
    assert rt.state("nofs")["status"] == "stopped"
    log = rt.log.read_text()
    assert "its file server died (virtiofsd exit status" in log, log[-2000:]
    started = time.monotonic()
    rt("delete", "nofs", check=True)
    assert time.monotonic() - started < 30
