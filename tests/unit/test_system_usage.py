"""Disk usage as `du -sx` counts it, and the cache settings (config file, env override)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmpod.errors import ConfigError
from vmpod.storage.config import CAP_ENV, CONFIG_ENV, load_cache_settings, parse_size
from vmpod.storage.usage import disk_usage, human_size

MIB = 1 << 20


def _blocks(*paths: Path) -> int:
    return sum(os.lstat(p).st_blocks * 512 for p in paths)


def test_sparse_files_count_what_they_hold(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.write(b"data")
        f.truncate(100 * MIB)
    assert sparse.stat().st_size == 100 * MIB
    assert disk_usage(sparse) == _blocks(sparse) < MIB


def test_hard_links_count_once_even_across_trees(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_bytes(os.urandom(MIB))
    os.link(a / "f", a / "g")
    os.link(a / "f", b / "f")
    assert disk_usage(a) == _blocks(a, a / "f") >= MIB
    seen: set[tuple[int, int]] = set()
    assert disk_usage(a, seen) + disk_usage(b, seen) == _blocks(a, a / "f", b)


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(MIB))
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "to-dir").symlink_to(outside)
    (tree / "to-file").symlink_to(outside / "big")
    assert disk_usage(tree) == _blocks(tree, tree / "to-dir", tree / "to-file") < MIB
    assert disk_usage(tree / "to-dir") == _blocks(tree / "to-dir")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_another_file_system_below_is_not_counted(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tree / "mnt")], check=True)
    try:
        (tree / "mnt" / "data").write_bytes(os.urandom(4 * MIB))
        assert disk_usage(tree) == _blocks(tree) < MIB
    finally:
        subprocess.run(["umount", str(tree / "mnt")], check=True)


def test_missing_path_is_zero(tmp_path: Path) -> None:
    assert disk_usage(tmp_path / "nope") == 0
    assert (human_size(999), human_size(1234567), human_size(3 * 10**12)) == ("999 B", "1.2 MB", "3.0 TB")


def test_cache_cap_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "vmpod.toml"
    monkeypatch.setenv(CONFIG_ENV, str(conf))
    monkeypatch.delenv(CAP_ENV, raising=False)
    assert load_cache_settings().max_bytes == 0  # no file: no cap
    conf.write_text('[cache]\nmax_bytes = "2G"\n')
    assert load_cache_settings().max_bytes == 2 << 30
    conf.write_text("[cache]\nmax_bytes = 4096\n")
    assert load_cache_settings().max_bytes == 4096
    monkeypatch.setenv(CAP_ENV, "512M")  # the environment wins
    assert load_cache_settings().max_bytes == 512 * MIB
    assert (parse_size("1GiB", "x"), parse_size("7k", "x")) == (1 << 30, 7 << 10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nmax_bytes = 'lots'\n", "invalid size 'lots'"),
        ("[cache]\nmax_bytes = -1\n", "invalid size -1"),
        ("[cache]\nmax_byte = 1\n", "unknown setting cache.max_byte"),
        ("[cache\n", "cannot read the config file"),
        ("cache = 3\n", "[cache] must be a table"),
    ],
)
def test_bad_config_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    conf = tmp_path / "vmpod.toml"
    conf.write_text(text)
    monkeypatch.setenv(CONFIG_ENV, str(conf))
    monkeypatch.delenv(CAP_ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        load_cache_settings()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_env_cap_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "none.toml"))
    monkeypatch.setenv(CAP_ENV, "10 parsecs")
    with pytest.raises(ConfigError, match=CAP_ENV):
        load_cache_settings()
