"""docker-run options that need parsing: ``-v`` volume specs and ``--env-file``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers.records import Mount
from vmpod.errors import ConfigError
from vmpod.fsutil import resolve_below
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.network.ports import PortMapping
from vmpod.runspec import ProcessOptions
from vmpod.runtime.outputlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class RunRequest:
    """A `vmpod run -d` / `--name` container, as asked for on the command line."""

    image: str
    rootfs: str
    process: ProcessOptions
    name: str = ""
    entrypoint: str | None = None  # "" clears the image's
    volumes: tuple[Mount, ...] = ()
    auto_remove: bool = False
    kernel: str = DEFAULT_KERNEL
    accel: str = "auto"
    guest_runtime: str = "runc"
    boot_timeout: float = 60.0
    cpus: int = 1
    memory_mb: int = 512
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_keep: int = DEFAULT_KEEP
    network: str = "bridge"  # bridge | none (a pod member: the pod's)
    ports: tuple[PortMapping, ...] = ()
    pod: str = ""  # join this pod's VM (`vmpod run --pod`)
    pod_infra: bool = False  # the pod's infra container (`vmpod pod create`)
    # root on the image's erofs disk, writes in the VM, no virtio-fs: can be snapshotted
    root_in_vm: bool = False


def pod_infra_name(pod: str) -> str:
    """The name of a pod's infra container (it holds the pod's VM)."""
    return f"{pod}-infra"


_VOLUME_HINT = "use -v /HOST/DIR:/CONTAINER/DIR[:ro|rw]"


def parse_volume(spec: str) -> Mount:
    """``HOST:CTR[:ro|rw]`` with absolute paths (named volumes are not supported)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"invalid volume spec {spec!r}", hint=_VOLUME_HINT)
    host, ctr = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise ConfigError(f"invalid volume mode {mode!r} in {spec!r}", hint=_VOLUME_HINT)
    if not host.startswith("/"):
        raise ConfigError(
            f"invalid volume spec {spec!r}: the host path must be absolute (named volumes are not supported)",
            hint=_VOLUME_HINT,
        )
    if not ctr.startswith("/"):
        raise ConfigError(
            f"invalid volume spec {spec!r}: the container path must be absolute", hint=_VOLUME_HINT
        )
    dest = os.path.normpath(ctr)
    if dest == "/":
        raise ConfigError(f"invalid volume spec {spec!r}: cannot mount over the container's root")
    for path in (host, ctr):
        if "\0" in path or "," in path:
            raise ConfigError(f"invalid volume spec {spec!r}: unsupported character in {path!r}")
    return Mount(source=os.path.normpath(host), destination=dest, readonly=mode == "ro")


def check_volumes(mounts: tuple[Mount, ...]) -> None:
    dests = [m.destination for m in mounts]
    dup = {d for d in dests if dests.count(d) > 1}
    if dup:
        raise ConfigError(f"duplicate mount point: {sorted(dup)[0]}")


def make_sources(mounts: tuple[Mount, ...]) -> None:
    """docker's behaviour: a missing host directory is created (0755)."""
    for m in mounts:
        src = Path(m.source)
        if src.is_symlink() and not src.exists():
            raise ConfigError(f"volume source {m.source} is a dangling symlink")
        if not src.exists():
            src.mkdir(parents=True, mode=0o755)


def read_env_file(path: str) -> tuple[str, ...]:
    """docker's --env-file: NAME=VALUE lines, '#' comments and blank lines skipped;
    a bare NAME takes the host's value (and is skipped when the host has none)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read env file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"env file {path} is not UTF-8 text") from err
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not name or any(c.isspace() for c in name):
            raise ConfigError(f"{path}:{number}: invalid variable name {name!r}")
        if sep:
            out.append(f"{name}={value}")
        elif name in os.environ:
            out.append(f"{name}={os.environ[name]}")
    return tuple(out)


def user_ids(tree: Path, user: str) -> dict[str, int]:
    """``uid[:gid]`` or ``name[:group]``, names looked up in the image's /etc files."""
    if not user:
        return {"uid": 0, "gid": 0}
    name, _, group = user.partition(":")
    passwd = _table(tree, "/etc/passwd")
    if name.isdigit():
        uid = int(name)
        gid = next((int(r[3]) for r in passwd if r[2] == name and r[3].isdigit()), 0)
    else:
        row = next((r for r in passwd if r[0] == name), None)
        if row is None or not row[2].isdigit() or not row[3].isdigit():
            raise ConfigError(f"unable to find user {name}: no matching entries in the image's /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = next((r for r in _table(tree, "/etc/group") if r[0] == group), None)
            if grow is None or not grow[2].isdigit():
                raise ConfigError(
                    f"unable to find group {group}: no matching entries in the image's /etc/group"
                )
            gid = int(grow[2])
    return {"uid": uid, "gid": gid}


def _table(tree: Path, path: str) -> list[list[str]]:
    try:
        below = resolve_below(tree, path)  # the image's file, never the host's
        if not below.exists or not below.path.is_file():
            return []
        text = below.path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(f"cannot read the image's {path}: {err.strerror}") from err
    return [line.split(":") + [""] * 4 for line in text.splitlines() if line and not line.startswith("#")]
