"""Host file-system helpers used across vmpod: atomic writes, flocks, paths below a root.

Standard library only, so any layer (runtime, images, guest assets, sandbox) can
use them without pulling in the rest of vmpod.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

StrPath = str | os.PathLike[str]
MAX_SYMLINKS = 40  # the kernel's limit: a symlink loop ends with ELOOP, not a hang
_LOCK_POLL = 0.02  # seconds between tries while a lock is held elsewhere


# -- atomic writes ---------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(
    path: StrPath, *, mode: int = 0o644, fsync: bool = False, tmp_dir: StrPath | None = None
) -> Iterator[BinaryIO]:
    """A file to write the new content of ``path`` into, renamed over ``path`` when the
    block ends normally and removed when it raises.

    Readers see the old content or the new one, never a part. The temporary file
    has a unique name (mkstemp), so concurrent writers never share it; the last
    rename wins. It lives in ``tmp_dir`` (default: the directory of ``path``),
    which must be on the same file system. ``mode`` is set exactly (no umask).
    ``fsync`` flushes the data to disk before the rename, so a crash cannot
    leave a short file under the final name.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=tmp_dir if tmp_dir is not None else target.parent, prefix=f".{target.name}."
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: StrPath, data: bytes, *, mode: int = 0o644, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` in one rename (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode=mode, fsync=fsync) as fh:
        fh.write(data)


# -- flocks ----------------------------------------------------------------------


class LockTimeout(TimeoutError):
    """Another open file held a conflicting flock for the whole timeout."""

    def __init__(self, path: StrPath, timeout: float) -> None:
        super().__init__(f"timed out after {timeout:g}s waiting for the lock {path}")
        self.path = Path(path)
        self.timeout = timeout


def lock_file(path: StrPath, *, exclusive: bool = True, timeout: float | None = 0) -> int:
    """Open ``path`` (created with mode 0600) and flock it; returns the descriptor.

    Closing the descriptor (or the process dying, even by SIGKILL) releases the
    lock. ``timeout`` is how long to wait while another open file holds a
    conflicting lock: 0 tries once, None waits as long as it takes. Raises
    :class:`LockTimeout` when the time is up.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(path: StrPath, *, exclusive: bool = True, timeout: float | None = 0) -> Iterator[int]:
    """:func:`lock_file` for the length of a ``with`` block."""
    fd = lock_file(path, exclusive=exclusive, timeout=timeout)
    try:
        yield fd
    finally:
        os.close(fd)


def _flock(fd: int, operation: int, timeout: float | None, path: StrPath) -> None:
    if timeout is None:
        fcntl.flock(fd, operation)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(path, timeout) from None
            time.sleep(_LOCK_POLL)


def is_locked(path: StrPath, *, shared_too: bool = False) -> bool:
    """True while some open file holds an exclusive flock on ``path`` (its owner lives).

    False when the file is missing, free or only share-locked. The probe takes a
    shared lock, so two processes probing at once never mistake each other for
    an owner; it never creates the file. Other errors (EACCES) are raised.
    ``shared_too``: shared locks (leases) count as well; the probe is exclusive.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if shared_too else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# -- owned temporary directories --------------------------------------------------

OWNER_LOCK = ".vmpod-owner.lock"  # inside an owned temp dir, flocked while its owner lives
_NEW_LOCK = ".vmpod-owner.new"  # the lock file before it is locked: never collected


@contextlib.contextmanager
def owned_tmpdir(parent: StrPath, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``parent``, removed when the block ends, that a
    later :func:`collect_stale_tmp` removes if its owner died (even by SIGKILL).

    Ownership is an exclusive flock on ``OWNER_LOCK`` inside the directory, held
    until the directory is gone. The lock file is locked under another name and
    then renamed, so a collector never sees an owner file that is not locked yet.
    Stale directories under ``parent`` are collected first.
    """
    base = Path(parent)
    base.mkdir(parents=True, exist_ok=True)
    collect_stale_tmp(base)
    path = Path(tempfile.mkdtemp(dir=base, prefix=prefix))
    fd = -1
    try:
        fd = lock_file(path / _NEW_LOCK)
        os.rename(path / _NEW_LOCK, path / OWNER_LOCK)
        yield path
    finally:
        _remove_owned(path, fd)


def _remove_owned(path: Path, fd: int) -> None:
    """Remove an owned dir: its content, then the lock (so it stays collectable)."""
    try:
        with os.scandir(path) as entries:
            names = [e.name for e in entries if e.name != OWNER_LOCK]
        for name in names:
            _remove_path(path / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / OWNER_LOCK)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)


def _remove_path(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, onerror=_chmod_retry)
    else:
        os.unlink(path)


def _chmod_retry(func: object, path: str, _exc: object) -> None:
    """rmtree as a non-root owner: an unpacked read-only dir blocks its children."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        if callable(func):
            func(path)


def collect_stale_tmp(parent: StrPath) -> list[Path]:
    """Remove the owned temp dirs under ``parent`` whose owner is gone; returns them.

    Only directories made by :func:`owned_tmpdir` (an ``OWNER_LOCK`` inside) are
    candidates; anything else is left alone, since it may be in use by code that
    does not take the lock. Errors on one directory do not stop the others.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            if not (path / OWNER_LOCK).exists() or is_locked(path / OWNER_LOCK):
                continue
            _remove_owned(path, -1)
        except OSError:
            continue
        removed.append(path)
    return removed


# -- paths below a root ----------------------------------------------------------


@dataclass(frozen=True)
class Below:
    """Where :func:`resolve_below` landed: always inside ``root``.

    ``escape`` names the first thing that tried to leave ``root`` and was confined
    instead: a '..' above it, or an absolute symlink (on the host it points
    outside). Callers that must refuse such paths rather than confine them
    (image layers) check it; those that want the container's view ignore it.
    """

    root: Path
    parts: tuple[str, ...]  # real components under root: no symlinks, no '..'
    missing: tuple[str, ...]  # the unwalked rest, from the first component that is absent
    escape: str  # the first attempt to leave root (confined), "" if none

    @property
    def path(self) -> Path:
        """The deepest existing real path (the whole path when nothing is missing)."""
        return self.root.joinpath(*self.parts)

    @property
    def exists(self) -> bool:
        return not self.missing


def resolve_below(root: StrPath, path: str) -> Below:
    """Resolve ``path`` below ``root`` as a process chrooted there would see it.

    openat2's RESOLVE_IN_ROOT, one component at a time: ``path`` is relative to
    ``root`` even with a leading '/'; ``..`` goes to the real parent of where the
    walk is (symlinks already followed) and at ``root`` stays there; every symlink
    is followed, the last component's too, an absolute target from ``root`` and a
    relative one from the link's directory, its components under these same
    rules. So no link chain and no ``..`` leads outside ``root``; ``escape`` says
    what tried (see Below). A missing component ends the walk. Raises
    OSError(ELOOP) after MAX_SYMLINKS links, NotADirectoryError for components
    below a non-directory. Path based (lstat per component): sound only for a
    tree nobody changes meanwhile (not a directory a guest writes to).
    """
    base = os.fspath(root)
    todo = _components(path)[::-1]  # a stack: next component last
    real: list[str] = []
    escape = via = ""
    links = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if real:
                real.pop()
            elif not escape:
                escape = f"escapes the root with '..'{via}"
            continue
        candidate = os.path.join(base, *real, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            return Below(Path(base), tuple(real), (part, *reversed(todo)), escape)
        if stat.S_ISLNK(mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
            target = os.readlink(candidate)
            link = f"{'/'.join([*real, part])!r} -> {target!r}"
            via = f" through symlink {link}"
            if target.startswith("/"):
                escape = escape or f"goes through absolute symlink {link}"
                real = []
            todo.extend(reversed(_components(target)))
            continue
        if todo and not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), candidate)
        real.append(part)
    return Below(Path(base), tuple(real), (), escape)


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


# -- host information ------------------------------------------------------------


def meminfo(path: StrPath = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as numbers: ``{"MemTotal": kB, "MemAvailable": kB, ...}``.

    Values are in kB as the kernel prints them (HugePages_* are counts); lines
    that do not parse are skipped. Raises OSError when the file cannot be read.
    """
    out: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            name, sep, rest = line.partition(":")
            fields = rest.split()
            if sep and fields and fields[0].isdigit():
                out[name.strip()] = int(fields[0])
    return out
