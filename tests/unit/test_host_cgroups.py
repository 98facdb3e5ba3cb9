"""Host cgroups of vmpod-runtime: cgroupsPath parsing, hierarchy detection, the
limits computed for a VM, and creation/removal on a directory tree standing in
for /sys/fs/cgroup (the kernel's behaviour is covered by tests/vm/test_host_cgroups.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmpod.runtime import cgroups
from vmpod.runtime.bundle import MEMORY_OVERHEAD_MB, translate, vm_size
from vmpod.runtime.cgroups import (
    MIB,
    RECORD,
    VM_OVERHEAD_MB,
    VM_PIDS,
    Hierarchy,
    HostCgroup,
    Limits,
    expand_slice,
    hierarchies,
    host_limits,
    is_systemd_path,
    remove_recorded,
    resolve_path,
    systemd_relpath,
)
from vmpod.runtime.config import RuntimeConfig
from vmpod.runtime.errors import RuntimeCliError

HYBRID_MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
32 25 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
33 32 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 32 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 32 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 32 0:31 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
37 32 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
38 32 0:33 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio
39 30 0:29 /sub /mnt/memsub rw - cgroup cgroup rw,memory
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
5:net_cls,net_prio:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu:/
0::/
"""


def test_cgroupfs_paths_absolute_and_relative() -> None:
    assert resolve_path("/libpod_parent/libpod-x") == "/libpod_parent/libpod-x"
    assert resolve_path("//a/./b/") == "/a/b"
    assert resolve_path("kube/pod1") == "kube/pod1"  # below the caller's own cgroup (runc)
    assert resolve_path("") == ""  # none asked for: none made
    for bad in ("/a/../b", "/", "..", "/a/.."):
        with pytest.raises(RuntimeCliError, match="without '..'"):
            resolve_path(bad)


def test_systemd_paths_expand_like_runc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_systemd_path("machine.slice:libpod:abc")
    assert not is_systemd_path("/machine.slice:libpod:abc") and not is_systemd_path("a/b")
    assert expand_slice("-.slice") == "/"
    assert expand_slice("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    for bad in ("a", "-a.slice", "a--b.slice", "a-.slice", "a/b.slice"):
        with pytest.raises(RuntimeCliError, match="invalid systemd slice"):
            expand_slice(bad)
    assert systemd_relpath("machine.slice:libpod:abc") == "/machine.slice/libpod-abc.scope"
    assert systemd_relpath(":cri-containerd:x") == "/system.slice/cri-containerd-x.scope"
    assert systemd_relpath("kubepods-pod1.slice:cri:x") == "/kubepods.slice/kubepods-pod1.slice/cri-x.scope"
    assert systemd_relpath("system.slice::x") == "/system.slice/x.scope"
    assert systemd_relpath("system.slice:p:my-pod.slice") == "/my.slice/my-pod.slice"
    with pytest.raises(RuntimeCliError, match="no unit name"):
        systemd_relpath("system.slice:p:")
    monkeypatch.setattr(cgroups, "systemd_running", lambda: True)
    assert resolve_path("machine.slice:libpod:abc") == "/machine.slice/libpod-abc.scope"
    monkeypatch.setattr(cgroups, "systemd_running", lambda: False)
    with pytest.raises(RuntimeCliError, match="systemd not running on this host.*cgroupfs"):
        resolve_path("machine.slice:libpod:abc")


def test_hierarchies_of_a_hybrid_host() -> None:
    found = hierarchies(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert [(str(h.mount), h.controllers, h.current) for h in found] == [
        ("/sys/fs/cgroup/systemd", ("name=systemd",), "/"),
        ("/sys/fs/cgroup/pids", ("pids",), "/"),
        ("/sys/fs/cgroup/memory", ("memory",), "/process_api/abc"),  # the whole hierarchy, not the bind
        ("/sys/fs/cgroup/cpu", ("cpu",), "/"),
        ("/sys/fs/cgroup/unified", (), "/"),  # v2 last; cpuset: not mounted, net_cls: nothing to limit
    ]
    assert found[-1].v2 and not found[0].v2


def test_hierarchies_of_a_pure_v2_host() -> None:
    info = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert hierarchies(info, "0::/user.slice/x.scope\n") == (
        Hierarchy(Path("/sys/fs/cgroup"), (), "/user.slice/x.scope"),
    )


def test_limits_of_a_vm_add_its_cost() -> None:
    resources: dict[str, object] = {
        "memory": {"limit": 256 * MIB, "swap": 512 * MIB},
        "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0-1"},
        "pids": {"limit": 100},
    }
    _, memory_mb = vm_size(resources, host_mb=8192)
    assert memory_mb == 256 + MEMORY_OVERHEAD_MB
    lim = host_limits(resources, memory_mb, vm=True)
    # the VM's RAM (the limit plus the guest's own share) plus QEMU/virtiofsd/monitor
    assert lim.memory == (256 + MEMORY_OVERHEAD_MB + VM_OVERHEAD_MB) * MIB
    assert (lim.cpu_quota, lim.cpu_period, lim.cpu_shares) == (50000, 100000, 512)
    assert lim.pids == 100 + VM_PIDS and lim.cpuset_cpus == "0-1"
    # a pod member's cgroup holds only its monitor: the container's own limits
    member = host_limits(resources, memory_mb, vm=False)
    assert (member.memory, member.pids) == (256 * MIB, 100)


def test_limits_without_resources_are_none_and_period_defaults() -> None:
    assert host_limits({}, 512, vm=True) == Limits()
    lim = host_limits({"cpu": {"quota": 25000}, "memory": {"limit": True}}, 512, vm=True)
    assert (lim.cpu_quota, lim.cpu_period, lim.memory) == (25000, 100000, None)
    assert host_limits({"cpu": {"period": 50000}}, 512, vm=True).cpu_period is None


def test_translate_keeps_cgroups_path_for_the_host(tmp_path: Path) -> None:
    (tmp_path / "rootfs/bin").mkdir(parents=True)
    (tmp_path / "rootfs/bin/sh").write_text("")
    (tmp_path / "rootfs/bin/sh").chmod(0o755)
    resources = {"memory": {"limit": 64 * MIB}}
    spec: dict[str, object] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["/bin/sh"], "cwd": "/"},
        "linux": {
            "cgroupsPath": "/libpod_parent/libpod-c1",
            "namespaces": [{"type": "network"}],
            "resources": resources,
        },
    }
    plan = translate(spec, tmp_path, "c1", RuntimeConfig())
    assert plan.cgroups_path == "/libpod_parent/libpod-c1"
    assert plan.host_resources == resources
    linux = plan.spec["linux"]
    assert isinstance(linux, dict) and linux["cgroupsPath"] == "/vmpod/c1"  # the guest's own
    linux_in = spec["linux"]
    assert isinstance(linux_in, dict)
    linux_in["cgroupsPath"] = 7
    with pytest.raises(RuntimeCliError, match="cgroupsPath must be a string"):
        translate(spec, tmp_path, "c1", RuntimeConfig())


def _fake_tree(tmp_path: Path) -> tuple[Hierarchy, Hierarchy]:
    """A v1 cpuset+memory hierarchy and a v2 one, as directories of plain files."""
    v1 = tmp_path / "v1"
    v1.mkdir()
    for name, value in (("cpuset.cpus", "0-3"), ("cpuset.mems", "0"), ("cgroup.procs", "")):
        (v1 / name).write_text(value)
    v2 = tmp_path / "v2"
    v2.mkdir()
    for name, value in (("cgroup.controllers", "cpu memory pids"), ("cgroup.subtree_control", "")):
        (v2 / name).write_text(value)
    return Hierarchy(v1, ("cpuset", "memory"), "/"), Hierarchy(v2, (), "/me")


def test_setup_makes_each_level_records_and_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2 = _fake_tree(tmp_path)
    monkeypatch.setattr(cgroups, "hierarchies", lambda: (v1, v2))
    # a real cpuset cgroup starts with empty cpus/mems: the kernel makes the files
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self)
        if self.is_relative_to(v1.mount):
            for name in ("cpuset.cpus", "cpuset.mems", "memory.limit_in_bytes", "cgroup.procs"):
                (self / name).write_text("")
        else:
            (self / "cgroup.controllers").write_text("cpu memory pids")
            (self / "cgroup.subtree_control").write_text("")
            (self / "memory.max").write_text("max")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    cg = HostCgroup.plan("parent/ctr", Limits(memory=300 * MIB))
    assert cg is not None
    assert cg.paths == (v1.mount / "parent/ctr", v2.mount / "me/parent/ctr")  # relative: below our own
    record = tmp_path / "state"
    record.mkdir()
    cg.setup(record)
    assert json.loads((record / RECORD).read_text()) == {"paths": [str(p) for p in cg.paths]}
    assert (v1.mount / "parent/cpuset.cpus").read_text() == "0-3"  # copied down, level by level
    assert (v1.mount / "parent/ctr/cpuset.mems").read_text() == "0"
    assert (v1.mount / "parent/ctr/memory.limit_in_bytes").read_text() == str(300 * MIB)
    assert (v2.mount / "me/parent/ctr/memory.max").read_text() == str(300 * MIB)
    # v2: the parents enable the controllers they have for their children
    assert (v2.mount / "me/parent/cgroup.subtree_control").read_text() == "+pids"  # (last write wins here)
    for d in cg.paths:  # the directories stand in for empty cgroups: only these files left
        for f in d.iterdir():
            f.unlink()
    remove_recorded(record)
    assert not any(d.exists() for d in cg.paths) and (v1.mount / "parent").is_dir()  # parents stay
    assert not (record / RECORD).exists()


def test_a_cgroup_with_processes_is_refused_and_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, _ = _fake_tree(tmp_path)
    monkeypatch.setattr(cgroups, "hierarchies", lambda: (v1,))
    busy = v1.mount / "taken"
    busy.mkdir()
    (busy / "cgroup.procs").write_text(f"{os.getpid()}\n")
    cg = HostCgroup.plan("/taken", Limits())
    assert cg is not None
    with pytest.raises(RuntimeCliError, match="has processes in it"):
        cg.setup(tmp_path)
    assert not (tmp_path / RECORD).exists()
    cg.leave(tmp_path)  # the monitor's teardown after a refusal: nothing of it is touched
    assert busy.is_dir()


def test_no_cgroups_path_no_cgroup_and_remove_without_record(tmp_path: Path) -> None:
    assert HostCgroup.plan("", Limits()) is None
    remove_recorded(tmp_path)  # nothing recorded: nothing to do
    (tmp_path / RECORD).write_text("{not json")
    remove_recorded(tmp_path)
    assert (tmp_path / RECORD).exists()


def test_update_changes_cpu_and_pids_but_not_the_vms_memory(tmp_path: Path) -> None:
    d = tmp_path / "v2/ctr"
    d.mkdir(parents=True)
    for name, value in (("memory.max", "805306368"), ("cpu.max", "50000 100000"), ("pids.max", "2304")):
        (d / name).write_text(value)
    cg = HostCgroup(((Hierarchy(tmp_path / "v2", (), "/"), d),), Limits())
    cg.update({"memory": {"limit": 64 * MIB}, "cpu": {"quota": 20000}, "pids": {"limit": 10}})
    assert (d / "cpu.max").read_text() == "20000 100000"
    assert (d / "pids.max").read_text() == str(10 + VM_PIDS)
    assert (d / "memory.max").read_text() == "805306368"  # the VM's RAM did not change


def test_a_user_without_rights_goes_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As runc's rootless manager: no cgroup, a warning, nothing left; root fails."""
    v1, _ = _fake_tree(tmp_path)
    cg = HostCgroup(((v1, v1.mount / "a/b"),), Limits())

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    record = tmp_path / "state"
    record.mkdir()
    monkeypatch.setattr(Path, "mkdir", denied)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cg.setup(record) is False
    assert not (record / RECORD).exists()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(RuntimeCliError, match="host cgroup .*a/b: Permission denied"):
        cg.setup(record)
