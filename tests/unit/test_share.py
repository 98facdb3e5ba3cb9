"""The sandbox's shared directory on real bind mounts (the unit tier runs as root):
directories and files shared, read-only on the host side, names checked, and a
teardown that unmounts first and never deletes a user's data behind a mount."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.test_mounts import optional_fields, unmount_all
from vmpod import mounts
from vmpod.errors import MountError, SandboxError
from vmpod.fsutil import lock_file
from vmpod.paths import Paths
from vmpod.sandbox import boot, share
from vmpod.sandbox.share import Share, SharedDir, collect_stale_shares


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        unmount_all(tmp_path)


@pytest.fixture
def user(tmp: Path) -> Path:
    """A user's data: a directory with a file and a subdirectory, and a lone file."""
    data = tmp / "data"
    (data / "sub").mkdir(parents=True)
    (data / "keep.txt").write_text("precious\n")
    (data / "sub" / "deep.txt").write_text("deep\n")
    (tmp / "hosts").write_text("127.0.0.1 localhost\n")
    return data


@pytest.fixture
def shared(tmp: Path) -> SharedDir:
    sd = SharedDir(tmp / "run" / "shared" / "sb1")
    sd.make()
    return sd


def test_make_gives_a_mount_in_a_peer_group_of_its_own(shared: SharedDir) -> None:
    assert shared.made and mounts.is_mount_point(shared.root)
    assert any(f.startswith("shared:") for f in optional_fields(shared.root))
    with pytest.raises(FileExistsError):
        SharedDir(shared.root).make()  # never two owners of one directory


def test_directories_and_files_are_shared(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/rootfs", user))
    shared.add(Share("c1/v0", tmp / "hosts"))
    root = shared.root
    assert mounts.mounts_below(root) == [root, root / "c1/rootfs", root / "c1/v0"]
    assert (root / "c1/rootfs/keep.txt").read_text() == "precious\n"
    assert (root / "c1/rootfs/sub/deep.txt").read_text() == "deep\n"
    assert (root / "c1/v0").read_text() == "127.0.0.1 localhost\n"
    (root / "c1/rootfs/new").write_text("from the guest\n")  # writes reach the host
    assert (user / "new").read_text() == "from the guest\n"
    (tmp / "hosts").write_text("changed\n")
    assert (root / "c1/v0").read_text() == "changed\n"


def test_a_read_only_share_refuses_writes_on_the_host_side(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/rootfs", user, readonly=True))
    shared.add(Share("c1/v0", tmp / "hosts", readonly=True))
    target = shared.root / "c1/rootfs"
    for path in (target / "new", target / "keep.txt", target / "sub" / "deep.txt", shared.root / "c1/v0"):
        with pytest.raises(OSError) as exc:
            path.write_text("x")
        assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError):
        (target / "keep.txt").unlink()
    assert (user / "keep.txt").read_text() == "precious\n"
    (user / "sub" / "deep.txt").write_text("the host may\n")  # the source stays writable
    assert (target / "sub" / "deep.txt").read_text() == "the host may\n"


@pytest.mark.parametrize(
    "name", ["", "/abs", "c1/", "/", "..", ".", "c1/..", "c1/../../etc", "a//b", "a b", "c1/v0\n", "é"]
)
def test_invalid_names_are_refused(shared: SharedDir, user: Path, name: str) -> None:
    with pytest.raises(SandboxError, match="invalid share name"):
        shared.add(Share(name, user))
    with pytest.raises(SandboxError, match="invalid share name"):
        shared.remove(name)
    assert mounts.mounts_below(shared.root) == [shared.root]
    assert list(shared.root.iterdir()) == []


def test_what_cannot_be_shared(shared: SharedDir, tmp: Path) -> None:
    with pytest.raises(SandboxError, match=f"cannot share {tmp}/missing: No such file"):
        shared.add(Share("c1/v0", tmp / "missing"))
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp / "sock"))
        os.mkfifo(tmp / "fifo")
        for special in (tmp / "sock", tmp / "fifo", Path("/dev/null")):
            with pytest.raises(SandboxError, match="not a directory or regular file"):
                shared.add(Share("c1/v0", special))
    finally:
        sock.close()
    assert not (shared.root / "c1/v0").exists()


def test_a_failed_bind_leaves_no_mount_point(
    shared: SharedDir, user: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(source: Path, target: Path, *, readonly: bool = False) -> None:
        raise MountError(f"bind {source} on {target}: Permission denied", errno=errno.EPERM)

    monkeypatch.setattr(share, "bind", fail)
    for name, source in (("c1/rootfs", user), ("c1/v0", tmp / "hosts")):
        with pytest.raises(SandboxError, match=f"cannot share {source}: bind .*Permission denied"):
            shared.add(Share(name, source))
        assert not (shared.root / name).exists()


def test_a_name_in_use_is_refused_and_left_alone(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/v0", user))
    with pytest.raises(SandboxError, match="shared already"):
        shared.add(Share("c1/v0", tmp / "hosts"))
    assert (shared.root / "c1/v0/keep.txt").read_text() == "precious\n"


def test_remove_drops_one_share_or_a_container(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/rootfs", user))
    shared.add(Share("c1/v0", tmp / "hosts"))
    shared.add(Share("c1/v1", user / "sub"))
    shared.add(Share("c2/rootfs", user, readonly=True))
    shared.remove("c1/v1")
    assert not (shared.root / "c1/v1").exists() and (user / "sub/deep.txt").exists()
    shared.remove("c1")  # a container's directory, file shares included
    assert not (shared.root / "c1").exists()
    assert mounts.mounts_below(shared.root) == [shared.root, shared.root / "c2/rootfs"]
    shared.remove("c3")  # nothing there: fine
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt", "sub"]
    assert (tmp / "hosts").read_text() == "127.0.0.1 localhost\n"


def test_remove_drops_a_file_share(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/v0", tmp / "hosts"))
    shared.remove("c1/v0")
    assert not (shared.root / "c1/v0").exists() and (shared.root / "c1").is_dir()
    assert (tmp / "hosts").read_text() == "127.0.0.1 localhost\n"


def test_destroy_unmounts_and_never_deletes_user_data(shared: SharedDir, user: Path, tmp: Path) -> None:
    shared.add(Share("c1/rootfs", user))
    shared.add(Share("c1/v0", tmp / "hosts"))
    shared.add(Share("c2/v1", user, readonly=True))
    (user / "written-later.txt").write_text("also mine\n")
    (user / "empty").touch()  # an empty file of the user's: still not the sandbox's to delete
    shared.destroy()
    assert not shared.root.exists() and mounts.mounts_below(tmp) == []
    assert (user / "keep.txt").read_text() == "precious\n"
    assert (user / "written-later.txt").read_text() == "also mine\n"
    assert (user / "sub" / "deep.txt").read_text() == "deep\n"
    assert (user / "empty").exists()
    assert (tmp / "hosts").read_text() == "127.0.0.1 localhost\n"
    shared.destroy()  # idempotent
    SharedDir(tmp / "never-made").destroy()


def test_prune_never_deletes_below_a_mount(tmp: Path, user: Path, caplog: pytest.LogCaptureFixture) -> None:
    top = tmp / "top"
    (top / "a").mkdir(parents=True)
    (top / "a" / "empty").touch()
    mounts.bind(user, top / "a")
    with caplog.at_level(logging.WARNING):
        share._prune(top)
    assert "still mounted below it" in caplog.text
    assert (user / "keep.txt").read_text() == "precious\n" and top.is_dir()
    mounts.umount(top / "a")
    share._prune(top)
    assert not top.exists()


def test_prune_removes_scratch_but_never_follows_links(tmp: Path, user: Path) -> None:
    # what is left once nothing is mounted is ours or the guest's scratch (the guest
    # can write into the shared root): all of it goes, links themselves only
    top = tmp / "top"
    (top / "d").mkdir(parents=True)
    (top / "d" / "stray").write_text("guest scratch\n")
    (top / "empty-dir").mkdir()
    (top / "file-link").symlink_to(user / "keep.txt")
    (top / "dir-link").symlink_to(user)
    share._prune(top)
    assert not top.exists()
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt", "sub"]
    assert (user / "keep.txt").read_text() == "precious\n"


def test_prune_stays_on_its_file_system(tmp: Path, user: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = tmp / "top"
    (top / "other").mkdir(parents=True)
    real_lstat = Path.lstat

    def lstat(self: Path) -> os.stat_result:
        st = real_lstat(self)
        if self.name == "other":  # as if another file system were there, not mounted
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *st[3:10]))
        return st

    monkeypatch.setattr(Path, "lstat", lstat)
    share._prune(top)
    assert (top / "other").is_dir()


def test_destroy_leaves_a_root_that_stays_mounted(
    shared: SharedDir, user: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared.add(Share("c1/rootfs", user))
    monkeypatch.setattr(share, "umount", lambda target: None)  # an unmount that did nothing
    with caplog.at_level(logging.WARNING):
        shared.destroy()
    assert "is still mounted; left in place" in caplog.text
    assert (shared.root / "c1/rootfs/keep.txt").read_text() == "precious\n"


def test_collect_stale_shares(tmp: Path, user: Path) -> None:
    base = tmp / "shared"
    assert collect_stale_shares(base, lambda name: False) == []  # no directory yet
    dirs = {}
    for sid in ("alive", "dead1", "dead2"):
        dirs[sid] = SharedDir(base / sid)
        dirs[sid].make()
        dirs[sid].add(Share("c/rootfs", user))
    assert sorted(collect_stale_shares(base, lambda name: name == "alive")) == ["dead1", "dead2"]
    assert sorted(p.name for p in base.iterdir()) == ["alive"]
    assert mounts.mounts_below(base) == [base / "alive", base / "alive/c/rootfs"]
    assert (user / "keep.txt").read_text() == "precious\n"
    assert collect_stale_shares(base, lambda name: name == "alive") == []


def test_collect_stale_shares_survives_a_stray_file(tmp: Path) -> None:
    base = tmp / "shared"
    base.mkdir()
    (base / "stray").write_text("x")
    assert collect_stale_shares(base, lambda name: False) == ["stray"]
    assert list(base.iterdir()) == []


def _sandbox(paths: Paths, sid: str) -> tuple[int, SharedDir]:
    """What a live sandbox holds: its state dir's lock, then its shared directory."""
    (paths.sandboxes / sid).mkdir(parents=True)
    fd = lock_file(paths.sandboxes / sid / "lock")
    sd = SharedDir(paths.shared / sid)
    sd.make()
    return fd, sd


def test_collect_stale_keeps_live_sandboxes_shares(tmp: Path, user: Path) -> None:
    paths = Paths(home=tmp / "home", run=tmp / "run")
    live, live_share = _sandbox(paths, "live")
    dead, dead_share = _sandbox(paths, "dead")
    try:
        live_share.add(Share("c/rootfs", user))
        dead_share.add(Share("c/rootfs", user))
        os.close(dead)  # its owner died
        assert boot.collect_stale(paths) == ["dead"]
        assert not (paths.sandboxes / "dead").exists() and not dead_share.root.exists()
        assert (live_share.root / "c/rootfs/keep.txt").read_text() == "precious\n"
        assert (user / "keep.txt").read_text() == "precious\n"
    finally:
        os.close(live)


def test_a_sandbox_starting_during_collect_stale_keeps_its_share(
    tmp: Path, user: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sandbox B collects while sandbox A starts: A takes its lock and makes its
    # shared directory after B listed the sandboxes, before B lists the shares.
    paths = Paths(home=tmp / "home", run=tmp / "run")
    paths.sandboxes.mkdir(parents=True)
    started: list[tuple[int, SharedDir]] = []
    real = share.collect_stale_shares

    def racing(base: Path, alive: Callable[[str], bool]) -> list[str]:
        started.append(_sandbox(paths, "a"))
        started[0][1].add(Share("c/rootfs", user))
        return real(base, alive)

    monkeypatch.setattr(boot, "collect_stale_shares", racing)
    try:
        boot.collect_stale(paths)
        assert mounts.is_mount_point(paths.shared / "a" / "c" / "rootfs")
    finally:
        for fd, _ in started:
            os.close(fd)
