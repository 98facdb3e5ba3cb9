"""Whole-VM state to and from a file descriptor, over QMP (a sandbox snapshot).

The jailed QEMU can neither spawn (seccomp ``spawn=deny`` rules out ``exec:``
migration) nor open a path for writing, and QEMU 7.2 has no ``file:`` migration:
the owner opens the file and hands QEMU the descriptor over the QMP socket
(SCM_RIGHTS + ``getfd``), then migrates to or from ``fd:NAME``. The restored QEMU
is started with ``-S -incoming defer`` (``VmConfig.incoming``) and stays paused
until ``resume``.
"""

from __future__ import annotations

import asyncio
import time

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmpod.errors import HypervisorError

FD_NAME = "vmpod-state"
# QEMU's default cap is 32 MiB/s: a paused VM has no reason to be throttled
MAX_BANDWIDTH = 1 << 40
POLL = 0.01
TIMEOUT = 600.0  # seconds: a large guest under a loaded host


async def save(qmp: QMPClient, fd: int, *, timeout: float = TIMEOUT) -> int:
    """Pause the VM and write its whole state to ``fd``; the VM stays paused.
    Returns the bytes QEMU wrote."""
    try:
        blocked = await _blockers(qmp)
        if blocked:
            raise HypervisorError(f"QEMU cannot save this VM: {blocked}")
        await qmp.execute("stop")
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        await _give_fd(qmp, fd)
        await qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        info = await _wait_migration(qmp, timeout, "saving the VM state")
    except QMPError as err:
        raise HypervisorError(f"saving the VM state failed: {err}") from err
    ram = info.get("ram")
    return int(ram.get("total", 0)) if isinstance(ram, dict) else 0


async def load(qmp: QMPClient, fd: int, *, timeout: float = TIMEOUT) -> None:
    """Load the state from ``fd`` into a QEMU started with ``-incoming defer``; the
    VM is left paused (``resume`` runs it)."""
    try:
        await _give_fd(qmp, fd)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        deadline = time.monotonic() + timeout
        while True:
            status = await qmp.execute("query-status")
            state = status.get("status") if isinstance(status, dict) else None
            if state in ("paused", "prelaunch", "running"):
                return
            if state not in ("inmigrate",):
                raise HypervisorError(f"loading the VM state failed (QEMU is {state})")
            if time.monotonic() > deadline:
                raise HypervisorError(f"loading the VM state took more than {timeout:g}s")
            await asyncio.sleep(POLL)
    except QMPError as err:
        raise HypervisorError(f"loading the VM state failed: {err}") from err


async def resume(qmp: QMPClient) -> None:
    try:
        await qmp.execute("cont")
    except QMPError as err:
        raise HypervisorError(f"cannot resume the VM: {err}") from err


async def _give_fd(qmp: QMPClient, fd: int) -> None:
    qmp.send_fd_scm(fd)
    await qmp.execute("getfd", {"fdname": FD_NAME})


async def _blockers(qmp: QMPClient) -> str:
    """Why QEMU would refuse to migrate (e.g. a vhost-user-fs device), or ""."""
    info = await qmp.execute("query-migrate")
    reasons = info.get("blocked-reasons") if isinstance(info, dict) else None
    return "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else ""


async def _wait_migration(qmp: QMPClient, timeout: float, what: str) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"{what} failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            await qmp.execute("migrate_cancel")
            raise HypervisorError(f"{what} took more than {timeout:g}s")
        await asyncio.sleep(POLL)
