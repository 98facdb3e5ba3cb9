"""The sandbox's shared directory: the host tree its VM sees over virtio-fs.

``<run>/shared/<sandbox id>`` is a small tmpfs of its own in a fresh peer group,
so a bind mount added after boot (a pod's next container, a late volume) reaches
the file server's mount namespace too, and what a guest writes beside its shares
is bounded (1 MiB) and gone with the unmount. Below it, Kata's layout: one directory per
container, holding bind mounts of its root filesystem and volumes::

    <cid>/rootfs   <cid>/v1   <cid>/v2 ...

Read-only shares are read-only bind mounts: the guest cannot write through them
whatever it mounts (virtiofsd 7.2 has no read-only mode). Teardown unmounts
first and deletes the tree only once nothing is mounted below it, on its own
file system and without following symlinks, so nothing can reach a user's data.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import MountError, SandboxError
from vmpod.mounts import bind, is_mount_point, make_shared_tmpfs, mounts_below, umount

log = logging.getLogger(__name__)
SCRATCH_SIZE, SCRATCH_INODES = "1m", 4096  # the shared root's own files: mount points
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class Share:
    """One host path the guest sees at ``<shared mount>/<name>``."""

    name: str  # relative: "<cid>/rootfs", "<cid>/v3"
    source: Path
    readonly: bool = False


def _check_name(name: str) -> list[str]:
    parts = name.split("/")
    if not all(p and set(p) <= _NAME_OK and p not in (".", "..") for p in parts):
        raise SandboxError(f"invalid share name {name!r}")
    return parts


class SharedDir:
    """Owns ``root`` (made by ``make``); ``add`` binds host paths below it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made = False

    def make(self) -> None:
        self.root.mkdir(parents=True, exist_ok=False)
        try:
            # the guest can write beside its shares: a bounded scratch, not /run
            make_shared_tmpfs(self.root, SCRATCH_SIZE, SCRATCH_INODES)
        except BaseException:
            self.destroy()
            raise
        self.made = True

    def add(self, share: Share) -> None:
        """Bind ``share.source`` (a directory or a file) at its name."""
        parts = _check_name(share.name)
        target = self.root.joinpath(*parts)
        try:
            st = os.stat(share.source)
        except OSError as err:
            raise SandboxError(f"cannot share {share.source}: {err.strerror}") from err
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise SandboxError(f"cannot share {share.source}: not a directory or regular file")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if stat.S_ISDIR(st.st_mode):
                target.mkdir()
            else:
                target.touch(exist_ok=False)
        except FileExistsError:
            raise SandboxError(f"cannot share {share.source}: {share.name} is shared already") from None
        try:
            bind(share.source, target, readonly=share.readonly)
        except MountError as err:
            _remove_point(target)
            raise SandboxError(f"cannot share {share.source}: {err.message}") from err

    def remove(self, name: str) -> None:
        """Unmount and drop one share (or a container's whole directory)."""
        target = self.root.joinpath(*_check_name(name))
        umount(target)
        _prune(target)

    def destroy(self) -> None:
        """Unmount everything below ``root`` and remove what is left; idempotent."""
        if not self.root.exists():
            return
        umount(self.root)
        if is_mount_point(self.root):
            log.warning("shared directory %s is still mounted; left in place", self.root)
            return
        _prune(self.root)


def _remove_point(path: Path) -> None:
    """Remove an empty mount point made by ``add`` (a directory or an empty file)."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _prune(top: Path) -> None:
    """Delete ``top``'s tree once nothing is mounted below it. What is left there is
    ours or the guest's scratch (mount points, files a guest made beside its
    shares), never user data: that was only reachable through the bind mounts.
    Stays on ``top``'s file system and never follows a symlink."""
    if not top.exists():
        return
    mounted = mounts_below(top)
    if mounted:
        log.warning("not removing %s: still mounted below it (%s)", top, mounted[0])
        return
    dev = top.lstat().st_dev
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in (*filenames, *dirnames):
            _remove_entry(Path(dirpath, name), dev)
    _remove_entry(top, dev)


def _remove_entry(path: Path, dev: int) -> None:
    try:
        st = path.lstat()
        if st.st_dev != dev:
            log.warning("not removing %s: on another file system", path)
        elif stat.S_ISDIR(st.st_mode):
            path.rmdir()
        else:
            path.unlink()  # files, and symlinks themselves (never their targets)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno != errno.ENOTEMPTY:
            raise
        log.warning("not removing %s: not empty", path)


def collect_stale_shares(base: Path, alive: Callable[[str], bool]) -> list[str]:
    """Tear down the shared directories of sandboxes for which ``alive(name)`` is
    false, asked at that moment (a sandbox may have started meanwhile)."""
    removed = []
    if base.is_dir():
        for d in base.iterdir():
            if not alive(d.name):
                if d.is_dir() and not d.is_symlink():
                    SharedDir(d).destroy()
                else:
                    d.unlink()
                removed.append(d.name)
    return removed
