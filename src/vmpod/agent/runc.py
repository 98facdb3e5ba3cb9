"""Guest side: container bundles and the runc command lines that run them.

Standard library only (runs on the guest's python3).
"""
from __future__ import annotations

import json
import os

from vmpod.agent.gproc import run_capture
from vmpod.agent.protocol import MAX_FILES, RUNTIME_COMMANDS

BUSYBOX = "/bin/busybox"
RUNC = "/usr/bin/runc"
# OCI runtimes in the guest image; both take runc's command line. crun (C)
# starts ~0.5 s faster than runc (Go) under TCG.
RUNTIMES = {"runc": RUNC, "crun": "/usr/bin/crun"}
RUNC_ROOT = "/run/runc"
BUNDLES = "/run/vmpod/containers"
_ID_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class AgentFailure(Exception):
    """A request the agent cannot carry out; ``kind`` lets the host map it."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


def check_id(cid: str) -> str:
    if not cid or len(cid) > 128 or not set(cid) <= _ID_OK or cid[0] in ".-":
        raise AgentFailure(f"invalid container id {cid!r}", "invalid")
    return cid


def bundle_dir(cid: str) -> str:
    return os.path.join(BUNDLES, check_id(cid))


def _mount(argv: list[str], what: str) -> None:
    code, out, err = run_capture([BUSYBOX, "mount", *argv], 4096)
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


def decode_files(files: dict[str, str]) -> dict[str, bytes]:
    """Validate CreateContainer.files (names, base64, total size) before anything is mounted."""
    if not files:
        return {}
    import binascii
    if len(files) > 64:
        raise AgentFailure(f"too many files ({len(files)} > 64)", "invalid")
    out: dict[str, bytes] = {}
    total = 0
    for name, b64 in files.items():
        if not name or len(name) > 64 or not set(name) <= _ID_OK or name[0] in ".-":
            raise AgentFailure(f"invalid file name {name!r}", "invalid")
        try:
            data = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise AgentFailure(f"file {name!r} is not valid base64", "invalid") from None
        total += len(data)
        if total > MAX_FILES:
            raise AgentFailure(f"files exceed {MAX_FILES} bytes", "invalid")
        out[name] = data
    return out


def _write_files(bundle: str, files: dict[str, bytes], config: dict[str, object]) -> None:
    """Write the files into <bundle>/files and point mounts of "files/NAME" at them."""
    if not files:
        return
    base = os.path.join(bundle, "files")
    os.makedirs(base)
    for name, data in files.items():
        fd = os.open(os.path.join(base, name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    mounts = config.get("mounts")
    if isinstance(mounts, list):
        fixed = []
        for m in mounts:
            src = m.get("source") if isinstance(m, dict) else None
            if isinstance(src, str) and src.startswith("files/") and src[6:] in files:
                m = dict(m)
                m["source"] = os.path.join(base, src[6:])
            fixed.append(m)
        config["mounts"] = fixed


def prepare_bundle(cid: str, spec: dict[str, object], serial: str, fstype: str,
                   user: str, files: dict[str, str] | None = None) -> str:
    """Mount the disk read-only under a tmpfs-backed overlay, write config.json."""
    check_id(cid)
    if fstype not in ("erofs", "ext4"):
        raise AgentFailure(f"unsupported rootfs filesystem {fstype!r}", "invalid")
    contents = decode_files(files or {})
    device = find_disk(serial)
    bundle = bundle_dir(cid)
    if os.path.exists(bundle):
        raise AgentFailure(f"container {cid} already exists", "exists")
    lower, rw, rootfs = (os.path.join(bundle, d) for d in ("lower", "rw", "rootfs"))
    for d in (lower, rw, rootfs):
        os.makedirs(d)
    _mount(["-t", fstype, "-o", "ro", device, lower], "mount container image")
    # The writable layer lives in guest RAM: it dies with the sandbox, like Kata's.
    _mount(["-t", "tmpfs", "-o", "mode=0755", "tmpfs", rw], "mount container tmpfs")
    os.makedirs(os.path.join(rw, "upper"))
    os.makedirs(os.path.join(rw, "work"))
    _mount(["-t", "overlay", "-o",
            f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work", "overlay", rootfs],
           "mount container overlay")
    config = dict(spec)
    root = dict(config.get("root") or {})  # type: ignore[call-overload]
    root["path"] = rootfs
    config["root"] = root
    process = config.get("process")
    if isinstance(process, dict) and user:
        process = dict(process)
        process["user"] = resolve_user(rootfs, user)
        config["process"] = process
    _write_files(bundle, contents, config)
    with open(os.path.join(bundle, "config.json"), "w") as fh:
        json.dump(config, fh)
    return bundle


def resolve_user(rootfs: str, user: str) -> dict[str, object]:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` -> OCI user, read from the image."""
    name, _, group = user.partition(":")
    passwd = _table(rootfs, "etc/passwd")
    uid = gid = None
    home_gid = None
    if name.isdigit():
        uid = int(name)
        match = [r for r in passwd if r[2] == name]
        home_gid = int(match[0][3]) if match and match[0][3].isdigit() else 0
    else:
        match = [r for r in passwd if r[0] == name]
        if not match or not match[0][2].isdigit():
            raise AgentFailure(f"unable to find user {name}: no matching entries in passwd file",
                               "invalid")
        uid, home_gid = int(match[0][2]), int(match[0][3] or 0)
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            rows = [r for r in _table(rootfs, "etc/group") if r[0] == group]
            if not rows or not rows[0][2].isdigit():
                raise AgentFailure(f"unable to find group {group}", "invalid")
            gid = int(rows[0][2])
    else:
        gid = home_gid or 0
    return {"uid": uid, "gid": gid}


def _table(rootfs: str, rel: str) -> list[list[str]]:
    # Plain read, no symlink following outside the rootfs: open with O_NOFOLLOW on
    # the last component and refuse huge files (the image is untrusted).
    path = os.path.join(rootfs, rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(1 << 20)
    return [line.split(":") for line in data.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]


def runtime_binary(name: str) -> str:
    if name not in RUNTIMES:
        raise AgentFailure(f"unknown OCI runtime {name!r} (have {', '.join(RUNTIMES)})",
                           "invalid")
    return RUNTIMES[name]


def run_argv(runtime: str, cid: str, pid_file: str, log: str) -> list[str]:
    return [runtime_binary(runtime), "--root", RUNC_ROOT, "--log", log, "--log-format", "json",
            "run", "--bundle", bundle_dir(cid), "--pid-file", pid_file, "--no-new-keyring", cid]


def exec_argv(runtime: str, cid: str, process_file: str, pid_file: str,
              log: str) -> list[str]:
    return [runtime_binary(runtime), "--root", RUNC_ROOT, "--log", log, "--log-format", "json",
            "exec", "--process", process_file, "--pid-file", pid_file, check_id(cid)]


def start_failure(log: str) -> tuple[int, str] | None:
    """(status, message) when runc failed before the process ran; None otherwise.

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


_ARG_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_=.,:+-/")


def runtime_argv(runtime: str, command: str, args: list[str], cid: str) -> list[str]:
    """``<runtime> --root R COMMAND ARGS... ID`` for the few commands the host may ask."""
    if command not in RUNTIME_COMMANDS:
        raise AgentFailure(f"runtime command {command!r} is not allowed", "invalid")
    for arg in args:
        if not arg or not set(arg) <= _ARG_OK or arg.startswith(("--root", "--log", "--criu")):
            raise AgentFailure(f"runtime argument {arg!r} is not allowed", "invalid")
    if command == "kill":   # runc kill [--all] ID SIGNAL: the signal follows the id
        flags = [a for a in args if a.startswith("-")]
        rest = [a for a in args if not a.startswith("-")]
        return [runtime_binary(runtime), "--root", RUNC_ROOT, command, *flags, check_id(cid), *rest]
    return [runtime_binary(runtime), "--root", RUNC_ROOT, command, *args, check_id(cid)]


def teardown(cid: str) -> None:
    """Unmount a bundle's rootfs layers (best effort: the VM goes away anyway)."""
    bundle = bundle_dir(cid)
    for d in ("rootfs", "rw", "lower"):
        run_capture([BUSYBOX, "umount", "-l", os.path.join(bundle, d)], 4096)
