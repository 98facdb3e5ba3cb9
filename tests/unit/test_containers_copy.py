"""`vmpod cp` path safety: container symlinks never lead to host paths, links
swapped in are replaced rather than followed, contents survive both ways."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vmpod.containers.copy import copy_in, copy_out
from vmpod.containers.records import ContainerError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "hostname").write_text("container\n")
    (r / "tmp").mkdir()
    return r


def test_files_and_trees_both_ways(root: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    src = tmp_path / "big"
    src.write_bytes(data)
    copy_in(root, src, "/tmp/")
    assert (root / "tmp" / "big").read_bytes() == data
    copy_in(root, src, "/tmp/renamed")
    out = tmp_path / "out"
    out.mkdir()
    copy_out(root, "/tmp/renamed", out)
    assert hashlib.sha256((out / "renamed").read_bytes()).digest() == hashlib.sha256(data).digest()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    (tree / "link").symlink_to("/etc/shadow")
    copy_in(root, tree, "/tmp")
    assert (root / "tmp/tree/sub/f").read_text() == "x"
    assert os.readlink(root / "tmp/tree/link") == "/etc/shadow"  # copied as a link
    copy_out(root, "/tmp/tree", out)
    assert (out / "tree/sub/f").read_text() == "x"


def test_absolute_links_in_the_container_stay_in_the_container(root: Path, tmp_path: Path) -> None:
    (root / "tmp" / "escape").symlink_to("/etc")  # the host's /etc if followed on the host
    out = tmp_path / "host"
    out.mkdir()
    copy_out(root, "/tmp/escape/hostname", out)
    assert (out / "hostname").read_text() == "container\n"
    src = tmp_path / "payload"
    src.write_text("evil")
    copy_in(root, src, "/tmp/escape/")  # lands in the container's /etc
    assert (root / "etc" / "payload").read_text() == "evil"
    (root / "tmp" / "up").symlink_to("../../../../../../")
    copy_in(root, src, "/tmp/up/dropped")
    assert (root / "dropped").read_text() == "evil"
    assert not Path("/dropped").exists()


def test_a_link_where_a_file_goes_is_replaced_not_followed(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host data")
    tree = tmp_path / "d"
    tree.mkdir()
    (tree / "f").write_text("new")
    (root / "tmp" / "d").mkdir()
    (root / "tmp" / "d" / "f").symlink_to(victim)  # what a hostile container prepares
    copy_in(root, tree, "/tmp")
    assert victim.read_text() == "host data"
    assert (root / "tmp" / "d" / "f").read_text() == "new" and not (root / "tmp" / "d" / "f").is_symlink()


def test_missing_paths(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="no such file"):
        copy_out(root, "/nope", tmp_path)
    with pytest.raises(ContainerError, match="no such directory in the container"):
        copy_in(root, root / "etc" / "hostname", "/a/b/c")
    with pytest.raises(ContainerError, match="on the host"):
        copy_in(root, tmp_path / "missing", "/tmp")
