"""Guest assets for one boot: kernel, initramfs, guest root image; built on first use.

Building is serialised by a lock in the cache so concurrent runs do not race.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import AssetError, VmpodError
from vmpod.guest import initramfs, rootfs
from vmpod.guest.kernel import DEFAULT_KERNEL, Kernel, ensure_kernel, load_cached
from vmpod.guest.progress import Progress, silent
from vmpod.paths import Paths
from vmpod.proc import is_disk_full


@dataclass(frozen=True)
class GuestAssets:
    kernel: Kernel
    initramfs: Path
    rootfs: Path
    tree: Path  # the unpacked guest root the image was made from


@contextmanager
def _build_lock(paths: Paths) -> Iterator[None]:
    paths.home.mkdir(parents=True, exist_ok=True)
    with (paths.home / ".build.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_assets(paths: Paths, kernel: str = DEFAULT_KERNEL, progress: Progress = silent) -> GuestAssets:
    """Everything needed to boot a sandbox with ``kernel``, building what is missing."""
    try:
        with _build_lock(paths):
            if load_cached(paths, kernel) is None:
                progress(f"fetching guest kernel '{kernel}' from Debian packages")
            k = ensure_kernel(paths, kernel)
            tree = rootfs.ensure_tree(paths, progress)
            image = rootfs.ensure_image(paths, tree, progress)
            busybox = tree / "bin/busybox"
            initrd = initramfs.ensure_initramfs(paths, k, busybox)
            return GuestAssets(kernel=k, initramfs=initrd, rootfs=image, tree=tree)
    except (OSError, VmpodError) as err:
        if is_disk_full(err):
            raise AssetError(
                f"disk full while building guest assets in {paths.home}", hint="free some space and retry"
            ) from err
        if isinstance(err, VmpodError):
            raise
        raise AssetError(f"cannot build guest assets: {err}") from err


def assets_state(paths: Paths, kernel: str = DEFAULT_KERNEL) -> dict[str, object]:
    """What is cached and whether it is current (for `vmpod doctor`), without building."""
    k = load_cached(paths, kernel)
    trees = [p for p in paths.guest.glob(f"tree-{rootfs.tree_key()}") if (p / ".complete").exists()]
    image = paths.guest / f"rootfs-{rootfs.image_key(trees[0].name)}.erofs" if trees else None
    initrd = None
    if k is not None and trees:
        key = initramfs.initramfs_key(k, trees[0] / "bin/busybox")
        initrd = paths.guest / f"initramfs-{k.id}-{key}.cpio"
    return {
        "kernel": k.release if k else None,
        "guest_tree": bool(trees),
        "rootfs_image": bool(image and image.is_file()),
        "initramfs": bool(initrd and initrd.is_file()),
    }
