"""`vmpod cp`: copies between the host and a container's root filesystem (the host
side of its overlay), never following the container's symlinks out of it.

A container path is first resolved as the container would see it
(``fsutil.resolve_below``: symlinks confined to the root), then walked again one
component at a time with O_NOFOLLOW from a directory fd, so a link swapped in
meanwhile (a running container may write its root) fails instead of escaping.
Symlinks inside copied trees are copied as links; an existing link in the
container where a file or directory is written is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from vmpod.containers.records import ContainerError
from vmpod.fsutil import resolve_below

log = logging.getLogger(__name__)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


def _walk(root: Path, parts: tuple[str, ...]) -> int:
    """A directory fd for ``root/parts``, no component a symlink."""
    fd = os.open(root, _DIR)
    try:
        for part in parts:
            nfd = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as err:
        os.close(fd)
        raise ContainerError(f"cannot walk to /{'/'.join(parts)} in the container: {err.strerror}") from err
    return fd


def _resolve(root: Path, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        below = resolve_below(root, path)
    except OSError as err:
        raise ContainerError(f"cannot resolve {path} in the container: {err.strerror}") from err
    return below.parts, below.missing


def copy_out(root: Path, path: str, dest: Path) -> None:
    """Container ``path`` (below ``root``) -> host ``dest`` (into it when a directory)."""
    parts, missing = _resolve(root, path)
    if missing:
        raise ContainerError(f"no such file or directory in the container: {path}")
    name = parts[-1] if parts else "."
    dfd = _walk(root, parts[:-1])
    try:
        if dest.is_dir():
            dest = dest / (name if name != "." else "rootfs")
        elif not dest.parent.is_dir():
            raise ContainerError(f"no such directory on the host: {dest.parent}")
        _out(dfd, name, dest)
    finally:
        os.close(dfd)


def _out(dfd: int, name: str, dest: Path) -> None:
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        os.symlink(os.readlink(name, dir_fd=dfd), dest)
    elif stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR, dir_fd=dfd)
        try:
            dest.mkdir(mode=stat.S_IMODE(st.st_mode) | 0o700, exist_ok=True)
            with os.scandir(fd) as it:
                children = [e.name for e in it]
            for child in children:
                _out(fd, child, dest / child)
        finally:
            os.close(fd)
    elif stat.S_ISREG(st.st_mode):
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            dst = os.open(
                dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, stat.S_IMODE(st.st_mode)
            )
            try:
                _pipe(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    else:
        log.warning("skipped %s: not a file, directory or symlink", name)


def copy_in(root: Path, src: Path, path: str) -> None:
    """Host ``src`` -> container ``path`` (into it when it is a directory)."""
    if not os.path.lexists(src):
        raise ContainerError(f"no such file or directory on the host: {src}")
    parts, missing = _resolve(root, path)
    if not missing and parts and not root.joinpath(*parts).is_dir():
        parent, name = _walk(root, parts[:-1]), parts[-1]  # an existing file: replaced
    elif not missing:
        parent, name = _walk(root, parts), src.name  # a directory: copied into it
    elif len(missing) == 1:
        parent, name = _walk(root, parts), missing[0]
    else:
        raise ContainerError(
            f"no such directory in the container: {os.path.dirname(path.rstrip('/')) or '/'}"
        )
    try:
        _in(src, parent, name)
    finally:
        os.close(parent)


def _in(src: Path, dfd: int, name: str) -> None:
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        _clear(dfd, name)
        os.symlink(os.readlink(src), name, dir_fd=dfd)
    elif stat.S_ISDIR(st.st_mode):
        if name != ".":
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        try:
            fd = os.open(name, _DIR, dir_fd=dfd)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _clear(dfd, name)  # a link or a file where the directory goes: replaced
            os.mkdir(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
            fd = os.open(name, _DIR, dir_fd=dfd)
        try:
            for child in sorted(os.listdir(src)):
                _in(src / child, fd, child)
        finally:
            os.close(fd)
    elif stat.S_ISREG(st.st_mode):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dst = os.open(name, flags, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            _clear(dfd, name)
            dst = os.open(name, flags, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        try:
            src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _pipe(src_fd, dst)
            finally:
                os.close(src_fd)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
        finally:
            os.close(dst)
    else:
        log.warning("skipped %s: not a file, directory or symlink", src)


def _clear(dfd: int, name: str) -> None:
    """Remove a non-directory (or an empty directory) ``name``; links are not followed."""
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        os.rmdir(name, dir_fd=dfd)


def _pipe(src: int, dst: int) -> None:
    while chunk := os.read(src, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
