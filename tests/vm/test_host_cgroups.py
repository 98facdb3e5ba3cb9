"""The VM's cgroup on the host (Kata's sandbox_cgroup_only), with real podman and the
real vmpod-runtime binary: QEMU, virtiofsd and all their threads are in the cgroup
the engine asked for, with the container's limits plus the VM's cost; `podman
stats` reads it; it is gone after the container."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.test_podman import ULIMITS, Podman, private_podman
from tests.vm.test_runtime_support import Runtime, assert_runtime_clean, make_bundle, runtime_env
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths
from vmpod.runtime.bundle import MEMORY_OVERHEAD_MB, MIN_MEMORY_MB
from vmpod.runtime.cgroups import MIB, VM_OVERHEAD_MB, VM_PIDS, hierarchies, systemd_running

IMAGE = "localhost/vmpod-busybox:latest"


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in _descendants(k)]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cgroups_of(path: Path) -> set[str]:
    """The cgroup paths in a /proc/.../cgroup file, in the hierarchies vmpod manages."""
    managed = {",".join(h.controllers) for h in hierarchies()}
    out = set()
    for line in path.read_text().splitlines():
        _, ctrls, where = line.split(":", 2)
        if ctrls in managed:
            out.add(where)
    return out


def _assert_vm_in(monitor: int, cgroup: str) -> None:
    """The monitor, QEMU, virtiofsd and every thread of theirs are in ``cgroup``."""
    helpers = [p for p in _descendants(monitor) if _comm(p).startswith(("qemu-system", "virtiofsd"))]
    assert any(_comm(p).startswith("qemu-system") for p in helpers), [_comm(p) for p in _descendants(monitor)]
    assert any(_comm(p) == "virtiofsd" for p in helpers)
    for pid in (monitor, *helpers):
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        assert tasks
        for task in tasks:
            assert _cgroups_of(task / "cgroup") == {cgroup}, (pid, _comm(pid), task.name)


def _file(controller: str, cgroup: str, v1: str, v2: str) -> str:
    """A control file's content: the v1 hierarchy of ``controller`` if there is one, else v2."""
    hs = hierarchies()
    for h in hs:
        if h.has(controller):
            return (h.mount / cgroup.lstrip("/") / v1).read_text().strip()
    v2h = next(h for h in hs if h.v2)
    return (v2h.mount / cgroup.lstrip("/") / v2).read_text().strip()


def _dirs(cgroup: str) -> list[Path]:
    return [h.mount / cgroup.lstrip("/") for h in hierarchies()]


def _bytes(size: str) -> float:
    m = re.fullmatch(r"([\d.]+)([kMGT]?i?B)", size.strip())
    assert m, size
    scale = {"B": 1, "kB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": MIB, "GB": 1e9, "GiB": 1024 * MIB}
    return float(m.group(1)) * scale.get(m.group(2), 1e12)


@pytest.fixture(scope="module")
def podman(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Podman, Path]]:
    tmp = tmp_path_factory.mktemp("podman-cg")
    with private_podman(paths, busybox, tmp) as (base, _):
        yield Podman(base), tmp / "root"


def _cgroups_path(podman_root: Path, cid: str) -> str:
    """What podman asked for in the container's config.json."""
    (config,) = podman_root.glob(f"*-containers/{cid}/userdata/config.json")
    path = json.loads(config.read_text())["linux"]["cgroupsPath"]
    assert isinstance(path, str) and path.startswith("/")
    return path


def test_podman_run_puts_the_vm_in_the_containers_cgroup(podman: tuple[Podman, Path]) -> None:
    p, root = podman
    res = p(
        "run", "-d", "--name", "limited", "--memory", "256m", "--cpus", "0.5", *ULIMITS, IMAGE, "sleep", "600"
    )
    assert res.returncode == 0, res.stderr
    cid = res.stdout.strip()
    try:
        cgroup = _cgroups_path(root, cid)
        monitor = int(p("inspect", "--format", "{{.State.Pid}}", cid).stdout)
        _assert_vm_in(monitor, cgroup)
        # the VM's RAM (limit + the guest's share) plus QEMU/virtiofsd/monitor on the host
        want = (max(MIN_MEMORY_MB, 256 + MEMORY_OVERHEAD_MB) + VM_OVERHEAD_MB) * MIB
        assert int(_file("memory", cgroup, "memory.limit_in_bytes", "memory.max")) == want
        quota = _file("cpu", cgroup, "cpu.cfs_quota_us", "cpu.max").split()[0]
        period = _file("cpu", cgroup, "cpu.cfs_period_us", "cpu.max").split()[-1]
        assert (quota, period) == ("50000", "100000")
        pids_max = _file("pids", cgroup, "pids.max", "pids.max")
        assert pids_max == str(2048 + VM_PIDS)  # podman's default pids limit, plus the VM's threads
        used = int(_file("memory", cgroup, "memory.usage_in_bytes", "memory.current"))
        assert 0 < used <= want
        res = p("stats", "--no-stream", "--format", "json", cid)
        assert res.returncode == 0, res.stderr
        (stats,) = json.loads(res.stdout)
        assert _bytes(stats["mem_usage"].split("/")[0]) > 0, stats
        assert int(stats["pids"]) > 2, stats  # the monitor, QEMU and virtiofsd are counted
    finally:
        res = p("rm", "-f", "-t", "0", cid)
    assert res.returncode == 0, res.stderr
    assert not [d for d in _dirs(cgroup) if d.exists()]


def test_pod_member_gets_a_cgroup_of_its_own(podman: tuple[Podman, Path]) -> None:
    """The infra container's cgroup holds the VM; a member's holds its small monitor
    process only, so the engine's accounting paths exist (as with Kata)."""
    p, root = podman
    assert p("pod", "create", "--name", "cgpod").returncode == 0
    try:
        res = p("run", "-d", "--pod", "cgpod", "--memory", "64m", *ULIMITS, IMAGE, "sleep", "600")
        assert res.returncode == 0, res.stderr
        member = res.stdout.strip()
        infra = p("pod", "inspect", "--format", "{{.InfraContainerID}}", "cgpod").stdout.strip()
        infra_cg, member_cg = _cgroups_path(root, infra), _cgroups_path(root, member)
        _assert_vm_in(int(p("inspect", "--format", "{{.State.Pid}}", infra).stdout), infra_cg)
        member_pid = int(p("inspect", "--format", "{{.State.Pid}}", member).stdout)
        assert _cgroups_of(Path(f"/proc/{member_pid}/cgroup")) == {member_cg}
        assert not [q for q in _descendants(member_pid) if _comm(q).startswith("qemu-system")]
        assert int(_file("memory", member_cg, "memory.limit_in_bytes", "memory.max")) == 64 * MIB
        res = p("exec", member, "echo", "in-pod")
        assert (res.returncode, res.stdout) == (0, "in-pod\n"), res.stderr
    finally:
        p("pod", "rm", "-f", "cgpod")
    assert not [d for d in _dirs(infra_cg) + _dirs(member_cg) if d.exists()]


@pytest.fixture(scope="module")
def rt(paths: Paths, assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    work = tmp_path_factory.mktemp("rt-cg")
    runtime = Runtime(work / "root", runtime_env(paths, work / "runtime.json"), work / "log.json")
    yield runtime
    for cid in runtime("list", "--quiet").stdout.decode().split():
        runtime("delete", "--force", cid)
    assert_runtime_clean(paths, runtime.root)


def _bundle(where: Path, busybox: Path, cgroups_path: str, resources: dict[str, dict[str, int]]) -> Path:
    bundle = make_bundle(where, busybox, ["sleep", "600"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"].update(cgroupsPath=cgroups_path, resources=resources)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def test_runtime_create_with_cgroups_path_then_monitor_killed(
    rt: Runtime, busybox: Path, tmp_path: Path
) -> None:
    """vmpod-runtime create straight from a bundle; after kill -9 of the monitor
    (QEMU follows by PDEATHSIG) `delete` removes the cgroup."""
    parent = f"/vmpod-test-{os.getpid()}"
    cgroup = f"{parent}/direct"
    resources = {
        "memory": {"limit": 100 * MIB},
        "cpu": {"quota": 30000, "period": 60000},
        "pids": {"limit": 50},
    }
    bundle = _bundle(tmp_path / "b", busybox, cgroup, resources)
    try:
        ctr = rt.create("direct", bundle, tmp_path)
        monitor = ctr.wait_created()
        _assert_vm_in(monitor, cgroup)
        assert int(_file("memory", cgroup, "memory.limit_in_bytes", "memory.max")) == (
            (MIN_MEMORY_MB + VM_OVERHEAD_MB) * MIB  # 100 MiB + the guest's share is below the VM minimum
        )
        assert _file("cpu", cgroup, "cpu.cfs_quota_us", "cpu.max").split()[0] == "30000"
        assert _file("pids", cgroup, "pids.max", "pids.max") == str(50 + VM_PIDS)
        rt("start", "direct", check=True)
        rt("update", "--cpu-quota", "15000", "--pids-limit", "40", "direct", check=True)
        assert _file("cpu", cgroup, "cpu.cfs_quota_us", "cpu.max").split()[0] == "15000"
        assert _file("pids", cgroup, "pids.max", "pids.max") == str(40 + VM_PIDS)
        os.kill(monitor, signal.SIGKILL)
        assert ctr.result()["signal"] == signal.SIGKILL
        assert any(d.exists() for d in _dirs(cgroup))  # nobody removed it yet
        rt("delete", "direct", check=True)
        assert not [d for d in _dirs(cgroup) if d.exists()]
    finally:
        rt("delete", "--force", "direct")
        for d in _dirs(parent):  # runc leaves the parents too: the test's own
            if d.exists():
                d.rmdir()


def test_busy_cgroup_and_systemd_path_are_refused(rt: Runtime, busybox: Path, tmp_path: Path) -> None:
    """Bad cgroupsPath: one clear line, exit 1, nothing left behind; another
    process's cgroup is neither joined nor removed (no VM boots for these)."""
    cgroup = f"/vmpod-busy-{os.getpid()}"
    dirs = _dirs(cgroup)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        for d in dirs:
            d.mkdir()
            for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset cgroup starts empty
                if (d / name).exists():
                    (d / name).write_text((d.parent / name).read_text())
            (d / "cgroup.procs").write_text(str(sleeper.pid))
        res = rt("create", "--bundle", str(_bundle(tmp_path / "b1", busybox, cgroup, {})), "busy")
        assert res.returncode == 1
        assert b"has processes in it" in res.stderr, res.stderr
        assert sleeper.poll() is None and all(d.is_dir() for d in dirs)
        assert rt("list", "--quiet").stdout.split() == []
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in dirs:
            if d.exists():
                d.rmdir()
    if systemd_running():
        return  # systemd paths are honoured there (tests/unit covers their expansion)
    bundle = _bundle(tmp_path / "b2", busybox, "machine.slice:libpod:sd", {})
    res = rt("create", "--bundle", str(bundle), "sd")
    assert res.returncode == 1
    assert b"systemd not running on this host" in res.stderr and b"cgroupfs" in res.stderr
    assert rt("list", "--quiet").stdout.split() == []
