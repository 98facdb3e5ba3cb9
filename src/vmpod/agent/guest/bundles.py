"""Guest side: container bundles and the OCI runtime command lines that run them.

Standard library only (runs on the guest's python3).
"""

from __future__ import annotations

import json
import os

from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.guest.gproc import run_capture
from vmpod.agent.guest.shared import shared_path
from vmpod.agent.guest.users import resolve_user
from vmpod.agent.protocol import RUNTIME_COMMANDS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmpod.agent.guest.config import AgentConfig

RUNC_ROOT = "/run/runc"
_ID_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_FSTYPES = ("erofs", "ext4", "virtiofs")
_DIR_FSTYPES = ("virtiofs", "dir")


def check_id(cid: str) -> str:
    if not cid or len(cid) > 128 or not set(cid) <= _ID_OK or cid[0] in ".-":
        raise AgentFailure(f"invalid container id {cid!r}", "invalid")
    return cid


def bundle_dir(config: AgentConfig, cid: str) -> str:
    return os.path.join(config.bundles, check_id(cid))


def check_fstype(config: AgentConfig, fstype: str) -> None:
    # "dir" (rootfs_serial names a directory) exists for in-process tests only:
    # in the guest it would let the host point a container at any guest path.
    if fstype not in _FSTYPES and not (fstype == "dir" and config.allow_dir_rootfs):
        raise AgentFailure(f"unsupported rootfs filesystem {fstype!r}", "invalid")


def _mount(config: AgentConfig, argv: list[str], what: str) -> None:
    code, out, err = run_capture([config.busybox, "mount", *argv], 4096)
    if code != 0:
        raise AgentFailure(f"{what}: {(err or out).strip()}")


def find_disk(serial: str) -> str:
    """Block device whose virtio serial is ``serial`` (device order is not stable)."""
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/serial") as fh:
                if fh.read(64).strip() == serial:
                    return f"/dev/{name}"
        except OSError:
            continue
    raise AgentFailure(f"no disk with serial {serial!r}", "not_found")


def rootfs_source(config: AgentConfig, fstype: str, serial: str) -> str:
    """The device holding the container image, or the directory that is its root
    (virtiofs: below the shared mount; "dir": anywhere, in-process tests only)."""
    if fstype == "virtiofs":
        return shared_path(config, serial)
    if fstype != "dir":
        return find_disk(serial)
    if not os.path.isabs(serial) or not os.path.isdir(serial):
        raise AgentFailure(f"rootfs directory {serial!r} does not exist", "not_found")
    return serial


def prepare_bundle(
    config: AgentConfig,
    cid: str,
    spec: dict[str, object],
    source: str,
    fstype: str,
    user: str,
) -> str:
    """Make the bundle (rootfs from ``source``, config.json); returns its path."""
    bundle = bundle_dir(config, cid)
    if os.path.exists(bundle):
        raise AgentFailure(f"container {cid} already exists", "exists")
    os.makedirs(bundle)
    if fstype in _DIR_FSTYPES:
        rootfs = source  # the directory is the root, writes included (runc wants no symlink)
    else:
        rootfs = os.path.join(bundle, "rootfs")
        _mount_overlay(config, bundle, source, fstype)
    spec = dict(spec)
    root = dict(spec.get("root") or {})  # type: ignore[call-overload]
    root["path"] = rootfs
    spec["root"] = root
    _apply_net_sysctls(config, spec)
    process = spec.get("process")
    if isinstance(process, dict) and user:
        process = dict(process)
        process["user"] = resolve_user(rootfs, user)
        spec["process"] = process
    with open(os.path.join(bundle, "config.json"), "w") as fh:
        json.dump(spec, fh)
    return bundle


_SYSCTL_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


def _apply_net_sysctls(config: AgentConfig, spec: dict[str, object]) -> None:
    """net.* sysctls belong to a network namespace, and the container shares the
    VM's (the pod's): set them there, as the engine set them on the pod's, and
    leave the rest to the runtime (which refuses net.* without a namespace)."""
    linux = spec.get("linux")
    sysctl = linux.get("sysctl") if isinstance(linux, dict) else None
    if not isinstance(linux, dict) or not isinstance(sysctl, dict):
        return
    net = {k: v for k, v in sysctl.items() if isinstance(k, str) and k.startswith("net.")}
    for key, value in net.items():
        parts = key.split(".")
        if not set(key) <= _SYSCTL_OK or "" in parts or ".." in parts or len(key) > 128:
            raise AgentFailure(f"invalid sysctl name {key!r}", "invalid")
        if not isinstance(value, str) or "\n" in value or len(value) > 256:
            raise AgentFailure(f"invalid value for sysctl {key}", "invalid")
        try:
            with open(os.path.join(config.net_sysctl, *parts[1:]), "w") as fh:
                fh.write(value)
        except OSError as err:
            raise AgentFailure(f"sysctl {key}={value}: {err.strerror}") from None
    linux = dict(linux)
    linux["sysctl"] = {k: v for k, v in sysctl.items() if k not in net}
    spec["linux"] = linux


JOINABLE_NAMESPACES = ("ipc", "uts")


def join_namespaces(spec: dict[str, object], paths: dict[str, str]) -> dict[str, object]:
    """``spec`` with the namespaces of ``paths``' types joined (path set)."""
    if not paths:
        return spec
    linux = dict(spec.get("linux") or {})  # type: ignore[call-overload]
    kept = [
        ns for ns in linux.get("namespaces") or [] if not (isinstance(ns, dict) and ns.get("type") in paths)
    ]
    linux["namespaces"] = [*kept, *({"type": t, "path": path} for t, path in paths.items())]
    return {**spec, "linux": linux}


def root_path(bundle: str) -> str:
    """The container's root directory, as the bundle's config.json says."""
    with open(os.path.join(bundle, "config.json")) as fh:
        spec = json.load(fh)
    return str(spec["root"]["path"])


def _mount_overlay(config: AgentConfig, bundle: str, device: str, fstype: str) -> None:
    """Mount the disk read-only under a tmpfs-backed overlay at <bundle>/rootfs."""
    lower, rw, rootfs = (os.path.join(bundle, d) for d in ("lower", "rw", "rootfs"))
    for d in (lower, rw, rootfs):
        os.makedirs(d)
    _mount(config, ["-t", fstype, "-o", "ro", device, lower], "mount container image")
    # The writable layer lives in guest RAM: it dies with the sandbox, like Kata's.
    _mount(config, ["-t", "tmpfs", "-o", "mode=0755", "tmpfs", rw], "mount container tmpfs")
    os.makedirs(os.path.join(rw, "upper"))
    os.makedirs(os.path.join(rw, "work"))
    _mount(
        config,
        ["-t", "overlay", "-o", f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work", "overlay", rootfs],
        "mount container overlay",
    )


def _logged(binary: str, root: str, log: str) -> list[str]:
    """The runtime with its state root and a JSON log (read by ``start_failure``)."""
    return [binary, "--root", root, "--log", log, "--log-format", "json"]


def run_argv(binary: str, bundle: str, cid: str, pid_file: str, log: str, root: str = RUNC_ROOT) -> list[str]:
    return [
        *_logged(binary, root, log),
        *("run", "--bundle", bundle, "--pid-file", pid_file, "--no-new-keyring", check_id(cid)),
    ]


def exec_argv(
    binary: str, cid: str, process_file: str, pid_file: str, log: str, root: str = RUNC_ROOT
) -> list[str]:
    return [
        *_logged(binary, root, log),
        *("exec", "--process", process_file, "--pid-file", pid_file, check_id(cid)),
    ]


def checkpoint_argv(
    binary: str, cid: str, images: str, work: str, flags: list[str], root: str = RUNC_ROOT
) -> list[str]:
    """``runc checkpoint``: CRIU images to ``images``, dump.log to ``work``."""
    return [
        binary, "--root", root, "checkpoint", "--image-path", images, "--work-path", work,
        *flags, check_id(cid),
    ]  # fmt: skip


def restore_argv(
    binary: str,
    bundle: str,
    cid: str,
    images: str,
    work: str,
    flags: list[str],
    pid_file: str,
    log: str,
    root: str = RUNC_ROOT,
) -> list[str]:
    """``runc restore`` in the foreground (like ``run``: its stdio become the tree's)."""
    return [
        *_logged(binary, root, log),
        *("restore", "--image-path", images, "--work-path", work, "--bundle", bundle),
        *("--pid-file", pid_file, *flags, check_id(cid)),
    ]  # fmt: skip


CRIU_CONFIG_ANNOTATION = "org.criu.config"  # runc hands this file to CRIU


def restore_config(bundle: str, leave_stopped: bool = False) -> None:
    """Prepare ``bundle`` for ``runc restore`` with a CRIU configuration file:
    ``tcp-close`` (connected TCP sockets come back closed: the new VM has no
    network), ``leave-stopped`` if asked (an analyst's ``--paused``), and on
    cgroup v2, where runc gives CRIU no cgroup root and the tree would land in
    the dumped container's cgroup, out of reach of this container's freezer
    (pause, a later checkpoint), this container's cgroup."""
    path = os.path.join(bundle, "config.json")
    with open(path) as fh:
        spec = json.load(fh)
    if (spec.get("process") or {}).get("terminal"):
        raise AgentFailure("a container with a terminal cannot be restored", "unsupported")
    lines = ["tcp-close", *["leave-stopped"] * leave_stopped]
    cgroup = (spec.get("linux") or {}).get("cgroupsPath")
    if isinstance(cgroup, str) and cgroup.startswith("/") and set(cgroup) <= _ARG_OK:
        lines.append(f"cgroup-root {cgroup}")
    conf = os.path.join(bundle, "criu-restore.conf")
    with open(conf, "w") as fh:
        fh.write("".join(f"{line}\n" for line in lines))
    spec["annotations"] = {**(spec.get("annotations") or {}), CRIU_CONFIG_ANNOTATION: conf}
    with open(path, "w") as fh:
        json.dump(spec, fh)


def criu_flags(leave_running: bool, tcp_established: bool, file_locks: bool) -> list[str]:
    flags = ["--leave-running"] if leave_running else []
    return flags + ["--tcp-established"] * tcp_established + ["--file-locks"] * file_locks


_ARG_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_=.,:+-/")


def runtime_argv(binary: str, command: str, args: list[str], cid: str, root: str = RUNC_ROOT) -> list[str]:
    """``<runtime> --root R COMMAND ARGS... ID`` for the few commands the host may ask."""
    if command not in RUNTIME_COMMANDS:
        raise AgentFailure(f"runtime command {command!r} is not allowed", "invalid")
    for arg in args:
        if not arg or not set(arg) <= _ARG_OK or arg.startswith(("--root", "--log", "--criu")):
            raise AgentFailure(f"runtime argument {arg!r} is not allowed", "invalid")
    if command == "kill":  # runc kill [--all] ID SIGNAL: the signal follows the id
        flags = [a for a in args if a.startswith("-")]
        rest = [a for a in args if not a.startswith("-")]
        return [binary, "--root", root, command, *flags, check_id(cid), *rest]
    return [binary, "--root", root, command, *args, check_id(cid)]


def start_failure(log: str) -> tuple[int, str] | None:
    """(status, message) when the runtime failed before the process ran; None otherwise.

    Like docker: 127 when the command does not exist, 126 when it cannot be run.
    """
    try:
        with open(log, "rb") as fh:
            lines = fh.read(1 << 20).decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("error", "fatal"):
            continue
        msg = str(entry.get("msg", ""))
        low = msg.lower()
        if "executable file not found" in low or "no such file or directory" in low:
            return 127, msg
        if "permission denied" in low:
            return 126, msg
        return 125, msg
    return None


def runtime_error(text: str) -> str:
    """The message of the runtime's last error line (JSON or logrus text), else the last line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "msg" in obj:
            return str(obj["msg"])
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rstrip('"')
    return lines[-1] if lines else ""


def teardown(config: AgentConfig, cid: str) -> None:
    """Unmount a bundle's rootfs layers (best effort: the VM goes away anyway)."""
    bundle = bundle_dir(config, cid)
    for d in ("rootfs", "rw", "lower"):
        run_capture([config.busybox, "umount", "-l", os.path.join(bundle, d)], 4096)
