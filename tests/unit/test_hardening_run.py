"""Hardening of `vmpod run` and the VM's helper processes (issue 10: defects 1, 2,
3 and 9), without a VM: fake QEMU and virtiofsd, the attach layer, start-up fds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.test_qemu_driver import Fleet, fleet, run  # noqa: F401 (fixture)
from tests.unit.test_qemu_virtiofs import shared_vm, source  # noqa: F401 (fixture)

# -- 1: helpers are out of the user's process group ------------------------------------


def _session_and_group(pid: int) -> tuple[int, int]:
    return os.getsid(pid), os.getpgid(pid)


def test_qemu_and_virtiofsd_run_in_their_own_session(
    fleet: Fleet,  # noqa: F811
    source: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground process group) must reach vmpod
    only: QEMU and virtiofsd lead sessions of their own, so no group signal of the
    user's can hit them, and vmpod forwards it to the container instead."""
    vm = shared_vm(fleet, source, monkeypatch)
    run(vm.launch())
    try:
        ours = _session_and_group(0)
        fs = vm._fs
        assert vm.pid is not None and fs is not None and fs.pid is not None
        for pid in (vm.pid, fs.pid):
            sid, pgid = _session_and_group(pid)
            assert (sid, pgid) != ours and sid != ours[0] and pgid != ours[1]
            assert sid == pgid  # a session leader's own group (setsid)
            # PDEATHSIG survives setsid: still SIGKILL when the owner dies
            status = Path(f"/proc/{pid}/status").read_text()
            assert "PPid:\t" + str(os.getpid()) in status
    finally:
        vm.kill()
