"""``vmpod forensics restore``: an evidence archive brought back to life as a new
detached vmpod container, in a fresh VM of its own.

The archive is verified and unpacked (nothing but regular files and
directories); the container's root is a new copy-on-write overlay on the image
(the archive's, found locally, or ``--rootfs``) whose upper layer is made from
rootfs-diff.tar and deleted.files; its VM has no network but loopback (a new,
empty network namespace); its process tree is restored by ``runc restore``
(CRIU) in the guest instead of started. From then on it is an ordinary
container: ``vmpod ps/exec/logs/stop/rm``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers import rootfs
from vmpod.containers.launch import start_container
from vmpod.containers.manager import Manager
from vmpod.containers.options import RunRequest
from vmpod.containers.records import Record, check_name, default_name, new_id
from vmpod.errors import ConfigError, ForensicsError, VmpodError
from vmpod.forensics import archive as a
from vmpod.forensics.rootfsdiff import apply_diff, read_deleted
from vmpod.fsutil import atomic_write, owned_tmpdir
from vmpod.guest.progress import Progress, silent
from vmpod.images import resolve_image, resolve_rootfs
from vmpod.jsonsafe import parse_json
from vmpod.paths import Paths
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


@dataclass(frozen=True)
class Restored:
    record: Record
    manifest: a.Manifest
    seconds: float  # from the start to the restored tree running


def restore(paths: Paths, req: RestoreRequest, progress: Progress = silent) -> Restored:
    t0 = time.monotonic()
    if not req.archive.is_file():
        raise ConfigError(f"{req.archive} is not a file", hint="name an archive of vmpod forensics capture")
    m = Manager(paths)
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "restore-") as tmp:
        unpacked = tmp / "archive"
        unpacked.mkdir()
        manifest = a.extract(req.archive, unpacked, MAX_UNPACKED)
        spec = _load_json(unpacked / a.SPEC_DUMP)
        config = _load_json(unpacked / a.CONFIG_DUMP)
        if not (unpacked / a.CHECKPOINT_DIR / "inventory.img").is_file():
            raise ForensicsError(f"{req.archive} holds no CRIU images (checkpoint/inventory.img)")
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
        captured = config.get("vmpod")
        kernel = (
            req.kernel
            or str(captured.get("kernel") if isinstance(captured, dict) else "")
            or RunRequest.kernel
        )
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
            _prepare(m, rec, spec, unpacked, req.accel)
            restore_dir = d / "restore"
            os.rename(unpacked / a.CHECKPOINT_DIR, restore_dir / "checkpoint")
            start_container(m, rec, restore=str(restore_dir))
        except BaseException:
            with contextlib.suppress(VmpodError, OSError):
                m.remove(rec.id, force=True)
            raise
    with contextlib.suppress(OSError):  # the images served their purpose; the archive keeps them
        shutil.rmtree(d / "restore")
    return Restored(rec, manifest, time.monotonic() - t0)


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


def _prepare(m: Manager, rec: Record, spec: dict[str, object], unpacked: Path, accel: str) -> None:
    """The new container's writable layer (the diff applied), bundle and VM settings."""
    d = m.dir(rec)
    ov = m.overlay(rec)
    ov.upper.mkdir(parents=True, mode=0o755)
    diff = unpacked / a.ROOTFS_DIFF
    apply_diff(diff if diff.is_file() else None, read_deleted(unpacked / a.DELETED_FILES), ov.upper)
    mounts = spec.get("mounts")
    if not isinstance(mounts, list):
        raise ForensicsError("spec.dump has no mounts list")
    binds = [x for x in mounts if isinstance(x, dict) and x.get("type") == "bind"]
    if binds:
        raise ForensicsError(
            f"the captured container had volumes ({binds[0].get('destination')}): "
            "they are not part of the archive and cannot be restored"
        )
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        raise ForensicsError("spec.dump has no linux section")
    namespaces = [
        n for n in linux.get("namespaces") or [] if isinstance(n, dict) and n.get("type") != "network"
    ]
    # a new, empty network namespace: the VM gets loopback only
    linux = {**linux, "namespaces": [*namespaces, {"type": "network"}]}
    spec = {**spec, "linux": linux, "root": {**_dict(spec.get("root")), "path": str(ov.merged)}}
    spec.pop("annotations", None)  # a pod member's: this one is alone
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


def _dict(value: object) -> dict[str, object]:
    return dict(value) if isinstance(value, dict) else {}
