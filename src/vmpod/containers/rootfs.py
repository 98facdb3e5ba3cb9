"""A named container's root filesystem on the host: an overlayfs mount whose lower
layer is the image (unpacked once per digest into a cache) or a --rootfs
directory, and whose upper layer lives in the container's record.

    <home>/images/trees/<key>/          unpacked images, shared read-only (leased:
                                         storage/cache.py)
    <record>/rootfs/{upper,work,merged}  the container's layer and the mount

Removal never crosses a mount: ``remove_tree`` refuses any tree with a mount
point below it (``/proc/self/mountinfo``) and checks st_dev on every directory
it enters, so a volume's data is never deleted through the container.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers.records import ContainerError
from vmpod.fsutil import locked, owned_tmpdir
from vmpod.guest.progress import Progress, silent
from vmpod.images import ImageSource
from vmpod.paths import Paths
from vmpod.proc import run
from vmpod.storage import cache

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Overlay:
    lower: Path
    upper: Path
    work: Path
    merged: Path

    @classmethod
    def of(cls, record_dir: Path, lower: str | Path) -> Overlay:
        base = record_dir / "rootfs"
        return cls(Path(lower), base / "upper", base / "work", base / "merged")


def image_tree(paths: Paths, source: ImageSource, progress: Progress = silent) -> Path:
    """The directory holding ``source``'s root filesystem: a --rootfs directory as is,
    an image unpacked once into the cache (keyed by its digest).

    The cached tree is leased for the rest of this process (storage/cache.py), so a
    concurrent ``vmpod system prune`` or LRU eviction leaves it alone until the
    caller's container record names it."""
    if source.rootfs_dir is not None:
        return source.rootfs_dir
    key = cache.key_of(source.digest)
    trees = paths.images / cache.TREES
    final = trees / key
    cache.lease(final)  # before the check: a remover holding it finishes first
    if final.is_dir():
        return final
    trees.mkdir(parents=True, exist_ok=True)
    try:
        with locked(trees / ".lock", timeout=600):
            if final.is_dir():  # unpacked by someone else while we waited
                return final
            # Owned: if vmpod is killed mid-unpack, the next unpack or prune removes it.
            with owned_tmpdir(paths.tmp, "tree-") as tmp:
                progress(f"unpacking image {source.ref}")
                tree = tmp / "rootfs"
                tree.mkdir(mode=0o755)
                source.unpack(tree)
                os.chmod(tree, 0o755)
                os.rename(tree, final)
    except BaseException:
        cache.abandon(final)
        raise
    cache.enforce_cap(paths)
    return final


def mount_points() -> list[str]:
    """Every mount point of this mount namespace (octal escapes decoded)."""
    out = []
    with open(MOUNTINFO, "rb") as fh:
        for line in fh:
            field = line.split(b" ")[4]
            out.append(os.fsdecode(_unescape(field)))
    return out


def _unescape(raw: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit() and len(raw[i + 1 : i + 4]) == 3:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def mounts_below(path: Path) -> list[str]:
    base = os.path.realpath(path)
    return [m for m in mount_points() if m == base or m.startswith(base.rstrip("/") + "/")]


def mount(ov: Overlay) -> None:
    """Mount the overlay at ``merged`` (nothing to do when it is mounted)."""
    if is_mounted(ov.merged):
        return
    if not ov.lower.is_dir():
        raise ContainerError(
            f"the container's image tree {ov.lower} is gone", hint="remove the container and run it again"
        )
    for d in (ov.upper, ov.work, ov.merged):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    for d in (ov.lower, ov.upper, ov.work):
        if any(c in str(d) for c in ",:\\\n"):
            raise ContainerError(f"cannot overlay-mount {d}: ',', ':' or '\\' in the path")
    opts = f"lowerdir={ov.lower},upperdir={ov.upper},workdir={ov.work}"
    run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(ov.merged)], what="mount the container's rootfs"
    )


def unmount(ov: Overlay) -> None:
    """Unmount ``merged`` (and anything mounted below it); raise if it stays mounted."""
    for point in sorted(mounts_below(ov.merged), key=len, reverse=True):
        run(["umount", point], what="unmount the container's rootfs")
    if left := mounts_below(ov.merged):
        raise ContainerError(f"{left[0]} is still mounted", hint="a process may still use it")
