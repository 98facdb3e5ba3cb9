"""The OCI runtime config built from an image config and the user's options."""

from __future__ import annotations

import json

import pytest

from vmpod.errors import ConfigError
from vmpod.images import ImageConfig
from vmpod.runspec import (
    DEFAULT_CAPS,
    DEFAULT_PATH,
    MASKED,
    READONLY,
    ProcessOptions,
    build_spec,
    command,
    merge_env,
    user_of,
)

SH = ImageConfig(entrypoint=("/bin/sh", "-c"), cmd=("echo hi",))


# -- command ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,args,expected",
    [
        (SH, (), ("/bin/sh", "-c", "echo hi")),  # entrypoint + cmd
        (SH, ("ls -l",), ("/bin/sh", "-c", "ls -l")),  # args replace cmd
        (ImageConfig(cmd=("nginx", "-g", "daemon off;")), (), ("nginx", "-g", "daemon off;")),
        (ImageConfig(cmd=("nginx",)), ("sh", "-x"), ("sh", "-x")),
        (ImageConfig(entrypoint=("/entry",)), (), ("/entry",)),
        (ImageConfig(entrypoint=("/entry",)), ("a", "b"), ("/entry", "a", "b")),
        (ImageConfig(), ("true",), ("true",)),
    ],
)
def test_command_precedence(image: ImageConfig, args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert command(image, args) == expected


def test_no_command_anywhere() -> None:
    with pytest.raises(ConfigError, match="no command") as info:
        command(ImageConfig(env=("A=1",)), ())
    assert "--" in info.value.hint


# -- environment --------------------------------------------------------------------


def test_env_defaults() -> None:
    assert merge_env(ImageConfig(), (), tty=False, hostname="box") == [DEFAULT_PATH, "HOSTNAME=box"]
    assert DEFAULT_PATH.startswith("PATH=/usr/local/sbin:")


def test_image_env_then_user_overrides() -> None:
    image = ImageConfig(env=("PATH=/opt/bin:/bin", "LANG=C.UTF-8", "A=image"))
    env = merge_env(image, ("A=cli", "B=x=y", "EMPTY="), tty=False, hostname="h")
    # overriding keeps the variable's first position
    assert env == ["PATH=/opt/bin:/bin", "HOSTNAME=h", "LANG=C.UTF-8", "A=cli", "B=x=y", "EMPTY="]


def test_user_may_override_hostname_and_path() -> None:
    env = merge_env(ImageConfig(), ("HOSTNAME=other", "PATH=/x"), tty=False, hostname="h")
    assert env == ["PATH=/x", "HOSTNAME=other"]


def test_tty_sets_term() -> None:
    assert "TERM=xterm" in merge_env(ImageConfig(), (), tty=True, hostname="h")
    assert not any(e.startswith("TERM=") for e in merge_env(ImageConfig(), (), tty=False, hostname="h"))
    env = merge_env(ImageConfig(), ("TERM=dumb",), tty=True, hostname="h")
    assert [e for e in env if e.startswith("TERM=")] == ["TERM=dumb"]


def test_image_term_beats_tty_default_like_docker() -> None:
    env = merge_env(ImageConfig(env=("TERM=linux",)), (), tty=True, hostname="h")
    assert [e for e in env if e.startswith("TERM=")] == ["TERM=linux"]


@pytest.mark.parametrize("item", ["NOEQUALS", "=value", "", "=", " "])
def test_invalid_env_item(item: str) -> None:
    with pytest.raises(ConfigError, match="invalid environment variable") as info:
        merge_env(ImageConfig(), (item,), tty=False, hostname="h")
    assert "NAME=VALUE" in info.value.hint


def test_invalid_image_env_item() -> None:
    with pytest.raises(ConfigError):
        merge_env(ImageConfig(env=("BROKEN",)), (), tty=False, hostname="h")


# -- build_spec -----------------------------------------------------------------------


def test_full_spec_defaults() -> None:
    spec = build_spec(SH, ProcessOptions())
    json.dumps(spec)  # plain JSON for the agent
    assert spec["ociVersion"] == "1.0.2"
    assert spec["hostname"] == "vmpod"
    proc = spec["process"]
    assert isinstance(proc, dict)
    assert proc["args"] == ["/bin/sh", "-c", "echo hi"]
    assert proc["cwd"] == "/"
    assert proc["terminal"] is False
    assert proc["env"] == [DEFAULT_PATH, "HOSTNAME=vmpod"]
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["noNewPrivileges"] is True
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    caps = proc["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for v in caps.values():
        assert v == list(DEFAULT_CAPS)
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPS
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    linux = spec["linux"]
    assert isinstance(linux, dict)
    ns = [n["type"] for n in linux["namespaces"]]
    assert ns == ["pid", "ipc", "uts", "mount", "cgroup"]
    assert "network" not in ns and "user" not in ns
    assert linux["maskedPaths"] == list(MASKED)
    assert linux["readonlyPaths"] == list(READONLY)
    mounts = spec["mounts"]
    assert isinstance(mounts, list)
    dests = [m["destination"] for m in mounts]
    assert dests[:2] == ["/proc", "/dev"]
    assert {"/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"} <= set(dests)
    sysfs = next(m for m in mounts if m["destination"] == "/sys")
    assert "ro" in sysfs["options"]


def test_options_flow_into_spec() -> None:
    opts = ProcessOptions(
        args=("id",), env=("X=1",), workdir="/srv", tty=True, hostname="web1", read_only=True, nofile=65536
    )
    spec = build_spec(ImageConfig(cmd=("sleep", "1"), working_dir="/app"), opts)
    proc = spec["process"]
    assert isinstance(proc, dict)
    assert proc["args"] == ["id"]
    assert proc["cwd"] == "/srv"
    assert proc["terminal"] is True
    assert proc["env"] == [DEFAULT_PATH, "HOSTNAME=web1", "TERM=xterm", "X=1"]
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}]
    assert spec["hostname"] == "web1"
    assert spec["root"] == {"path": "rootfs", "readonly": True}


def test_image_workdir_used_when_no_option() -> None:
    spec = build_spec(ImageConfig(cmd=("true",), working_dir="/app"), ProcessOptions())
    assert spec["process"]["cwd"] == "/app"  # type: ignore[index]


@pytest.mark.parametrize("image_wd,opt_wd", [("", "app"), ("app", ""), ("/ok", "./x"), ("", "~/x")])
def test_relative_workdir_is_config_error(image_wd: str, opt_wd: str) -> None:
    with pytest.raises(ConfigError, match="not absolute"):
        build_spec(ImageConfig(cmd=("true",), working_dir=image_wd), ProcessOptions(workdir=opt_wd))


def test_spec_without_command_is_config_error() -> None:
    with pytest.raises(ConfigError, match="no command"):
        build_spec(ImageConfig(), ProcessOptions())


def test_spec_with_bad_env_is_config_error() -> None:
    with pytest.raises(ConfigError):
        build_spec(SH, ProcessOptions(env=("oops",)))


def test_lists_are_fresh_per_spec() -> None:
    a, b = build_spec(SH, ProcessOptions()), build_spec(SH, ProcessOptions())
    a["linux"]["maskedPaths"].append("/x")  # type: ignore[index]
    assert "/x" not in b["linux"]["maskedPaths"]  # type: ignore[index]
    assert "/x" not in MASKED


def test_user_of() -> None:
    image = ImageConfig(cmd=("true",), user="nginx")
    assert user_of(image, ProcessOptions()) == "nginx"
    assert user_of(image, ProcessOptions(user="0:0")) == "0:0"
    assert user_of(ImageConfig(), ProcessOptions()) == ""
