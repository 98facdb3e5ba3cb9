"""Sandbox snapshots on real VMs: one booted sandbox (a container counting in its
shell's memory, writing the count into its writable layer) is saved, restored
twice, and the restores are checked against it; broken snapshots are refused
with nothing left behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.vm import test_network_vmpod
from tests.vm.conftest import VmFactory, VmpodRunner, assert_nothing_left, qemu_pids
from vmpod.errors import HypervisorError
from vmpod.guest.assets import GuestAssets
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec
from vmpod.sandbox import Container, ContainerSpec, ContainerState, Output, Sandbox, SandboxSpec, prepare
from vmpod.sandbox import snapshot as snap
from vmpod.storage.erofs import rootfs_disk

T = TypeVar("T")
# its `vmpod` fixture, for this module's tests: a runner on the test's own CNI network
network_runner = test_network_vmpod.vmpod
QUIET_UPTIME = 20.0  # the source's: the kernel's own reseed comes uptime/2 after the last
CLOCK_GAP = 8.0  # seconds between save and restore: how far behind an uncorrected clock is
COUNTER = "echo kept > /marker; i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.1; done"


class Source:
    def __init__(self, loop: asyncio.AbstractEventLoop, sandbox: Sandbox, container: Container) -> None:
        self.loop, self.sandbox, self.container = loop, sandbox, container

    def run(self, coro: Coroutine[object, object, T]) -> T:
        return self.loop.run_until_complete(coro)


async def sh(c: Container, script: str) -> str:
    out = bytearray()
    proc = await c.exec(
        {"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/"},
        Output(out.extend, out.extend),
        stdin=False,
    )
    ex = await asyncio.wait_for(proc.wait(), 120)
    assert ex.status == 0, bytes(out)
    return out.decode().strip()


async def count(c: Container) -> int:
    return int(await sh(c, "cat /count 2>/dev/null || echo 0"))


async def counted_past(c: Container, value: int) -> int:
    for _ in range(600):
        now = await count(c)
        if now > value:
            return now
        await asyncio.sleep(0.1)
    raise AssertionError(f"the count stays at {value}")


@pytest.fixture(scope="module")
def source(paths: Paths, assets: GuestAssets, busybox: Path) -> Iterator[Source]:
    loop = asyncio.new_event_loop()
    disk = rootfs_disk(paths, resolve_rootfs(busybox))
    sandbox = Sandbox(paths, prepare(paths, SandboxSpec(rootfs=(disk,))))
    oci = build_spec(resolve_rootfs(busybox).config, ProcessOptions(args=("sh", "-c", COUNTER)))

    async def boot() -> Container:
        await sandbox.start()
        c = await sandbox.create_container(ContainerSpec(id="counter", oci=oci, rootfs=disk))
        await c.start(Output(lambda _b: None, lambda _b: None), stdin=False, wait_started=True)
        await counted_past(c, 3)
        return c

    try:
        yield Source(loop, sandbox, loop.run_until_complete(boot()))
    finally:
        loop.run_until_complete(sandbox.stop())
        loop.close()
        assert_nothing_left(paths)


async def restored(paths: Paths, src: Path) -> tuple[Sandbox, Container]:
    m = snap.load_manifest(src)
    sandbox = snap.restore_config(paths, m)
    try:
        running = await snap.start(sandbox, src, m)
        (saved,) = m.containers
        (info,) = [i for i in running.processes if i.container_id == saved.id and i.init]
        c = sandbox.adopt(saved.spec(), info, Output(lambda _b: None, lambda _b: None))
    except BaseException:
        await sandbox.kill()
        raise
    return sandbox, c


def test_snapshot_restores_a_running_container(source: Source, paths: Paths, tmp_path: Path) -> None:
    dest = tmp_path / "snap"

    async def scenario() -> None:
        before = await count(source.container)
        m = await snap.save(source.sandbox, dest)
        assert sorted(os.listdir(dest)) == [snap.MANIFEST, snap.STATE] and m.state_size > 0
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        # the original runs on
        assert await counted_past(source.container, before) > before
        await asyncio.sleep(CLOCK_GAP)
        a, ca = await restored(paths, dest)
        b, cb = await restored(paths, dest)
        try:
            assert ca.state is ContainerState.RUNNING and cb.state is ContainerState.RUNNING
            # it goes on counting from where it was: never from the start again
            at_restore = await count(ca)
            assert at_restore >= before
            assert await counted_past(ca, at_restore) > at_restore
            # the writable layer came along
            assert await sh(ca, "cat /marker") == "kept"
            # the clock was corrected: without it the guest would be behind by the
            # time between save and restore (CLOCK_GAP at least)
            t0 = time.time()
            guest = int(await sh(ca, "date +%s"))
            assert t0 - 2 <= guest <= time.time() + 2
        finally:
            await a.stop()
            await b.stop()
        assert source.sandbox.alive

    source.run(scenario())
    # broken copies are refused before anything boots, and nothing is left
    truncated = tmp_path / "truncated"
    shutil.copytree(dest, truncated)
    with open(truncated / snap.STATE, "r+b") as fh:
        fh.truncate(os.path.getsize(truncated / snap.STATE) // 2)
    running = (qemu_pids(str(paths.run)), sorted(os.listdir(paths.sandboxes)))
    with pytest.raises(snap.SnapshotError, match="truncated or damaged"):
        source.run(restored(paths, truncated))
    assert (qemu_pids(str(paths.run)), sorted(os.listdir(paths.sandboxes))) == running


def test_a_state_qemu_cannot_load_leaves_nothing(source: Source, paths: Paths, tmp_path: Path) -> None:
    """A state file that matches its manifest but is not QEMU's: the restored QEMU
    fails to load it, and is gone with its sandbox directory."""
    dest = tmp_path / "snap"
    source.run(snap.save(source.sandbox, dest))
    garbage = os.urandom(os.path.getsize(dest / snap.STATE))
    (dest / snap.STATE).write_bytes(garbage)
    manifest = json.loads((dest / snap.MANIFEST).read_text())
    manifest["state_sha256"] = hashlib.sha256(garbage).hexdigest()
    (dest / snap.MANIFEST).write_text(json.dumps(manifest))
    running = (qemu_pids(str(paths.run)), sorted(os.listdir(paths.sandboxes)))
    with pytest.raises(HypervisorError, match="loading the VM state failed|QEMU exited"):
        source.run(restored(paths, dest))
    assert (qemu_pids(str(paths.run)), sorted(os.listdir(paths.sandboxes))) == running


def _ps(vmpod: VmpodRunner) -> dict[str, str]:
    r = vmpod("ps", "-a", "--format", "json")
    assert r.returncode == 0, r.err
    return {str(row["name"]): str(row["status"]) for row in json.loads(r.out)}


def _count(vmpod: VmpodRunner, name: str) -> int:
    r = vmpod("exec", name, "sh", "-c", "cat /count 2>/dev/null || echo 0")
    assert r.returncode == 0, r.err
    return int(r.out)


def _counted_past(vmpod: VmpodRunner, name: str, value: int) -> int:
    for _ in range(300):
        now = _count(vmpod, name)
        if now > value:
            return now
        time.sleep(0.2)
    raise AssertionError(f"{name}'s count stays at {value}")


def test_cli_snapshot_and_restore(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    vmpod = vm_factory()
    root = ("--rootfs", str(busybox))
    r = vmpod.run("-d", "--root-in-vm", "-v", f"{tmp_path}:/data", *root, "--", "true")
    assert r.returncode != 0 and "--root-in-vm" in r.err and "volumes" in r.err
    assert len(r.err.strip().splitlines()) == 1 and _ps(vmpod) == {}

    r = vmpod.run(
        "-d", "--root-in-vm", "--network", "none", "--name", "src", *root, "--", "sh", "-c", COUNTER
    )
    assert r.returncode == 0, r.err
    r = vmpod.run("-d", "--network", "none", "--name", "fs", *root, "--", "sleep", "1000")
    assert r.returncode == 0, r.err
    before = _counted_past(vmpod, "src", 2)

    # a virtio-fs container is refused naming the device; nothing is written
    r = vmpod("snapshot", "fs", str(tmp_path / "fs-snap"))
    assert r.returncode != 0 and "vhost-user-fs-device" in r.err and "--root-in-vm" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not list(tmp_path.glob("fs-snap*"))
    r = vmpod("cp", "src:/count", str(tmp_path / "count"))
    assert r.returncode != 0 and "--root-in-vm" in r.err and not (tmp_path / "count").exists()
    assert vmpod("rm", "-f", "fs").returncode == 0
    archive = tmp_path / "evidence.tar"
    r = vmpod("forensics", "capture", "src", "-o", str(archive), timeout=600)
    assert r.returncode != 0 and "--root-in-vm" in r.err and not archive.exists(), r.err
    assert len(r.err.strip().splitlines()) == 1

    snapshot = tmp_path / "snap"
    r = vmpod("snapshot", "src", str(snapshot))
    assert r.returncode == 0, r.err
    assert sorted(os.listdir(snapshot)) == [snap.MANIFEST, snap.STATE]
    assert _counted_past(vmpod, "src", before) > before  # the original runs on

    r = vmpod("restore", str(snapshot), "--name", "clone")
    assert r.returncode == 0, r.err
    assert _ps(vmpod) == {"src": "Running", "clone": "Running"}
    at_restore = _count(vmpod, "clone")
    assert at_restore >= before
    assert _counted_past(vmpod, "clone", at_restore) > at_restore
    assert vmpod("exec", "clone", "cat", "/marker").out == "kept\n"
    r = vmpod("exec", "clone", "cat", "/proc/net/dev")
    assert [ln.split(":")[0].strip() for ln in r.out.splitlines()[2:]] == ["lo"]  # no network
    assert vmpod("logs", "clone").returncode == 0
    r = vmpod("stop", "-t", "1", "clone")
    assert r.returncode == 0, r.err
    assert _ps(vmpod)["clone"].startswith("Exited")
    assert vmpod("rm", "clone").returncode == 0

    # a damaged snapshot is refused in one line, and nothing is made
    damaged = tmp_path / "damaged"
    shutil.copytree(snapshot, damaged)
    with open(damaged / snap.STATE, "r+b") as fh:
        fh.truncate(1000)
    r = vmpod("restore", str(damaged))
    assert r.returncode != 0 and "truncated or damaged" in r.err and len(r.err.strip().splitlines()) == 1
    assert _ps(vmpod) == {"src": "Running"}
    # one QEMU cannot load (its manifest vouches for it): the new container goes again
    garbage = os.urandom(1000)
    (damaged / snap.STATE).write_bytes(garbage)
    manifest = json.loads((damaged / snap.MANIFEST).read_text())
    manifest.update(state_size=len(garbage), state_sha256=hashlib.sha256(garbage).hexdigest())
    (damaged / snap.MANIFEST).write_text(json.dumps(manifest))
    qemus = qemu_pids(str(vmpod.paths.run))
    r = vmpod("restore", str(damaged), "--name", "broken")
    assert r.returncode != 0 and "loading the VM state failed" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1
    assert _ps(vmpod) == {"src": "Running"} and qemu_pids(str(vmpod.paths.run)) == qemus

    r = vmpod("snapshot", "src", str(tmp_path / "last"), "--stop")
    assert r.returncode == 0, r.err
    assert _ps(vmpod)["src"].startswith("Exited") and (tmp_path / "last" / snap.MANIFEST).is_file()
    assert not qemu_pids(str(vmpod.paths.run))
    assert vmpod("rm", "src").returncode == 0


def test_clones_do_not_share_random_state(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path: Path
) -> None:
    """Two restores of one snapshot read different bytes from /dev/urandom. The
    source is quiet (no process started between save and read) and its CRNG was
    just reseeded, so the kernel's own reseed (after uptime/2, at most 60 s) does
    not come first: without the restore's reseed both clones read the same bytes."""
    disk = rootfs_disk(paths, resolve_rootfs(busybox))
    oci = build_spec(resolve_rootfs(busybox).config, ProcessOptions(args=("sleep", "1000")))
    dest = tmp_path / "quiet"

    async def scenario() -> tuple[str, str]:
        async with Sandbox(paths, prepare(paths, SandboxSpec(rootfs=(disk,)))) as source:
            c = await source.create_container(ContainerSpec(id="quiet", oci=oci, rootfs=disk))
            await c.start(Output(lambda _b: None, lambda _b: None), stdin=False, wait_started=True)
            await asyncio.sleep(QUIET_UPTIME)
            await source.reseed_random()
            await snap.save(source, dest, stop=True)
        out = []
        for _ in range(2):  # (one at a time: each reads soon after its restore)
            clone, c = await restored(paths, dest)
            try:
                out.append(await sh(c, "head -c 32 /dev/urandom | od -An -tx1"))
            finally:
                await clone.stop()
        return out[0], out[1]

    loop = asyncio.new_event_loop()
    try:
        ra, rb = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(ra.split()) == 32 and ra != rb


def test_cli_snapshot_of_a_networked_container(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    """A container on the bridge network (a NIC on a tap) is saved; its clone has
    the same NIC (the saved state expects it) with nothing behind it."""
    r = vmpod.run("-d", "--root-in-vm", "--name", "web", "--rootfs", str(busybox), "--", "sh", "-c", COUNTER)
    assert r.returncode == 0, r.err
    route = vmpod("exec", "web", "ip", "route").out
    gateway = next(ln.split()[2] for ln in route.splitlines() if ln.startswith("default via"))
    ping = ("ping", "-c", "1", "-W", "3", gateway)
    assert vmpod("exec", "web", *ping).returncode == 0  # the source reaches its gateway
    r = vmpod("snapshot", "web", str(tmp_path / "snap"))
    assert r.returncode == 0, r.err
    r = vmpod("restore", str(tmp_path / "snap"), "--name", "clone")
    assert r.returncode == 0, r.err
    mac = vmpod("exec", "web", "cat", "/sys/class/net/eth0/address").out
    assert vmpod("exec", "clone", "cat", "/sys/class/net/eth0/address").out == mac
    assert vmpod("exec", "clone", *ping).returncode != 0  # isolated
    assert vmpod("exec", "web", *ping).returncode == 0  # the source is not
    assert _counted_past(vmpod, "clone", 0) > 0
    for name in ("clone", "web"):
        assert vmpod("rm", "-f", name).returncode == 0
