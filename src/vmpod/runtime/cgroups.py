"""The container's cgroup on the host (Kata's sandbox_cgroup_only): where the
engine asked for it (``linux.cgroupsPath``), holding the monitor and, because it
joins before it starts them, QEMU, virtiofsd and all their threads.

Mirrors runc's cgroupfs manager, so engines read it as they read runc's
(`podman stats` reads the monitor's ``/proc/PID/cgroup``, the pid it waits for):

- the cgroup is made in every mounted hierarchy the monitor is in: each v1
  hierarchy (cpu, memory, pids, ..., name=systemd) and the v2 one. On a hybrid
  host the controllers are v1 and the unified hierarchy only groups processes;
  on a pure v2 host the controllers are enabled in the parents'
  ``cgroup.subtree_control``, best effort as runc does;
- a relative path is below the creating process's own cgroup (runc);
- a systemd path ("slice:prefix:name") becomes ``<expanded slice>/<prefix>-<name>.scope``,
  and is refused like runc refuses it where systemd is not running (systemd is
  not asked over D-Bus for the unit: the scope directory is made directly);
- a cgroup that exists already is reused if no process is in it, refused if one is;
- ``delete`` kills what is left in it and removes it (``remove_recorded``); the
  monitor removes it itself when it ends normally (``HostCgroup.leave``).

The limits are the container's with the VM's cost added (``host_limits``): the
guest keeps applying the container's own limits to the container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod.fsutil import atomic_write
from vmpod.runtime.errors import RuntimeCliError

log = logging.getLogger(__name__)
MIB = 1024 * 1024
# Host memory a sandbox uses besides its guest RAM: QEMU itself with its TCG
# translation cache (tb-size=128 MiB) and device buffers, virtiofsd, the monitor
# (a Python process). Measured on this cgroup (v1 memory.stat, --memory 256m, TCG):
# idle 260-274 MiB = guest RAM touched (shmem) ~115 MiB + ~155 MiB of this (QEMU
# anon 131, monitor 30, virtiofsd < 1); with 220 MB written to a guest tmpfs 499
# MiB (161 of this). 256 leaves ~100 MiB of margin over the measured figure, so
# the host limit only bites on a VM that misbehaves, never before the guest's.
VM_OVERHEAD_MB = 256
# Host processes/threads of a sandbox besides the container's own (which the
# guest counts): QEMU's vCPU, I/O and RCU threads, virtiofsd's pool, the monitor.
VM_PIDS = 256
RECORD = "host-cgroup.json"
V1_CONTROLLERS = (
    *("cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer"),
    *("net_cls", "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"),
)
V1_SKIP = ("net_cls", "net_prio", "perf_event", "rdma", "misc")  # nothing runc limits for a VM there
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")
RMDIR_TRIES = 50  # x 0.1 s: QEMU dies by PDEATHSIG, asynchronously, after a killed monitor


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy the process is in."""

    mount: Path  # where it is mounted
    controllers: tuple[str, ...]  # v1: ("cpu", "cpuacct"), ("name=systemd",); v2: ()
    current: str  # this process's cgroup in it, e.g. "/process_api/abc"

    @property
    def v2(self) -> bool:
        return not self.controllers

    def has(self, controller: str) -> bool:
        return controller in self.controllers


@dataclass(frozen=True)
class Limits:
    """What is written on the host; None: left as the parent's (unlimited)."""

    memory: int | None = None  # bytes
    cpu_quota: int | None = None  # microseconds per period
    cpu_period: int | None = None
    cpu_shares: int | None = None
    pids: int | None = None
    cpuset_cpus: str = ""
    cpuset_mems: str = ""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def host_limits(resources: dict[str, object], memory_mb: int, *, vm: bool) -> Limits:
    """The host cgroup's limits for a container's ``linux.resources``.

    ``vm``: the cgroup holds the VM (the sandbox's first container). Its memory
    is then the VM's RAM (``memory_mb``: the limit plus the guest kernel's and
    agent's share, bundle.vm_size) plus VM_OVERHEAD_MB for QEMU, virtiofsd and
    the monitor on the host: the container is held to its limit inside the
    guest, the sandbox as a whole to what it can use on the host. Guest RAM is a
    memfd: its pages are charged here when QEMU or virtiofsd first touch them.
    Without a memory limit nothing is set (as runc). pids: the container's own
    are counted in the guest; the host holds the VM's threads (VM_PIDS more).
    A pod member's cgroup (``vm=False``) holds only its small monitor process:
    the container's own limits, so the engine reads the ones it set.
    """
    mem = resources.get("memory") if isinstance(resources.get("memory"), dict) else {}
    cpu = resources.get("cpu") if isinstance(resources.get("cpu"), dict) else {}
    pids = resources.get("pids") if isinstance(resources.get("pids"), dict) else {}
    assert isinstance(mem, dict) and isinstance(cpu, dict) and isinstance(pids, dict)
    limit, quota, pid_limit = _int(mem.get("limit")), _int(cpu.get("quota")), _int(pids.get("limit"))
    if vm:
        limit = (memory_mb + VM_OVERHEAD_MB) * MIB if limit else None
        pid_limit = pid_limit + VM_PIDS if pid_limit else None
    cpus, mems = cpu.get("cpus"), cpu.get("mems")
    return Limits(
        memory=limit,
        cpu_quota=quota,
        cpu_period=(_int(cpu.get("period")) or 100000) if quota else None,
        cpu_shares=_int(cpu.get("shares")),
        pids=pid_limit,
        cpuset_cpus=cpus if isinstance(cpus, str) else "",
        cpuset_mems=mems if isinstance(mems, str) else "",
    )


# -- where ----------------------------------------------------------------------------


def is_systemd_path(path: str) -> bool:
    """A systemd driver's cgroupsPath ("slice:prefix:name"), as runc tells them
    apart when --systemd-cgroup is not passed on."""
    return not path.startswith("/") and path.count(":") == 2


def expand_slice(slice_: str) -> str:
    """systemd's slice name -> its path ("a-b.slice" -> "/a.slice/a-b.slice")."""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise RuntimeCliError(f"cgroupsPath: invalid systemd slice {slice_!r}")
    if slice_ == "-.slice":
        return "/"
    name = slice_[: -len(".slice")]
    if not name or name.startswith("-") or name.endswith("-") or "--" in name:
        raise RuntimeCliError(f"cgroupsPath: invalid systemd slice {slice_!r}")
    parts = name.split("-")
    return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def systemd_relpath(path: str) -> str:
    """The cgroup path systemd gives "slice:prefix:name" (runc's systemd driver)."""
    slice_, prefix, name = path.split(":")
    base = expand_slice(slice_ or "system.slice")
    if not name:
        raise RuntimeCliError(f"cgroupsPath {path!r}: no unit name (expected slice:prefix:name)")
    if name.endswith(".slice"):
        return expand_slice(name)  # a slice of its own, its parent implied by its name
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return base.rstrip("/") + "/" + unit


def systemd_running() -> bool:
    """sd_booted(3): what runc checks before it uses systemd's cgroups."""
    return Path("/run/systemd/system").is_dir()


def resolve_path(cgroups_path: str) -> str:
    """cgroupsPath -> the cgroup's path in each hierarchy (absolute, or relative to
    the process's own cgroup there); "" when the engine asked for none."""
    if not cgroups_path:
        return ""
    if is_systemd_path(cgroups_path):
        if not systemd_running():
            raise RuntimeCliError(
                "systemd not running on this host, cannot use systemd cgroups manager "
                "(use the cgroupfs cgroup manager, e.g. podman --cgroup-manager=cgroupfs)"
            )
        return systemd_relpath(cgroups_path)
    parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise RuntimeCliError(
            f"cgroupsPath {cgroups_path!r}: must name a cgroup below the root, without '..'"
        )
    return ("/" if cgroups_path.startswith("/") else "") + "/".join(parts)


def hierarchies(mountinfo: str | None = None, proc_cgroup: str | None = None) -> tuple[Hierarchy, ...]:
    """The mounted hierarchies this process is in (v1 ones, then the v2 one)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if proc_cgroup is None:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    mounts: dict[tuple[str, ...], Path] = {}
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue  # only whole hierarchies (root "/"): a bind of a subtree is no place to create
        if tail[0] == "cgroup2":
            mounts.setdefault((), Path(fields[4].replace("\\040", " ")))
        elif tail[0] == "cgroup":
            opts = tuple(
                sorted(o for o in tail[2].split(",") if o in V1_CONTROLLERS or o.startswith("name="))
            )
            mounts.setdefault(opts, Path(fields[4].replace("\\040", " ")))
    found: list[Hierarchy] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ctrls = tuple(sorted(c for c in parts[1].split(",") if c))
        if any(c in V1_SKIP for c in ctrls):
            continue
        mount = mounts.get(ctrls)
        if mount is None:
            continue  # not mounted here: runc skips it too
        found.append(Hierarchy(mount, ctrls, parts[2]))
    return tuple(sorted(found, key=lambda h: h.v2))


# -- the cgroup -----------------------------------------------------------------------


@dataclass(frozen=True)
class HostCgroup:
    """The container's cgroup in each hierarchy, and where the monitor came from."""

    dirs: tuple[tuple[Hierarchy, Path], ...]
    limits: Limits

    @classmethod
    def plan(cls, cgroups_path: str, limits: Limits) -> HostCgroup | None:
        """Where the cgroup goes (nothing is made yet); None without a cgroupsPath."""
        rel = resolve_path(cgroups_path)
        if not rel:
            return None
        dirs = []
        for h in hierarchies():
            under = rel if rel.startswith("/") else h.current.rstrip("/") + "/" + rel
            dirs.append((h, h.mount / under.lstrip("/")))
        if not dirs:
            raise RuntimeCliError(
                "no cgroup hierarchy is mounted under /sys/fs/cgroup: cannot honour cgroupsPath"
            )
        return cls(tuple(dirs), limits)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(d for _, d in self.dirs)

    def setup(self, record_dir: Path) -> bool:
        """Record, create and limit the cgroup (a failure leaves the record, so
        ``remove_recorded`` cleans up what was made); False when a user without
        the right to make it goes without (as runc's rootless cgroup manager).
        A cgroup that holds processes is someone else's: refused before anything
        is recorded, so nothing of it is touched by the clean-up."""
        for _, d in self.dirs:
            if _procs(d):
                raise RuntimeCliError(
                    f"host cgroup {d} exists and has processes in it: it belongs to another container"
                )
        atomic_write(record_dir / RECORD, json.dumps({"paths": [str(p) for p in self.paths]}).encode())
        for h, d in self.dirs:
            try:
                _make(h, d)
                _apply(h, d, self.limits)
            except PermissionError as err:
                if os.geteuid() == 0:
                    raise RuntimeCliError(f"host cgroup {d}: {err.strerror or err}") from err
                log.warning("no host cgroup (%s: %s): limits apply in the VM only", d, err.strerror)
                remove_recorded(record_dir)
                return False
            except OSError as err:
                raise RuntimeCliError(f"host cgroup {d}: {err.strerror or err}") from err
        return True

    def enter(self) -> None:
        """Move this process (all its threads) in: what it starts from now on is in too."""
        for _, d in self.dirs:
            try:
                (d / "cgroup.procs").write_text(str(os.getpid()))
            except OSError as err:
                raise RuntimeCliError(f"cannot join host cgroup {d}: {err.strerror or err}") from err

    def update(self, resources: dict[str, object]) -> None:
        """`update`: the new CPU and pids limits on the host too. Not memory: the
        VM's RAM is fixed at boot (no hotplug), so the host limit that follows from
        it stays; a new memory limit is the guest's to apply."""
        lim = dataclasses.replace(host_limits(resources, 0, vm=True), memory=None)
        for h, d in self.dirs:
            try:
                _apply(h, d, lim)
            except OSError as err:
                raise RuntimeCliError(f"host cgroup {d}: {err.strerror or err}") from err

    def leave(self, record_dir: Path) -> None:
        """Back to where this process came from, then remove the cgroup (whatever
        of the sandbox is still in it is killed first)."""
        for h, _ in self.dirs:
            home = h.mount / h.current.lstrip("/")
            for target in (home, h.mount):  # the old cgroup may be gone: the root then
                try:
                    (target / "cgroup.procs").write_text(str(os.getpid()))
                    break
                except OSError:
                    continue
        if not (record_dir / RECORD).exists():
            return  # refused before anything was made: nothing here is ours
        if remove_dirs(self.paths):
            with contextlib.suppress(OSError):
                (record_dir / RECORD).unlink()


def _make(h: Hierarchy, leaf: Path) -> None:
    """mkdir -p, preparing each new level as the controller needs (v1 cpuset:
    copy cpus/mems from the parent, or no task could join; v2: enable the
    controllers the parent has for its children)."""
    levels = [p for p in reversed((leaf, *leaf.parents)) if p.is_relative_to(h.mount) and p != h.mount]
    for p in levels:
        if h.v2:
            _enable_controllers(p.parent)
        if p.exists():
            continue
        with contextlib.suppress(FileExistsError):  # a concurrent create of a sibling
            p.mkdir()
        if h.has("cpuset"):
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (p / name).read_text().strip():
                    (p / name).write_text((p.parent / name).read_text().strip())


def _enable_controllers(p: Path) -> None:
    try:
        available = set((p / "cgroup.controllers").read_text().split())
        enabled = set((p / "cgroup.subtree_control").read_text().split())
    except OSError:
        return
    for c in V2_CONTROLLERS:
        if c in available and c not in enabled:
            with contextlib.suppress(OSError):  # busy (processes in a non-root cgroup): as runc, go on
                (p / "cgroup.subtree_control").write_text(f"+{c}")


def _write(d: Path, name: str, value: str) -> None:
    if (d / name).exists():
        (d / name).write_text(value)


def _apply(h: Hierarchy, d: Path, lim: Limits) -> None:
    """The limits, in this hierarchy's files (v1 names or v2 names)."""
    if h.v2:
        if lim.memory:
            _write(d, "memory.max", str(lim.memory))
        if lim.cpu_quota and lim.cpu_period:
            _write(d, "cpu.max", f"{lim.cpu_quota} {lim.cpu_period}")
        if lim.cpu_shares:  # runc's conversion of shares (2..262144) to weight (1..10000)
            weight = 1 + ((max(2, min(lim.cpu_shares, 262144)) - 2) * 9999) // 262142
            _write(d, "cpu.weight", str(weight))
        if lim.pids:
            _write(d, "pids.max", str(lim.pids))
    if h.has("memory") and lim.memory:
        _write(d, "memory.limit_in_bytes", str(lim.memory))
    if h.has("cpu"):
        if lim.cpu_quota and lim.cpu_period:
            _write(d, "cpu.cfs_period_us", str(lim.cpu_period))
            _write(d, "cpu.cfs_quota_us", str(lim.cpu_quota))
        if lim.cpu_shares:
            _write(d, "cpu.shares", str(lim.cpu_shares))
    if h.has("pids") and lim.pids:
        _write(d, "pids.max", str(lim.pids))
    if h.has("cpuset") or (h.v2 and (d / "cpuset.cpus").exists()):
        if lim.cpuset_cpus:
            _write(d, "cpuset.cpus", lim.cpuset_cpus)
        if lim.cpuset_mems:
            _write(d, "cpuset.mems", lim.cpuset_mems)


def _procs(d: Path) -> list[int]:
    try:
        return [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_recorded(record_dir: Path) -> None:
    """Remove the cgroup a container's monitor recorded in ``record_dir`` (delete's
    clean-up, for a monitor that was killed before it could)."""
    try:
        paths = [Path(p) for p in json.loads((record_dir / RECORD).read_text())["paths"]]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if remove_dirs(paths):
        with contextlib.suppress(OSError):
            (record_dir / RECORD).unlink()


def remove_dirs(paths: tuple[Path, ...] | list[Path]) -> bool:
    """Kill what is still in the cgroup (as runc's destroy does: QEMU dies by
    PDEATHSIG after a killed monitor, but asynchronously), then rmdir it in each
    hierarchy; False if it stayed busy."""
    me = os.getpid()
    for _ in range(RMDIR_TRIES):
        for d in paths:
            if not d.exists():
                continue
            for pid in _procs(d):
                if pid != me:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                d.rmdir()
        if not any(d.exists() for d in paths):
            return True
        time.sleep(0.1)
    log.warning("host cgroup not removed (still busy): %s", ", ".join(str(d) for d in paths if d.exists()))
    return False
