"""Hostile input to `vmpod run` and vmpod-runtime: refused early, with one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmpod.cli import run as run_mod
from vmpod.cli.run import RunOptions
from vmpod.errors import ConfigError, ImageError
from vmpod.guest.progress import silent
from vmpod.images import source
from vmpod.images.source import pseudo_fs, resolve_rootfs
from vmpod.jsonsafe import json_depth, parse_json
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions
from vmpod.runtime import lifecycle
from vmpod.runtime.bundle import load_spec, translate
from vmpod.runtime.config import RuntimeConfig, load_config
from vmpod.runtime.errors import NotFound, RuntimeCliError
from vmpod.runtime.specgen import default_spec
from vmpod.runtime.state import ContainerState, Store
from vmpod.sandbox.build import check_config_size
from vmpod.sandbox.config import MAX_CONFIG_BYTES


def _state(cid: str) -> ContainerState:
    return ContainerState(id=cid, bundle="/b", rootfs="/b/rootfs", created="now")


# -- defect 10: concurrent delete --force ------------------------------------------


def test_delete_force_that_loses_the_race_succeeds(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    _, lock, mon = store.begin(_state("c1"))
    os.close(mon)  # a stopped container
    errors: list[BaseException] = []

    def loser() -> None:
        try:
            lifecycle.delete(store, "c1", force=True)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=loser)
    thread.start()
    time.sleep(0.3)  # the loser waits for the lock the winner holds
    store.remove("c1")  # the winner deletes the container...
    os.close(lock)  # ...and lets go
    thread.join(10)
    assert not thread.is_alive()
    assert errors == []
    # a delete --force of a container that is gone by the time it looks also succeeds
    lifecycle.delete(store, "c1", force=True)


def test_delete_without_force_of_a_vanished_container_still_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    with pytest.raises(NotFound):
        lifecycle.delete(store, "gone", force=False)


# -- defect 11: deeply nested JSON ---------------------------------------------------

RUNTIME = [sys.executable, "-c", "from vmpod.runtime.cli import main; main()"]


def _deep(levels: int) -> str:
    return '{"ociVersion": "1.0.2", "x": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("levels", [100, 100_000])
def test_deeply_nested_config_json_is_one_clear_line(tmp_path: Path, levels: int) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(_deep(levels))
    with pytest.raises(RuntimeCliError, match="nested too deeply"):
        load_spec(bundle)
    res = subprocess.run(
        [*RUNTIME, "--root", str(tmp_path / "root"), "create", "--bundle", str(bundle), "c1"],
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr and b"nested too deeply" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_deeply_nested_runtime_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    path.write_text('{"kernels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RuntimeCliError, match="nested too deeply"):
        load_config(str(path))


def test_ordinary_nesting_is_accepted() -> None:
    assert parse_json('{"a": [{"b": [1]}]}') == {"a": [{"b": [1]}]}
    assert json_depth([[[]]]) == 3 and json_depth(1) == 0


# -- defect 4: huge argv or environment ------------------------------------------------


@pytest.fixture
def no_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """`vmpod run` fails the test if it gets as far as building a disk or a VM."""

    def boot(*a: object, **k: object) -> object:
        raise AssertionError("vmpod run got past its checks")

    monkeypatch.setattr(run_mod, "rootfs_disk", boot)
    monkeypatch.setattr(run_mod, "prepare", boot)


@pytest.mark.parametrize(
    "process",
    [
        ProcessOptions(args=tuple(f"arg{i}" for i in range(100_000))),
        ProcessOptions(args=("true",), env=tuple(f"VAR{i}=value{i}" for i in range(10_000))),
    ],
    ids=["100k-args", "10k-env"],
)
def test_huge_argv_or_env_is_refused_before_boot(
    tmp_path: Path, no_boot: None, process: ProcessOptions
) -> None:
    (tmp_path / "rootfs").mkdir()
    opts = RunOptions(image="", rootfs=str(tmp_path / "rootfs"), process=process, network="none")
    with pytest.raises(ConfigError, match=f"too large for the agent channel \\(limit {MAX_CONFIG_BYTES}\\)"):
        asyncio.run(run_mod.run(Paths(home=tmp_path / "home", run=tmp_path / "run"), opts, silent))


def test_config_size_check_counts_escaped_bytes() -> None:
    check_config_size({"env": ["x" * (MAX_CONFIG_BYTES - 100)]})
    with pytest.raises(ConfigError):  # each non-ASCII character travels as \\uXXXX
        check_config_size({"env": ["\u00e9" * (MAX_CONFIG_BYTES // 3)]})


# -- defect 6: the host's / or a pseudo filesystem as a rootfs -------------------------


@pytest.mark.parametrize("path", ["/", "/proc", "/sys", "/proc/self", "/sys/fs/cgroup", "/dev"])
def test_host_root_and_pseudo_filesystems_are_no_rootfs(path: str) -> None:
    if path == "/dev" and os.stat("/dev").st_dev == os.stat("/").st_dev:
        pytest.skip("/dev is no mount of its own here")
    with pytest.raises(ImageError, match="host's"):
        resolve_rootfs(path)


def test_ordinary_directories_are_rootfs(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    assert resolve_rootfs(tmp_path).kind == "rootfs-dir"
    assert pseudo_fs(tmp_path) == "" and pseudo_fs("/proc") == "proc"


def test_vmpod_runtime_refuses_the_host_root_as_root_path(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = default_spec()
    spec["root"] = {"path": "/"}
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(RuntimeCliError, match="root.path: rootfs '/' is the host's root directory"):
        translate(load_spec(bundle), bundle, "c1", RuntimeConfig())
    spec["root"] = {"path": "/proc"}
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(RuntimeCliError, match="host's proc filesystem"):
        translate(load_spec(bundle), bundle, "c1", RuntimeConfig())


def test_the_digest_walk_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        (tmp_path / f"f{i}").touch()
    monkeypatch.setattr(source, "MAX_ROOTFS_ENTRIES", 10)
    with pytest.raises(ImageError, match="more than 10 entries"):
        source.rootfs_digest(tmp_path)


def test_the_digest_walk_refuses_a_mounted_proc(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(tmp_path / "proc")], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount proc here")
    try:
        with pytest.raises(ImageError, match="proc mounted on"):
            resolve_rootfs(tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "proc")], check=False)


# -- defect 5: non-UTF-8 bytes in arguments or environment ---------------------------------


def test_non_utf8_arguments_and_environment_are_refused_not_replaced() -> None:
    # Python keeps undecodable argv bytes as lone surrogates (surrogateescape);
    # they used to reach runc as U+FFFD. JSON cannot carry them: refuse, naming them.
    arg = b"caf\xe9".decode("utf-8", "surrogateescape")
    oci = default_spec()
    process = oci["process"]
    assert isinstance(process, dict)
    process["args"] = ["echo", arg]
    with pytest.raises(ConfigError, match=r"config.process.args\[1\] is not valid UTF-8 \(b'caf\\xe9'\)"):
        check_config_size(oci)
    process["args"] = ["echo", "café ✓"]  # real Unicode passes unchanged
    check_config_size(oci)
    process["env"] = ["PATH=/bin", b"X=\xff".decode("utf-8", "surrogateescape")]
    with pytest.raises(ConfigError, match=r"process.env\[1\] is not valid UTF-8"):
        check_config_size(oci)


def test_vmpod_run_refuses_non_utf8_argv_before_booting(tmp_path: Path) -> None:
    # the real CLI, with bytes in argv: refused before any asset is built or VM booted
    rootfs = tmp_path / "root"
    rootfs.mkdir()
    home, run = tmp_path / "home", tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "vmpod.cli", "run", "--rootfs", str(rootfs), "--", "echo", b"\xff\xfe"],
        capture_output=True,
        env={**os.environ, "VMPOD_HOME": str(home), "VMPOD_RUN": str(run)},
        timeout=60,
    )
    assert proc.returncode == 125, proc.stderr
    assert b"not valid UTF-8 (b'\\xff\\xfe')" in proc.stderr
    assert not (home / "guest").exists()  # nothing was built, nothing booted
