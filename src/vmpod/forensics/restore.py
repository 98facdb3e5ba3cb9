"""``vmpod forensics restore``: an evidence archive brought back to life as a new
detached vmpod container, in a fresh VM of its own.

The archive is verified and unpacked (nothing but regular files and
directories); the container's root is a new copy-on-write overlay on the image
(the archive's, found locally, or ``--rootfs``) whose upper layer is made from
rootfs-diff.tar and deleted.files; its VM has no network but loopback (a new,
empty network namespace); its process tree is restored by ``runc restore``
(CRIU) in the guest instead of started. From then on it is an ordinary
container: ``vmpod ps/exec/logs/stop/rm``.

podman's and Kubernetes' archives (no manifest, maybe compressed) are taken as
unverified. What no archive holds is replaced and said so: bind mounts (the
engine's /etc/hosts, /etc/resolv.conf, /dev/shm, volumes) become empty
placeholders, and the spec's host-side settings (hooks, which would run host
commands; the engine's cgroup path) are dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers import rootfs
from vmpod.containers.launch import start_container
from vmpod.containers.manager import RUNNING_S, Manager
from vmpod.containers.options import RunRequest
from vmpod.containers.records import Record, check_name, default_name, new_id
from vmpod.errors import ConfigError, ForensicsError, VmpodError
from vmpod.forensics import archive as a
from vmpod.forensics.inspect import root_mode
from vmpod.forensics.rootfsdiff import apply_diff, read_deleted
from vmpod.fsutil import atomic_write, owned_tmpdir
from vmpod.guest.kernel import ensure_kernel
from vmpod.guest.progress import Progress, silent
from vmpod.images import resolve_image, resolve_rootfs
from vmpod.jsonsafe import parse_json
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.state import now_rfc3339

MAX_UNPACKED = 32 << 30  # bytes an archive may unpack to
NETWORK_NOTE = "network: none (loopback only); connected TCP sockets are restored closed (CRIU --tcp-close)"


@dataclass(frozen=True)
class RestoreRequest:
    archive: Path
    name: str = ""
    rootfs: str = ""  # the image's root filesystem, when the archive's image is not here
    kernel: str = ""  # "": the captured container's kernel (else vmpod's default)
    accel: str = RunRequest.accel
    paused: bool = False  # every restored task left stopped until ``resume``


@dataclass(frozen=True)
class Restored:
    record: Record
    manifest: a.Manifest | None  # None: a podman/Kubernetes archive, unverified
    seconds: float  # from the start to the restored tree running
    notes: tuple[str, ...] = ()  # what the restore had to replace or drop


def restore(paths: Paths, req: RestoreRequest, progress: Progress = silent) -> Restored:
    t0 = time.monotonic()
    if not req.archive.is_file():
        raise ConfigError(f"{req.archive} is not a file", hint="name an archive of vmpod forensics capture")
    m = Manager(paths)
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "restore-") as tmp:
        unpacked = tmp / "archive"
        unpacked.mkdir()
        manifest = a.extract(a.plain_tar(req.archive, tmp, MAX_UNPACKED), unpacked, MAX_UNPACKED)
        spec = _load_json(unpacked / a.SPEC_DUMP)
        config = _load_json(unpacked / a.CONFIG_DUMP)
        if not (unpacked / a.CHECKPOINT_DIR / "inventory.img").is_file():
            raise ForensicsError(f"{req.archive} holds no CRIU images (checkpoint/inventory.img)")
        captured = config.get("vmpod")
        kernel = (
            req.kernel
            or str(captured.get("kernel") if isinstance(captured, dict) else "")
            or RunRequest.kernel
        )
        _check_kernel(paths, kernel)
        image = str(config.get("rootfsImageName") or "")
        if req.rootfs:
            source = resolve_rootfs(req.rootfs)
        elif image.startswith("/") and Path(image).is_dir():
            source = resolve_rootfs(image)  # captured from a --rootfs container of this host
        elif image:
            source = resolve_image(image, progress=progress)
        else:
            raise ForensicsError(
                "the archive names no image", hint="give the image's root filesystem with --rootfs"
            )
        tree = rootfs.image_tree(paths, source, progress)
        cid = new_id()
        rec = Record(
            id=cid,
            name=check_name(req.name) if req.name else default_name(cid),
            image=req.rootfs or image,
            image_digest=source.digest,
            lower=str(tree),
            command=_command(spec),
            created=now_rfc3339(),
            kernel=kernel,
            network="none",
        )
        d = m.records.add(rec)
        try:
            notes = _prepare(m, rec, spec, unpacked, req.accel)
            restore_dir = d / "restore"
            os.rename(unpacked / a.CHECKPOINT_DIR, restore_dir / "checkpoint")
            if req.paused:
                from vmpod.sandbox import LEAVE_STOPPED

                (restore_dir / LEAVE_STOPPED).touch()
            start_container(m, rec, restore=str(restore_dir))
        except BaseException:
            with contextlib.suppress(VmpodError, OSError):
                m.remove(rec.id, force=True)
            raise
    with contextlib.suppress(OSError):  # the images served their purpose; the archive keeps them
        shutil.rmtree(d / "restore")
    return Restored(rec, manifest, time.monotonic() - t0, notes)


def resume(paths: Paths, ref: str) -> Record:
    """Let a tree restored with ``paused`` run: SIGCONT to each of its tasks."""
    m = Manager(paths)
    with m.locked(ref) as rec:
        if m.view(rec).state != RUNNING_S:
            raise ForensicsError(f"container {rec.name} is not running")
        msg = {"op": "kill", "signal": int(signal.SIGCONT), "all": True}
        ipc.request(m.store.dir(rec.id) / "monitor.sock", msg, timeout=30)
        return rec


def _check_kernel(paths: Paths, name: str) -> None:
    """Refuse a guest kernel built without checkpoint/restore before anything is made
    (CRIU would fail deep inside the new VM)."""
    k = ensure_kernel(paths, name)
    try:
        config = k.config.read_text(errors="replace").splitlines()
    except OSError:  # a local kernel catalogued without its config: CRIU will say what it misses
        config = []
    if config and "CONFIG_CHECKPOINT_RESTORE=y" not in config:  # (empty: not known)
        raise ForensicsError(
            f"kernel {k.id} has no checkpoint/restore support (CONFIG_CHECKPOINT_RESTORE is not set)",
            hint="restore with --kernel naming one that has it (every Debian kernel does)",
        )


def _load_json(path: Path) -> dict[str, object]:
    try:
        obj = parse_json(path.read_bytes())
    except FileNotFoundError:
        raise ForensicsError(f"the archive has no {path.name}") from None
    except (ValueError, VmpodError) as err:
        raise ForensicsError(f"{path.name} is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ForensicsError(f"{path.name} is not a JSON object")
    return obj


def _command(spec: dict[str, object]) -> tuple[str, ...]:
    process = spec.get("process")
    args = process.get("args") if isinstance(process, dict) else None
    if not isinstance(args, list) or not all(isinstance(x, str) for x in args):
        raise ForensicsError("spec.dump has no process.args")
    return tuple(args)


def _prepare(m: Manager, rec: Record, spec: dict[str, object], unpacked: Path, accel: str) -> tuple[str, ...]:
    """The new container's writable layer (the diff applied), bundle and VM
    settings; returns notes on what was replaced or dropped."""
    d = m.dir(rec)
    ov = m.overlay(rec)
    ov.upper.mkdir(parents=True, mode=0o755)
    diff = unpacked / a.ROOTFS_DIFF
    apply_diff(diff if diff.is_file() else None, read_deleted(unpacked / a.DELETED_FILES), ov.upper)
    # the root's mode as the tree saw it (the overlay's root takes the upper's): CRIU
    # refuses a root whose mode differs, and engines differ (podman's is often 0555)
    with contextlib.suppress(VmpodError):
        mode = root_mode(unpacked / a.CHECKPOINT_DIR)
        if mode is not None:
            ov.upper.chmod(mode)
    mounts = spec.get("mounts")
    if not isinstance(mounts, list) or not all(isinstance(x, dict) for x in mounts):
        raise ForensicsError("spec.dump has no mounts list")
    mounts, notes = _placeholder_binds(mounts, d / "placeholders")
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        raise ForensicsError("spec.dump has no linux section")
    namespaces = [
        n for n in linux.get("namespaces") or [] if isinstance(n, dict) and n.get("type") != "network"
    ]
    # a new, empty network namespace: the VM gets loopback only
    linux = {**linux, "namespaces": [*namespaces, {"type": "network"}]}
    if linux.pop("cgroupsPath", None):  # the capturing engine's host cgroup: vmpod picks its own
        notes.append("the engine's cgroup path was dropped")
    spec = {
        **spec,
        "mounts": mounts,
        "linux": linux,
        "root": {**_dict(spec.get("root")), "path": str(ov.merged)},
    }
    spec.pop("annotations", None)  # a pod member's: this one is alone
    if spec.pop("hooks", None):  # host commands named by the archive: never run them
        notes.append("the spec's hooks were dropped (they would run host commands)")
    bundle = d / "bundle"
    bundle.mkdir(mode=0o700)
    atomic_write(bundle / "config.json", json.dumps(spec, indent=1).encode(), mode=0o600)
    runtime_cfg = {
        "kernel": rec.kernel,
        "kernels": [rec.kernel],
        "accel": accel,
        "guest_runtime": "runc",
        "boot_timeout": RunRequest.boot_timeout,
    }
    atomic_write(d / "runtime.json", json.dumps(runtime_cfg).encode(), mode=0o600)
    (d / "restore").mkdir(mode=0o700)
    return tuple(notes)


# Bind-mount destinations that engines fill with a file of their own.
_FILE_BINDS = frozenset(
    {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv", "/dev/termination-log"}
)


def _placeholder_binds(mounts: list[dict[str, object]], where: Path) -> tuple[list[object], list[str]]:
    """``mounts`` with every bind mount's source replaced by an empty file or
    directory under ``where``: no archive holds volumes or the engine's files,
    and CRIU needs each mount point the tree had."""
    out: list[object] = []
    replaced = []
    for i, mnt in enumerate(mounts):
        options = mnt.get("options")
        if mnt.get("type") != "bind" and not (isinstance(options, list) and "bind" in options):
            out.append(mnt)
            continue
        dest = mnt.get("destination")
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise ForensicsError(f"spec.dump: mount {i} has no absolute destination")
        where.mkdir(mode=0o700, exist_ok=True)
        source = where / str(i)
        if dest in _FILE_BINDS:
            source.touch(mode=0o644)
        else:
            source.mkdir(mode=0o755)
        out.append({**mnt, "type": "bind", "source": str(source)})
        replaced.append(dest)
    notes = []
    if replaced:
        notes.append(f"not in the archive, restored as empty placeholders: {', '.join(replaced)}")
    return out, notes


def _dict(value: object) -> dict[str, object]:
    return dict(value) if isinstance(value, dict) else {}
