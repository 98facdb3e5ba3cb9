"""The monitor process itself (forked, as `create` does): it detaches, serves the
session, and exits with its container's status — re-raising a fatal signal."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fakevm import registered
from tests.unit.test_mounts import unmount_all
from tests.unit.test_runtime_session import Monitor
from vmpod.runtime.monitor import monitor_main


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path: Path) -> Iterator[None]:
    """The forked monitor's sandbox shares the rootfs with bind mounts: they go
    with the monitor (and, should a test fail, at teardown)."""
    try:
        yield
    finally:
        unmount_all(tmp_path)


def fork_monitor(m: Monitor) -> int:
    pid = os.fork()
    if pid == 0:  # the monitor never returns
        monitor_main(m.args, keep=())
    os.close(m.ready_w)
    return pid


def test_the_monitor_exits_with_the_status_of_its_container(tmp_path: Path) -> None:
    with registered():
        m = Monitor(tmp_path, ["sh", "-c", "exit 7"], terminal=True)
        pid = fork_monitor(m)
        assert m.ready_r.readline()
        os.close(m.console_master())
        m.request(op="created")
        m.request(op="start")
        _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == 7
    assert m.store.load("c1").exit_status == 7
    assert m.shared_dirs() == []


def test_a_container_killed_by_a_signal_kills_its_monitor_the_same_way(tmp_path: Path) -> None:
    log = tmp_path / "runtime.log"
    with registered():
        m = Monitor(tmp_path, ["sleep", "30"], terminal=True)
        m.args = dataclasses.replace(m.args, log_path=str(log), debug=True)
        pid = fork_monitor(m)
        assert m.ready_r.readline()
        os.close(m.console_master())
        m.request(op="created")
        m.request(op="start")
        m.request(op="kill", signal=signal.SIGTERM)
        _, wstatus = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGTERM
    assert "level=debug" in log.read_text()
    assert m.shared_dirs() == []


def test_a_monitor_that_cannot_boot_reports_and_exits_255(tmp_path: Path) -> None:
    from tests.fixtures.fakevm import FakeVm

    with registered():
        FakeVm.die_on_launch = 1
        m = Monitor(tmp_path, ["true"])
        pid = fork_monitor(m)
        assert b'"ok": false' in m.ready_r.readline()
        _, wstatus = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wstatus) == 255
