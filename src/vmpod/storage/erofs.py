"""Container rootfs -> read-only erofs disk image, cached by image digest.

The guest mounts it as the lower layer of an overlay with a tmpfs upper layer,
so the container sees a writable root while the image stays shared and intact.
Why erofs over a 9p share: Debian's cloud kernels have no 9p, and a block
image needs no server process on the host (no extra attack surface).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from vmpod.errors import ImageError
from vmpod.guest.progress import Progress, silent
from vmpod.images import ImageSource
from vmpod.paths import Paths
from vmpod.proc import run


def rootfs_disk(paths: Paths, source: ImageSource, progress: Progress = silent) -> Path:
    """Path of the erofs image holding ``source``'s root filesystem (built once)."""
    key = hashlib.sha256(source.digest.encode()).hexdigest()[:32]
    final = paths.images / "disks" / f"{key}.erofs"
    if final.is_file():
        os.utime(final)  # recency, for a future cache pruner
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.tmp, prefix="rootfs-") as tmp:
        src = source.rootfs_dir
        if src is None:
            progress(f"unpacking image {source.ref}")
            src = Path(tmp) / "rootfs"
            src.mkdir()
            source.unpack(src)
        out = Path(tmp) / "disk.erofs"
        progress(f"making root filesystem image of {source.ref}")
        run(["mkfs.erofs", "--quiet", "-T0", out, src], what=f"make erofs image of {source.ref}")
        if out.stat().st_size == 0:
            raise ImageError(f"empty root filesystem image for {source.ref}")
        out.rename(final)
    return final
