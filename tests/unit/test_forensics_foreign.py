"""podman's and Kubernetes' checkpoint archives without VMs: no manifest, gzip or
zstd compression (with a cap), and what a restore must replace or drop."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics.restore import _placeholder_binds


def _podman_layout(path: Path, *, link: bool = False) -> None:
    """An archive in podman's layout: no vmpod manifest."""
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("checkpoint/inventory.img", os.urandom(300)),
            ("config.dump", b'{"rootfsImageName": "busybox"}'),
            ("spec.dump", b"{}"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("checkpoint/shadow")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
            tar.addfile(info)


def test_plain_gzip_and_zstd_archives_unpack_alike(tmp_path: Path) -> None:
    plain = tmp_path / "podman.tar"
    _podman_layout(plain)
    gz = tmp_path / "podman.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "podman.tar.zst"
    subprocess.run(["zstd", "-q", "-o", str(zst), str(plain)], check=True)
    for src in (plain, gz, zst):
        scratch = tmp_path / f"scratch-{src.name}"
        scratch.mkdir()
        tar = a.plain_tar(src, scratch, 1 << 20)
        assert (tar == src) == (src is plain)
        dest = tmp_path / f"out-{src.name}"
        dest.mkdir()
        assert a.extract(tar, dest, 1 << 20) is None  # no manifest: nothing verified
        assert (dest / "checkpoint/inventory.img").read_bytes() == (
            tmp_path / "out-podman.tar/checkpoint/inventory.img"
        ).read_bytes()


def test_decompression_is_capped_and_corruption_is_one_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (8 << 20)))
    with pytest.raises(ForensicsError, match="decompresses to more than 1048576 bytes"):
        a.plain_tar(bomb, tmp_path, 1 << 20)
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    with pytest.raises(ForensicsError, match=r"cannot decompress .*bad\.tar\.zst"):
        a.plain_tar(bad, tmp_path, 1 << 20)


def test_foreign_archive_with_a_symlink_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "podman.tar"
    _podman_layout(src, link=True)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ForensicsError, match="not regular files: checkpoint/shadow"):
        a.extract(src, dest, 1 << 20)
    with pytest.raises(ForensicsError, match="no vmpod-manifest.json"):
        a.verify(src)  # verify needs digests: a podman archive has none


def test_bind_mounts_become_empty_placeholders(tmp_path: Path) -> None:
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": "/var/lib/podman/x/hosts",
            "options": ["rbind"],
        },
        {"destination": "/data", "source": "/srv/secret", "options": ["rbind", "bind", "ro"]},
    ]
    out, notes = _placeholder_binds(mounts, tmp_path / "ph")
    assert out[0] == mounts[0]
    hosts, data = out[1], out[2]
    assert isinstance(hosts, dict) and isinstance(data, dict)
    assert Path(str(hosts["source"])).is_file() and Path(str(hosts["source"])).stat().st_size == 0
    assert Path(str(data["source"])).is_dir() and not list(Path(str(data["source"])).iterdir())
    assert data["options"] == ["rbind", "bind", "ro"] and data["type"] == "bind"
    assert notes == ["not in the archive, restored as empty placeholders: /etc/hosts, /data"]
    with pytest.raises(ForensicsError, match="mount 0 has no absolute destination"):
        _placeholder_binds([{"destination": "etc", "type": "bind"}], tmp_path / "ph2")
