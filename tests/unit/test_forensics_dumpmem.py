"""`forensics dump-memory` without VMs: the agent's op in process (a real process
of this host, run by the fake runc, holding a secret built at run time), the
guest-side pid resolution and region copy, and the host's checks of what a
(hostile) guest wrote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import InProcessAgent, agent_config, create, start
from vmpod.agent import protocol as p
from vmpod.agent.guest import memory
from vmpod.agent.guest.errors import AgentFailure
from vmpod.errors import ForensicsError
from vmpod.forensics.dumpmem import _check, _write_tar

# the secret exists only once the process runs: its argv holds it reversed
HIDDEN = "terces-yromem-ylno"
SECRET = HIDDEN[::-1].encode()
# it touches its argv[1] once the secret is built (a dump before that would miss it)
HOLDER = f"import sys, time; s = {HIDDEN!r}[::-1] * 2; open(sys.argv[1], 'w').close(); time.sleep(60)"


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    (d / "c1" / "memory").mkdir(parents=True)
    return d


@pytest.fixture
def agent(tmp_path: Path, shared: Path) -> Iterator[InProcessAgent]:
    host = InProcessAgent(agent_config(tmp_path, shared_dir=str(shared), shared_premounted=True))
    try:
        yield host
    finally:
        host.close()


def _pid_file(tmp_path: Path, cid: str) -> int:
    return int((tmp_path / "bundles" / cid / "init.pid").read_text())


def _dump(pid: int, max_bytes: int = 1 << 30, cid: str = "c1") -> dict[str, object]:
    return {"container_id": cid, "pid": pid, "dir": "c1/memory", "max_bytes": max_bytes}


def test_dump_memory_op(agent: InProcessAgent, tmp_path: Path, shared: Path) -> None:
    assert agent.refused("dump_memory", _dump(1))[0] == "not_found"
    ready = tmp_path / "ready"
    create(agent, tmp_path, "c1", ["python3", "-c", HOLDER, str(ready)])
    assert agent.refused("dump_memory", _dump(1)) == ("invalid", "the shared directory is not mounted")
    agent.call("mount_shared")
    assert agent.refused("dump_memory", _dump(1)) == ("invalid", "container c1 is not running")
    start(agent, "c1", 3)
    pid = _pid_file(tmp_path, "c1")  # the fake runc: no pid namespace, host pids
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the holder never got ready"
        time.sleep(0.05)
    assert agent.refused("dump_memory", _dump(0))[0] == "invalid"
    assert agent.refused("dump_memory", {**_dump(pid), "dir": "c1/../.."})[0] == "invalid"
    assert agent.refused("dump_memory", _dump(pid, max_bytes=4096)) == (
        "invalid",
        "the process's readable memory exceeds 4096 bytes (raise --max-size)",
    )
    for leftover in (shared / "c1" / "memory").iterdir():
        leftover.unlink()
    got = agent.call("dump_memory", _dump(pid))
    assert isinstance(got, p.MemoryDumped) and got.vm_pid == pid and got.comm == "python3"
    out = shared / "c1" / "memory"
    regions = _check(out, 1 << 30)
    assert len(regions) == got.regions and sum(hi - lo for _, lo, hi in regions) == got.bytes
    maps = (out / "maps.txt").read_text()
    assert "python3" in maps and len(maps.splitlines()) >= got.regions
    assert any(SECRET in (out / name).read_bytes() for name, _, _ in regions)


def test_pids_resolve_in_the_init_pid_namespace() -> None:
    me = os.getpid()
    assert memory.vm_pid(me, me) == me  # this namespace: NSpid's last number is the pid
    with pytest.raises(AgentFailure, match="has no process 4194303"):
        memory.vm_pid(me, (1 << 22) - 1)
    with pytest.raises(AgentFailure, match="init is gone"):
        memory.vm_pid((1 << 22) - 1, 1)


def test_regions_of_maps() -> None:
    maps = (
        "00400000-00401000 r-xp 00000000 08:01 12 /bin/busybox\n"
        "00600000-00601000 ---p 00000000 00:00 0\n"  # not readable
        "7ffd1000-7ffd3000 rw-p 00000000 00:00 0 [stack]\n"
        "garbage line\n"
        "zz-yy r--p 0 0 0\n"
    )
    got = memory._regions(maps)
    assert [(lo, hi) for lo, hi, _ in got] == [(0x400000, 0x401000), (0x7FFD1000, 0x7FFD3000)]


def test_guest_dump_of_a_process(tmp_path: Path) -> None:
    # an idle process (a container's is frozen while it is dumped): one that changes
    # its own mappings while being read (the test runner) may lose a region
    build = "bytes(reversed(b'ereh-ma-i-rekram')) * 3"  # built at run time, in its heap
    code = f"import sys, time; m = {build}; print('ready', flush=True); time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        regions, total, unreadable = memory.dump(child.pid, str(tmp_path), 1 << 40)
    finally:
        child.kill()
        child.wait()
    names = _check(tmp_path, 1 << 40)
    marker = bytes(reversed(b"ereh-ma-i-rekram")) * 3
    assert len(names) == regions and sum(hi - lo for _, lo, hi in names) == total
    assert any(marker in (tmp_path / name).read_bytes() for name, _, _ in names)
    # what the kernel refused ([vvar], [vsyscall] above 2**63...) is listed, not written
    maps = (tmp_path / "maps.txt").read_text().splitlines()
    assert set(unreadable) <= set(maps) and not any(line.endswith("/python3") for line in unreadable)


# -- the host's checks of what the guest wrote ----------------------------------------


def _region(root: Path, lo: int, hi: int, data: bytes | None = None) -> Path:
    path = root / f"{lo:016x}-{hi:016x}.bin"
    path.write_bytes(data if data is not None else bytes(hi - lo))
    return path


def test_check_takes_only_what_the_format_names(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "maps.txt").write_text("x")
    _region(root, 0x2000, 0x3000)
    _region(root, 0x1000, 0x2000)
    assert _check(root, 8192) == [
        ("0000000000001000-0000000000002000.bin", 0x1000, 0x2000),
        ("0000000000002000-0000000000003000.bin", 0x2000, 0x3000),
    ]
    with pytest.raises(ForensicsError, match="exceeds 4096 bytes"):
        _check(root, 4096)
    out = tmp_path / "dump.tar"
    _write_tar(root, _check(root, 8192), {"pid": 1}, out)
    with tarfile.open(out) as tar:
        assert tar.getnames() == [
            "dump.json",
            "maps.txt",
            "regions/0000000000001000-0000000000002000.bin",
            "regions/0000000000002000-0000000000003000.bin",
        ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda r: (r / "x.bin").symlink_to("/etc/passwd"), "not a regular file or directory"),
        (lambda r: (r / "evil").write_text("x"), "unexpected 'evil'"),
        (lambda r: (r / "sub").mkdir(), "unexpected 'sub'"),
        (lambda r: _region(r, 0x1000, 0x3000, b"short"), "does not hold its address range"),
        (lambda r: _region(r, 0x3000, 0x1000, b""), "does not hold its address range"),
        (lambda r: os.mkfifo(r / "fifo"), "not a regular file or directory"),
        (lambda r: (r / "maps.txt").unlink(), "has no maps.txt"),
    ],
)
def test_check_refuses_a_hostile_dump(tmp_path: Path, make: object, error: str) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "maps.txt").write_text("x")
    assert callable(make)
    make(root)
    with pytest.raises(ForensicsError, match=re.escape(error)):
        _check(root, 1 << 20)
