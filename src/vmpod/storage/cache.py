"""Derived cache entries (image trees, erofs disks): use leases, last use, removal, LRU cap.

    <home>/images/trees/<key>/            an unpacked image (the lower layer of overlays)
    <home>/images/trees/.<key>.use        its lease lock; mtime = last use
    <home>/images/disks/<key>.erofs       an erofs image of an image or rootfs dir
    <home>/images/disks/.<key>.erofs.use  likewise

Locking: whoever hands out an entry (``rootfs.image_tree``, ``erofs.rootfs_disk``)
takes a *lease* first: a shared flock on the entry's ``.use`` file, held until the
process ends (a run's VM or record needs the entry from then on), then checks
the entry exists and builds it if not. A remover takes the same lock exclusively
without waiting: while any lease is held the entry is in use and stays. Holding it,
the remover also checks the container records, which a run writes before its
lease ends, so a stopped container's tree is never removed. A removed entry's
``.use`` file is unlinked under the lock; a lease that then wins a stale inode
notices (st_ino differs) and locks the new file instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import VmpodError
from vmpod.fsutil import LockTimeout, is_locked, lock_file
from vmpod.paths import Paths
from vmpod.storage.config import CacheSettings, load_cache_settings
from vmpod.storage.usage import disk_usage

log = logging.getLogger(__name__)

TREES, DISKS = "trees", "disks"
TRASH = ".trash-"  # an entry being removed (what a killed remover left: see collect_trash)
_leases: dict[str, int] = {}  # use file -> fd: held until the process ends


@dataclass(frozen=True)
class Entry:
    kind: str  # TREES | DISKS
    path: Path
    last_use: float  # mtime of the .use file (the entry's own when there is none)


def key_of(digest: str) -> str:
    """The cache key of an image or rootfs digest (names of trees and disks)."""
    return hashlib.sha256(digest.encode()).hexdigest()[:32]


def use_file(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.use")


def lease(entry: Path) -> None:
    """Mark ``entry`` in use by this process until it ends, and record the use now.

    Call before checking that the entry exists: a remover that got there first
    has finished by the time the lease is granted."""
    key = os.fspath(use_file(entry))
    if key in _leases:
        with contextlib.suppress(OSError):
            os.utime(key)
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # no timeout: a remover holds the lock only while it deletes this one entry
        fd = lock_file(key, exclusive=False, timeout=None)
        if _same_file(fd, key):
            break
        os.close(fd)  # the remover unlinked the file we waited on: lock the new one
    os.utime(key)
    _leases[key] = fd


def abandon(entry: Path) -> None:
    """Drop this process's lease after building ``entry`` failed: a failed build leaves
    no lock file behind unless another process holds it too."""
    key = os.fspath(use_file(entry))
    if (fd := _leases.pop(key, -1)) >= 0:
        os.close(fd)
    with exclusive(entry) as free:
        if free and not os.path.lexists(entry):
            os.unlink(key)


def release_leases() -> None:
    """Drop this process's leases (tests; a process that ends drops them anyway)."""
    for fd in _leases.values():
        os.close(fd)
    _leases.clear()


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive(entry: Path) -> Iterator[bool]:
    """The entry's lock taken exclusively if free now: yields False while leased."""
    key = os.fspath(use_file(entry))
    if key in _leases:  # this very process uses it
        yield False
        return
    if not os.path.lexists(key):  # made now: keep the entry's age, a check is no use
        with contextlib.suppress(OSError):
            age = os.lstat(entry).st_mtime
            os.close(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.utime(key, (age, age))
    try:
        fd = lock_file(key, timeout=0)
    except LockTimeout:
        yield False
        return
    try:
        yield _same_file(fd, key)
    finally:
        os.close(fd)


def in_use(entry: Path) -> bool:
    """True while some process holds a lease on ``entry`` (creates nothing)."""
    key = os.fspath(use_file(entry))
    # no lock file: never leased since its last removal
    return key in _leases or is_locked(key, shared_too=True)


def entries(paths: Paths) -> list[Entry]:
    """Every tree and disk in the cache (dot files and half-built ones excluded)."""
    out = []
    for kind, pattern in ((TREES, "*"), (DISKS, "*.erofs")):
        for path in sorted((paths.images / kind).glob(pattern)):
            if path.name.startswith(".") or path.is_symlink():
                continue
            try:
                last = os.stat(use_file(path)).st_mtime
            except FileNotFoundError:
                last = os.lstat(path).st_mtime
            out.append(Entry(kind, path, last))
    return out


def referenced(paths: Paths) -> set[str]:
    """Image trees and disks named by a container record (running or stopped)."""
    from vmpod.containers.records import Records  # (storage sits below containers)

    return {
        os.path.realpath(path)
        for rec in Records(paths.home / "containers").all()
        for path in (rec.lower, rec.root_disk)
        if path
    }


def remove_unused(entry: Path, keep: Callable[[], set[str]]) -> bool:
    """Remove ``entry`` unless leased or among ``keep()`` (real paths, see ``referenced``:
    asked under the lock, so a record written before the last lease ended counts);
    True when it went."""
    from vmpod.mounts import remove_tree

    if not entry.parent.is_dir():
        return True  # nothing was ever cached here
    with exclusive(entry) as free:
        if not free or os.path.realpath(entry) in keep():
            return False
        if os.path.lexists(entry):
            # renamed out first: a half-removed tree is never taken for a complete one
            trash = entry.with_name(f"{TRASH}{entry.name}-{os.getpid()}")
            os.rename(entry, trash)
            with contextlib.suppress(FileNotFoundError):  # collect_trash got there too
                remove_tree(trash)
        use_file(entry).unlink(missing_ok=True)
    return True


def enforce_cap(paths: Paths, settings: CacheSettings | None = None) -> list[Path]:
    """Past the cap, evict unused entries, least recently used first; returns them."""
    settings = load_cache_settings() if settings is None else settings
    if settings.max_bytes <= 0:
        return []
    seen: set[tuple[int, int]] = set()
    sized = [(e, disk_usage(e.path, seen)) for e in entries(paths)]
    total = sum(size for _e, size in sized)
    evicted = []
    for entry, size in sorted(sized, key=lambda pair: pair[0].last_use):
        if total <= settings.max_bytes:
            break
        try:
            removed = remove_unused(entry.path, lambda: referenced(paths))
        except (OSError, VmpodError) as err:  # eviction is housekeeping: never fail the caller
            log.warning("cache eviction of %s failed: %s", entry.path, err)
            continue
        if removed:
            log.info("cache over %d bytes: evicted %s", settings.max_bytes, entry.path)
            evicted.append(entry.path)
            total -= size
    return evicted


def collect_trash(paths: Paths) -> int:
    """Finish removals a killed remover left (``.trash-*``); returns the bytes freed."""
    from vmpod.mounts import remove_tree

    freed = 0
    for kind in (TREES, DISKS):
        for trash in (paths.images / kind).glob(f"{TRASH}*"):
            size = disk_usage(trash)
            with contextlib.suppress(OSError, VmpodError):  # another remover may be at it
                remove_tree(trash)
                freed += size
    return freed
