"""Host mount primitives on real bind mounts in a temporary directory (the unit
tier runs as root): read-only all the way down, recursive unmount, the mount
table's order and its escaped names. Every test's mounts go at teardown."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpod import mounts
from vmpod.errors import MountError


def options(point: Path) -> set[str]:
    """The per-mount options of the topmost mount at ``point``."""
    found = ""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if Path(mounts._unescape(fields[4])) == point:
                found = fields[5]
    assert found, f"{point} is not a mount point"
    return set(found.split(","))


def optional_fields(point: Path) -> list[str]:
    """mountinfo's optional fields (``shared:N``, ``master:N``) of ``point``."""
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left = line.partition(" - ")[0].split()
            if Path(mounts._unescape(left[4])) == point:
                found = left[6:]
    return found


def tmpfs(target: Path, opts: str = "mode=0755") -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], check=True)


def write_fails(path: Path) -> int:
    with pytest.raises(OSError) as exc:
        path.write_text("x")
    return exc.value.errno or 0


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, with whatever a test left mounted below it unmounted afterwards
    (pytest must never delete through a bind mount)."""
    try:
        yield tmp_path
    finally:
        unmount_all(tmp_path)


def unmount_all(top: Path) -> None:
    """Every mount at or below ``top``, stacked ones included; fails if one stays."""
    for _ in range(10):
        if not mounts.mounts_below(top):
            return
        mounts.umount(top)
    assert mounts.mounts_below(top) == []


def test_bind_read_write(tmp: Path) -> None:
    src, target = tmp / "src", tmp / "target"
    src.mkdir()
    target.mkdir()
    (src / "f").write_text("host\n")
    assert not mounts.is_mount_point(target)
    mounts.bind(src, target)
    assert mounts.is_mount_point(target) and mounts.mounts_below(target) == [target]
    assert (target / "f").read_text() == "host\n"
    (target / "g").write_text("through the bind\n")
    assert (src / "g").read_text() == "through the bind\n"
    assert "rw" in options(target)
    mounts.umount(target)
    assert not mounts.is_mount_point(target) and list(target.iterdir()) == []
    assert sorted(p.name for p in src.iterdir()) == ["f", "g"]


def test_bind_of_a_file(tmp: Path) -> None:
    src, target = tmp / "hosts", tmp / "target"
    src.write_text("127.0.0.1 localhost\n")
    target.touch()
    mounts.bind(src, target, readonly=True)
    assert target.read_text() == "127.0.0.1 localhost\n"
    assert write_fails(target) == errno.EROFS
    src.write_text("changed\n")  # the source itself stays writable
    assert target.read_text() == "changed\n"
    mounts.umount(target)
    assert target.read_text() == ""


def test_read_only_bind_is_read_only_all_the_way_down(tmp: Path) -> None:
    src, other, target = tmp / "src", tmp / "other", tmp / "target"
    for d in (src, src / "sub", other, target):
        d.mkdir()
    mounts.bind(other, src / "sub")  # a submount of the source
    mounts.bind(src, target, readonly=True)
    assert mounts.mounts_below(target) == [target, target / "sub"]
    assert {"ro"} <= options(target) and {"ro"} <= options(target / "sub")
    assert write_fails(target / "x") == errno.EROFS
    assert write_fails(target / "sub" / "y") == errno.EROFS
    # the host's own mounts stay writable
    (src / "x").write_text("1")
    (src / "sub" / "y").write_text("2")
    assert (other / "y").read_text() == "2" and (target / "sub" / "y").read_text() == "2"
    assert "rw" in options(src / "sub")
    mounts.umount(target)  # recursive: the submount goes too
    assert mounts.mounts_below(target) == []
    assert mounts.mounts_below(src) == [src / "sub"]


def test_read_only_bind_keeps_nosuid_and_nodev(tmp: Path) -> None:
    src, target = tmp / "src", tmp / "target"
    src.mkdir()
    target.mkdir()
    tmpfs(src, "nosuid,nodev,noexec,mode=0755")
    mounts.bind(src, target, readonly=True)
    assert {"ro", "nosuid", "nodev", "noexec"} <= options(target)


def test_bind_errors_name_the_paths(tmp: Path) -> None:
    target = tmp / "target"
    target.mkdir()
    with pytest.raises(MountError, match=f"bind {tmp}/missing on {target}: No such file") as exc:
        mounts.bind(tmp / "missing", target)
    assert exc.value.details["errno"] == errno.ENOENT
    with pytest.raises(MountError, match="No such file"):
        mounts.bind(target, tmp / "no-target")
    assert mounts.mounts_below(tmp) == []


def test_umount_of_what_is_not_mounted_is_fine(tmp: Path) -> None:
    (tmp / "d").mkdir()
    mounts.umount(tmp / "d")
    mounts.umount(tmp / "absent")


def test_umount_is_recursive_and_lazy(tmp: Path) -> None:
    top = tmp / "top"
    top.mkdir()
    tmpfs(top)
    (top / "a").mkdir()
    tmpfs(top / "a")
    (top / "a" / "b").mkdir()
    tmpfs(top / "a" / "b")
    fd = os.open(top / "a" / "b", os.O_RDONLY)  # busy: a plain unmount would fail
    try:
        mounts.umount(top)
        assert mounts.mounts_below(top) == []
    finally:
        os.close(fd)


def test_mounts_below_order_and_escaped_names(tmp: Path) -> None:
    root = tmp / "with space"
    odd = root / "tab\there" / "back\\slash"
    sibling = tmp / "with space2"  # a shared prefix is not "below"
    for d in (root, sibling):
        d.mkdir()
    tmpfs(root)
    odd.mkdir(parents=True)
    (root / "z").mkdir()
    tmpfs(root / "z")
    tmpfs(odd)
    tmpfs(sibling)
    assert mounts.mounts_below(root) == [root, root / "z", odd]  # mount order
    assert mounts.mounts_below(odd) == [odd]
    assert mounts.is_mount_point(odd) and not mounts.is_mount_point(odd.parent)
    assert mounts.mounts_below(sibling) == [sibling]
    assert mounts.mounts_below(tmp / "with") == []
    # a point mounted over again counts at its latest place (after its children)
    tmpfs(root)
    assert mounts.mounts_below(root) == [root / "z", odd, root]


def test_umount_removes_stacked_mounts_too(tmp: Path) -> None:
    d = tmp / "d"
    d.mkdir()
    tmpfs(d)
    tmpfs(d)
    mounts.umount(d)
    assert mounts.mounts_below(d) == []


def test_make_shared_tmpfs_starts_a_bounded_peer_group_of_its_own(tmp: Path) -> None:
    d = tmp / "shared"
    d.mkdir()
    mounts.make_shared_tmpfs(d, "64k", 64)
    assert mounts.is_mount_point(d)
    with pytest.raises(OSError):  # bounded: a hostile guest cannot fill the host's /run
        (d / "big").write_bytes(b"x" * (128 * 1024))
    (d / "big").unlink()
    [tag] = [f for f in optional_fields(d) if f.startswith("shared:")]
    (d / "late").mkdir()
    other = tmp / "other"
    other.mkdir()
    mounts.bind(other, d / "late")  # joins the group (what virtiofsd's namespace sees)
    assert any(f.startswith("shared:") for f in optional_fields(d / "late"))
    assert tag not in optional_fields(tmp / "other")
    mounts.umount(d)
    assert mounts.mounts_below(d) == []
