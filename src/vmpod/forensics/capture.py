"""``vmpod forensics capture``: a running container of ``vmpod run -d`` into an
evidence archive, through its monitor (which owns the VM) and CRIU in the guest.

Order, so that files and memory agree: pause the container (cgroup freezer in
the guest), write the writable layer's diff (on the host: the overlay's upper
directory), let runc/CRIU dump the frozen tree, resume it (unless ``kill``).
CRIU restores an open file only if its size is what it was at dump time, so
the diff must be taken while nothing runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod import __version__
from vmpod.agent.protocol import CHECKPOINT_TIMEOUT
from vmpod.containers.manager import PAUSED_S, RUNNING_S, Manager
from vmpod.errors import ConfigError, ForensicsError, VmpodError
from vmpod.forensics import archive as a
from vmpod.forensics.rootfsdiff import write_diff
from vmpod.fsutil import owned_tmpdir
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.state import now_rfc3339

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


@dataclass(frozen=True)
class Captured:
    archive: Path
    manifest: a.Manifest
    seconds: float  # from the pause to the archive's rename
    frozen_seconds: float  # how long the container was paused


def capture(paths: Paths, req: CaptureRequest) -> Captured:
    out = req.output.absolute()
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} exists", hint="name a new archive file with -o")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a directory", hint="name an archive in an existing directory")
    if req.tcp_established:
        # CRIU locks the connections with iptables while it dumps them
        raise ForensicsError(
            "--tcp-established needs iptables in the guest root, which vmpod's guest does not ship yet",
            hint="capture without it: CRIU then refuses a container with established TCP connections",
        )
    m = Manager(paths)
    with m.locked(req.ref) as rec:
        v = m.view(rec)
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
        sock = m.store.dir(rec.id) / "monitor.sock"
        facts = ipc.request(sock, {"op": "guest_facts"}, timeout=180)
        criu = str(facts.get("criu", ""))
        if facts.get("criu_status") != 0:
            raise ForensicsError(f"CRIU does not work in the VM of {rec.name}: {criu.strip()[-500:]}")
        t0 = time.monotonic()
        paths.tmp.mkdir(parents=True, exist_ok=True)
        with owned_tmpdir(paths.tmp, "forensics-") as tmp:
            stage, criu_dir = tmp / "archive", tmp / "criu"
            stage.mkdir()
            criu_dir.mkdir()
            pause, dumped = v.state == RUNNING_S, False
            if pause:
                ipc.request(sock, {"op": "runtime", "command": "pause"}, timeout=60)
            try:
                write_diff(m.overlay(rec).upper, stage / a.ROOTFS_DIFF, stage / a.DELETED_FILES)
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
                    dumped = True
                finally:
                    _keep_log(criu_dir / "work" / "dump.log", stage / a.DUMP_LOG)
            finally:
                if pause and not (req.kill and dumped):  # a failed --kill leaves it running
                    with contextlib.suppress(VmpodError):
                        ipc.request(sock, {"op": "runtime", "command": "resume"}, timeout=60)
            frozen = time.monotonic() - t0
            images = criu_dir / "checkpoint"
            a.check_tree(images, req.max_bytes, "the CRIU images the guest wrote")
            os.rename(images, stage / a.CHECKPOINT_DIR)
            shutil.copyfile(m.dir(rec) / "bundle" / "config.json", stage / a.SPEC_DUMP)
            (stage / a.CONFIG_DUMP).write_text(json.dumps(_config_dump(rec.to_json(), runtime), indent=1))
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
                container={
                    "id": rec.id,
                    "name": rec.name,
                    "image": rec.image,
                    "image_digest": rec.image_digest,
                },
                leave_running=not req.kill,
            )
            a.write_archive(stage, out, manifest)
    return Captured(out, manifest, time.monotonic() - t0, frozen)


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


def _keep_log(src: Path, dest: Path) -> None:
    """CRIU's log (a guest file: a bounded copy of a regular file, if any)."""
    with contextlib.suppress(OSError):
        if src.is_file() and not src.is_symlink():
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                fout.write(fin.read(MAX_LOG))
