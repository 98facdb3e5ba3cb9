"""Host mount primitives (mount(2)/umount2(2) through libc): bind mounts, their
propagation, and the mount table. Used to lay out what a VM shares with the host.

Only what vmpod needs, with errors that name the path; no shell, no mount(8).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from pathlib import Path

from vmpod.errors import MountError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
# per-mount flags a read-only remount must keep, or the kernel refuses it (EPERM)
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": 0x8}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: Path, fstype: str | None, flags: int, what: str) -> None:
    src = os.fsencode(source) if source is not None else None
    typ = fstype.encode() if fstype is not None else None
    if _libc.mount(src, os.fsencode(target), typ, flags, None) != 0:
        err = ctypes.get_errno()
        raise MountError(f"{what} {target}: {os.strerror(err)}", errno=err)


def bind(source: Path, target: Path, *, readonly: bool = False) -> None:
    """Recursive bind mount of ``source`` on ``target``; read-only all the way down."""
    _mount(str(source), target, None, MS_BIND | MS_REC, f"bind {source} on")
    if readonly:
        try:
            for point in reversed(mounts_below(target)):  # the bind and its submounts
                _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _flags(point), "read-only")
        except BaseException:
            umount(target)
            raise


def make_shared_tmpfs(path: Path, size: str, inodes: int) -> None:
    """A small tmpfs on ``path`` in a new peer group of its own: mounts made below it
    later reach namespaces that copied it as slaves (virtiofsd's), and whatever
    else is written there is bounded (``size`` like "1m", ``inodes`` files)."""
    opts = f"size={size},nr_inodes={inodes},mode=0755"
    src = b"vmpod-shared"
    if _libc.mount(src, os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(f"mount tmpfs on {path}: {os.strerror(err)}", errno=err)
    try:
        _mount(None, path, None, MS_PRIVATE, "make private")
        _mount(None, path, None, MS_SHARED, "make shared")
    except BaseException:
        umount(path)
        raise


def umount(target: Path) -> None:
    """Lazy recursive unmount of ``target`` and everything below it, however many
    times a point was mounted over; absent is fine."""
    for _ in range(64):  # one layer of every stacked point per round
        points = mounts_below(target)
        if not points:
            return
        for point in reversed(points):
            if _libc.umount2(os.fsencode(point), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):
                    raise MountError(f"unmount {point}: {os.strerror(err)}", errno=err)
    raise MountError(f"unmount {target}: still mounted after 64 rounds")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _table() -> list[tuple[Path, str]]:
    """(mount point, per-mount options) of this process's mount namespace, in order."""
    rows = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 5:
                rows.append((Path(_unescape(fields[4])), fields[5]))
    return rows


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or below ``root``, parents before children (mount order)."""
    seen: dict[Path, None] = {}
    for point, _ in _table():
        if point == root or root in point.parents:
            seen.pop(point, None)  # a point mounted over again: its latest place counts
            seen[point] = None
    return list(seen)


def overlay_upper(point: Path) -> Path | None:
    """The upper directory of the overlay mounted at ``point`` (its latest mount), if any."""
    found = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) > 4 and Path(_unescape(fields[4])) == point:
                found = None
                if len(rest) > 2 and rest[0] == "overlay":
                    for opt in rest[2].split(","):
                        if opt.startswith("upperdir="):
                            found = Path(_unescape(opt.removeprefix("upperdir=")))
    return found


def _flags(point: Path) -> int:
    for p, opts in reversed(_table()):
        if p == point:
            return sum(_KEEP_FLAGS[o] for o in opts.split(",") if o in _KEEP_FLAGS)
    return 0


def is_mount_point(path: Path) -> bool:
    return path in mounts_below(path)


def remove_tree(path: Path) -> None:
    """``rm -rf path``, refusing to cross a mount point (checked before and during)."""
    if not os.path.lexists(path):
        return
    if left := mounts_below(path):
        raise MountError(f"refusing to remove {path}: {left[0]} is mounted below it")
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    _empty_dir(str(path), st.st_dev)
    os.rmdir(path)


def _empty_dir(path: str, dev: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_dev != dev:
            raise MountError(f"refusing to remove {path}: another file system")
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                _empty_dir(os.path.join(path, e.name), dev)
                os.rmdir(e.name, dir_fd=fd)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.name, dir_fd=fd)
    finally:
        os.close(fd)
