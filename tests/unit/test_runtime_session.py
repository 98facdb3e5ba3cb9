"""The runtime's monitor session without a VM: the control server, start, kill,
pause/resume/ps, exec with passed fds and with a console socket, destroy — over
the real monitor socket, with the fake hypervisor and the real agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.fixtures.fakevm import fake_config, fake_rootfs, registered
from tests.unit.test_mounts import unmount_all
from vmpod.mounts import is_mount_point
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.bundle import Plan
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.session import MonitorArgs, Session
from vmpod.runtime.state import ContainerState, Store, now_rfc3339

T = TypeVar("T")


class Monitor:
    """A Session running on its own loop in a thread, as the forked monitor would."""

    def __init__(self, tmp: Path, args: list[str], *, terminal: bool = False) -> None:
        self.tmp = tmp
        self.store = Store(str(tmp / "state"))
        rootfs = fake_rootfs(tmp)
        self.store.begin(ContainerState(id="c1", bundle=str(tmp), rootfs=str(rootfs), created=now_rfc3339()))
        self.console = tmp / "console.sock"
        self.console_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.console_listener.bind(str(self.console))
        self.console_listener.listen(4)
        plan = Plan(
            spec={
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"args": args, "cwd": "/", "terminal": terminal, "env": ["PATH=/usr/bin:/bin"]},
            },
            rootfs=rootfs,
            volumes=(),
            cpus=1,
            memory_mb=512,
            kernel="6.1",
            terminal=terminal,
            hooks={},
            annotations={},
        )
        self.paths = paths = Paths(home=tmp / "home", run=tmp / "run")
        r, self.ready_w = os.pipe()
        self.ready_r = os.fdopen(r, "rb")
        self.args = MonitorArgs(
            store_root=str(self.store.root),
            cid="c1",
            plan=plan,
            # as create makes it: the bundle's rootfs directory is shared with the VM
            sandbox=fake_config(paths.home, shared_fs=True),
            guest_runtime="runc",
            console_socket=str(self.console),
            paths=paths,
            ready_fd=self.ready_w,
        )
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # (signal handlers need the main thread: the session's are tested elsewhere)
        loop = asyncio.new_event_loop()
        loop.add_signal_handler = lambda *a: None  # type: ignore[method-assign]
        try:
            self.status = loop.run_until_complete(Session(self.args).run())
        finally:
            loop.close()

    def start(self) -> dict[str, object]:
        self.thread.start()
        ready = json.loads(self.ready_r.readline() or b"{}")
        assert isinstance(ready, dict)
        return ready

    def request(self, **msg: object) -> dict[str, object]:
        return ipc.request(self.store.dir("c1") / "monitor.sock", dict(msg), timeout=20)

    def console_master(self) -> int:
        conn, _ = self.console_listener.accept()
        with conn:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
        return fds[0]

    def shared_dirs(self) -> list[Path]:
        """The sandboxes' shared directories on the host (gone with the monitor)."""
        return list(self.paths.shared.iterdir()) if self.paths.shared.is_dir() else []

    def wait(self) -> int | None:
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.status


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Callable[..., Monitor]]:
    made: list[Monitor] = []

    def make(*args: str, terminal: bool = False) -> Monitor:
        m = Monitor(tmp_path, list(args), terminal=terminal)
        made.append(m)
        return m

    try:
        with registered():
            yield make
        for m in made:
            if m.thread.is_alive():
                m.request(op="destroy")
                m.wait()
            m.console_listener.close()
            assert not m.shared_dirs(), "a shared directory outlived its monitor"
    finally:
        unmount_all(tmp_path)


def state(m: Monitor) -> str:
    return m.store.load("c1").status


def read_until(fd: int, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = os.read(fd, 4096)
        assert chunk, data
        data += chunk
    return data


def test_lifecycle_over_the_control_socket(monitor: Callable[..., Monitor]) -> None:
    m = monitor("sh", "-c", "echo up; exec sleep 30", terminal=True)
    assert m.start()["ok"] is True
    master = m.console_master()
    assert state(m) == "creating"
    m.request(op="created")
    assert state(m) == "created"
    shared = Path(m.store.load("c1").shared_dir)  # recorded for delete's cleanup
    assert m.shared_dirs() == [shared] and is_mount_point(shared / "c1" / "rootfs")
    with pytest.raises(RuntimeCliError, match="unknown monitor operation"):
        m.request(op="format")
    m.request(op="start")
    assert state(m) == "running"
    assert b"up" in read_until(master, b"up")
    with pytest.raises(RuntimeCliError, match="cannot start an already running container"):
        m.request(op="start")
    m.request(op="runtime", command="pause", args=[], resources={})
    assert state(m) == "paused"
    with pytest.raises(RuntimeCliError, match="container already paused"):
        m.request(op="runtime", command="pause", args=[], resources={})
    m.request(op="runtime", command="resume", args=[], resources={})
    with pytest.raises(RuntimeCliError, match="invalid runtime request"):
        m.request(op="runtime", command="checkpoint", args=[], resources={})
    assert json.loads(
        str(m.request(op="runtime", command="ps", args=["--format", "json"], resources={})["stdout"])
    )
    with pytest.raises(RuntimeCliError, match="invalid signal"):
        m.request(op="kill", signal=99)
    m.request(op="kill", signal=signal.SIGTERM)
    assert m.wait() == 128 + signal.SIGTERM
    st = m.store.load("c1")
    assert (st.status, st.exit_status) == ("stopped", 128 + signal.SIGTERM)
    assert not shared.exists()
    os.close(master)


def test_the_bundle_rootfs_is_shared_and_written_on_the_host(monitor: Callable[..., Monitor]) -> None:
    m = monitor("sh", "-c", "echo from-the-container > written; exit 3")
    assert m.start()["ok"] is True
    m.request(op="created")
    m.request(op="start")
    assert m.wait() == 3
    rootfs = Path(m.store.load("c1").rootfs)
    assert (rootfs / "written").read_text() == "from-the-container\n"
    assert m.shared_dirs() == []


def test_kill_before_start_and_destroy(monitor: Callable[..., Monitor]) -> None:
    m = monitor("true", terminal=True)
    m.start()
    os.close(m.console_master())
    m.request(op="created")
    m.request(op="kill", signal=signal.SIGKILL)
    assert m.wait() == 128 + signal.SIGKILL


def test_exec_with_passed_fds(monitor: Callable[..., Monitor]) -> None:
    m = monitor("sleep", "30", terminal=True)
    m.start()
    os.close(m.console_master())
    m.request(op="created")
    m.request(op="start")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    client = ipc.Client(m.store.dir("c1") / "monitor.sock", 20)
    process = {"args": ["sh", "-c", "echo o; echo e >&2; exit 5"], "cwd": "/", "env": ["PATH=/bin:/usr/bin"]}
    assert client.request({"op": "exec", "process": process}, [null, out_w, err_w])["ok"]
    for fd in (null, out_w, err_w):
        os.close(fd)
    exit_ = client.recv()
    client.close()
    assert exit_ == {"event": "exit", "status": 5, "message": ""}
    assert os.read(out_r, 100) == b"o\n" and os.read(err_r, 100) == b"e\n"
    os.close(out_r)
    os.close(err_r)
    # an exec without its stdio is refused
    with pytest.raises(RuntimeCliError, match="3 fds"):
        m.request(op="exec", process=process)
    m.request(op="destroy")
    assert m.wait() == 128 + signal.SIGKILL


def test_exec_with_a_console_socket_and_a_vanishing_caller(monitor: Callable[..., Monitor]) -> None:
    m = monitor("sleep", "30", terminal=True)
    m.start()
    os.close(m.console_master())
    m.request(op="created")
    m.request(op="start")
    client = ipc.Client(m.store.dir("c1") / "monitor.sock", 20)
    process = {
        "args": ["sh", "-c", "echo ready; exec sleep 30"],
        "cwd": "/",
        "terminal": True,
        "env": ["PATH=/bin:/usr/bin"],
    }
    client.send({"op": "exec", "process": process, "console_socket": str(m.console)})
    master = m.console_master()
    assert client.recv()["ok"]
    assert b"ready" in read_until(master, b"ready")
    client.send({"op": "resize", "rows": 30, "cols": 100})
    client.close()  # the caller went away: its process is killed
    os.close(master)
    m.request(op="destroy")
    assert m.wait() == 128 + signal.SIGKILL


def test_a_failed_boot_is_reported_to_create(monitor: Callable[..., Monitor]) -> None:
    from tests.fixtures.fakevm import FakeVm

    FakeVm.die_on_launch = 3
    m = monitor("true")
    ready = m.start()
    assert ready["ok"] is False and "stopped during boot" in str(ready["error"])
    assert m.wait() == 255


def test_a_lost_vm_ends_the_container_as_if_killed(monitor: Callable[..., Monitor]) -> None:
    from tests.fixtures.fakevm import FakeVm

    m = monitor("sleep", "30", terminal=True)
    m.start()
    os.close(m.console_master())
    m.request(op="created")
    m.request(op="start")
    FakeVm.launched[-1].crash(-9)
    assert m.wait() == 128 + signal.SIGKILL
    assert m.store.load("c1").exit_status == 128 + signal.SIGKILL
