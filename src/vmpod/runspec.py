"""The OCI runtime config that the guest runtime runs, built from an image config
and docker-run style options (docker's precedence rules). Used by `vmpod run` and
the matrix; vmpod-runtime takes its config from the bundle instead."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vmpod.errors import ConfigError
from vmpod.images import ImageConfig
from vmpod.sandbox.build import check_config_size

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# docker's default capability set
DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
ALL_CAPS = DEFAULT_CAPS + (
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class ProcessOptions:
    """What the user asked for on the command line (empty = take the image's)."""

    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""
    tty: bool = False
    hostname: str = "vmpod"
    read_only: bool = False
    nofile: int = 1024
    # All capabilities and the guest's devices (like `docker run --privileged`):
    # privileged inside the VM, which stays the isolation boundary.
    privileged: bool = False
    # --init: catatonit from the host, bind-mounted read-only, runs as PID 1 and
    # reaps zombies (as podman --init does; it is static, so any image can run it)
    init: bool = False


def command(image: ImageConfig, args: tuple[str, ...]) -> tuple[str, ...]:
    """ENTRYPOINT + (CLI args or CMD), as docker does."""
    argv = image.entrypoint + (args or image.cmd)
    if not argv:
        raise ConfigError(
            "no command given and the image has none", hint="add one after '--', e.g. vmpod run IMAGE -- sh"
        )
    return argv


def merge_env(image: ImageConfig, extra: tuple[str, ...], tty: bool, hostname: str) -> list[str]:
    env: dict[str, str] = {}
    # Image values override defaults (TERM included, as in docker); -e wins last.
    for item in (DEFAULT_PATH, f"HOSTNAME={hostname}", *(("TERM=xterm",) if tty else ()), *image.env, *extra):
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ConfigError(f"invalid environment variable '{item}'", hint="use -e NAME=VALUE")
        env[key] = value
    return [f"{k}={v}" for k, v in env.items()]


INIT_PATH = "/run/vmpod-init"  # where --init's binary appears in the container
INIT_BINARIES = ("/usr/bin/catatonit", "/usr/libexec/podman/catatonit")


def init_binary() -> str:
    """The host's catatonit (for --init)."""
    for cand in INIT_BINARIES:
        if os.access(cand, os.X_OK):
            return cand
    raise ConfigError("--init needs catatonit on the host", hint="apt-get install catatonit")


def user_of(image: ImageConfig, opts: ProcessOptions) -> str:
    return opts.user or image.user


def build_spec(image: ImageConfig, opts: ProcessOptions) -> dict[str, object]:
    """A complete OCI runtime config; the agent fills in root.path and the user ids."""
    workdir = opts.workdir or image.working_dir or "/"
    if not workdir.startswith("/"):
        raise ConfigError(
            f"working directory '{workdir}' is not absolute", hint="use an absolute path with -w"
        )
    caps = list(ALL_CAPS if opts.privileged else DEFAULT_CAPS)
    spec: dict[str, object] = {
        "ociVersion": "1.0.2",
        "hostname": opts.hostname,
        "process": {
            "terminal": opts.tty,
            "user": {"uid": 0, "gid": 0},
            "args": [*((INIT_PATH, "--") if opts.init else ()), *command(image, opts.args)],
            "env": merge_env(image, opts.env, opts.tty, opts.hostname),
            "cwd": workdir,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": opts.nofile, "soft": opts.nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": opts.read_only},
        "mounts": default_mounts(),
        "linux": {
            # No network namespace: the container shares the VM's network (Kata model).
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": list(MASKED),
            "readonlyPaths": list(READONLY),
        },
    }
    if opts.privileged:
        spec["mounts"] = [m for m in default_mounts() if m["destination"] != "/sys"] + [
            {"destination": "/dev", "type": "bind", "source": "/dev", "options": ["rbind"]},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev"],
            },
        ]
        linux = spec["linux"]
        assert isinstance(linux, dict)
        linux.update(
            maskedPaths=[], readonlyPaths=[], resources={"devices": [{"allow": True, "access": "rwm"}]}
        )
        process = spec["process"]
        assert isinstance(process, dict)
        process["noNewPrivileges"] = False
    if opts.init:
        mounts = spec["mounts"]
        assert isinstance(mounts, list)
        mounts.append(
            {"destination": INIT_PATH, "type": "bind", "source": init_binary(), "options": ["bind", "ro"]}
        )
    check_config_size(spec)  # huge argv or environment: refused here, not after the boot
    return spec


def default_mounts() -> list[dict[str, object]]:
    """The mounts every container gets (docker's and runc's defaults)."""

    def m(dest: str, typ: str, src: str, *options: str) -> dict[str, object]:
        return {"destination": dest, "type": typ, "source": src, "options": list(options)}

    return [
        m("/proc", "proc", "proc"),
        m("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ),
        m("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        m("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        m("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        m("/sys/fs/cgroup", "cgroup", "cgroup", "nosuid", "noexec", "nodev", "relatime", "ro"),
    ]
