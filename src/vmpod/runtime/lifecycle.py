"""create / start / delete: the steps that involve the monitor, hooks and cleanup."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

from vmpod.fsutil import atomic_write, is_locked
from vmpod.runtime import ipc
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.hooks import HookError, run_hooks, run_hooks_warn
from vmpod.runtime.rules import require
from vmpod.runtime.state import (
    CREATED,
    CREATING,
    RUNNING,
    STOPPED,
    ContainerState,
    Store,
    check_id,
    now_rfc3339,
    proc_start_time,
)

log = logging.getLogger(__name__)
DESTROY_TIMEOUT = 10.0


def sock_path(store: Store, cid: str) -> Path:
    return store.dir(cid) / "monitor.sock"


def write_pid_file(path: str, pid: int) -> None:
    atomic_write(Path(path).absolute(), str(pid).encode(), mode=0o600)


def create(store: Store, cid: str, bundle: str, pid_file: str, console_socket: str,
           log_opts: tuple[str, str, bool] = ("", "text", False)) -> None:
    # Heavy imports only here, for start-up time: start/delete (this module) stay quick.
    from vmpod.images import resolve_rootfs
    from vmpod.paths import default_paths
    from vmpod.runtime.bundle import load_spec, translate
    from vmpod.runtime.config import load_config
    from vmpod.runtime.monitor import monitor_main
    from vmpod.runtime.session import MonitorArgs
    from vmpod.sandbox import SandboxSpec, prepare
    from vmpod.sandbox.build import with_rootfs
    from vmpod.storage.erofs import rootfs_disk

    check_id(cid)
    if (store.dir(cid) / "state.json").exists():
        raise RuntimeCliError("container with given ID already exists")
    cfg = load_config()
    bundle_dir = Path(bundle).absolute()
    plan = translate(load_spec(bundle_dir), bundle_dir, cid, cfg)
    if plan.terminal and not console_socket:
        raise RuntimeCliError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and not plan.terminal:
        raise RuntimeCliError("cannot use console socket if runc will not detach or allocate tty")
    for warning in plan.warnings:
        log.warning("%s", warning)
    paths = default_paths()
    # resolved before anything is made: an unknown kernel or module fails `create` itself
    sandbox = prepare(paths, SandboxSpec(
        kernel=plan.kernel, accel=cfg.accel, cpus=plan.cpus, memory_mb=plan.memory_mb,
        boot_timeout=cfg.boot_timeout, kernel_modules=plan.kernel_modules))
    source = resolve_rootfs(plan.rootfs)
    disks = paths.images / "disks"
    with store.disks_lock():   # a delete must not remove the disk before our state names it
        before = set(os.listdir(disks)) if disks.is_dir() else set()
        disk = rootfs_disk(paths, source)
        made = disk.name not in before
        if made:
            _marker(disk).touch()   # made by the runtime: its last user's delete removes it
        st = ContainerState(id=cid, bundle=str(bundle_dir), rootfs=str(plan.rootfs),
                            created=now_rfc3339(), annotations=plan.annotations,
                            hooks=plan.hooks, disk=str(disk))
        try:
            _, lock, mon_lock = store.begin(st)
        except BaseException:
            if made:   # (a container with this id may exist and use the disk: it counts)
                _drop_disk(store, st, mine=False)
            raise
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        args = MonitorArgs(store_root=str(store.root), cid=cid, plan=plan,
                           sandbox=with_rootfs(sandbox, disk),
                           guest_runtime=cfg.guest_runtime, console_socket=console_socket,
                           paths=paths, ready_fd=w, log_path=log_opts[0],
                           log_format=log_opts[1], debug=log_opts[2])
        pid = os.fork()
        if pid == 0:   # the monitor: keeps our stdio, never returns
            os.close(r)
            os.close(lock)
            monitor_main(args, keep=(mon_lock,))
        os.close(w)
        os.close(mon_lock)
        reply = _read_ready(r)
        if not reply.get("ok"):
            destroy(store, store.load(cid))
            cleanup(store, store.load(cid))
            raise RuntimeCliError(str(reply.get("error") or "the monitor failed"))
        st = store.load(cid)
        try:
            for kind in ("prestart", "createRuntime", "createContainer"):
                run_hooks(st.hooks, kind, st.oci(CREATING))
            ipc.request(sock_path(store, cid), {"op": "created"})
            if pid_file:
                write_pid_file(pid_file, pid)
        except BaseException:
            # The spec's lifecycle: a failed create hook destroys the container, then
            # the poststop hooks run. Any other failure here cleans up the same way.
            destroy(store, st)
            cleanup(store, st)
            run_hooks_warn(st.hooks, "poststop", st.oci(STOPPED))
            raise
    finally:
        os.close(lock)


def _read_ready(fd: int) -> dict[str, object]:
    data = b""
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(4096):
            data += chunk
    try:
        reply = json.loads(data.decode())
    except ValueError:
        return {"ok": False, "error": "the container's monitor died during create"}
    return reply if isinstance(reply, dict) else {"ok": False, "error": "bad monitor reply"}


def start(store: Store, cid: str) -> None:
    with store.lock(cid):
        st = store.load(cid)
        require("start", store.status(st))
        try:
            run_hooks(st.hooks, "startContainer", st.oci(CREATED))
        except HookError:
            destroy(store, st)
            raise
        ipc.request(sock_path(store, cid), {"op": "start"})
        run_hooks_warn(st.hooks, "poststart", store.load(cid).oci(RUNNING))


def delete(store: Store, cid: str, force: bool) -> None:
    check_id(cid)
    try:
        st = store.load(cid)
    except RuntimeCliError:
        if force:     # like runc: a half-made directory goes, and --force never fails
            store.remove(cid)
            return
        raise
    with store.lock(cid):
        st = store.load(cid)
        if not force:
            require("delete", store.status(st), cid)
        destroy(store, st)
        cleanup(store, st)
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
    """Remove what a dead monitor may have left: VM state dir, owned disk, state dir."""
    if st.sandbox_dir:
        _remove_unlocked(Path(st.sandbox_dir))
    _drop_disk(store, st)
    store.remove(st.id)


def _marker(disk: Path) -> Path:
    return disk.with_name(disk.name + ".vmpod-runtime")


def _drop_disk(store: Store, st: ContainerState, mine: bool = True) -> None:
    """Remove the rootfs disk if the runtime made it (podman and containerd give every
    container a fresh rootfs, so a new disk each time) and no other container here
    uses it. Called under ``disks_lock`` or takes it."""
    if not st.disk:
        return
    disk = Path(st.disk)
    if not _marker(disk).exists():
        return     # a plain cache entry (vmpod run's): not ours to remove
    if not mine:   # create's own failure path already holds the lock
        _drop_unused(store, st, disk, mine)
        return
    with store.disks_lock():
        _drop_unused(store, st, disk, mine)


def _drop_unused(store: Store, st: ContainerState, disk: Path, mine: bool) -> None:
    others = [o for o in store.ids() if o != st.id or not mine]
    if any(_disk_of(store, o) == st.disk for o in others):
        return
    disk.unlink(missing_ok=True)
    _marker(disk).unlink(missing_ok=True)


def _disk_of(store: Store, cid: str) -> str:
    try:
        return store.load(cid).disk
    except RuntimeCliError:
        return ""


def _remove_unlocked(d: Path) -> None:
    """Remove a VM state dir unless its owner still holds its lock."""
    try:
        if is_locked(d / "lock"):
            return      # still in use (should not happen once the monitor is gone)
    except OSError:
        return
    shutil.rmtree(d, ignore_errors=True)
