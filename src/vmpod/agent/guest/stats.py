"""Guest side: a container's usage from its cgroup v2 files. Standard library only."""

from __future__ import annotations

import os

from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.protocol import ContainerStats


def container_stats(cgroup_root: str, pid: int) -> ContainerStats:
    """Usage of the cgroup (v2, mounted at ``cgroup_root``) that process ``pid`` is in.

    A file the kernel does not offer there (the root cgroup has no memory.current
    nor pids.current) reads 0; pids then counts cgroup.procs.
    """
    group = _cgroup_dir(cgroup_root, pid)
    if group is None:
        return ContainerStats(cpu_usage_usec=0, memory_bytes=0, pids=0)
    cpu = 0
    for line in _read(f"{group}/cpu.stat").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            cpu = _int(value)
    pids = _read(f"{group}/pids.current")
    return ContainerStats(
        cpu_usage_usec=cpu,
        memory_bytes=_int(_read(f"{group}/memory.current")),
        pids=_int(pids) if pids else len(_read(f"{group}/cgroup.procs", 1 << 20).split()),
    )


def _cgroup_dir(root: str, pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            lines = fh.read(1 << 16).splitlines()
    except OSError:
        raise AgentFailure(f"process {pid} is gone", "invalid") from None
    root = os.path.normpath(root)
    for line in lines:
        if line.startswith("0::/"):
            path = os.path.normpath(root + line[3:].strip())
            if path == root or path.startswith(root + "/"):
                return path
    return None


def _read(path: str, limit: int = 4096) -> str:
    try:
        with open(path) as fh:
            return fh.read(limit)
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else 0
