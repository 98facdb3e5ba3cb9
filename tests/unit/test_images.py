"""Resolving and unpacking local images: OCI layouts, OCI/docker archives, rootfs dirs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from vmpod.errors import ImageError
from vmpod.images import ImageConfig, resolve_image, resolve_rootfs

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


def layer(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    """An uncompressed layer tar with the given regular files and whiteout markers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [*files.items(), *((w, b"") for w in whiteouts)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OciLayout:
    """Writes a minimal OCI image layout, the way skopeo/buildah lay it out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        (self.root / "blobs" / "sha256" / sha(data)).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{sha(data)}", "size": len(data)}

    def image(
        self, layers: list[bytes], *, config: dict[str, Any] | None = None, compression: str = "gzip"
    ) -> dict[str, Any]:
        descs = []
        for raw in layers:
            if compression == "gzip":
                descs.append(self.blob(gzip.compress(raw, mtime=0), LAYER + "+gzip"))
            elif compression == "zstd":
                packed = subprocess.run(
                    ["zstd", "-q", "-c"], input=raw, capture_output=True, check=True
                ).stdout
                descs.append(self.blob(packed, LAYER + "+zstd"))
            else:
                descs.append(self.blob(raw, LAYER))
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha(r)}" for r in layers]},
        }
        cfg_desc = self.blob(json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg_desc, "layers": descs}
        return self.blob(json.dumps(manifest).encode(), MANIFEST)

    def save(self, *descs: dict[str, Any]) -> Path:
        index = {"schemaVersion": 2, "manifests": list(descs)}
        (self.root / "index.json").write_text(json.dumps(index))
        return self.root


def tagged(desc: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**desc, "annotations": {REF_NAME: tag}}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_archive(path: Path, images: list[tuple[list[str], list[bytes], dict[str, Any]]]) -> Path:
    """A 'docker save' archive (legacy layout: <id>/layer.tar, <config-hex>.json)."""
    members: dict[str, bytes] = {}
    manifest = []
    for tags, layers, config in images:
        for raw in layers:
            members[f"{sha(raw)}/layer.tar"] = raw
        cfg = json.dumps(
            {"config": config, "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha(r)}" for r in layers]}}
        ).encode()
        members[f"{sha(cfg)}.json"] = cfg
        manifest.append(
            {
                "Config": f"{sha(cfg)}.json",
                "RepoTags": tags,
                "Layers": [f"{sha(r)}/layer.tar" for r in layers],
            }
        )
    members["manifest.json"] = json.dumps(manifest).encode()
    return write_tar(path, members)


@pytest.fixture
def oci(tmp_path: Path) -> OciLayout:
    return OciLayout(tmp_path / "layout")


def unpacked(source: Any, tmp_path: Path, name: str = "rootfs") -> Path:
    dest = tmp_path / name
    dest.mkdir()
    source.unpack(dest)
    return dest


def test_oci_layout_single_image(oci: OciLayout, tmp_path: Path) -> None:
    config = {
        "Env": ["PATH=/bin"],
        "Entrypoint": ["/bin/sh"],
        "Cmd": ["-c", "true"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
    }
    desc = oci.image([layer({"etc/hello": b"hi"})], config=config)
    src = resolve_image(str(oci.save(desc)))
    assert (src.kind, src.digest, src.rootfs_dir) == ("oci-layout", desc["digest"], None)
    assert src.config == ImageConfig(
        env=("PATH=/bin",), entrypoint=("/bin/sh",), cmd=("-c", "true"), working_dir="/srv", user="1000:1000"
    )
    assert (unpacked(src, tmp_path) / "etc" / "hello").read_bytes() == b"hi"
    assert resolve_image(f"oci:{oci.root}").digest == desc["digest"]


def test_tag_selection(oci: OciLayout, tmp_path: Path) -> None:
    a = oci.image([layer({"which": b"a"})])
    b = oci.image([layer({"which": b"b"})])
    root = oci.save(tagged(a, "a"), tagged(b, "b"))
    assert resolve_image(f"{root}:b").digest == b["digest"]
    assert (unpacked(resolve_image(f"oci:{root}:a"), tmp_path) / "which").read_bytes() == b"a"
    with pytest.raises(ImageError, match=r"tag 'zzz' not in OCI layout .*\(available: a, b\)"):
        resolve_image(f"{root}:zzz")
    with pytest.raises(ImageError, match="holds 2 images"):
        resolve_image(str(root))


def test_nested_index_picks_linux_amd64(oci: OciLayout, tmp_path: Path) -> None:
    arm = oci.image([layer({"arch": b"arm64"})])
    amd = oci.image([layer({"arch": b"amd64"})])
    index = {
        "schemaVersion": 2,
        "manifests": [
            {**arm, "platform": {"os": "linux", "architecture": "arm64"}},
            {**amd, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    nested = oci.blob(json.dumps(index).encode(), INDEX)
    src = resolve_image(f"{oci.save(tagged(nested, 'multi'))}:multi")
    assert src.digest == amd["digest"]
    assert (unpacked(src, tmp_path) / "arch").read_bytes() == b"amd64"


def test_corrupt_layer_fails_and_leaves_dest_empty(oci: OciLayout, tmp_path: Path) -> None:
    desc = oci.image([layer({"a": b"x" * 100}), layer({"b": b"good"})], compression="none")
    src = resolve_image(str(oci.save(desc)))
    manifest = json.loads((oci.root / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    blob = oci.root / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    blob.write_bytes(blob.read_bytes().replace(b"good", b"evil"))  # same size, valid tar
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError, match="digest mismatch"):
        src.unpack(dest)
    assert list(dest.iterdir()) == []


def test_corrupt_config_fails_resolve(oci: OciLayout) -> None:
    desc = oci.image([layer({"a": b"x"})], config={"User": "root"})
    manifest = json.loads((oci.root / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    config = oci.root / "blobs" / "sha256" / manifest["config"]["digest"][7:]
    config.write_bytes(config.read_bytes().replace(b"root", b"evil"))
    with pytest.raises(ImageError, match="digest mismatch"):
        resolve_image(str(oci.save(desc)))


def test_oversized_index_is_refused(oci: OciLayout) -> None:
    (oci.root / "index.json").write_bytes(b" " * (5 << 20))
    with pytest.raises(ImageError, match="larger than"):
        resolve_image(str(oci.root))


def test_oci_archive(oci: OciLayout, tmp_path: Path) -> None:
    desc = oci.image([layer({"etc/os-release": b"ID=test"})])
    oci.save(tagged(desc, "v1"))
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(oci.root, arcname=".")  # members are "./index.json" etc., like skopeo's
    src = resolve_image(str(archive))
    assert (src.kind, src.digest) == ("oci-archive", desc["digest"])
    assert resolve_image(f"oci-archive:{archive}:v1").digest == desc["digest"]
    assert (unpacked(src, tmp_path) / "etc" / "os-release").read_bytes() == b"ID=test"


def test_docker_archive(tmp_path: Path) -> None:
    archive = docker_archive(
        tmp_path / "saved.tar",
        [
            (
                ["busybox:latest"],
                [layer({"bin/busybox": b"bb", "gone": b""}), layer({}, whiteouts=(".wh.gone",))],
                {"Cmd": ["sh"]},
            ),
            (["other:1"], [layer({"other": b"o"})], {}),
        ],
    )
    src = resolve_image(f"{archive}:busybox:latest")
    assert src.kind == "docker-archive" and src.config.cmd == ("sh",)
    with tarfile.open(archive) as tar:
        saved = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    config_name = saved[0]["Config"]
    assert src.digest == "sha256:" + config_name.removesuffix(".json")
    root = unpacked(src, tmp_path)
    assert sorted(os.listdir(root)) == ["bin"]
    assert (root / "bin" / "busybox").read_bytes() == b"bb"
    assert resolve_image(f"docker-archive:{archive}:docker.io/library/other:1").config.cmd == ()
    with pytest.raises(ImageError, match=r"holds 2 images \(available: busybox:latest, other:1\)"):
        resolve_image(str(archive))
    with pytest.raises(ImageError, match="tag 'nope' not in docker archive"):
        resolve_image(f"{archive}:nope")


def test_docker_archive_tampered_layer_fails_diff_id(tmp_path: Path) -> None:
    good = layer({"f": b"good"})
    archive = docker_archive(tmp_path / "saved.tar", [(["img:1"], [good], {})])
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    members[f"{sha(good)}/layer.tar"] = good.replace(b"good", b"evil")
    src = resolve_image(str(write_tar(archive, members)))
    dest = tmp_path / "rootfs"
    dest.mkdir()
    with pytest.raises(ImageError, match="diff_id"):
        src.unpack(dest)
    assert list(dest.iterdir()) == []


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd tool not installed")
def test_zstd_layer(oci: OciLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = resolve_image(str(oci.save(oci.image([layer({"z": b"zstd!"})], compression="zstd"))))
    assert (unpacked(src, tmp_path) / "z").read_bytes() == b"zstd!"
    monkeypatch.setattr(shutil, "which", lambda *_args, **_kw: None)
    with pytest.raises(ImageError, match="'zstd' tool is not installed"):
        unpacked(src, tmp_path, "again")


def test_whiteouts_across_image_layers(oci: OciLayout, tmp_path: Path) -> None:
    desc = oci.image(
        [
            layer({"a/old": b"", "a/keep": b"", "d/x": b"", "f": b""}),
            layer({"d/new": b""}, whiteouts=("a/.wh.old", "d/.wh..wh..opq", ".wh.f")),
        ]
    )
    root = unpacked(resolve_image(str(oci.save(desc))), tmp_path)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["a", "a/keep", "d", "d/new"]


@pytest.mark.parametrize("ref", ["does-not-exist", "nothere.tar:tag", "./no/such/dir:1"])
def test_missing_ref_is_a_clear_error(ref: str) -> None:
    with pytest.raises(ImageError, match=r"image '.*' not found: .*use --rootfs DIR"):
        resolve_image(ref)


def test_plain_directory_points_to_rootfs_flag(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not an OCI layout.*--rootfs"):
        resolve_image(str(tmp_path))


def test_non_archive_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="cannot read image archive"):
        resolve_image(str(tmp_path / "junk"))
    with pytest.raises(ImageError, match="neither an OCI archive nor a docker archive"):
        resolve_image(str(write_tar(tmp_path / "empty.tar", {"hello": b""})))


def test_unpack_needs_an_empty_dir(oci: OciLayout, tmp_path: Path) -> None:
    src = resolve_image(str(oci.save(oci.image([layer({"a": b""})]))))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(ImageError, match="not empty"):
        src.unpack(tmp_path / "full")


def test_rootfs_dir_digest_and_copy(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "sh").write_text("v1")
    (root / "bin").symlink_to("usr/bin")
    os.link(root / "usr" / "bin" / "sh", root / "hard")
    (root / ".wh.plain").write_text("not a whiteout here")
    src = resolve_rootfs(root)
    assert (src.kind, src.rootfs_dir, src.config) == ("rootfs-dir", root, ImageConfig())
    assert resolve_rootfs(str(root)).digest == src.digest
    copy = unpacked(src, tmp_path, "copy")
    assert (copy / "bin" / "sh").read_text() == "v1"
    assert os.readlink(copy / "bin") == "usr/bin"
    assert (copy / "hard").stat().st_ino == (copy / "usr" / "bin" / "sh").stat().st_ino
    assert (copy / ".wh.plain").exists()
    assert resolve_rootfs(copy).digest == src.digest  # modes, owners, ns mtimes all kept
    (root / "usr" / "bin" / "sh").write_text("v2")
    os.utime(root / "usr" / "bin" / "sh", ns=(1, 1))
    changed = resolve_rootfs(root).digest
    assert changed != src.digest
    (root / "usr" / "bin" / "sh").chmod(0o755)
    assert resolve_rootfs(root).digest != changed


def test_rootfs_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        resolve_rootfs(tmp_path / "missing")
    (tmp_path / "file").touch()
    with pytest.raises(ImageError, match="not a directory"):
        resolve_rootfs(tmp_path / "file")
