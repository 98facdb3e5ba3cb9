"""`create`: plan the container from its bundle, fork its monitor (which boots the
VM, with the bundle's rootfs and volumes shared over virtio-fs) and run the create
hooks.

Imported only by the `create` command: the sandbox stack it needs is heavy,
and the other commands must start quickly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from vmpod.paths import default_paths
from vmpod.runtime import ipc
from vmpod.runtime.bundle import Plan, load_spec, translate
from vmpod.runtime.cgroups import HostCgroup, host_limits
from vmpod.runtime.config import RuntimeConfig, load_config
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.hooks import run_hooks, run_hooks_warn
from vmpod.runtime.lifecycle import cleanup, destroy, sock_path, write_pid_file
from vmpod.runtime.member import MemberArgs, member_main, pod_of
from vmpod.runtime.monitor import monitor_main
from vmpod.runtime.outputlog import LogSink
from vmpod.runtime.session import MonitorArgs
from vmpod.runtime.state import CREATING, STOPPED, ContainerState, Store, check_id, now_rfc3339
from vmpod.sandbox import SandboxSpec, prepare

log = logging.getLogger(__name__)
LogOpts = tuple[str, str, bool]  # --log, --log-format, --debug


def create(
    store: Store,
    cid: str,
    bundle: str,
    pid_file: str,
    console_socket: str,
    log_opts: LogOpts = ("", "text", False),
    *,
    cfg: RuntimeConfig | None = None,
    output_log: LogSink | None = None,
    root_disk: str = "",
    snapshot: str = "",
) -> None:
    """runc's create. ``cfg``: the runtime's configuration (default: its config
    file); ``output_log``: the container's stdout/stderr go to that rotating log
    instead of the stdio ``create`` was given (`vmpod run -d`); ``root_disk``: the
    container's root is that erofs disk, not the bundle's directory over virtio-fs
    (`--root-in-vm`); ``snapshot``: the VM starts from that snapshot directory,
    the container already running in it (`vmpod restore`)."""
    check_id(cid)
    if (store.dir(cid) / "state.json").exists():
        raise RuntimeCliError("container with given ID already exists")
    cfg = cfg or load_config()
    bundle_dir = Path(bundle).absolute()
    plan = translate(load_spec(bundle_dir), bundle_dir, cid, cfg)
    if plan.terminal and not console_socket:
        raise RuntimeCliError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and not plan.terminal:
        raise RuntimeCliError("cannot use console socket if runc will not detach or allocate tty")
    for warning in plan.warnings:
        log.warning("%s", warning)
    pod = pod_of(store, plan)
    # where the engine asked for the cgroup (a bad or unusable cgroupsPath fails here);
    # a pod member holds no VM: its cgroup holds only its own monitor process
    host_cgroup = HostCgroup.plan(
        plan.cgroups_path, host_limits(plan.host_resources, plan.memory_mb, vm=not pod)
    )
    if pod:
        _create_member(
            store, cid, bundle_dir, plan, pod, pid_file, console_socket, log_opts, output_log, host_cgroup
        )
        return
    paths = default_paths()
    if root_disk and plan.volumes:
        raise RuntimeCliError(
            "a container with its root in the VM (--root-in-vm) cannot have volumes: they need "
            "virtio-fs (drop -v or --root-in-vm)"
        )
    # resolved before anything is made: an unknown kernel or module fails `create` itself
    sandbox = prepare(
        paths,
        SandboxSpec(
            kernel=plan.kernel,
            accel=cfg.accel,
            cpus=plan.cpus,
            memory_mb=plan.memory_mb,
            boot_timeout=cfg.boot_timeout,
            kernel_modules=plan.kernel_modules,
            shared_fs=not root_disk,
            netns=plan.netns,
            rootfs=(Path(root_disk),) if root_disk else (),
        ),
    )
    if snapshot:
        from vmpod.sandbox import snapshot as snap

        sandbox = snap.restore_sandbox_config(paths, snap.load_manifest(Path(snapshot), verify=False))
    args = MonitorArgs(
        store_root=str(store.root),
        cid=cid,
        plan=plan,
        sandbox=sandbox,
        guest_runtime=cfg.guest_runtime,
        console_socket=console_socket,
        paths=paths,
        ready_fd=-1,
        output_log=output_log,
        log_path=log_opts[0],
        log_format=log_opts[1],
        debug=log_opts[2],
        host_cgroup=host_cgroup,
        root_disk=root_disk,
        snapshot=snapshot,
    )
    _launch(
        store,
        cid,
        bundle_dir,
        plan,
        pid_file,
        lambda w, mon: monitor_main(dataclasses.replace(args, ready_fd=w), (mon,)),
    )


def _create_member(
    store: Store,
    cid: str,
    bundle_dir: Path,
    plan: Plan,
    pod: str,
    pid_file: str,
    console_socket: str,
    log_opts: LogOpts,
    output_log: LogSink | None,
    host_cgroup: HostCgroup | None,
) -> None:
    """A pod member: its container joins the pod's VM; its own monitor process
    (member.py) is the pid the engine waits for."""
    log.debug("container %s joins pod %s", cid, pod)
    args = MemberArgs(
        store_root=str(store.root),
        cid=cid,
        bundle=str(bundle_dir),
        pod=pod,
        console_socket=console_socket,
        ready_fd=-1,
        output_log=output_log,
        log_path=log_opts[0],
        log_format=log_opts[1],
        debug=log_opts[2],
        host_cgroup=host_cgroup,
    )
    _launch(
        store,
        cid,
        bundle_dir,
        plan,
        pid_file,
        lambda w, mon: member_main(dataclasses.replace(args, ready_fd=w), (mon,)),
    )


def _launch(
    store: Store,
    cid: str,
    bundle_dir: Path,
    plan: Plan,
    pid_file: str,
    monitor: Callable[[int, int], NoReturn],
) -> None:
    """Record the container, fork its monitor (``monitor(ready_fd, monitor_lock)``:
    keeps our stdio, never returns), wait until it is ready (or failed), then run
    the create hooks and write the pid file."""
    st = ContainerState(
        id=cid,
        bundle=str(bundle_dir),
        rootfs=str(plan.rootfs),
        created=now_rfc3339(),
        annotations=plan.annotations,
        hooks=plan.hooks,
    )
    _, lock, mon_lock = store.begin(st)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.close(lock)
            monitor(w, mon_lock)
        os.close(w)
        os.close(mon_lock)
        reply = _read_ready(r)
        if not reply.get("ok"):
            destroy(store, store.load(cid))
            cleanup(store, store.load(cid))
            raise RuntimeCliError(str(reply.get("error") or "the monitor failed"))
        _created(store, cid, pid, pid_file)
    finally:
        os.close(lock)


def _created(store: Store, cid: str, pid: int, pid_file: str) -> None:
    """Run the create hooks, tell the monitor, write the pid file."""
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
