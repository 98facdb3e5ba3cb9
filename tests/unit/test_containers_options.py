"""docker-run option parsing: -v specs, --env-file, user names from the image."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmpod.containers.options import check_volumes, make_sources, parse_volume, read_env_file, user_ids
from vmpod.containers.records import Mount
from vmpod.errors import ConfigError


def test_volume_specs() -> None:
    assert parse_volume("/h:/c") == Mount("/h", "/c", False)
    assert parse_volume("/h/:/c/x/../y:ro") == Mount("/h", "/c/y", True)


@pytest.mark.parametrize(
    "spec",
    ["rel:/c", "/h:rel", "/h", "/h:/c:rx", "/h:/c:ro:x", ":/c", "/h:", "/h:/", "named:/data", "/a,b:/c"],
)
def test_bad_volume_specs_are_one_line_errors(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_volume(spec)
    assert "\n" not in str(err.value)


def test_duplicate_destinations_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        check_volumes((Mount("/a", "/c"), Mount("/b", "/c")))
    src = tmp_path / "new" / "dir"
    make_sources((Mount(str(src), "/c"),))
    assert src.is_dir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="dangling"):
        make_sources((Mount(str(tmp_path / "dangling"), "/c"),))


def test_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_SET", raising=False)
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\nB=x=y\n  C=\nFROM_HOST\nNOT_SET\n")
    assert read_env_file(str(f)) == ("A=1", "B=x=y", "C=", "FROM_HOST=h")
    f.write_text("BAD NAME=1\n")
    with pytest.raises(ConfigError, match="env:1"):
        read_env_file(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        read_env_file(str(tmp_path / "missing"))


def test_user_names_come_from_the_image_never_the_host(tmp_path: Path) -> None:
    etc = tmp_path / "root" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n")
    (etc / "group").write_text("staff:x:50:\n")
    root = tmp_path / "root"
    assert user_ids(root, "") == {"uid": 0, "gid": 0}
    assert user_ids(root, "app") == {"uid": 1000, "gid": 1001}
    assert user_ids(root, "1000") == {"uid": 1000, "gid": 1001}
    assert user_ids(root, "app:staff") == {"uid": 1000, "gid": 50}
    assert user_ids(root, "7:8") == {"uid": 7, "gid": 8}
    with pytest.raises(ConfigError, match="unable to find user nobody"):
        user_ids(root, "nobody")
    # an image whose /etc/passwd is a link to the host's: resolved inside the image
    (etc / "passwd").unlink()
    (etc / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(ConfigError):
        user_ids(root, "root")
