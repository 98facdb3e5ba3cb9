"""Persistent records of named containers, and finding one by name or id prefix.

    <home>/containers/<id>/record.json   Record, replaced atomically
    <home>/containers/<id>/lock          flock: serialises commands on this container
    <home>/containers/.names.lock        flock: serialises taking a name

The record outlives a host reboot (the runtime state under the run dir does not),
so what it says about a container's process is only a fallback: the runtime
state, when present, is the truth (see ``manager.status_of``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vmpod.errors import ConfigError, VmpodError
from vmpod.fsutil import LockTimeout, atomic_write, lock_file
from vmpod.network.ports import PortMapping

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")  # docker's rule, length capped
ID_LEN = 64
SHORT = 12


class ContainerError(VmpodError):
    """A refused or failed container command (unknown name, wrong state...)."""


class NoSuchContainer(ContainerError):
    def __init__(self, ref: str) -> None:
        super().__init__(f"no such container: {ref}", hint="see vmpod ps -a")


@dataclass(frozen=True)
class Mount:
    """A volume: host directory -> container path."""

    source: str
    destination: str
    readonly: bool = False


@dataclass(frozen=True)
class Record:
    id: str
    name: str
    image: str  # what the user named (image ref or rootfs dir)
    image_digest: str
    lower: str  # the read-only tree under the overlay (image cache or --rootfs dir)
    command: tuple[str, ...]
    created: str
    kernel: str = ""
    mounts: tuple[Mount, ...] = ()
    auto_remove: bool = False
    log_max_bytes: int = 0
    log_keep: int = 0
    started: str = ""
    finished: str = ""
    exit_code: int | None = None
    network: str = "none"  # bridge: a CNI attachment while the container exists; pod: the pod's
    ports: tuple[PortMapping, ...] = ()
    pod: str = ""  # the pod it belongs to (its name)
    pod_infra: bool = False  # the pod's first container: it holds the VM and the network
    # --root-in-vm: its root is this erofs disk of the image and its writes live in
    # the VM (gone when it stops; `vmpod cp` cannot reach them); no virtio-fs device
    root_disk: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:SHORT]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "ports": [p.to_json() for p in self.ports]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Record:
        known = set(cls.__dataclass_fields__)
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        values["command"] = tuple(values.get("command") or ())
        values["mounts"] = tuple(Mount(**m) for m in values.get("mounts") or ())
        values["ports"] = tuple(PortMapping.from_json(p) for p in values.get("ports") or ())
        return cls(**values)


def new_id() -> str:
    return secrets.token_hex(ID_LEN // 2)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid container name {name!r}", hint="use letters, digits, '_', '.', '-' (64 at most)"
        )
    if re.fullmatch(r"[0-9a-f]{12,64}", name):
        raise ConfigError(f"invalid container name {name!r}", hint="a name must not look like a container id")
    return name


def default_name(cid: str) -> str:
    return f"vmpod-{cid[:8]}"


@dataclass
class Records:
    """The records under ``root`` (``Paths.home / "containers"``)."""

    root: Path

    def dir(self, cid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", cid):
            raise ConfigError(f"invalid container id {cid!r}")
        return self.root / cid

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if not d.name.startswith(".") and (d / "record.json").exists()
        )

    def load(self, cid: str) -> Record:
        try:
            data = json.loads((self.dir(cid) / "record.json").read_text())
        except FileNotFoundError:
            raise NoSuchContainer(cid) from None
        except (OSError, ValueError, TypeError) as err:
            raise ContainerError(f"cannot read the record of container {cid}: {err}") from err
        return Record.from_json(data)

    def all(self) -> list[Record]:
        out = []
        for cid in self.ids():
            with contextlib.suppress(NoSuchContainer):  # removed meanwhile
                out.append(self.load(cid))
        return out

    def save(self, rec: Record) -> None:
        atomic_write(self.dir(rec.id) / "record.json", json.dumps(rec.to_json()).encode(), mode=0o600)

    def update(self, cid: str, **changes: object) -> Record:
        rec = replace(self.load(cid), **changes)  # type: ignore[arg-type]
        self.save(rec)
        return rec

    def add(self, rec: Record) -> Path:
        """Make the record's directory; the name must be free (checked under a lock)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked(self.root / ".names.lock", 30):
            for other in self.all():
                if other.name == rec.name:
                    raise ContainerError(
                        f"the container name {rec.name!r} is already in use by container {other.short_id}",
                        hint="remove it (vmpod rm) or choose another name",
                    )
            d = self.dir(rec.id)
            d.mkdir(mode=0o700)
            self.save(rec)
        return d

    def resolve(self, ref: str) -> Record:
        """A full id, a name, or a unique id prefix (as docker resolves them)."""
        if not ref:
            raise ContainerError("no container named", hint="give a container name or id")
        records = self.all()
        for r in records:
            if ref in (r.id, r.name):
                return r
        matches = [r for r in records if r.id.startswith(ref)] if re.fullmatch(r"[0-9a-f]+", ref) else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(sorted(f"{r.short_id} ({r.name})" for r in matches)[:5])
            raise ContainerError(
                f"{ref!r} matches {len(matches)} containers: {names}", hint="give more of the id, or the name"
            )
        raise NoSuchContainer(ref)

    @contextlib.contextmanager
    def lock(self, cid: str, timeout: float = 60.0) -> Iterator[None]:
        """This container's command lock; NoSuchContainer once it is gone."""
        d = self.dir(cid)
        if not (d / "record.json").exists():
            raise NoSuchContainer(cid)
        with self._locked(d / "lock", timeout):
            if not (d / "record.json").exists():  # removed while we waited
                raise NoSuchContainer(cid)
            yield

    @contextlib.contextmanager
    def _locked(self, path: Path, timeout: float) -> Iterator[None]:
        try:
            fd = lock_file(path, timeout=timeout)
        except LockTimeout:
            raise ContainerError(
                f"timed out waiting for the lock {path}", hint="another command is busy"
            ) from None
        except FileNotFoundError:
            raise NoSuchContainer(path.parent.name) from None
        try:
            yield
        finally:
            os.close(fd)
