"""Layer application: whiteouts, metadata and every path-escape attempt we refuse."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from vmpod.errors import ImageError, UnsafeLayerError
from vmpod.images.layers import LayerApplier, apply_tar
from vmpod.images.stream import HashingReader

MTIME = 1_600_000_000
Member = tuple[tarfile.TarInfo, bytes | None]


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    target: str = "",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, target, mode, MTIME
    info.uid, info.gid = uid, gid
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def F(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    return member(name, data=data, mode=mode, uid=uid, gid=gid)


def D(name: str, mode: int = 0o755) -> Member:
    return member(name, tarfile.DIRTYPE, mode=mode)


def L(name: str, target: str) -> Member:
    return member(name, tarfile.SYMTYPE, target=target, mode=0o777)


def H(name: str, target: str) -> Member:
    return member(name, tarfile.LNKTYPE, target=target)


def tar_bytes(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def apply_layers(dest: Path, *layers: list[Member]) -> None:
    applier = LayerApplier(dest)
    for number, layer in enumerate(layers, 1):
        applier.begin_layer(f"layer {number}")
        apply_tar(applier, HashingReader(io.BytesIO(tar_bytes(*layer))))
    applier.finish()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "dest").mkdir()
    return tmp_path / "dest"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to dest that no layer may touch."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim").write_text("orig")
    return tmp_path / "outside"


def test_files_dirs_links_and_metadata(dest: Path) -> None:
    apply_layers(
        dest,
        [
            D("usr", mode=0o750),
            F("usr/su", b"#!", mode=0o4755, uid=1234, gid=4321),
            L("usr/link", "su"),
            H("usr/hard", "/usr/su"),
            F("implicit/parent/file", b"x"),
            F("/abs/file", b"in-root"),
        ],
    )
    assert (dest / "abs" / "file").read_bytes() == b"in-root"  # leading '/' means the root
    su = dest / "usr" / "su"
    assert su.read_bytes() == b"#!"
    assert stat.S_IMODE(su.stat().st_mode) == 0o4755
    assert su.stat().st_mtime == MTIME
    assert stat.S_IMODE((dest / "usr").stat().st_mode) == 0o750
    assert (dest / "usr").stat().st_mtime == MTIME  # applied after the children were written
    assert os.readlink(dest / "usr" / "link") == "su"
    assert (dest / "usr" / "hard").stat().st_ino == su.stat().st_ino
    assert (dest / "implicit" / "parent" / "file").read_bytes() == b"x"
    if os.geteuid() == 0:
        assert (su.stat().st_uid, su.stat().st_gid) == (1234, 4321)


def test_relative_symlink_inside_root_is_followed(dest: Path) -> None:
    apply_layers(dest, [D("usr"), D("usr/bin"), L("bin", "usr/bin")], [F("bin/sh", b"sh")])
    assert (dest / "usr" / "bin" / "sh").read_bytes() == b"sh"
    assert os.readlink(dest / "bin") == "usr/bin"


def test_symlink_chain_with_dotdot_inside_root_is_followed(dest: Path) -> None:
    apply_layers(
        dest,
        [D("usr"), D("usr/lib"), L("lib", "usr/lib"), L("l2", "lib/../lib")],
        [F("l2/f", b"x"), D("l2/sub"), F("lib/sub/g", b"y")],
    )
    assert (dest / "usr" / "lib" / "f").read_bytes() == b"x"
    assert (dest / "usr" / "lib" / "sub" / "g").read_bytes() == b"y"
    assert os.readlink(dest / "l2") == "lib/../lib"


def test_whiteouts_and_opaque_dirs_across_layers(dest: Path) -> None:
    apply_layers(
        dest,
        [F("a/f1", b"1"), F("a/f2", b"2"), F("b/x"), F("b/sub/old"), F("c/gone"), F("keep")],
        # The opaque marker follows b/y on purpose: entries of the same layer survive it.
        [
            F("a/.wh.f1"),
            F("b/y", b"y"),
            F("b/.wh..wh..opq"),
            D("b/sub"),
            F("b/sub/new"),
            F(".wh.c"),
            F("a/.wh.never-existed"),
        ],
    )
    assert sorted(os.listdir(dest / "a")) == ["f2"]
    assert sorted(os.listdir(dest / "b")) == ["sub", "y"]
    assert os.listdir(dest / "b" / "sub") == ["new"]
    assert not (dest / "c").exists()
    assert (dest / "keep").exists()
    assert not list(dest.rglob(".wh.*"))


def test_opaque_dir_through_in_root_symlink(dest: Path) -> None:
    apply_layers(
        dest, [D("real"), F("real/old"), L("alias", "real")], [F("alias/.wh..wh..opq"), F("alias/new")]
    )
    assert os.listdir(dest / "real") == ["new"]


UNSAFE = {
    "dotdot": ([[F("../escape")]], "../escape"),
    "absolute-dotdot": ([[F("/../../escape")]], "/../../escape"),
    "nested-dotdot": ([[F("a/../../escape")]], "a/../../escape"),
    "absolute-symlink-parent": ([[L("etc", "{outside}"), F("etc/evil")]], "etc/evil"),
    "absolute-symlink-parent-lower-layer": ([[L("etc", "{outside}")], [F("etc/evil")]], "etc/evil"),
    "escaping-symlink-parent": ([[L("up", "../outside"), F("up/evil")]], "up/evil"),
    "escaping-symlink-chain": ([[L("a", "b"), L("b", "x/../../outside"), F("a/evil")]], "a/evil"),
    "escaping-symlink-dir-entry": ([[L("up", ".."), D("up/outside/newdir")]], "up/outside"),
    "escaping-hardlink": ([[H("h", "../outside/victim")]], "../outside/victim"),
    "hardlink-via-escaping-symlink": ([[L("s", "../outside"), H("h", "s/victim")]], "h"),
    "hardlink-via-absolute-symlink": ([[L("s", "{outside}"), H("h", "s/victim")]], "h"),
    "symlink-loop": ([[L("loop", "loop"), F("loop/x")]], "loop/x"),
    "whiteout-via-escaping-symlink": ([[L("up", "../outside"), F("up/.wh.victim")]], "up/.wh.victim"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_entries_are_refused(case: str, dest: Path, outside: Path, tmp_path: Path) -> None:
    layers, entry = UNSAFE[case]
    resolved = [[(info, data) for info, data in layer] for layer in layers]
    for layer in resolved:
        for info, _ in layer:
            info.linkname = info.linkname.replace("{outside}", str(outside))
    with pytest.raises(UnsafeLayerError) as err:
        apply_layers(dest, *resolved)
    assert entry in str(err.value)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "orig"
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]


@pytest.mark.parametrize("target", ["abs", "../outside/victim"])
def test_file_replacing_symlink_does_not_write_through(dest: Path, outside: Path, target: str) -> None:
    link = str(outside / "victim") if target == "abs" else target
    apply_layers(dest, [L("x", link), L("d", str(outside))], [F("x", b"new"), D("d"), F("d/f")])
    assert (outside / "victim").read_text() == "orig"
    assert sorted(os.listdir(outside)) == ["victim"]
    assert not (dest / "x").is_symlink() and (dest / "x").read_bytes() == b"new"
    assert not (dest / "d").is_symlink() and (dest / "d" / "f").is_file()


def test_absolute_symlinks_are_created_but_not_followed(dest: Path) -> None:
    apply_layers(dest, [L("lib64", "/usr/lib64")])
    assert os.readlink(dest / "lib64") == "/usr/lib64"


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_devices_refused_when_not_root(kind: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UnsafeLayerError, match="dev/node"):
        apply_layers(dest, [member("dev/node", kind)])
    assert not (dest / "dev" / "node").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating device nodes needs root")
def test_devices_created_as_root(dest: Path) -> None:
    null = member("dev/null", tarfile.CHRTYPE, mode=0o666)
    null[0].devmajor, null[0].devminor = 1, 3
    apply_layers(dest, [null, member("run/fifo", tarfile.FIFOTYPE, mode=0o600)])
    st = (dest / "dev" / "null").stat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISFIFO((dest / "run" / "fifo").lstat().st_mode)


def test_readonly_dir_gets_its_mode_after_children(dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    apply_layers(dest, [D("ro", mode=0o555), F("ro/file", b"x")], [F("ro/second")])
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert sorted(os.listdir(dest / "ro")) == ["file", "second"]


def test_file_under_regular_file_is_an_error(dest: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        apply_layers(dest, [F("a"), F("a/b")])


def test_hardlink_to_missing_target_is_an_error(dest: Path) -> None:
    with pytest.raises(ImageError, match="missing"):
        apply_layers(dest, [H("h", "nope")])


def test_garbage_is_not_a_tar(dest: Path) -> None:
    applier = LayerApplier(dest)
    with pytest.raises(ImageError, match="not a valid tar"):
        apply_tar(applier, HashingReader(io.BytesIO(b"\x01" * 1024)))
