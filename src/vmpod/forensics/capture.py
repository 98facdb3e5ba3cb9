"""``vmpod forensics capture``: a running container of ``vmpod run -d`` into an
evidence archive, through its monitor (which owns the VM) and CRIU in the guest.

Order, so that files and memory agree: pause the container (cgroup freezer in
the guest), write the writable layer's diff (on the host: the overlay's upper
directory), let runc/CRIU dump the frozen tree, resume it (unless ``kill``).
CRIU restores an open file only if its size is what it was at dump time, so
the diff must be taken while nothing runs.

A container of ``vmpod-runtime`` (``runtime_root``: its ``--root``; e.g. one
podman made) is captured the same way through its monitor; its writable layer
is the upper directory of the overlay mounted at its bundle's root (podman's
overlay storage driver). A root that is not an overlay mount is refused: its
changes cannot be told from the image's.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmpod import __version__, mounts
from vmpod.containers.manager import PAUSED_S, RUNNING_S, Manager
from vmpod.errors import ForensicsError, VmpodError
from vmpod.forensics import archive as a
from vmpod.forensics.rootfsdiff import write_diff
from vmpod.fsutil import owned_tmpdir
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.errors import NotFound, RuntimeCliError
from vmpod.runtime.state import PAUSED, RUNNING, ContainerState, Store, check_id, now_rfc3339
from vmpod.sandbox import CHECKPOINT_TIMEOUT

MAX_IMAGES = 16 << 30  # bytes of CRIU images taken from a guest by default
MAX_LOG = 16 << 20  # bytes of dump.log kept


@dataclass(frozen=True)
class CaptureRequest:
    ref: str  # container name or id
    output: Path
    kill: bool = False
    tcp_established: bool = False
    file_locks: bool = False
    max_bytes: int = MAX_IMAGES
    command_line: tuple[str, ...] = ()
    runtime_root: Path | None = None  # ``ref`` is then a vmpod-runtime container id under it


@dataclass(frozen=True)
class _Target:
    """What capture needs of a running container, whoever made it."""

    name: str
    sock: Path  # its monitor's control socket
    upper: Path  # its writable layer
    spec: Path  # its bundle's config.json
    paused: bool  # paused already (then it stays paused)
    config_dump: dict[str, object]
    container: dict[str, str]  # the manifest's id, name, image, image_digest


@dataclass(frozen=True)
class Captured:
    archive: Path
    manifest: a.Manifest
    seconds: float  # from the pause to the archive's rename
    frozen_seconds: float  # how long the container was paused


def capture(paths: Paths, req: CaptureRequest) -> Captured:
    a.new_output(req.output)  # checked before anything is paused
    if req.runtime_root is not None:
        with _runtime_target(req.runtime_root, req.ref) as target:
            return _capture(paths, req, target, None)
    m = Manager(paths)
    with m.locked(req.ref) as rec:
        v = m.view(rec)
        if rec.root_disk:
            raise ForensicsError(
                f"container {rec.name} keeps its root and its writes in its VM (--root-in-vm): "
                "capture cannot read them",
                hint=f"save its whole VM with vmpod snapshot {rec.name} DIR",
            )
        if v.state not in (RUNNING_S, PAUSED_S):
            raise ForensicsError(
                f"container {rec.name} is {v.state}: only a running container can be captured"
            )
        runtime = _guest_runtime(m.dir(rec) / "runtime.json")
        if runtime != "runc":
            raise ForensicsError(
                f"container {rec.name} runs under {runtime} in its VM: capture needs runc (CRIU)",
                hint="run it with --guest-runtime runc",
            )
        target = _Target(
            name=rec.name,
            sock=m.store.dir(rec.id) / "monitor.sock",
            upper=m.overlay(rec).upper,
            spec=m.dir(rec) / "bundle" / "config.json",
            paused=v.state == PAUSED_S,
            config_dump=_config_dump(rec.to_json(), runtime),
            container={
                "id": rec.id,
                "name": rec.name,
                "image": rec.image,
                "image_digest": rec.image_digest,
            },
        )
        return _capture(paths, req, target, runtime)


def _capture(paths: Paths, req: CaptureRequest, target: _Target, runtime: str | None) -> Captured:
    """Pause, diff, dump, resume, archive. ``runtime``: the guest runtime when the
    caller knows it (else the monitor says)."""
    out = req.output.absolute()
    sock = target.sock
    facts = ipc.request(sock, {"op": "guest_facts"}, timeout=180)
    if runtime is None:
        runtime = str(facts.get("guest_runtime") or "runc")
        if runtime != "runc":
            raise ForensicsError(
                f"container {target.name} runs under {runtime} in its VM: capture needs runc (CRIU)",
                hint="set guest_runtime to runc in the runtime's configuration",
            )
    criu = str(facts.get("criu", ""))
    if facts.get("criu_status") != 0:
        raise ForensicsError(f"CRIU does not work in the VM of {target.name}: {criu.strip()[-500:]}")
    t0 = time.monotonic()
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "forensics-") as tmp:
        stage, criu_dir = tmp / "archive", tmp / "criu"
        stage.mkdir()
        criu_dir.mkdir()
        with freezer(sock, pause=not target.paused) as hold:
            write_diff(target.upper, stage / a.ROOTFS_DIFF, stage / a.DELETED_FILES)
            flags = {
                "leave_running": not req.kill,
                "tcp_established": req.tcp_established,
                "file_locks": req.file_locks,
            }
            try:
                ipc.request(
                    sock,
                    {"op": "checkpoint", "dir": str(criu_dir), "flags": flags},
                    timeout=CHECKPOINT_TIMEOUT + 60,
                )
                hold.resume = not req.kill  # a failed --kill leaves it running
            finally:
                keep_log(criu_dir / "work" / "dump.log", stage / a.DUMP_LOG)
        frozen = time.monotonic() - t0
        images = criu_dir / "checkpoint"
        a.check_tree(images, req.max_bytes, "the CRIU images the guest wrote")
        os.rename(images, stage / a.CHECKPOINT_DIR)
        shutil.copyfile(target.spec, stage / a.SPEC_DUMP)
        dump = target.config_dump
        vmpod_part = dump.get("vmpod")
        if isinstance(vmpod_part, dict):
            vmpod_part["guest_runtime"] = runtime
        (stage / a.CONFIG_DUMP).write_text(json.dumps(dump, indent=1))
        manifest = a.Manifest(
            files=a.digest_tree(stage),
            captured=now_rfc3339(),
            host=socket.gethostname(),
            host_kernel=platform.release(),
            guest_kernel=str(facts.get("kernel", "")),
            criu=criu.splitlines()[0].removeprefix("Version: ") if criu else "",
            runc=str(facts.get("runc", "")),
            vmpod=__version__,
            command_line=req.command_line,
            container=target.container,
            leave_running=not req.kill,
        )
        a.write_archive(stage, out, manifest)
    return Captured(out, manifest, time.monotonic() - t0, frozen)


@contextlib.contextmanager
def _runtime_target(root: Path, cid: str) -> Iterator[_Target]:
    """A running vmpod-runtime container, locked against other runtime commands."""
    store = Store(root)
    try:
        check_id(cid)
        with store.lock(cid):
            st = store.load(cid)
            status = store.status(st)
            if status not in (RUNNING, PAUSED):
                raise ForensicsError(f"container {cid} is {status}: only a running container can be captured")
            spec = Path(st.bundle) / "config.json"
            yield _Target(
                name=cid,
                sock=store.dir(cid) / "monitor.sock",
                upper=overlay_upper(Path(st.rootfs)),
                spec=spec,
                paused=status == PAUSED,
                config_dump=_runtime_config_dump(st, root, spec),
                container={"id": cid, "name": cid, "image": "", "image_digest": ""},
            )
    except NotFound:
        raise ForensicsError(
            f"no container {cid} under {root}", hint="name a container of vmpod-runtime --root DIR"
        ) from None
    except RuntimeCliError as err:
        raise ForensicsError(err.message) from err


def overlay_upper(rootfs: Path) -> Path:
    """The upper (writable) directory of the overlay mounted at ``rootfs``."""
    found = mounts.overlay_upper(rootfs)
    if found is None or not found.is_absolute() or not found.is_dir():
        raise ForensicsError(
            f"the root filesystem {rootfs} is not an overlay mount with an upper directory: "
            "its changes cannot be told from its image",
            hint="capture needs a container on overlay storage (podman's overlay driver, vmpod run -d)",
        )
    return found


def _runtime_config_dump(st: ContainerState, root: Path, spec: Path) -> dict[str, object]:
    """podman's config.dump keys where a runtime container has them."""
    try:
        process = json.loads(spec.read_text()).get("process") or {}
        command = process.get("args") or [] if isinstance(process, dict) else []
    except (OSError, ValueError, AttributeError) as err:
        raise ForensicsError(f"cannot read the bundle's config.json: {err}") from err
    return {
        "id": st.id,
        "name": st.id,
        "rootfsImageName": "",  # the engine's image: not known to the runtime
        "rootfsImageID": "",
        "createdTime": st.created,
        "command": command,
        "vmpod": {
            "runtime_root": str(root),
            "bundle": st.bundle,
            "rootfs": st.rootfs,
            "annotations": st.annotations,
        },
    }


def _guest_runtime(runtime_json: Path) -> str:
    try:
        return str(json.loads(runtime_json.read_text()).get("guest_runtime") or "runc")
    except (OSError, ValueError):
        return "runc"


def _config_dump(record: dict[str, object], runtime: str) -> dict[str, object]:
    """podman's config.dump keys where vmpod has them, and the whole record."""
    return {
        "id": record["id"],
        "name": record["name"],
        "rootfsImageName": record["image"],
        "rootfsImageID": record["image_digest"],
        "createdTime": record["created"],
        "command": record["command"],
        "vmpod": {**record, "guest_runtime": runtime},
    }


@dataclass
class Hold:
    """Whether ``freezer`` resumes the container when its block ends."""

    resume: bool = True


@contextlib.contextmanager
def freezer(sock: Path, *, pause: bool) -> Iterator[Hold]:
    """The container paused (cgroup freezer in the guest) for the block, if ``pause``
    (else it was paused already and stays so); resumed after it unless the block
    set ``resume`` false. A resume that fails is left to the caller's error."""
    hold = Hold()
    if pause:
        ipc.request(sock, {"op": "runtime", "command": "pause"}, timeout=60)
    try:
        yield hold
    finally:
        if pause and hold.resume:
            with contextlib.suppress(VmpodError):
                ipc.request(sock, {"op": "runtime", "command": "resume"}, timeout=60)


def keep_log(src: Path, dest: Path) -> None:
    """CRIU's log (a guest file: a bounded copy of a regular file, if any)."""
    with contextlib.suppress(OSError):
        if src.is_file() and not src.is_symlink():
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                fout.write(fin.read(MAX_LOG))
