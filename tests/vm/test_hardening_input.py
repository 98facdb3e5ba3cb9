"""Hostile input to vmpod-runtime on real VMs: racing deletes, a guest runtime that
fails before the container's process runs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.test_runtime_support import Runtime, assert_runtime_clean, make_bundle, runtime_env
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def rt(paths: Paths, assets: GuestAssets, work: Path) -> Iterator[Runtime]:
    runtime = Runtime(work / "root", runtime_env(paths, work / "runtime.json"), work / "log.json")
    yield runtime
    for cid in runtime("list", "--quiet").stdout.decode().split():
        runtime("delete", "--force", cid)
    assert_runtime_clean(paths, runtime.root)


def test_concurrent_forced_deletes_all_succeed(rt: Runtime, busybox: Path, work: Path) -> None:
    bundle = make_bundle(work / "race", busybox, ["sleep", "600"])
    ctr = rt.create("race", bundle, work)
    ctr.wait_created()
    rt("start", "race", check=True)
    procs = [
        subprocess.Popen(rt.argv("delete", "--force", "race"), env=rt.env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [(p.wait(120), p.stderr.read() if p.stderr else b"") for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert rt("state", "race").returncode == 1


def test_start_fails_with_the_guest_runtimes_message(rt: Runtime, busybox: Path, work: Path) -> None:
    # well-typed, so create takes it; runc fails in the guest before the process runs
    # (a NOFILE limit past the kernel's nr_open)
    huge = 1 << 40
    bundle = make_bundle(work / "nofile", busybox, ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": huge, "soft": huge}]
    (bundle / "config.json").write_text(json.dumps(spec))
    ctr = rt.create("nofile", bundle, work)
    ctr.wait_created()
    res = rt("start", "nofile")
    try:
        assert res.returncode == 1, (res, ctr.output())
        assert b"rlimit" in res.stderr, res.stderr
    finally:
        rt("delete", "--force", "nofile")
