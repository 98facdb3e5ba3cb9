"""Hardening of image unpacking: sparse files stay sparse, a per-image size cap,
temporary unpack directories that a killed vmpod leaves are collected later."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vmpod.errors import ConfigError, ImageError
from vmpod.fsutil import collect_stale_tmp, owned_tmpdir
from vmpod.images import ImageSource
from vmpod.images.layers import LayerApplier, apply_tar, max_image_bytes
from vmpod.images.source import ImageConfig
from vmpod.paths import Paths
from vmpod.storage.erofs import rootfs_disk

MiB = 1 << 20
HOLE = 256 * MiB


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _sparse_file(path: Path, size: int = HOLE) -> None:
    """``size`` bytes: b"head" at 0, a hole, b"tail" at the end."""
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")


def _unpack(dest: Path, data: bytes, max_bytes: int | None = None) -> None:
    applier = LayerApplier(dest, max_bytes=max_bytes)
    applier.begin_layer("layer 1")
    apply_tar(applier, io.BytesIO(data))  # type: ignore[arg-type]
    applier.finish()


def _check_sparse_content(path: Path, size: int = HOLE) -> None:
    assert path.stat().st_size == size
    assert _allocated(path) < 4 * MiB  # was `size`: every zero written
    with open(path, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(size // 2)
        assert f.read(8) == bytes(8)
        f.seek(size - 4)
        assert f.read() == b"tail"


def test_gnu_sparse_member_stays_sparse(tmp_path: Path) -> None:
    """A tar made with `tar --sparse` (GNU sparse member): holes stay holes."""
    src = tmp_path / "src"
    src.mkdir()
    _sparse_file(src / "big")
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", "-cf", layer, "-C", src, "big"], check=True)
    assert layer.stat().st_size < MiB
    dest = tmp_path / "dest"
    dest.mkdir()
    _unpack(dest, layer.read_bytes())
    _check_sparse_content(dest / "big")


def test_zeros_stored_in_the_tar_become_holes(tmp_path: Path) -> None:
    size = 32 * MiB
    body = b"head" + bytes(size - 8) + b"tail"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(body))
    dest = tmp_path / "dest"
    dest.mkdir()
    _unpack(dest, buf.getvalue())
    _check_sparse_content(dest / "zeros", size)


def test_data_is_written_exactly(tmp_path: Path) -> None:
    """Mixed data and zeros across chunk edges survive the hole detection."""
    body = os.urandom(100_000) + bytes(3 * MiB + 17) + os.urandom(70_001) + bytes(65_536) + b"x"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("mixed")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    dest = tmp_path / "dest"
    dest.mkdir()
    _unpack(dest, buf.getvalue())
    assert (dest / "mixed").read_bytes() == body


def _fake_layer_source(tmp_path: Path, layer: bytes) -> ImageSource:
    """An ImageSource whose unpack applies one layer tar, as image sources do."""

    @dataclasses.dataclass(frozen=True)
    class _Source(ImageSource):
        def unpack(self, dest: Path) -> None:
            applier = LayerApplier(dest)
            applier.begin_layer("layer sha256:feed")
            apply_tar(applier, io.BytesIO(layer))  # type: ignore[arg-type]
            applier.finish()

    return _Source(
        ref="hostile:latest", kind="oci-layout", digest="sha256:" + "ab" * 32, config=ImageConfig()
    )


def _sparse_layer(tmp_path: Path, size: int) -> bytes:
    src = tmp_path / "layer-src"
    src.mkdir(exist_ok=True)
    _sparse_file(src / "big", size)
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", "-cf", layer, "-C", src, "big"], check=True)
    return layer.read_bytes()


def test_cap_on_unpacked_size_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", "8M")
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    source = _fake_layer_source(tmp_path, _sparse_layer(tmp_path, 64 * MiB))
    with pytest.raises(ImageError) as info:
        rootfs_disk(paths, source)
    msg = str(info.value)
    assert "more than 8 MiB" in msg and "'big'" in msg and "\n" not in msg
    assert "VMPOD_MAX_IMAGE_BYTES" in (info.value.hint or "")
    assert list(paths.tmp.iterdir()) == []  # nothing left behind
    assert not any((paths.images / "disks").iterdir())


def test_cap_counts_every_layer(tmp_path: Path) -> None:
    def layer(name: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(bytes(600)))
        return buf.getvalue()

    dest = tmp_path / "dest"
    dest.mkdir()
    applier = LayerApplier(dest, max_bytes=1000)
    applier.begin_layer("layer 1")
    apply_tar(applier, io.BytesIO(layer("a")))  # type: ignore[arg-type]
    applier.begin_layer("layer 2")
    with pytest.raises(ImageError, match="layer 2: entry 'b': the image unpacks to more than 1000 bytes"):
        apply_tar(applier, io.BytesIO(layer("b")))  # type: ignore[arg-type]


def test_max_image_bytes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMPOD_MAX_IMAGE_BYTES", raising=False)
    assert max_image_bytes() == 16 << 30
    for raw, value in (("1024", 1024), ("512M", 512 * MiB), ("2GiB", 2 << 30), ("3g", 3 << 30)):
        monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", raw)
        assert max_image_bytes() == value
    for bad in ("lots", "-5", "0", "1.5G"):
        monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", bad)
        with pytest.raises(ConfigError, match="VMPOD_MAX_IMAGE_BYTES"):
            max_image_bytes()


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="needs erofs-utils")
def test_erofs_image_keeps_holes(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    source = _fake_layer_source(tmp_path, _sparse_layer(tmp_path, HOLE))
    disk = rootfs_disk(paths, source)
    assert disk.stat().st_size < 4 * MiB  # was HOLE: the zeros written into the image
    out = tmp_path / "extracted"
    subprocess.run(["fsck.erofs", f"--extract={out}", disk], check=True, capture_output=True)
    big = out / "big"
    assert big.stat().st_size == HOLE
    with open(big, "rb") as f:
        assert f.read(4) == b"head"
        f.seek(HOLE - 4)
        assert f.read() == b"tail"


# -- defect 8: temp unpack dirs of a killed vmpod ---------------------------------

_SLOW_UNPACK = """
import dataclasses, sys, time
from pathlib import Path
from vmpod.cli.common import guard
from vmpod.images import ImageSource
from vmpod.images.source import ImageConfig
from vmpod.paths import Paths
from vmpod.storage.erofs import rootfs_disk

@dataclasses.dataclass(frozen=True)
class Slow(ImageSource):
    def unpack(self, dest: Path) -> None:
        (dest / "partial").write_bytes(b"x" * 4096)
        print(dest, flush=True)
        time.sleep(60)

paths = Paths(home=Path(sys.argv[1]), run=Path(sys.argv[1]) / "run")
src = Slow(ref="slow:latest", kind="oci-layout", digest="sha256:" + "cd" * 32, config=ImageConfig())
guard(lambda: rootfs_disk(paths, src))
"""


def _start_slow_unpack(home: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_UNPACK, str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, Path(line)


def test_sigkill_during_unpack_is_collected_at_next_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc, dest = _start_slow_unpack(home)
    paths = Paths(home=home, run=home / "run")
    try:
        assert dest.is_file() is False and (dest / "partial").is_file()
        assert collect_stale_tmp(paths.tmp) == []  # its owner lives: kept
    finally:
        proc.kill()
        proc.communicate()
    assert (dest / "partial").is_file()  # SIGKILL: no cleanup ran
    # the next start (any image build, even a cache hit) removes it
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "hello").write_text("hi\n")
    source = ImageSource(
        ref=str(rootfs),
        kind="rootfs-dir",
        digest="sha256:" + "ef" * 32,
        config=ImageConfig(),
        rootfs_dir=rootfs,
    )
    rootfs_disk(paths, source)
    assert list(paths.tmp.iterdir()) == []


def test_collector_leaves_foreign_and_live_dirs(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()  # made by code that takes no owner lock
    with owned_tmpdir(tmp_path, "live-") as live:
        (live / "sub").mkdir()
        (live / "sub" / "f").write_text("x")
        assert collect_stale_tmp(tmp_path) == []
        assert live.is_dir()
    assert not live.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["foreign"]


def test_sigterm_during_unpack_exits_143_with_message_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc, dest = _start_slow_unpack(home)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err  # was -15: killed with no message
    assert err.strip() == "vmpod: terminated"
    assert not dest.parent.exists()
    assert list((home / "tmp").iterdir()) == []
