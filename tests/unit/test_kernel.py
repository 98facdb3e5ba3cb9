"""Guest kernels: vmlinux extraction from synthetic bzImages, name resolution, cache."""

from __future__ import annotations

import gzip
import json
import lzma
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmpod.errors import AssetError, ConfigError
from vmpod.guest import kernel
from vmpod.guest.kernel import Kernel, extract_vmlinux, load_cached, resolve_package
from vmpod.paths import Paths


def fake_elf(machine: int = 0x3E, size: int = 4096, seed: int = 0) -> bytes:
    """An ELF header prefix with ``e_machine`` at offset 18, then filler."""
    head = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", machine)
    return head + random.Random(seed).randbytes(size)


def bzimage(payload: bytes, *, setup_sects: int = 3, offset: int = 0x60) -> bytes:
    """A minimal bzImage: boot header, setup sectors, then the payload at
    ``(setup_sects + 1) * 512 + payload_offset``; other bytes are noise."""
    sects = setup_sects or 4
    start = (sects + 1) * 512 + offset
    img = bytearray(random.Random(1).randbytes(start + len(payload) + 64))
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, offset, len(payload))
    img[start : start + len(payload)] = payload
    return bytes(img)


def size_trailer(data: bytes) -> bytes:
    """The kernel build appends the uncompressed size (le32) to xz/lz4/zstd payloads."""
    return struct.pack("<I", len(data))


# -- extract_vmlinux -------------------------------------------------------------


def test_gzip_payload() -> None:
    elf = fake_elf()
    assert extract_vmlinux(bzimage(gzip.compress(elf))) == elf


def test_xz_payload_with_size_trailer() -> None:
    elf = fake_elf(size=20000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert extract_vmlinux(bzimage(payload + size_trailer(elf))) == elf


@pytest.mark.parametrize("setup_sects,offset", [(0, 0x40), (1, 0), (27, 0x3C0)])
def test_payload_location_from_header(setup_sects: int, offset: int) -> None:
    # setup_sects 0 means 4 (boot protocol)
    elf = fake_elf(seed=setup_sects)
    img = bzimage(gzip.compress(elf), setup_sects=setup_sects, offset=offset)
    assert extract_vmlinux(img) == elf


def test_wrong_offset_is_not_silently_accepted() -> None:
    img = bytearray(bzimage(gzip.compress(fake_elf()), setup_sects=3, offset=0x60))
    struct.pack_into("<I", img, 0x248, 0x61)  # off by one
    with pytest.raises(AssetError):
        extract_vmlinux(bytes(img))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HdrS" * 10,
        bytes(0x250),
        bytes(0x202) + b"HdrT" + bytes(0x100),
        (bytes(0x202) + b"HdrS")[:0x24F],  # too short for the payload fields
    ],
)
def test_not_a_bzimage(data: bytes) -> None:
    with pytest.raises(AssetError, match="not a bzImage"):
        extract_vmlinux(data)


@pytest.mark.parametrize(
    "inner",
    [
        b"just some text, not ELF" * 10,
        fake_elf(machine=0xB7),  # aarch64
        fake_elf(machine=0x03),  # i386
        b"\x7fELF",  # truncated header
    ],
)
def test_payload_not_x86_64_elf(inner: bytes) -> None:
    with pytest.raises(AssetError, match="not an x86-64 ELF"):
        extract_vmlinux(bzimage(gzip.compress(inner)))


@pytest.mark.parametrize(
    "payload",
    [
        b"BZh91AY&SY" + bytes(40),  # bzip2
        b"\x5d\x00\x00\x80\x00" + bytes(40),  # lzma
        b"\x89LZO" + bytes(40),  # lzo
        fake_elf(),  # uncompressed
    ],
)
def test_unknown_compression(payload: bytes) -> None:
    with pytest.raises(AssetError, match="unsupported kernel compression"):
        extract_vmlinux(bzimage(payload))


def test_truncated_gzip() -> None:
    payload = gzip.compress(fake_elf(size=50000))
    with pytest.raises(AssetError, match="cannot decompress"):
        extract_vmlinux(bzimage(payload[: len(payload) // 2]))


def test_corrupt_xz() -> None:
    payload = bytearray(lzma.compress(fake_elf(), format=lzma.FORMAT_XZ))
    payload[40:60] = b"\xff" * 20
    with pytest.raises(AssetError, match="cannot decompress"):
        extract_vmlinux(bzimage(bytes(payload)))


def test_corrupt_gzip() -> None:
    payload = bytearray(gzip.compress(fake_elf(size=50000)))
    payload[10:40] = b"\xff" * 30
    with pytest.raises(AssetError):
        extract_vmlinux(bzimage(bytes(payload)))


def test_truncated_xz() -> None:
    elf = fake_elf(size=200_000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    with pytest.raises(AssetError):
        extract_vmlinux(bzimage(payload[: len(payload) // 2]))


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_zstd_payload_via_tool() -> None:
    elf = fake_elf(size=30000)
    payload = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert extract_vmlinux(bzimage(payload + size_trailer(elf))) == elf


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 not installed")
def test_lz4_legacy_payload_via_tool() -> None:
    elf = fake_elf(size=30000)
    payload = subprocess.run(["lz4", "-l", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert payload[:4] == b"\x02\x21\x4c\x18"
    assert extract_vmlinux(bzimage(payload + size_trailer(elf))) == elf


LZ4_MAGIC = b"\x02\x21\x4c\x18"


def test_tool_payload_goes_through_stdin_whatever_the_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tail = shutil.which("tail")
    assert tail is not None
    fake = tmp_path / "lz4"  # drops the magic and exits 1, as lz4 does on the size trailer
    fake.write_text(f"#!/bin/sh\n{tail} -c +5\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    elf = fake_elf()
    assert extract_vmlinux(bzimage(LZ4_MAGIC + elf)) == elf


def test_missing_tool_is_an_asset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no lz4 here
    with pytest.raises(AssetError, match="'lz4' is not installed"):
        extract_vmlinux(bzimage(LZ4_MAGIC + b"payload"))


def test_aliases_are_written_atomically(paths: Paths) -> None:
    paths.kernels.mkdir(parents=True)
    kernel._write_json(paths.kernels / "aliases.json", {"6.1": "6.1.0-47-cloud-amd64"})
    kernel._write_json(paths.kernels / "aliases.json", {"6.12": "x"})
    assert json.loads((paths.kernels / "aliases.json").read_text()) == {"6.12": "x"}
    assert [p.name for p in paths.kernels.iterdir()] == ["aliases.json"]  # no temp left


# -- resolve_package (branches that raise before apt is asked) ----------------------


@pytest.fixture
def no_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> object:
        raise AssertionError("apt must not be called")

    monkeypatch.setattr(kernel, "_apt_names", boom)
    monkeypatch.setattr(kernel, "run", boom)


@pytest.mark.parametrize("name", ["latest", "linux", "", "v6.1", "cloud", "6", "6.x"])
def test_unknown_kernel_name(no_apt: None, name: str) -> None:
    with pytest.raises(ConfigError, match="unknown kernel") as info:
        resolve_package(name)
    assert "debian:RELEASE" in info.value.hint


@pytest.mark.parametrize(
    "name",
    ["debian:", "debian:../../etc/passwd", "debian:6.1/x", "debian:linux", "debian:6.1 evil", "debian:.6"],
)
def test_invalid_debian_release(no_apt: None, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid kernel name"):
        resolve_package(name)


def test_alias_pattern_and_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def names(pattern: str) -> list[str]:
        asked.append(pattern)
        return []

    monkeypatch.setattr(kernel, "_apt_names", names)
    with pytest.raises(ConfigError, match="not found"):
        resolve_package("6.1")
    assert len(asked) == 1
    rx = re.compile(asked[0] + "$")
    assert rx.match("linux-image-6.1.0-56-cloud-amd64")
    assert rx.match("linux-image-6.1.0-56-cloud-amd64-unsigned")
    assert not rx.match("linux-image-6.12.117+deb12-cloud-amd64")  # another series
    assert not rx.match("linux-image-6.1.0-56-amd64")  # another flavour


def test_release_pattern_and_newest_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    listing = (
        "linux-image-6.12.9+deb12-cloud-amd64-unsigned\n"
        "linux-image-6.12.10+deb12-cloud-amd64-unsigned\n"
        "linux-image-6.12.10+deb12-cloud-amd64-unsigned-dbg\n"
        "linux-image-6.12.2+deb12-cloud-amd64-unsigned\n"
        "linux-image-6.12.10+deb12-amd64-unsigned\n"
        "linux-image-6.1.0-47-amd64\n"
        "linux-image-6.1.0-47-amd64-unsigned\n"
        "linux-image-6.1.0-47-amd64-dbg\n"
    )
    argvs: list[list[str]] = []

    def fake_run(argv: list[str], **kw: object) -> SimpleNamespace:
        argvs.append(list(argv))
        return SimpleNamespace(stdout=listing.encode())

    monkeypatch.setattr(kernel, "run", fake_run)
    assert resolve_package("6.12") == "linux-image-6.12.10+deb12-cloud-amd64-unsigned"
    assert resolve_package("6.12-generic") == "linux-image-6.12.10+deb12-amd64-unsigned"
    assert argvs[0] == ["apt-cache", "pkgnames", "linux-image-6"]
    got = resolve_package("debian:6.1.0-47-amd64")
    assert got in ("linux-image-6.1.0-47-amd64", "linux-image-6.1.0-47-amd64-unsigned")
    assert resolve_package("6.1.0-47-amd64") == got
    with pytest.raises(ConfigError, match="not found"):
        resolve_package("debian:6.1.0-48-amd64")


# -- cache -------------------------------------------------------------------------


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "h", run=tmp_path / "r")


def _install(paths: Paths, release: str, pvh: bool = True) -> Path:
    root = paths.kernels / release
    root.mkdir(parents=True)
    (root / "kernel.json").write_text(
        json.dumps({"release": release, "package": f"linux-image-{release}", "version": "1.0", "pvh": pvh})
    )
    return root


@pytest.mark.parametrize(
    "name", ["6.1", "6.12-generic", "debian:6.1.0-47-amd64", "nonsense", "", "../../etc"]
)
def test_load_cached_unknown_is_none(paths: Paths, name: str) -> None:
    assert load_cached(paths, name) is None
    paths.kernels.mkdir(parents=True, exist_ok=True)
    assert load_cached(paths, name) is None
    assert not paths.home.joinpath("tmp").exists()


def test_load_cached_by_release_and_alias(paths: Paths) -> None:
    root = _install(paths, "6.1.0-47-cloud-amd64")
    expect = Kernel(
        release="6.1.0-47-cloud-amd64",
        package="linux-image-6.1.0-47-cloud-amd64",
        version="1.0",
        root=root,
        pvh=True,
    )
    assert load_cached(paths, "6.1.0-47-cloud-amd64") == expect
    assert load_cached(paths, "debian:6.1.0-47-cloud-amd64") == expect
    assert load_cached(paths, "6.1") is None
    (paths.kernels / "aliases.json").write_text(json.dumps({"6.1": "6.1.0-47-cloud-amd64"}))
    assert load_cached(paths, "6.1") == expect
    assert expect.boot_image == root / "vmlinux"
    assert expect.modules_dir == root / "lib/modules/6.1.0-47-cloud-amd64"
    assert kernel.cached_kernels(paths) == [expect]


def test_load_cached_half_built_dir_is_ignored(paths: Paths) -> None:
    (paths.kernels / "6.1.0-47-cloud-amd64").mkdir(parents=True)
    assert load_cached(paths, "6.1.0-47-cloud-amd64") is None
    assert kernel.cached_kernels(paths) == []


def test_alias_escaping_the_cache_is_ignored(paths: Paths, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "kernel.json").write_text(
        json.dumps({"release": "x", "package": "p", "version": "v", "pvh": False})
    )
    paths.kernels.mkdir(parents=True)
    (paths.kernels / "aliases.json").write_text(json.dumps({"6.1": "../../evil"}))
    assert load_cached(paths, "6.1") is None


def test_bzimage_boot_image_without_pvh(paths: Paths) -> None:
    root = _install(paths, "6.12.10+deb12-cloud-amd64", pvh=False)
    k = load_cached(paths, "6.12.10+deb12-cloud-amd64")
    assert k is not None and k.pvh is False
    assert k.boot_image == root / "vmlinuz"
