"""``vmpod forensics dump-memory``: the memory of one process of a running
container (typically a restored one), read by the guest agent from
/proc/PID/mem into a host directory shared into the VM, checked here, and
written as one tar file:

    dump.json                      pid (the container's), its pid in the VM, comm,
                                   container, time, and every region written
    maps.txt                       /proc/PID/maps as the guest read it
    regions/<start>-<end>.bin      each readable region's bytes (hex addresses,
                                   16 digits): byte N is the address start + N

The container is paused (cgroup freezer in the guest) while its memory is read,
so the regions agree, and resumed after. What the guest wrote is hostile: only
regular files with the names above, at most ``--max-size`` bytes, are taken.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers.manager import PAUSED_S, RUNNING_S, Manager
from vmpod.errors import ConfigError, ForensicsError
from vmpod.forensics.archive import check_tree, new_output
from vmpod.forensics.capture import freezer
from vmpod.fsutil import atomic_writer, owned_tmpdir
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.state import now_rfc3339
from vmpod.sandbox import MEMORY_DUMP_TIMEOUT

FORMAT = "vmpod-memory/1"
MAX_DUMP = 4 << 30  # bytes of memory taken by default
REGION = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.bin")
MAPS = "maps.txt"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DumpRequest:
    ref: str  # container name or id
    pid: int  # in the container's pid namespace
    output: Path
    max_bytes: int = MAX_DUMP


@dataclass(frozen=True)
class Dumped:
    output: Path
    vm_pid: int
    comm: str
    regions: int
    bytes: int
    unreadable: tuple[str, ...]
    seconds: float


def dump_memory(paths: Paths, req: DumpRequest) -> Dumped:
    out = new_output(req.output)
    if req.pid <= 0:
        raise ConfigError(f"invalid pid {req.pid}", hint="give a pid that `vmpod exec NAME ps` shows")
    t0 = time.monotonic()
    m = Manager(paths)
    with m.locked(req.ref) as rec:
        v = m.view(rec)
        if v.state not in (RUNNING_S, PAUSED_S):
            raise ForensicsError(f"container {rec.name} is {v.state}: only a running container has memory")
        sock = m.store.dir(rec.id) / "monitor.sock"
        paths.tmp.mkdir(parents=True, exist_ok=True)
        with owned_tmpdir(paths.tmp, "memdump-") as tmp:
            shared = tmp / "memory"
            shared.mkdir(mode=0o700)
            with freezer(sock, pause=v.state == RUNNING_S):
                got = ipc.request(
                    sock,
                    {"op": "dump_memory", "pid": req.pid, "dir": str(shared), "max_bytes": req.max_bytes},
                    timeout=MEMORY_DUMP_TIMEOUT + 60,
                )
            answer = _answer(got)
            regions = _check(shared, req.max_bytes)
            summary = {
                "format": FORMAT,
                "pid": req.pid,
                "vm_pid": answer.vm_pid,
                "comm": answer.comm,
                "container": {"id": rec.id, "name": rec.name},
                "dumped": now_rfc3339(),
                "host": socket.gethostname(),
                "regions": [{"start": lo, "end": hi, "file": f"regions/{name}"} for name, lo, hi in regions],
                "unreadable": list(answer.unreadable),
            }
            _write_tar(shared, regions, summary, out)
    size = sum(hi - lo for _, lo, hi in regions)
    return Dumped(
        out, answer.vm_pid, answer.comm, len(regions), size, answer.unreadable, time.monotonic() - t0
    )


@dataclass(frozen=True)
class _Answer:
    vm_pid: int
    comm: str
    unreadable: tuple[str, ...]


def _answer(got: dict[str, object]) -> _Answer:
    """The monitor's answer, checked (it relays the guest's numbers)."""
    vm_pid, comm, unreadable = got.get("vm_pid"), got.get("comm"), got.get("unreadable")
    if type(vm_pid) is not int or not isinstance(comm, str) or not isinstance(unreadable, list):
        raise ForensicsError("the guest's answer to dump_memory is malformed")
    return _Answer(vm_pid, comm[:64], tuple(str(x)[:300] for x in unreadable[:64]))


def _check(root: Path, max_bytes: int) -> list[tuple[str, int, int]]:
    """The regions the guest wrote as (file name, start, end), sorted; ForensicsError
    on anything but maps.txt and region files of the right size."""
    check_tree(root, max_bytes + (16 << 20), "the memory dump the guest wrote")
    regions = []
    for entry in os.scandir(root):
        if entry.name == MAPS and entry.is_file(follow_symlinks=False):
            continue
        m = REGION.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            raise ForensicsError(f"the memory dump holds an unexpected {entry.name!r}")
        lo, hi = int(m[1], 16), int(m[2], 16)
        if hi <= lo or entry.stat(follow_symlinks=False).st_size != hi - lo:
            raise ForensicsError(f"the memory dump's {entry.name} does not hold its address range")
        regions.append((entry.name, lo, hi))
    if not (root / MAPS).is_file():
        raise ForensicsError("the memory dump has no maps.txt: the guest did not read the process")
    if sum(hi - lo for _, lo, hi in regions) > max_bytes:
        raise ForensicsError(f"the memory dump exceeds {max_bytes} bytes", hint="raise --max-size")
    return sorted(regions, key=lambda r: r[1])


def _write_tar(
    root: Path, regions: list[tuple[str, int, int]], summary: dict[str, object], out: Path
) -> None:
    """dump.json, maps.txt, regions/* into ``out`` (atomically: a temp file, then rename)."""
    with atomic_writer(out) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(summary, indent=1).encode()
        info = tarfile.TarInfo("dump.json")
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        tar.addfile(info, io.BytesIO(data))
        for name, arcname in [(MAPS, MAPS), *((n, f"regions/{n}") for n, _, _ in regions)]:
            fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ForensicsError(f"the memory dump's {name} is not a regular file")
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
                tar.addfile(info, fh)
