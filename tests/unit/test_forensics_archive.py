"""Evidence archives without VMs: the manifest, verify (changed, missing, added,
unsafe members), extract, and the writable layer's diff round trip."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics.rootfsdiff import apply_diff, read_deleted, write_diff


def _manifest(files: dict[str, str]) -> a.Manifest:
    return a.Manifest(
        files=files,
        captured="2026-01-01T00:00:00Z",
        host="h",
        host_kernel="6.18",
        guest_kernel="6.1",
        criu="3.17.1",
        runc="runc 1.1.5",
        vmpod="0.1.0",
        command_line=("vmpod", "forensics", "capture", "x", "-o", "a.tar"),
        container={"id": "c", "name": "x"},
        leave_running=True,
    )


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    stage = tmp_path / "stage"
    (stage / "checkpoint").mkdir(parents=True)
    (stage / "checkpoint" / "pages-1.img").write_bytes(os.urandom(5000))
    (stage / "spec.dump").write_text("{}")
    out = tmp_path / "evidence.tar"
    a.write_archive(stage, out, _manifest(a.digest_tree(stage)))
    return out


def _rewrite(src: Path, dest: Path, drop: str = "", extra: tarfile.TarInfo | None = None) -> None:
    """A copy of ``src`` without member ``drop`` / with ``extra`` appended."""
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for info in tin:
            if info.name != drop:
                tout.addfile(info, tin.extractfile(info) if info.isreg() else None)
        if extra is not None:
            data = b"x" * extra.size
            tout.addfile(extra, io.BytesIO(data) if extra.isreg() else None)


def test_intact_archive_verifies(archive: Path) -> None:
    v = a.verify(archive)
    assert v.ok and set(v.manifest.files) == {"checkpoint/pages-1.img", "spec.dump"}
    assert v.manifest.command_line[:3] == ("vmpod", "forensics", "capture")


def test_flipped_byte_names_the_file(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        offset = tar.getmember("checkpoint/pages-1.img").offset_data
    with open(archive, "r+b") as fh:
        fh.seek(offset + 100)
        b = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([b[0] ^ 1]))
    v = a.verify(archive)
    assert (v.changed, v.missing, v.added) == (("checkpoint/pages-1.img",), (), ())
    assert "changed: checkpoint/pages-1.img" in a.describe(v)


def test_missing_and_added_files(archive: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone.tar"
    _rewrite(archive, gone, drop="spec.dump")
    assert a.verify(gone).missing == ("spec.dump",)
    extra = tarfile.TarInfo("checkpoint/extra.img")
    extra.size = 3
    more = tmp_path / "more.tar"
    _rewrite(archive, more, extra=extra)
    assert a.verify(more).added == ("checkpoint/extra.img",)
    link = tarfile.TarInfo("spec2.dump")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    linked = tmp_path / "link.tar"
    _rewrite(archive, linked, extra=link)
    assert a.verify(linked).added == ("spec2.dump",)  # not a regular file: never extracted
    with pytest.raises(ForensicsError, match="fails verification"):
        a.extract(linked, tmp_path / "out", 1 << 20)


def test_unsafe_names_and_no_manifest(archive: Path, tmp_path: Path) -> None:
    evil = tarfile.TarInfo("../escape")
    evil.size = 1
    bad = tmp_path / "evil.tar"
    _rewrite(archive, bad, extra=evil)
    with pytest.raises(ForensicsError, match="not a plain relative path"):
        a.verify(bad)
    bare = tmp_path / "bare.tar"
    _rewrite(archive, bare, drop=a.MANIFEST)
    with pytest.raises(ForensicsError, match="no vmpod-manifest.json"):
        a.verify(bare)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ForensicsError, match="not a readable tar"):
        a.verify(junk)


def test_truncated_archive_is_refused(archive: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(ForensicsError):
        a.extract(cut, tmp_path / "out", 1 << 20)


def test_extract_checks_and_caps(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    m = a.extract(archive, out, 1 << 20)
    assert m is not None and a.digest_tree(out) == m.files
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(ForensicsError, match="more than 100 bytes"):
        a.extract(archive, again, 100)


def test_manifest_schema() -> None:
    m = _manifest({"a": "0" * 64})
    assert a.Manifest.from_json(m.to_json()) == m
    obj = json.loads(m.to_json())
    obj["leave_running"] = "yes"
    with pytest.raises(ForensicsError, match="wrong type"):
        a.Manifest.from_json(json.dumps(obj).encode())
    with pytest.raises(ForensicsError, match="not a vmpod-forensics/1"):
        a.Manifest.from_json(b'{"format": "other"}')
    with pytest.raises(ForensicsError, match="not valid JSON"):
        a.Manifest.from_json(b"{")


def test_check_tree_refuses_links_and_size(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"x" * 10)
    assert a.check_tree(tmp_path, 100, "images") == 10
    with pytest.raises(ForensicsError, match="exceeds 5 bytes"):
        a.check_tree(tmp_path, 5, "images")
    (tmp_path / "link").symlink_to("/etc/passwd")
    with pytest.raises(ForensicsError, match="link is not a regular file"):
        a.check_tree(tmp_path, 100, "images")


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (char 0:0) and trusted xattrs need root")
def test_rootfs_diff_round_trip(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "new.conf").write_text("new\n")
    (upper / "data.log").write_text("1\n2\n")
    (upper / "bin").mkdir()
    (upper / "bin" / "sh").symlink_to("busybox")
    os.mknod(upper / "etc" / "passwd", stat.S_IFCHR | 0o600, 0)  # deleted from the image
    (upper / "opt").mkdir()
    os.setxattr(upper / "opt", "trusted.overlay.opaque", b"y")  # replaced wholesale
    (upper / "opt" / "only").write_text("o")
    tar_path, deleted_path = tmp_path / "rootfs-diff.tar", tmp_path / "deleted.files"
    assert write_diff(upper, tar_path, deleted_path) == 2
    deleted = read_deleted(deleted_path)
    assert sorted(deleted) == ["/etc/passwd", "/opt"]
    with tarfile.open(tar_path) as tar:
        assert "etc/passwd" not in tar.getnames() and "data.log" in tar.getnames()

    new = tmp_path / "new"
    new.mkdir()
    apply_diff(tar_path, deleted, new)
    assert (new / "data.log").read_text() == "1\n2\n"
    assert os.readlink(new / "bin" / "sh") == "busybox"
    st = (new / "etc" / "passwd").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(new / "opt", "trusted.overlay.opaque") == b"y"
    assert (new / "opt" / "only").read_text() == "o"


def test_deleted_files_must_be_a_list_of_paths(tmp_path: Path) -> None:
    bad = tmp_path / "deleted.files"
    bad.write_text('{"a": 1}')
    with pytest.raises(ForensicsError, match="JSON list of paths"):
        read_deleted(bad)
    bad.write_text('["/"]')
    with pytest.raises(ForensicsError, match="JSON list of paths"):
        read_deleted(bad)
    assert read_deleted(tmp_path / "none") == []
    with pytest.raises(ForensicsError, match="not a plain absolute path"):
        apply_diff(None, ["/a/../../b"], tmp_path)
