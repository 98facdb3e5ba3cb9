"""The sandbox core without a VM: a fake hypervisor and the real agent server
(in a thread, over the channel socket) with a fake OCI runtime on the host."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.fixtures.fakevm import FakeVm, fake_config, fake_rootfs, registered
from tests.unit.test_mounts import unmount_all
from vmpod.errors import AgentTimeout, HypervisorError, SandboxError, StateError
from vmpod.guest.modules import ModuleLoad
from vmpod.mounts import is_mount_point, mounts_below
from vmpod.paths import Paths
from vmpod.sandbox import (
    Container,
    ContainerSpec,
    ContainerState,
    Output,
    Process,
    Sandbox,
    SandboxState,
    Volume,
)
from vmpod.sandbox.build import rootfs_serial, with_rootfs

T = TypeVar("T")


def run(coro: Coroutine[object, object, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    try:
        with registered():
            yield Paths(home=tmp_path / "home", run=tmp_path / "run")
    finally:
        unmount_all(tmp_path)  # shared directories' bind mounts a failed test left


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return fake_rootfs(tmp_path)


def sandbox(paths: Paths, rootfs: Path, **changes: object) -> Sandbox:
    return Sandbox(paths, with_rootfs(fake_config(paths.home, **changes), rootfs))


def spec(
    cid: str,
    rootfs: Path,
    *args: str,
    tty: bool = False,
    readonly: bool = False,
    mounts: list[dict[str, object]] | None = None,
    volumes: tuple[Volume, ...] = (),
) -> ContainerSpec:
    oci: dict[str, object] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": readonly},
        "process": {
            "args": list(args),
            "cwd": "/",
            "terminal": tty,
            "env": ["PATH=/usr/bin:/bin"],
            "user": {"uid": 0, "gid": 0},
        },
    }
    if mounts is not None:
        oci["mounts"] = mounts
    return ContainerSpec(id=cid, rootfs=rootfs, oci=oci, volumes=volumes)


def state_of(c: Container) -> ContainerState:
    """``c.state`` read afresh. It changes across awaits, but mypy keeps a property
    narrowed by an earlier assertion and would call a later one unreachable."""
    return c.state


def sandbox_state(sb: Sandbox) -> SandboxState:
    """``sb.state`` read afresh (see :func:`state_of`)."""
    return sb.state


def execs_of(c: Container) -> tuple[Process, ...]:
    """``c.execs`` read afresh (see :func:`state_of`)."""
    return c.execs


def collect() -> tuple[Output, bytearray, bytearray]:
    out, err = bytearray(), bytearray()
    return Output(out.extend, err.extend), out, err


def test_a_container_runs_and_its_status_and_output_come_back(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            assert sb.state is SandboxState.RUNNING and sb.state_dir.is_dir()
            c = await sb.create_container(spec("c1", rootfs, "sh", "-c", "echo out; echo err >&2; exit 3"))
            assert c.state is ContainerState.CREATED
            output, out, err = collect()
            proc = await c.start(output, stdin=False)
            ex = await proc.wait()
            assert (ex.status, bytes(out), bytes(err)) == (3, b"out\n", b"err\n")
            assert state_of(c) is ContainerState.STOPPED and (await c.wait()).status == 3
            assert c.exit == ex
        assert sandbox_state(sb) is SandboxState.STOPPED and not sb.state_dir.exists()

    run(scenario())


def test_two_containers_share_one_sandbox(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            a = await sb.create_container(spec("a", rootfs, "sleep", "30"))
            b = await sb.create_container(spec("b", rootfs, "sh", "-c", "echo b"))
            pa = await a.start(collect()[0], stdin=False)
            output, out, _ = collect()
            await b.start(output, stdin=False)
            assert (await b.wait()).status == 0 and bytes(out) == b"b\n"
            assert (a.state, b.state) == (ContainerState.RUNNING, ContainerState.STOPPED)
            await a.kill(signal.SIGTERM)
            assert (await pa.wait()).status == 128 + signal.SIGTERM
            assert set(sb.containers) == {"a", "b"}

    run(scenario())


def test_stdin_exec_and_queries(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            c = await sb.create_container(spec("c", rootfs, "cat"))
            output, out, _ = collect()
            proc = await c.start(output, stdin=True, wait_started=True)
            ex_out, eo, _ = collect()
            ex = await c.exec(
                {"args": ["sh", "-c", "echo exec $X"], "env": ["X=1", "PATH=/bin"], "cwd": "/"},
                ex_out,
                stdin=False,
            )
            assert c.execs == (ex,)
            assert (await ex.wait()).status == 0 and bytes(eo) == b"exec 1\n"
            assert execs_of(c) == ()
            pids = json.loads(await c.query("ps", ["--format", "json"]))
            assert len(pids) == 1 and isinstance(pids[0], int)
            stats = await c.stats()  # (real figures are checked in a VM: the host is cgroup v1+v2)
            assert all(
                isinstance(v, int) and v >= 0 for v in (stats.pids, stats.memory_bytes, stats.cpu_usage_usec)
            )
            await c.pause()
            assert c.state is ContainerState.PAUSED
            with pytest.raises(StateError, match="c is paused"):
                await c.exec({"args": ["true"]}, collect()[0], stdin=False)
            await c.resume()
            await proc.write(b"hello\n")
            proc.close_stdin()
            assert (await proc.wait()).status == 0 and bytes(out) == b"hello\n"
            with pytest.raises(SandboxError, match="unsupported runtime query"):
                await c.query("checkpoint", [])

    run(scenario())


def test_kill_before_start_ends_the_container(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            c = await sb.create_container(spec("c", rootfs, "true"))
            await c.kill(signal.SIGWINCH)  # not fatal: nothing happens
            assert c.state is ContainerState.CREATED
            await c.kill(signal.SIGKILL)
            assert state_of(c) is ContainerState.STOPPED
            assert (await c.wait()).status == 128 + signal.SIGKILL
            with pytest.raises(StateError, match="cannot start the container: container c is stopped"):
                await c.start(collect()[0], stdin=False)

    run(scenario())


def test_illegal_states_are_refused_with_the_state_named(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        sb = sandbox(paths, rootfs)
        with pytest.raises(StateError, match="is new"):
            await sb.create_container(spec("c", rootfs, "true"))
        async with sb:
            with pytest.raises(StateError, match="it cannot become starting"):
                await sb.start()
            c = await sb.create_container(spec("c", rootfs, "true"))
            with pytest.raises(SandboxError, match="already exists"):
                await sb.create_container(spec("c", rootfs, "true"))
            with pytest.raises(SandboxError, match="/elsewhere is neither a directory nor a disk attached"):
                await sb.create_container(spec("d", Path("/elsewhere"), "true"))
            with pytest.raises(StateError, match="cannot pause"):
                await c.pause()
            with pytest.raises(StateError, match="cannot wait"):
                await c.wait()
        await sb.stop()  # idempotent
        await sb.kill()
        assert c.state is ContainerState.STOPPED

    run(scenario())


def test_a_crashed_vm_is_explained_to_waiters(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            c = await sb.create_container(spec("c", rootfs, "sleep", "30"))
            proc = await c.start(collect()[0], stdin=False)
            FakeVm.launched[-1].crash(-9)
            with pytest.raises(HypervisorError, match="stopped unexpectedly .QEMU killed by SIGKILL"):
                await proc.wait()
            assert not sb.alive

    run(scenario())


def test_boot_failures(paths: Paths, rootfs: Path) -> None:
    FakeVm.die_on_launch = 1
    sb = sandbox(paths, rootfs)
    with pytest.raises(HypervisorError, match="stopped during boot .exit status 1.: vmpod-init: fake"):
        run(sb.__aenter__())
    assert not sb.state_dir.exists() and sb.state is SandboxState.STOPPED
    FakeVm.die_on_launch, FakeVm.mute = None, True
    sb = sandbox(paths, rootfs, boot_timeout=0.3)
    with pytest.raises(AgentTimeout, match="did not answer within 0.3s") as exc:
        run(sb.__aenter__())
    assert "fake console" in exc.value.details["console_tail"]
    assert not sb.state_dir.exists()


def test_kernel_modules_and_guest_facts(paths: Paths, rootfs: Path, tmp_path: Path) -> None:
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"\0")

    async def scenario() -> None:
        async with sandbox(paths, rootfs, modules=(ModuleLoad("m", ko, ()),)) as sb:
            info = await sb.guest_info()
            assert info.cpus >= 1
            log = await sb.kernel_log()
            assert log.last_seq >= -1
            with pytest.raises(SandboxError, match="loading kernel module m failed"):
                await sb.load_modules()  # (no insmod of a real module on the host)
            res = await sb.unload_module("surely_not_loaded")
            assert res.status != 0

    run(scenario())


def test_kill_is_hard_and_leaves_nothing(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        sb = sandbox(paths, rootfs)
        await sb.start()
        c = await sb.create_container(spec("c", rootfs, "sleep", "30"))
        await c.start(collect()[0], stdin=False)
        await sb.kill()
        assert sb.state is SandboxState.STOPPED and not sb.state_dir.exists()
        assert c.state is ContainerState.STOPPED

    run(scenario())


def test_rootfs_serials() -> None:
    assert [rootfs_serial(i) for i in range(3)] == ["ctr-rootfs", "ctr-rootfs-1", "ctr-rootfs-2"]
    cfg = with_rootfs(fake_config(Path("/x")), Path("/a"), Path("/b"), Path("/a"))
    assert [(d.path, d.serial) for d in cfg.disks] == [
        (Path("/a"), "ctr-rootfs"),
        (Path("/b"), "ctr-rootfs-1"),
    ]


# -- the shared directory (virtio-fs; in the fake VM the agent sees it as it is) --


def shared_sandbox(paths: Paths) -> Sandbox:
    """A sandbox with a shared directory and no disks: root filesystems that are
    host directories go through the shared directory, as with vmpod-runtime."""
    return Sandbox(paths, fake_config(paths.home, shared_fs=True))


def guest_config(sb: Sandbox, cid: str) -> dict[str, object]:
    """The config.json the agent wrote for ``cid`` (in the fake VM's state dir)."""
    config = json.loads((sb.state_dir / "guest" / "bundles" / cid / "config.json").read_text())
    assert isinstance(config, dict)
    return config


async def run_to_end(c: Container) -> tuple[int, bytes, bytes]:
    output, out, err = collect()
    proc = await c.start(output, stdin=False)
    return (await proc.wait()).status, bytes(out), bytes(err)


def test_a_host_directory_rootfs_is_written_on_the_host(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with shared_sandbox(paths) as sb:
            shared = sb.shared_dir
            assert shared is not None and shared == paths.shared / sb.id and is_mount_point(shared)
            c = await sb.create_container(
                spec("c", rootfs, "sh", "-c", "echo hi > from-guest; cat etc/group")
            )
            assert is_mount_point(shared / "c" / "rootfs")
            assert guest_config(sb, "c")["root"] == {"path": f"{shared}/c/rootfs", "readonly": False}
            status, out, _ = await run_to_end(c)
            assert (status, out) == (0, b"root:x:0:\nalice:x:1000:\n")
            ro = await sb.create_container(spec("ro", rootfs, "sh", "-c", "echo x > nope", readonly=True))
            status, _, err = await run_to_end(ro)
            assert status != 0 and b"Read-only file system" in err
        assert (rootfs / "from-guest").read_text() == "hi\n" and not (rootfs / "nope").exists()
        assert not shared.exists() and mounts_below(paths.run) == []
        assert (rootfs / "etc/passwd").is_file()  # the user's tree survives the teardown

    run(scenario())


def test_volumes_point_at_the_guest_shared_path(paths: Paths, rootfs: Path, tmp_path: Path) -> None:
    vol, hosts = tmp_path / "vol", tmp_path / "hosts"
    vol.mkdir()
    (vol / "in.txt").write_text("volume data\n")
    hosts.write_text("127.0.0.1 localhost\n")
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["bind", "ro"]},
    ]
    volumes = (Volume(1, vol), Volume(2, hosts, readonly=True))

    async def scenario() -> None:
        async with shared_sandbox(paths) as sb:
            shared = sb.shared_dir
            assert shared is not None
            script = f"cat {shared}/c/v0/in.txt; echo out > {shared}/c/v0/out.txt; echo x > {shared}/c/v1"
            s = spec("c", rootfs, "sh", "-c", script, mounts=mounts, volumes=volumes)
            c = await sb.create_container(s)
            guest = guest_config(sb, "c")["mounts"]
            assert isinstance(guest, list)
            assert [m["source"] for m in guest] == ["proc", f"{shared}/c/v0", f"{shared}/c/v1"]
            assert [m["destination"] for m in guest] == ["/proc", "/data", "/etc/hosts"]
            assert s.oci["mounts"] == mounts and mounts[1]["source"] == str(vol)  # the spec is not changed
            status, out, err = await run_to_end(c)
            assert status != 0 and out == b"volume data\n" and b"Read-only file system" in err
        assert (vol / "out.txt").read_text() == "out\n"
        assert hosts.read_text() == "127.0.0.1 localhost\n"
        assert not shared.exists() and mounts_below(paths.run) == []
        assert (vol / "in.txt").read_text() == "volume data\n"

    run(scenario())


def test_volumes_that_cannot_be_shared_leave_nothing(paths: Paths, rootfs: Path, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    mounts: list[dict[str, object]] = [{"destination": "/data", "type": "bind", "source": str(vol)}]

    async def scenario() -> None:
        async with shared_sandbox(paths) as sb:
            assert sb.shared_dir is not None
            for bad, message in (
                ((Volume(0, vol), Volume(3, vol)), "volume .*vol: no mount 3 in the container's config"),
                ((Volume(0, tmp_path / "missing"),), "cannot share .*missing: No such file"),
                ((Volume(0, Path("/dev/null")),), "not a directory or regular file"),
            ):
                with pytest.raises(SandboxError, match=message):
                    await sb.create_container(spec("c", rootfs, "true", mounts=mounts, volumes=bad))
                assert "c" not in sb.containers
                assert not (sb.shared_dir / "c").exists() and mounts_below(sb.shared_dir) == [sb.shared_dir]
            with pytest.raises(SandboxError, match="volume .*: no mount 0"):
                await sb.create_container(spec("c", rootfs, "true", volumes=(Volume(0, vol),)))
            c = await sb.create_container(spec("c", rootfs, "true", mounts=mounts, volumes=(Volume(0, vol),)))
            assert (await run_to_end(c))[0] == 0

    run(scenario())


def test_without_a_shared_directory_nothing_is_shared(paths: Paths, rootfs: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sandbox(paths, rootfs) as sb:
            assert sb.shared_dir is None
            vol = (Volume(0, tmp_path),)
            mounts: list[dict[str, object]] = [{"destination": "/d", "type": "bind", "source": "/x"}]
            with pytest.raises(
                SandboxError, match="sandbox .* has no shared directory .set SandboxConfig.shared_fs"
            ):
                await sb.create_container(spec("c", rootfs, "true", mounts=mounts, volumes=vol))
        async with Sandbox(paths, fake_config(paths.home, rootfs_fstype="erofs")) as sb:
            with pytest.raises(
                SandboxError, match=f"cannot share {rootfs}: sandbox .* has no shared directory"
            ):
                await sb.create_container(spec("c", rootfs, "true"))
        assert not paths.shared.exists() or list(paths.shared.iterdir()) == []

    run(scenario())


def test_a_dead_file_server_stops_the_vm_and_is_named(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        async with shared_sandbox(paths) as sb:
            c = await sb.create_container(spec("c", rootfs, "sleep", "30"))
            proc = await c.start(collect()[0], stdin=False)
            vm = FakeVm.launched[-1]
            assert vm.shared_fs_failure() is None
            vm.fs_failure = "virtiofsd exited with status 1: fuse: session lost"
            with pytest.raises(
                HypervisorError, match="was stopped .its file server died: virtiofsd exited"
            ) as exc:
                await proc.wait()
            assert exc.value.details["how"].startswith("its file server died")
            assert not sb.alive and sb.shared_failure == vm.fs_failure
            assert vm.shared_fs_failure() is None  # stopped: nothing to report any more
            shared = sb.shared_dir
        assert shared is not None and not shared.exists()
        assert (rootfs / "etc/passwd").is_file()

    run(scenario())


def test_a_killed_shared_sandbox_leaves_no_mount(paths: Paths, rootfs: Path) -> None:
    async def scenario() -> None:
        sb = shared_sandbox(paths)
        await sb.start()
        c = await sb.create_container(spec("c", rootfs, "sleep", "30"))
        await c.start(collect()[0], stdin=False)
        await sb.kill()
        assert sb.state is SandboxState.STOPPED and mounts_below(paths.run) == []
        assert sb.shared_dir is not None and not sb.shared_dir.exists()
        assert sorted(p.name for p in rootfs.iterdir()) == ["etc", "tmp"]

    run(scenario())
