"""Host-side capture: a container of the host's own runc (``--runc ID``) or
podman (``--podman NAME``) checkpointed by the host's CRIU, into the same
evidence archive as a vmpod container's.

CRIU on the host needs: the criu tool, a kernel with CONFIG_CHECKPOINT_RESTORE,
CAP_SYS_ADMIN, CAP_SYS_PTRACE and CAP_SYS_RESOURCE (CRIU raises RLIMIT_NOFILE
and restores rlimits), and a CRIU that knows the kernel (``criu check``: its
vDSO parser in particular must know the kernel's vDSO layout). ``host_criu``
checks each and says which fails and why; ``vmpod doctor`` prints it, and a
capture refuses with it before touching the container.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod import __version__
from vmpod.errors import CommandError, ConfigError, ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics.capture import MAX_IMAGES, Captured, keep_log, overlay_upper
from vmpod.forensics.rootfsdiff import write_diff
from vmpod.fsutil import owned_tmpdir
from vmpod.jsonsafe import parse_json
from vmpod.paths import Paths
from vmpod.proc import run
from vmpod.runtime.state import now_rfc3339

# capability bit -> name and why CRIU needs it
_CAPS = {
    21: ("CAP_SYS_ADMIN", "namespaces and mounts"),
    19: ("CAP_SYS_PTRACE", "seizing the tasks"),
    24: ("CAP_SYS_RESOURCE", "raising RLIMIT_NOFILE, restoring rlimits"),
}
_ERROR_LINE = re.compile(r"^Error \(([^)]*)\): (.*)$", re.M)
ENGINES = ("runc", "podman")


@dataclass(frozen=True)
class HostCriu:
    """Whether the host's CRIU can checkpoint its containers, and if not, why."""

    ok: bool
    version: str  # "3.17.1"; "" when criu is missing
    detail: str  # what passed, or every check that failed and why


def host_criu(status_path: str = "/proc/self/status") -> HostCriu:
    exe = shutil.which("criu")
    if exe is None:
        return HostCriu(False, "", "criu is not installed (apt-get install criu)")
    out = run([exe, "--version"], what="criu --version", timeout=30, check=False)
    version = out.stdout.decode(errors="replace").partition("Version: ")[2].split("\n")[0].strip()
    problems = []
    check = run([exe, "check"], what="criu check", timeout=120, check=False)
    if check.returncode != 0:
        text = (check.stdout + check.stderr).decode(errors="replace")
        errors = _ERROR_LINE.findall(text)
        where, msg = errors[0] if errors else ("", text.strip()[-300:] or f"exit {check.returncode}")
        why = ""
        if "vdso" in msg.lower():
            why = f": criu {version} cannot parse the vDSO of kernel {platform.release()} (a newer CRIU may)"
        problems.append(f"`criu check` fails: {msg}" + (f" ({where})" if where else "") + why)
    if not Path("/proc/sys/kernel/ns_last_pid").exists():
        problems.append(
            "the kernel has no CONFIG_CHECKPOINT_RESTORE (/proc/sys/kernel/ns_last_pid is missing)"
        )
    missing = [f"{name} ({why})" for bit, (name, why) in _CAPS.items() if not _has_cap(bit, status_path)]
    if missing:
        problems.append(f"vmpod runs without {', '.join(missing)}")
    if problems:
        return HostCriu(False, version, "; ".join(problems))
    return HostCriu(True, version, f"criu {version}: `criu check` passes, capabilities present")


def _has_cap(bit: int, status_path: str) -> bool:
    with open(status_path) as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


@dataclass(frozen=True)
class HostCaptureRequest:
    engine: str  # one of ENGINES
    ref: str  # runc container id / podman container name or id
    output: Path
    root: str = ""  # runc's --root ("": runc's default)
    kill: bool = False
    tcp_established: bool = False
    file_locks: bool = False
    max_bytes: int = MAX_IMAGES
    command_line: tuple[str, ...] = ()


def capture_host(paths: Paths, req: HostCaptureRequest) -> Captured:
    """Checkpoint a host container with the host's CRIU into an evidence archive."""
    if req.engine not in ENGINES:
        raise ConfigError(f"unknown engine {req.engine!r}")
    out = a.new_output(req.output)
    criu = host_criu()
    if not criu.ok:
        raise ForensicsError(
            f"host-side capture needs CRIU to work on this host: {criu.detail}",
            hint="`vmpod doctor` shows this check; a container of `vmpod run -d` is captured in its VM",
        )
    t0 = time.monotonic()
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "forensics-") as tmp:
        stage = tmp / "archive"
        stage.mkdir()
        if req.engine == "runc":
            container, frozen = _runc(req, stage, tmp)
        else:
            container, frozen = _podman(req, stage, tmp)
        a.check_tree(stage / a.CHECKPOINT_DIR, req.max_bytes, "the CRIU images")
        manifest = a.Manifest(
            files=a.digest_tree(stage),
            captured=now_rfc3339(),
            host=socket.gethostname(),
            host_kernel=platform.release(),
            guest_kernel="",  # captured on the host: no guest
            criu=criu.version,
            runc=_first_line([_runc_binary(), "--version"]),
            vmpod=__version__,
            command_line=req.command_line,
            container=container,
            leave_running=not req.kill,
        )
        a.write_archive(stage, out, manifest)
    return Captured(out, manifest, time.monotonic() - t0, frozen)


def _runc_binary() -> str:
    return shutil.which("runc") or "runc"


def _first_line(argv: list[str]) -> str:
    with contextlib.suppress(CommandError):
        return run(argv, what=argv[0], timeout=30).stdout.decode(errors="replace").split("\n")[0]
    return ""


def _criu_flags(req: HostCaptureRequest) -> list[str]:
    return (
        ["--leave-running"] * (not req.kill)
        + ["--tcp-established"] * req.tcp_established
        + ["--file-locks"] * req.file_locks
    )


def _runc(req: HostCaptureRequest, stage: Path, tmp: Path) -> tuple[dict[str, str], float]:
    """runc: pause, the overlay's upper dir as the diff, ``runc checkpoint``, resume."""
    runc = [_runc_binary(), *(["--root", req.root] if req.root else [])]
    state = parse_json(run([*runc, "state", req.ref], what=f"runc state {req.ref}", timeout=60).stdout)
    if not isinstance(state, dict) or state.get("status") not in ("running", "paused"):
        raise ForensicsError(f"runc container {req.ref} is not running")
    bundle, rootfs = Path(str(state.get("bundle"))), Path(str(state.get("rootfs")))
    upper = overlay_upper(rootfs)
    t0 = time.monotonic()
    pause, dumped = state["status"] == "running", False
    if pause:
        run([*runc, "pause", req.ref], what=f"runc pause {req.ref}", timeout=60)
    try:
        write_diff(upper, stage / a.ROOTFS_DIFF, stage / a.DELETED_FILES)
        images, work = stage / a.CHECKPOINT_DIR, tmp / "work"
        argv = [*runc, "checkpoint", "--image-path", str(images), "--work-path", str(work), *_criu_flags(req)]
        try:
            run([*argv, req.ref], what=f"runc checkpoint {req.ref}", timeout=1800)
            dumped = True
        finally:
            keep_log(work / "dump.log", stage / a.DUMP_LOG)
    finally:
        if pause and not (req.kill and dumped):
            with contextlib.suppress(CommandError):
                run([*runc, "resume", req.ref], what=f"runc resume {req.ref}", timeout=60)
    frozen = time.monotonic() - t0
    shutil.copyfile(bundle / "config.json", stage / a.SPEC_DUMP)
    config = {"id": str(state.get("id")), "name": req.ref, "createdTime": str(state.get("created", ""))}
    (stage / a.CONFIG_DUMP).write_text(json.dumps({**config, "rootfsImageName": "", "runtime": "runc"}))
    return {"id": config["id"], "name": req.ref, "image": "", "image_digest": ""}, frozen


def _podman(req: HostCaptureRequest, stage: Path, tmp: Path) -> tuple[dict[str, str], float]:
    """podman exports its own archive (same layout); vmpod adds the manifest."""
    export = tmp / "podman.tar"
    argv = ["podman", "container", "checkpoint", "--export", str(export), "--compress", "none"]
    t0 = time.monotonic()
    run([*argv, *_criu_flags(req), req.ref], what=f"podman container checkpoint {req.ref}", timeout=1800)
    frozen = time.monotonic() - t0
    a.extract(export, stage, req.max_bytes)
    try:
        config = parse_json((stage / a.CONFIG_DUMP).read_bytes())
    except (OSError, ValueError) as err:
        raise ForensicsError(f"podman's archive has no readable {a.CONFIG_DUMP}: {err}") from None
    if not isinstance(config, dict):
        raise ForensicsError(f"podman's {a.CONFIG_DUMP} is not a JSON object")
    keys = {"id": "id", "name": "name", "image": "rootfsImageName", "image_digest": "rootfsImageID"}
    return {k: str(config.get(v) or "") for k, v in keys.items()}, frozen
