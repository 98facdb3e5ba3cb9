"""`features` (runtime spec features.md) and `spec` (a default config.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vmpod.runspec import MASKED, READONLY, default_mounts
from vmpod.runtime.config import KNOWN_ANNOTATIONS, load_config
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.hooks import HOOK_KINDS

MOUNT_OPTIONS = sorted(
    {
        "async",
        "atime",
        "bind",
        "defaults",
        "dev",
        "diratime",
        "dirsync",
        "exec",
        "lazytime",
        "mand",
        "noatime",
        "nodev",
        "nodiratime",
        "noexec",
        "nolazytime",
        "nomand",
        "norelatime",
        "nostrictatime",
        "nosuid",
        "private",
        "rbind",
        "relatime",
        "remount",
        "ro",
        "rprivate",
        "rshared",
        "rslave",
        "runbindable",
        "rw",
        "shared",
        "slave",
        "strictatime",
        "suid",
        "sync",
        "unbindable",
    }
)
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
ALL_CAPS = (
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYSLOG",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
)


def features_doc() -> dict[str, object]:
    cfg = load_config()
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.0.2",
        "hooks": list(HOOK_KINDS),
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            # "network" is accepted and dropped: the container shares its VM's network.
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": sorted(ALL_CAPS),
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "org.vmpod.runtime": "vmpod-runtime",
            "org.vmpod.runtime.isolation": "vm",
            "org.vmpod.runtime.annotations.known": ",".join(KNOWN_ANNOTATIONS),
            "org.vmpod.runtime.annotations.enabled": ",".join(cfg.enable_annotations),
        },
    }


def default_spec() -> dict[str, object]:
    """runc spec's template: sh on a terminal, rootfs read-only, the usual mounts."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted", "ambient")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }


def write_default_spec(bundle: Path) -> None:
    path = bundle / "config.json"
    if path.exists():
        raise RuntimeCliError("File config.json exists. Remove it first")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise RuntimeCliError(f"cannot write {path}: {err.strerror}") from err
    with os.fdopen(fd, "w") as fh:
        json.dump(default_spec(), fh, indent=2)
        fh.write("\n")
