"""Making and starting a named container: image -> overlay rootfs -> OCI bundle ->
vmpod-runtime ``create`` + ``start`` (the runtime's functions, its monitor).

The bundle (``<record>/bundle/config.json``) names the overlay's merged
directory as ``root.path`` and the volumes as bind mounts; the VM's kernel,
accelerator and guest runtime are kept in a per-container runtime config
(``<record>/runtime.json``) that ``create`` is given on every start. Imported only by commands that boot VMs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Iterator
from types import FrameType

from vmpod.containers import network as net
from vmpod.containers import rootfs
from vmpod.containers.manager import Manager
from vmpod.containers.options import RunRequest, make_sources, pod_infra_name, user_ids
from vmpod.containers.records import ContainerError, Record, check_name, default_name, new_id
from vmpod.errors import ConfigError
from vmpod.fsutil import atomic_write, lock_file
from vmpod.guest.progress import Progress, silent
from vmpod.images import resolve_image, resolve_rootfs
from vmpod.mounts import remove_tree
from vmpod.runspec import build_spec
from vmpod.runtime import ipc, lifecycle
from vmpod.runtime.config import load_config
from vmpod.runtime.run import wait_forwarding
from vmpod.runtime.state import now_rfc3339
from vmpod.sandbox.build import check_resources

MIB = 1 << 20
VM_OVERHEAD_MB = 256  # what vmpod-runtime adds to a memory limit (bundle.MEMORY_OVERHEAD_MB)


def make_container(m: Manager, req: RunRequest, progress: Progress = silent) -> Record:
    """Resolve the image, take the name, write the record and the bundle (no VM yet)."""
    check_resources(req.cpus, req.memory_mb)
    if req.rootfs and req.image:
        raise ConfigError("give either an IMAGE or --rootfs DIR, not both")
    if not req.rootfs and not req.image:
        raise ConfigError("no image given", hint="use vmpod run -d IMAGE [CMD...] or --rootfs DIR")
    if req.root_in_vm and (req.volumes or req.pod):
        raise ConfigError(
            "--root-in-vm keeps the container's root and writes in its VM: it cannot have volumes "
            "(-v) or join a pod, which need virtio-fs",
            hint="drop -v/--pod or --root-in-vm",
        )
    source = resolve_rootfs(req.rootfs) if req.rootfs else resolve_image(req.image, progress=progress)
    config = source.config
    if req.entrypoint is not None:  # docker: --entrypoint replaces ENTRYPOINT and drops CMD
        config = dataclasses.replace(config, entrypoint=(req.entrypoint,) if req.entrypoint else (), cmd=())
    spec = build_spec(config, req.process)
    tree = rootfs.image_tree(m.paths, source, progress)
    root_disk = ""
    if req.root_in_vm:
        from vmpod.storage.erofs import rootfs_disk

        root_disk = str(rootfs_disk(m.paths, source, progress))
    user = user_ids(tree, req.process.user or config.user)
    cid = new_id()
    rec = Record(
        id=cid,
        name=check_name(req.name) if req.name else default_name(cid),
        image=req.rootfs or req.image,
        image_digest=source.digest,
        lower=str(tree),
        command=tuple(spec["process"]["args"]),  # type: ignore[index]
        created=now_rfc3339(),
        kernel=req.kernel,
        mounts=req.volumes,
        auto_remove=req.auto_remove,
        log_max_bytes=req.log_max_bytes,
        log_keep=req.log_keep,
        network="pod" if req.pod and not req.pod_infra else req.network,
        ports=req.ports,
        pod=req.pod,
        pod_infra=req.pod_infra,
        root_disk=root_disk,
    )
    d = m.records.add(rec)
    try:
        _write_bundle(m, rec, spec, user, req)
    except BaseException:
        remove_tree(d)
        raise
    return rec


def _write_bundle(
    m: Manager, rec: Record, spec: dict[str, object], user: dict[str, int], req: RunRequest
) -> None:
    d = m.dir(rec)
    bundle = d / "bundle"
    bundle.mkdir(mode=0o700)
    spec["root"] = {**spec["root"], "path": str(m.overlay(rec).merged)}  # type: ignore[dict-item]
    spec["process"]["user"] = user  # type: ignore[index]
    mounts = spec["mounts"]
    assert isinstance(mounts, list)
    # parents before children, as docker does: -v /b:/data/sub -v /a:/data keeps both
    for v in sorted(rec.mounts, key=lambda v: v.destination.rstrip("/").count("/")):
        opts = ["rbind", "ro" if v.readonly else "rw"]
        mounts.append({"destination": v.destination, "type": "bind", "source": v.source, "options": opts})
    resources: dict[str, object] = {"cpu": {"quota": req.cpus * 100000, "period": 100000}}
    if req.memory_mb > 512:
        resources["memory"] = {"limit": (req.memory_mb - VM_OVERHEAD_MB) * MIB}
    linux = spec["linux"]
    assert isinstance(linux, dict)
    linux["resources"] = {**linux.get("resources", {}), **resources}
    # the VM's network: the namespace start's CNI attachment makes (vmpod-runtime
    # wires it in), or a new, empty one (loopback only)
    netns = (
        {"type": "network", "path": net.netns_path(rec.id)}
        if rec.network == "bridge"
        else {"type": "network"}
    )
    linux["namespaces"] = [*linux["namespaces"], netns]
    if rec.pod and not rec.pod_infra:  # joins the infra's VM (vmpod-runtime reads CRI-O's annotations)
        spec["annotations"] = {
            "io.kubernetes.cri-o.ContainerType": "container",
            "io.kubernetes.cri-o.SandboxID": m.records.resolve(pod_infra_name(rec.pod)).id,
        }
    atomic_write(bundle / "config.json", json.dumps(spec, indent=1).encode(), mode=0o600)
    runtime_cfg = {
        "kernel": req.kernel,
        "kernels": [req.kernel],
        "accel": req.accel,
        "guest_runtime": req.guest_runtime,
        "boot_timeout": req.boot_timeout,
    }
    atomic_write(d / "runtime.json", json.dumps(runtime_cfg).encode(), mode=0o600)


# -- starting -------------------------------------------------------------------------


def start_container(
    m: Manager,
    rec: Record,
    *,
    foreground: bool = False,
    interactive: bool = False,
    restore: str = "",
    snapshot: str = "",
) -> int:
    """Mount the rootfs, boot the VM (runtime ``create``), run the process
    (runtime ``start``; with ``restore``, restore it from that directory's CRIU
    images); with ``snapshot`` the VM starts from that snapshot, its container
    running. Returns the monitor's pid (this process's child)."""
    # (imported on use: the sandbox stack is heavy and only booting needs it)
    from vmpod.runtime.create import create

    d = m.dir(rec)
    rootfs.mount(m.overlay(rec))
    make_sources(rec.mounts)
    if m.store.dir(rec.id).exists():  # an ended VM's runtime state: replaced
        lifecycle.delete(m.store, rec.id, force=True)
    sink = m.log_sink(rec, tee=foreground)
    cfg = load_config(str(d / "runtime.json"))  # the VM settings it was made with
    if rec.network == "bridge":
        net.attach(m.paths, rec.id, rec.ports)  # (a previous run's is released first)
    try:
        with _stdin(interactive):
            log_opts = (str(d / "monitor.log"), "text", False)
            create(
                m.store,
                rec.id,
                str(d / "bundle"),
                "",
                "",
                log_opts,
                cfg=cfg,
                output_log=sink,
                root_disk=rec.root_disk,
                snapshot=snapshot,
            )
    except BaseException:
        net.detach(m.paths, rec.id)
        raise
    m.records.update(rec.id, started=now_rfc3339(), finished="", exit_code=None)
    if not snapshot:  # (a restored snapshot's container runs already)
        lifecycle.start(m.store, rec.id, restore)
    return m.store.load(rec.id).pid


def start_existing(m: Manager, ref: str) -> Record:
    """`vmpod start`: a created or exited container gets a new VM (same rootfs)."""
    with m.locked(ref) as rec:
        v = m.view(rec)
        if v.state in ("running", "paused"):
            raise ContainerError(f"container {rec.name} is already running")
        if v.state == "created" and v.monitor_pid:
            lifecycle.start(m.store, rec.id)  # booted by create, never started
            m.records.update(rec.id, started=now_rfc3339())
        else:
            start_container(m, rec)
        return rec


def wait_foreground(m: Manager, rec: Record, pid: int) -> int:
    """Wait for the monitor (our child) with signals passed on: the first INT/TERM/HUP
    goes to the container, a second one kills it. Returns the container's status."""
    count = 0

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        if count == 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)  # the monitor passes it to the container
        else:
            with contextlib.suppress(ContainerError, OSError):
                msg = {"op": "kill", "signal": int(signal.SIGKILL), "all": True}
                ipc.request(m.store.dir(rec.id) / "monitor.sock", msg, timeout=5)

    return wait_forwarding(pid, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP), forward)


def reap_when_done(m: Manager, rec: Record) -> None:
    """--rm of a detached container: a small child waits for its monitor to end
    (the monitor's flock) and then removes the container."""
    if os.fork() != 0:
        return
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with contextlib.suppress(OSError):
            os.close(lock_file(m.store.dir(rec.id) / "monitor.lock", exclusive=False, timeout=None))
        with contextlib.suppress(Exception):
            m.remove(rec.id, force=True)
    finally:
        os._exit(0)


@contextlib.contextmanager
def _stdin(keep: bool) -> Iterator[None]:
    """The monitor (forked by create) inherits our stdin: /dev/null unless -i."""
    if keep:
        yield
        return
    saved = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)
