"""Sandbox snapshots on real VMs: one booted sandbox (a container counting in its
shell's memory, writing the count into its writable layer) is saved, restored
twice, and the restores are checked against it; broken snapshots are refused
with nothing left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.vm.conftest import assert_nothing_left, qemu_pids
from vmpod.guest.assets import GuestAssets
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec
from vmpod.sandbox import Container, ContainerSpec, ContainerState, Output, Sandbox, SandboxSpec, prepare
from vmpod.sandbox import snapshot as snap
from vmpod.storage.erofs import rootfs_disk

T = TypeVar("T")
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
            # the clock was corrected: the guest's time is the host's (seconds)
            assert abs(int(await sh(ca, "date +%s")) - int(__import__("time").time())) < 60
            # two clones of one snapshot do not share their random state
            ra = await sh(ca, "head -c 32 /dev/urandom | od -An -tx1")
            rb = await sh(cb, "head -c 32 /dev/urandom | od -An -tx1")
            assert ra != rb
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
