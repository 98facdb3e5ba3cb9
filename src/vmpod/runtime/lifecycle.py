"""create / start / delete: the steps that involve the monitor, hooks and cleanup."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

from vmpod.fsutil import atomic_write, is_locked
from vmpod.runtime import ipc
from vmpod.runtime.cgroups import remove_recorded
from vmpod.runtime.errors import NotFound, RuntimeCliError
from vmpod.runtime.hooks import HookError, run_hooks, run_hooks_warn
from vmpod.runtime.rules import require
from vmpod.runtime.state import (
    CREATED,
    RUNNING,
    STOPPED,
    ContainerState,
    Store,
    check_id,
    proc_start_time,
)
from vmpod.sandbox.share import SharedDir
from vmpod.timeouts import CONTAINER_START, MONITOR_MARGIN

log = logging.getLogger(__name__)
DESTROY_TIMEOUT = 10.0


def sock_path(store: Store, cid: str) -> Path:
    return store.dir(cid) / "monitor.sock"


def write_pid_file(path: str, pid: int) -> None:
    atomic_write(Path(path).absolute(), str(pid).encode(), mode=0o600)


def start(store: Store, cid: str, restore: str = "") -> None:
    """``restore``: a directory with CRIU images (checkpoint/): the process tree
    is restored from them instead of started (forensics)."""
    with store.lock(cid):
        st = store.load(cid)
        require("start", store.status(st))
        try:
            run_hooks(st.hooks, "startContainer", st.oci(CREATED))
        except HookError:
            destroy(store, st)
            raise
        # as long as the monitor may wait for the guest runtime, or a slow start
        # would be reported failed and then happen anyway
        msg: dict[str, object] = {"op": "start", "restore": restore} if restore else {"op": "start"}
        timeout = CONTAINER_START
        if restore:  # (imported on use: a plain start needs no sandbox stack here)
            from vmpod.sandbox import CHECKPOINT_TIMEOUT

            timeout = CHECKPOINT_TIMEOUT
        ipc.request(sock_path(store, cid), msg, timeout=timeout + MONITOR_MARGIN)
        run_hooks_warn(st.hooks, "poststart", store.load(cid).oci(RUNNING))


def delete(store: Store, cid: str, force: bool) -> None:
    check_id(cid)
    try:
        st = store.load(cid)
    except RuntimeCliError:
        if force:  # like runc: a half-made directory goes, and --force never fails
            store.remove(cid)
            return
        raise
    try:
        with store.lock(cid):
            st = store.load(cid)
            if not force:
                require("delete", store.status(st), cid)
            destroy(store, st)
            cleanup(store, st)
    except NotFound:
        if force:  # a concurrent delete won the race: the container is gone, as asked
            return
        raise
    run_hooks_warn(st.hooks, "poststop", st.oci(STOPPED))


def destroy(store: Store, st: ContainerState) -> None:
    """End the monitor (and with it the VM): ask, then SIGKILL the verified pid."""
    if not store.monitor_alive(st.id):
        return
    with contextlib.suppress(RuntimeCliError, OSError):
        ipc.request(sock_path(store, st.id), {"op": "destroy"}, timeout=5)
    if store.wait_monitor_gone(st.id, DESTROY_TIMEOUT):
        return
    st = store.load(st.id)
    if st.pid and proc_start_time(st.pid) == st.monitor_start:
        log.debug("monitor %d did not exit: killing it", st.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.pid, signal.SIGKILL)
    if not store.wait_monitor_gone(st.id, 5):
        raise RuntimeCliError(f"the monitor of container {st.id} does not go away")


def cleanup(store: Store, st: ContainerState) -> None:
    """Remove what a dead monitor may have left: the VM's shared directory (unmounted,
    never deleted through a mount), its state dir, the container's state dir."""
    if st.shared_dir:
        SharedDir(Path(st.shared_dir)).destroy()
    if st.sandbox_dir:
        _remove_unlocked(Path(st.sandbox_dir))
    remove_recorded(store.dir(st.id))  # the host cgroup a killed monitor could not remove
    store.remove(st.id)


def _remove_unlocked(d: Path) -> None:
    """Remove a VM state dir unless its owner still holds its lock."""
    try:
        if is_locked(d / "lock"):
            return  # still in use (should not happen once the monitor is gone)
    except OSError:
        return
    shutil.rmtree(d, ignore_errors=True)
