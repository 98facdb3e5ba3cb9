"""The agent as PID 1 (of a new PID namespace, as in the guest): without any SIGCHLD
handler it still reaps the orphans that the kernel re-parents to it."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmpod
from tests.unit.test_agent_harness import FAKE_RUNC, TIMEOUT, Host, create, start
from vmpod.agent import protocol as p

SRC = str(Path(vmpod.__file__).resolve().parents[1])
AS_PID1 = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from vmpod.agent.guest.config import AgentConfig
from vmpod.agent.guest.server import run_agent
assert os.getpid() == 1
run_agent(int(sys.argv[2]), AgentConfig(**json.loads(sys.argv[3])))
"""


def _pid_namespaces() -> bool:
    try:
        return (
            subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=TIMEOUT
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def pid1(tmp_path: Path) -> Iterator[Host]:
    if not _pid_namespaces():
        pytest.skip("needs unshare --pid (root)")
    host_sock, guest_sock = socket.socketpair()
    config = {
        "bundles": str(tmp_path / "bundles"),
        "runc_root": str(tmp_path / "runc"),
        "runtimes": {"runc": FAKE_RUNC},
        "allow_dir_rootfs": True,
        "set_clock": False,
    }
    proc = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            sys.executable,
            "-c",
            AS_PID1,
            SRC,
            str(guest_sock.fileno()),
            json.dumps(config),
        ],
        pass_fds=[guest_sock.fileno()],
    )
    guest_sock.close()
    host = Host(host_sock)
    try:
        yield host
        assert host.call("shutdown") == p.Empty()
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        host_sock.close()


def test_pid1_agent_reaps_orphans(pid1: Host, tmp_path: Path) -> None:
    pid1.hello()
    create(pid1, tmp_path, "c1", ["cat"])
    start(pid1, "c1", 1, stdin=True)
    # sh leaves a background child behind: once sh exits it is PID 1's to reap
    pid1.call(
        "exec",
        {
            "container_id": "c1",
            "stream": 2,
            "process": {"args": ["sh", "-c", "sleep 0.1 > /dev/null 2>&1 & echo $!"], "env": ["PATH=/bin"]},
        },
    )
    assert pid1.exit_event(2).status == 0
    orphan = int(pid1.out(2))
    # every exec wakes the agent's loop, which reaps after each round; a zombie
    # left unreaped would show up as state Z forever
    deadline = time.monotonic() + TIMEOUT
    for stream in itertools.count(3):
        if time.monotonic() > deadline:
            raise AssertionError(f"orphan {orphan} never reaped: {pid1.out(stream - 1)!r}")
        pid1.call(
            "exec",
            {
                "container_id": "c1",
                "stream": stream,
                "process": {
                    "args": ["sh", "-c", f"cat /proc/{orphan}/stat 2>/dev/null || echo gone"],
                    "env": ["PATH=/bin"],
                },
            },
        )
        pid1.exit_event(stream)
        if pid1.out(stream) == b"gone\n":
            break
    pid1.close_stdin(1)
    assert pid1.exit_event(1).status == 0
