"""A sparse file in an image stays sparse on the host and reads back right in the
guest, whose erofs driver gets a chunk-based image for it (defect 7)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.vm.conftest import GuestKernel, VmFactory

SIZE = 1 << 30


def test_sparse_file_reads_back_in_the_guest(
    vm_factory: VmFactory, busybox: Path, guest_kernel: GuestKernel, tmp_path: Path
) -> None:
    rootfs = tmp_path / "rootfs"
    shutil.copytree(busybox, rootfs, symlinks=True)
    with open(rootfs / "big", "wb") as f:
        f.write(b"head")
        f.seek(SIZE - 4)
        f.write(b"tail")
    vmpod = vm_factory(kernel=guest_kernel.name)
    r = vmpod.run(
        "--rootfs", str(rootfs), "--", "sh", "-c", "head -c 4 /big; echo; tail -c 4 /big; echo; wc -c < /big"
    )
    assert r.returncode == 0, r.err
    assert r.out.split() == ["head", "tail", str(SIZE)]
    newest = max((vmpod.paths.images / "disks").glob("*.erofs"), key=lambda d: d.stat().st_mtime_ns)
    assert newest.stat().st_size < 16 << 20  # this image: was > 1 GiB of zeros
