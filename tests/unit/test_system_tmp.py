"""Owned temp dirs of image tree unpacks and initramfs builds: a vmpod killed by
SIGKILL in the middle leaves a dir that the next build (or `system prune`) collects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vmpod.containers.rootfs import image_tree
from vmpod.fsutil import OWNER_LOCK, collect_stale_tmp
from vmpod.images import ImageSource
from vmpod.images.source import ImageConfig
from vmpod.paths import Paths
from vmpod.storage import cache
from vmpod.storage.prune import TEMP, prune

_CHILD = """
import dataclasses, sys, time
from pathlib import Path
from vmpod.images import ImageSource
from vmpod.images.source import ImageConfig
from vmpod.paths import Paths

home, what = Path(sys.argv[1]), sys.argv[2]
paths = Paths(home=home, run=home / "run")

def stop_here(dest: Path) -> None:
    (dest / "partial").write_bytes(b"x" * 8192)
    print(next(p for p in (dest, *dest.parents) if p.parent == paths.tmp), flush=True)
    time.sleep(120)  # killed here

if what == "tree":
    from vmpod.containers.rootfs import image_tree

    @dataclasses.dataclass(frozen=True)
    class Slow(ImageSource):
        def unpack(self, dest: Path) -> None:
            stop_here(dest)

    image_tree(paths, Slow(ref="slow", kind="oci-layout", digest="sha256:" + "ab" * 32, config=ImageConfig()))
else:
    from vmpod.guest import initramfs
    from vmpod.guest.kernel import Kernel

    initramfs.initramfs_key = lambda kernel, busybox: "key"
    initramfs._stage = lambda stage, kernel, busybox: stop_here(stage.parent)
    kernel = Kernel("6.1.0-test", "linux-image-test", "1", home / "kernels" / "6.1.0-test", False)
    initramfs.ensure_initramfs(paths, kernel, Path("/bin/true"))
"""


def _killed_midway(home: Path, what: str) -> Path:
    """Start a child building ``what``, SIGKILL it mid-build; returns its temp dir."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(home), what],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read() if proc.stderr else ""
        tmp = Path(line)
        paths = Paths(home=home, run=home / "run")
        assert tmp.parent == paths.tmp and (tmp / OWNER_LOCK).exists()
        assert collect_stale_tmp(paths.tmp) == []  # its owner lives: kept
    finally:
        proc.kill()
        proc.communicate()
    assert list(tmp.rglob("partial"))  # SIGKILL: no cleanup ran
    return tmp


@pytest.mark.parametrize("what", ["tree", "initramfs"])
def test_sigkill_mid_build_is_collected_by_the_next_build(tmp_path: Path, what: str) -> None:
    home = tmp_path / "home"
    tmp = _killed_midway(home, what)
    paths = Paths(home=home, run=home / "run")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "hello").write_text("hi\n")
    # any next unpack of another image collects the dead one's dir first
    source = ImageSource(ref="next", kind="oci-layout", digest="sha256:" + "cd" * 32, config=ImageConfig())
    unpacked = image_tree(paths, _CopyOf(source, rootfs))
    cache.release_leases()
    assert (unpacked / "hello").read_text() == "hi\n"
    assert not tmp.exists() and list(paths.tmp.iterdir()) == []


def test_sigkill_mid_unpack_is_collected_by_prune(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tmp = _killed_midway(home, "tree")
    paths = Paths(home=home, run=home / "run")
    result = prune(paths, all_=False)
    assert [(c.kind, c.path) for c in result.removed] == [(TEMP, tmp)]
    assert result.freed >= 8192 and not tmp.exists()
    # the killed unpack left no tree and no lease behind either
    assert list((paths.images / cache.TREES).glob("[!.]*")) == []


class _CopyOf(ImageSource):
    """An image whose unpack copies a directory (a real unpack, without a layout)."""

    def __init__(self, source: ImageSource, root: Path) -> None:
        object.__setattr__(self, "_root", root)
        super().__init__(source.ref, source.kind, source.digest, source.config)

    def unpack(self, dest: Path) -> None:
        root: Path = object.__getattribute__(self, "_root")
        subprocess.run(["cp", "-a", f"{root}/.", str(dest)], check=True)
