"""The monitor's operations on the container's whole state, for forensics and
snapshots: CRIU checkpoints, memory dumps, VM snapshots, facts about the guest.
(Functions of the session, kept apart so session.py stays about its lifecycle.)"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmpod.errors import VmpodError
from vmpod.runtime.control import Msg
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.rules import require

if TYPE_CHECKING:
    from vmpod.runtime.session import Session


def handlers(session: Session) -> dict[str, Callable[[Msg], Awaitable[Msg]]]:
    """The control socket's ops served here, bound to ``session``."""
    ops = {
        "checkpoint": checkpoint,
        "dump_memory": dump_memory,
        "snapshot": snapshot,
        "guest_facts": guest_facts,
    }
    return {name: functools.partial(fn, session) for name, fn in ops.items()}


async def checkpoint(self: Session, msg: Msg) -> Msg:
    """CRIU images of the container into the host directory ``dir`` (forensics)."""
    where, flags = msg.get("dir"), msg.get("flags") or {}
    if not isinstance(where, str) or not os.path.isabs(where) or not os.path.isdir(where):
        raise RuntimeCliError(f"checkpoint: {where!r} is not an existing absolute directory")
    if not isinstance(flags, dict) or not set(flags) <= {
        "leave_running",
        "tcp_established",
        "file_locks",
    }:
        raise RuntimeCliError(f"checkpoint: invalid flags {flags!r}")
    require("checkpoint", self.status)
    assert self.container is not None
    if self.a.root_disk or self.a.snapshot:
        raise RuntimeCliError(
            "checkpoint: the container runs with its root in the VM (--root-in-vm): there is no "
            "shared directory for CRIU's images; use vmpod snapshot, or run it without --root-in-vm"
        )
    try:
        await self.container.checkpoint(Path(where), **{k: bool(v) for k, v in flags.items()})
    finally:
        self.persist()
    return {}


async def dump_memory(self: Session, msg: Msg) -> Msg:
    """The memory of the container's process ``pid`` into the empty host directory ``dir``."""
    where, pid, max_bytes = msg.get("dir"), msg.get("pid"), msg.get("max_bytes")
    if not isinstance(where, str) or not os.path.isabs(where) or not os.path.isdir(where):
        raise RuntimeCliError(f"dump_memory: {where!r} is not an existing absolute directory")
    if type(pid) is not int or type(max_bytes) is not int or pid <= 0 or max_bytes <= 0:
        raise RuntimeCliError(f"dump_memory: invalid pid {pid!r} or size {max_bytes!r}")
    require("checkpoint", self.status)  # running or paused, as for a checkpoint
    assert self.container is not None
    got = await self.container.dump_memory(pid, Path(where), max_bytes)
    return {
        "vm_pid": got.vm_pid,
        "comm": got.comm,
        "regions": got.regions,
        "bytes": got.bytes,
        "unreadable": list(got.unreadable),
    }


async def snapshot(self: Session, msg: Msg) -> Msg:
    """The VM's whole state into the new directory ``dir`` (`vmpod snapshot`);
    the container runs on, or with ``stop`` ends with its VM."""
    from vmpod.sandbox import snapshot as snap

    where, stop, extra = msg.get("dir"), msg.get("stop"), msg.get("extra") or {}
    if not isinstance(where, str) or not os.path.isabs(where) or not isinstance(extra, dict):
        raise RuntimeCliError(f"snapshot: invalid request for {where!r}")
    require("checkpoint", self.status)
    if self.pod is not None or self.members or self.sandbox is None:
        raise RuntimeCliError("snapshot: containers of a pod cannot be snapshotted yet")
    try:
        m = await snap.save(self.sandbox, Path(where), stop=bool(stop), extra=extra)
    except VmpodError as err:
        raise RuntimeCliError(err.message, hint=err.hint) from err
    if stop:
        asyncio.get_running_loop().call_soon(self.finish, 128 + signal.SIGKILL)
    return {"ram_bytes": m.ram_bytes, "state_size": m.state_size}


async def guest_facts(self: Session, msg: Msg) -> Msg:
    """The guest's kernel and runc, and whether CRIU works there (first line: its version)."""
    sandbox = self.sandbox or self.pod
    if sandbox is None:
        raise RuntimeCliError("the container has no VM")
    info = await sandbox.guest_info()
    criu = await sandbox.criu_check()
    return {
        "kernel": info.kernel,
        "runc": info.runc,
        "criu_status": criu.status,
        "criu": criu.stdout,
        "guest_runtime": self.a.guest_runtime,  # what runs this container in the VM
    }
