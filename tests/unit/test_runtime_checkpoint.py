"""vmpod-runtime checkpoint/restore without VMs: podman's probes, flag refusals,
and what lands where (the monitor and the sandbox are faked)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmpod.runtime import checkpoint as cp
from vmpod.runtime.cli import cli
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.state import RUNNING, ContainerState, Store


def _invoke(*args: str) -> BaseException | None:
    res = CliRunner().invoke(cli, list(args), standalone_mode=False)
    return res.exception


def test_podman_probes() -> None:
    """podman 4.3 calls a runtime checkpoint-capable when `checkpoint --help` exits 0,
    and pod-restore-capable when `restore --lsm-mount-context` says "flag needs an
    argument" (we cannot: no LSM in the guest)."""
    res = CliRunner().invoke(cli, ["checkpoint", "--help"])
    assert res.exit_code == 0 and "--image-path" in res.output and "--leave-running" in res.output
    res = CliRunner().invoke(cli, ["restore", "--lsm-mount-context"])
    assert res.exit_code != 0 and "flag needs an argument" not in res.output


@pytest.mark.parametrize(
    "args",
    [
        ["--ext-unix-sk"],
        ["--shell-job"],
        ["--lazy-pages"],
        ["--pre-dump"],
        ["--parent-path", "../parent"],
        ["--page-server", "127.0.0.1:9"],
        ["--status-fd", "3"],
        ["--auto-dedup"],
    ],
)
def test_checkpoint_refuses_what_the_guest_cannot_do(args: list[str], tmp_path: Path) -> None:
    err = _invoke("--root", str(tmp_path), "checkpoint", "--image-path", str(tmp_path / "i"), *args, "c1")
    assert isinstance(err, RuntimeCliError)
    assert str(err).startswith(f"checkpoint {args[0]} is not supported by vmpod-runtime: ")
    assert "\n" not in str(err)
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--tcp-established"],
        ["--file-locks"],
        ["--shell-job"],
        ["--lazy-pages"],
        ["--ext-unix-sk"],
        ["--auto-dedup"],
        ["--lsm-profile", "apparmor:x"],
        ["--lsm-mount-context", "system_u:object_r:x"],
    ],
)
def test_restore_refuses_what_the_guest_cannot_do(args: list[str], tmp_path: Path) -> None:
    err = _invoke("--root", str(tmp_path), "restore", "--detach", *args, "c1")
    assert isinstance(err, RuntimeCliError)
    assert str(err).startswith(f"restore {args[0]} is not supported by vmpod-runtime: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["checkpoint", "restore"])
def test_cgroup_mode_and_empty_ns(command: str, tmp_path: Path) -> None:
    err = _invoke("--root", str(tmp_path), command, "--manage-cgroups-mode", "full", "c1")
    assert isinstance(err, RuntimeCliError) and "--manage-cgroups-mode full" in str(err)
    err = _invoke("--root", str(tmp_path), command, "--empty-ns", "pid", "c1")
    assert isinstance(err, RuntimeCliError) and "--empty-ns pid" in str(err)


def test_checkpoint_of_an_unknown_container(tmp_path: Path) -> None:
    err = _invoke("--root", str(tmp_path), "checkpoint", "--manage-cgroups-mode", "soft", "nosuch")
    assert isinstance(err, RuntimeCliError) and str(err) == "container does not exist"


def test_restore_needs_images(tmp_path: Path) -> None:
    err = _invoke("--root", str(tmp_path / "root"), "restore", "--image-path", str(tmp_path), "c1")
    assert isinstance(err, RuntimeCliError) and "holds no CRIU images" in str(err)


def test_default_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cp.default_paths_for("", "") == (tmp_path / "checkpoint", tmp_path / "checkpoint")
    assert cp.default_paths_for("i", "w") == (tmp_path / "i", tmp_path / "w")


# -- checkpoint: through a fake monitor ------------------------------------------


def _bundle(where: Path, terminal: bool = False) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    spec = {"ociVersion": "1.0.2", "process": {"terminal": terminal, "args": ["sh"]}}
    (where / "config.json").write_text(json.dumps(spec))
    return where


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """A container whose (fake) monitor is alive: it holds monitor.lock."""
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    store = Store(tmp_path / "root")
    bundle = _bundle(tmp_path / "bundle")
    st = ContainerState(id="c1", bundle=str(bundle), rootfs="/r", created="now", status=RUNNING, pid=1)
    _, lock, mon = store.begin(st)
    os.close(lock)
    yield store
    os.close(mon)


def _fake_monitor(
    monkeypatch: pytest.MonkeyPatch, write: dict[str, bytes], fail: str = ""
) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []

    def request(sock: Path, msg: dict[str, object], timeout: float = 0) -> dict[str, object]:
        seen.append(msg)
        stage = Path(str(msg["dir"]))
        for rel, data in write.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith("@"):
                (stage / rel[:-1]).symlink_to("/etc/passwd")
            else:
                (stage / rel).write_bytes(data)
        if fail:
            raise RuntimeCliError(fail)
        return {}

    monkeypatch.setattr("vmpod.runtime.checkpoint.ipc.request", request)
    return seen


def test_checkpoint_moves_images_and_copies_the_log(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_monitor(
        monkeypatch,
        {
            "checkpoint/inventory.img": b"inv",
            "checkpoint/pages-1.img": b"p",
            "work/dump.log": b"dumped",
            "work/stats-dump": b"stats",
        },
    )
    images, work = tmp_path / "ud" / "checkpoint", tmp_path / "ud"
    images.mkdir(parents=True)
    (images / "pages-1.img").write_bytes(b"stale")  # a previous checkpoint's
    cp.checkpoint(running, "c1", cp.CheckpointOptions(images, work, leave_running=True))
    assert seen[0]["op"] == "checkpoint"
    assert seen[0]["flags"] == {"leave_running": True, "file_locks": False, "tcp_established": False}
    assert {p.name: p.read_bytes() for p in images.iterdir()} == {
        "inventory.img": b"inv",
        "pages-1.img": b"p",
    }
    assert (work / "dump.log").read_bytes() == b"dumped"
    assert (work / "stats-dump").read_bytes() == b"stats"  # podman exports it
    stage = Path(str(seen[0]["dir"]))
    assert not stage.exists()  # the staging directory is gone


def test_checkpoint_refuses_a_symlink_from_the_guest(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_monitor(monkeypatch, {"checkpoint/inventory.img": b"inv", "checkpoint/evil@": b""})
    images = tmp_path / "images"
    with pytest.raises(RuntimeCliError, match="evil is not a regular file"):
        cp.checkpoint(running, "c1", cp.CheckpointOptions(images, tmp_path / "work", leave_running=True))
    assert not images.exists()


def test_failed_checkpoint_keeps_the_log(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_monitor(monkeypatch, {"work/dump.log": b"Error (criu/cr-dump.c): boom"}, fail="checkpoint failed")
    with pytest.raises(RuntimeCliError, match="checkpoint failed"):
        cp.checkpoint(running, "c1", cp.CheckpointOptions(tmp_path / "i", tmp_path / "w", leave_running=True))
    assert (tmp_path / "w" / "dump.log").read_bytes().endswith(b"boom")
    assert not (tmp_path / "i").exists()


def test_a_log_symlink_from_the_guest_is_not_followed(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_monitor(monkeypatch, {"checkpoint/inventory.img": b"inv", "work/dump.log@": b""})
    cp.checkpoint(running, "c1", cp.CheckpointOptions(tmp_path / "i", tmp_path / "w", leave_running=True))
    assert not (tmp_path / "w" / "dump.log").exists()
    assert (tmp_path / "i" / "inventory.img").read_bytes() == b"inv"


def test_terminal_containers_are_refused(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _fake_monitor(monkeypatch, {})
    _bundle(tmp_path / "bundle", terminal=True)
    with pytest.raises(RuntimeCliError, match="checkpoint of a container with a terminal is not supported"):
        cp.checkpoint(running, "c1", cp.CheckpointOptions(tmp_path / "i", tmp_path / "w"))
    assert seen == []
    images = _images(tmp_path / "ud" / "checkpoint")
    opts = cp.RestoreOptions(tmp_path / "bundle", images, tmp_path / "ud", detach=True)
    with pytest.raises(RuntimeCliError, match="restore of a container with a terminal is not supported"):
        cp.restore(Store(tmp_path / "root2"), "c1", opts, ("", "text", False))
    assert not (tmp_path / "root2").exists()


def test_checkpoint_of_a_stopped_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    store = Store(tmp_path / "root")
    _, lock, mon = store.begin(
        ContainerState(id="c1", bundle="/b", rootfs="/r", created="now", status=RUNNING)
    )
    os.close(lock)
    os.close(mon)  # the monitor is dead: stopped
    with pytest.raises(RuntimeCliError, match="container not running"):
        cp.checkpoint(store, "c1", cp.CheckpointOptions(tmp_path / "i", tmp_path / "w"))


# -- restore: create and start faked -----------------------------------------------


def _images(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "inventory.img").write_bytes(b"inv")
    (where / "pages-1.img").write_bytes(b"pages")
    return where


def test_restore_copies_the_images_and_writes_the_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    store = Store(tmp_path / "root")
    images = _images(tmp_path / "ud" / "checkpoint")
    _bundle(tmp_path / "ud")
    made: list[str] = []

    def create(store_: Store, cid: str, bundle: str, pid_file: str, console: str, log_opts: object) -> None:
        assert pid_file == ""  # written once restored, not when created
        made.append(bundle)
        _, lock, mon = store_.begin(
            ContainerState(id=cid, bundle=bundle, rootfs="/r", created="now", pid=4242)
        )
        os.close(lock)
        os.close(mon)

    def start(store_: Store, cid: str, restore: str = "") -> None:
        stage = Path(restore)
        assert (stage / "checkpoint" / "pages-1.img").read_bytes() == b"pages"
        (stage / "checkpoint" / "pages-1.img").write_bytes(b"the guest wrote here")
        (stage / "work").mkdir()
        (stage / "work" / "restore.log").write_bytes(b"restored")

    monkeypatch.setattr("vmpod.runtime.create.create", create)
    monkeypatch.setattr("vmpod.runtime.lifecycle.start", start)
    opts = cp.RestoreOptions(
        tmp_path / "ud", images, tmp_path / "ud", pid_file=str(tmp_path / "pidfile"), detach=True
    )
    assert cp.restore(store, "c1", opts, ("", "text", False)) == 0
    assert made == [str(tmp_path / "ud")]
    assert (tmp_path / "pidfile").read_text() == "4242"
    assert (tmp_path / "ud" / "restore.log").read_bytes() == b"restored"
    assert (images / "pages-1.img").read_bytes() == b"pages"  # the engine's copy is untouched


def test_failed_restore_leaves_no_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    store = Store(tmp_path / "root")
    images = _images(tmp_path / "ud" / "checkpoint")
    _bundle(tmp_path / "ud")

    def create(store_: Store, cid: str, bundle: str, pid_file: str, console: str, log_opts: object) -> None:
        _, lock, mon = store_.begin(ContainerState(id=cid, bundle=bundle, rootfs="/r", created="now"))
        os.close(lock)
        os.close(mon)

    def start(store_: Store, cid: str, restore: str = "") -> None:
        (Path(restore) / "work").mkdir()
        (Path(restore) / "work" / "restore.log").write_bytes(b"Error: bad size")
        raise RuntimeCliError("restore of container c1 failed in the VM")

    monkeypatch.setattr("vmpod.runtime.create.create", create)
    monkeypatch.setattr("vmpod.runtime.lifecycle.start", start)
    opts = cp.RestoreOptions(tmp_path / "ud", images, tmp_path / "ud", pid_file=str(tmp_path / "pid"))
    with pytest.raises(RuntimeCliError, match="failed in the VM"):
        cp.restore(store, "c1", opts, ("", "text", False))
    assert store.ids() == [] and not (tmp_path / "pid").exists()
    assert (tmp_path / "ud" / "restore.log").read_bytes() == b"Error: bad size"
    assert list((tmp_path / "home" / "tmp").iterdir()) == []


def test_restore_in_the_foreground_waits_and_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --detach, as runc: wait for the restored container, delete it, exit with its status."""
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    store = Store(tmp_path / "root")
    images = _images(tmp_path / "ud" / "checkpoint")
    _bundle(tmp_path / "ud")
    deleted: list[str] = []

    def create(store_: Store, cid: str, bundle: str, pid_file: str, console: str, log_opts: object) -> None:
        st = ContainerState(id=cid, bundle=bundle, rootfs="/r", created="now", pid=77, monitor_start=5)
        _, lock, mon = store_.begin(st)
        os.close(lock)
        os.close(mon)

    monkeypatch.setattr("vmpod.runtime.create.create", create)
    monkeypatch.setattr("vmpod.runtime.lifecycle.start", lambda store_, cid, restore="": None)
    monkeypatch.setattr(
        "vmpod.runtime.run.wait_child", lambda pid, start: 137 if (pid, start) == (77, 5) else 0
    )
    monkeypatch.setattr("vmpod.runtime.lifecycle.delete", lambda store_, cid, force: deleted.append(cid))
    opts = cp.RestoreOptions(tmp_path / "ud", images, tmp_path / "ud")
    assert cp.restore(store, "c1", opts, ("", "text", False)) == 137
    assert deleted == ["c1"]
