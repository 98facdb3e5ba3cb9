"""Container rootfs -> read-only erofs disk image, cached by image digest.

The guest mounts it as the lower layer of an overlay with a tmpfs upper layer,
so the container sees a writable root while the image stays shared and intact.
Why erofs over a 9p share: Debian's cloud kernels have no 9p, and a block
image needs no server process on the host (no extra attack surface).

Sparse files stay sparse: when the tree holds one, the image is made with
chunk-based files (``--chunksize``), where a hole is an unmapped chunk instead
of blocks of zeros (Linux >= 5.15 reads them). Otherwise plain files keep their
tails inline, which is smaller for trees of many small files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmpod.errors import ImageError
from vmpod.fsutil import collect_stale_tmp, owned_tmpdir
from vmpod.guest.progress import Progress, silent
from vmpod.images import ImageSource
from vmpod.paths import Paths
from vmpod.proc import run
from vmpod.storage import cache

_CHUNK = 4096  # erofs chunk size for trees with sparse files: holes of a block are kept


def has_holes(root: Path) -> bool:
    """True when a regular file below ``root`` has fewer blocks than its size needs."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 + _CHUNK <= st.st_size:
                return True
    return False


def rootfs_disk(paths: Paths, source: ImageSource, progress: Progress = silent) -> Path:
    """Path of the erofs image holding ``source``'s root filesystem (built once)."""
    collect_stale_tmp(paths.tmp)  # what a killed vmpod left, on every start
    key = cache.key_of(source.digest)
    final = paths.images / cache.DISKS / f"{key}.erofs"
    cache.lease(final)  # held while this process (and its VM) runs: prune leaves it
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _build(paths, source, final, progress)
    except BaseException:
        cache.abandon(final)
        raise
    cache.enforce_cap(paths)
    return final


def _build(paths: Paths, source: ImageSource, final: Path, progress: Progress) -> None:
    """Unpack (images) and mkfs.erofs in an owned temp dir; rename the image to ``final``."""
    # Owned: if vmpod is killed mid-unpack, the next image build removes it.
    with owned_tmpdir(paths.tmp, "rootfs-") as tmp:
        src = source.rootfs_dir
        if src is None:
            progress(f"unpacking image {source.ref}")
            src = Path(tmp) / "rootfs"
            src.mkdir()
            source.unpack(src)
        out = Path(tmp) / "disk.erofs"
        progress(f"making root filesystem image of {source.ref}")
        chunks = [f"--chunksize={_CHUNK}"] if has_holes(src) else []
        run(["mkfs.erofs", "--quiet", "-T0", *chunks, out, src], what=f"make erofs image of {source.ref}")
        if out.stat().st_size == 0:
            raise ImageError(f"empty root filesystem image for {source.ref}")
        out.rename(final)
