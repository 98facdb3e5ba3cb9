"""Container state under the runtime root: one directory per container.

    <root>/<id>/state.json     ContainerState, replaced atomically (tmp + rename)
    <root>/<id>/lock           flock: serialises mutating commands on this container
    <root>/<id>/monitor.lock   flock held by the monitor for its whole life
    <root>/<id>/monitor.sock   the monitor's control socket

A container directory appears atomically: it is prepared (locked) under a
temporary name and renamed into place, and a rename onto a non-empty directory
fails, so two concurrent ``create``s of one id cannot both win. While the
monitor lives it is the only writer of state.json; a monitor that died (even by
SIGKILL) releases monitor.lock, and the container then reads as "stopped".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from vmpod.fsutil import LockTimeout, atomic_write, is_locked, lock_file
from vmpod.runtime.errors import NotFound, RuntimeCliError

DEFAULT_ROOT = "/run/vmpod-runtime"
OCI_VERSION = "1.0.2"
CREATING, CREATED, RUNNING, PAUSED, STOPPED = "creating", "created", "running", "paused", "stopped"
ALIVE = (CREATING, CREATED, RUNNING, PAUSED)
# The guest agent's rule (no "+", no leading "." or "-"), a subset of runc's.
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_id(cid: str) -> str:
    if not _ID_RE.match(cid):
        raise RuntimeCliError(f"invalid container id format: {cid!r}")
    return cid


def now_rfc3339() -> str:
    t = time.time_ns()
    stamp = datetime.fromtimestamp(t // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{t % 10**9:09d}Z"


def proc_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks (0 if gone): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class ContainerState:
    id: str
    bundle: str
    rootfs: str
    created: str
    status: str = CREATING
    pid: int = 0  # the monitor (what conmon and shims wait for)
    monitor_start: int = 0  # its start time, to never signal a reused pid
    exit_status: int | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    sandbox_dir: str = ""  # the VM's sockets and logs (removed by delete)
    shared_dir: str = ""  # the VM's virtio-fs tree of bind mounts (unmounted by delete)
    owner: str = ""

    def oci(self, status: str) -> dict[str, object]:
        """The runtime spec's State (plus runc's rootfs/created/owner)."""
        out: dict[str, object] = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": self.pid if status in ALIVE else 0,
            "status": status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": self.owner,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if status == STOPPED and self.exit_status is not None:
            out["exitStatus"] = self.exit_status  # vmpod extension: kept until delete
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ContainerState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]


def _write_json_atomic(path: Path, data: dict[str, object]) -> None:
    atomic_write(path, json.dumps(data).encode(), mode=0o600)


def _flock(path: Path, timeout: float) -> int:
    """An exclusive flock on ``path`` (its fd), as a runtime error when it times out."""
    try:
        return lock_file(path, timeout=timeout)
    except LockTimeout:
        raise RuntimeCliError(f"timed out waiting for the lock {path}") from None


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def dir(self, cid: str) -> Path:
        return self.root / check_id(cid)

    def begin(self, st: ContainerState) -> tuple[Path, int, int]:
        """Make the container's directory atomically; returns (dir, lock fd, monitor
        lock fd), both flocks held. Raises if the id is taken."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.dir(st.id)
        if final.exists():
            raise RuntimeCliError("container with given ID already exists")
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".new-{st.id}-"))
        try:
            lock = _flock(tmp / "lock", 0)
            mon = _flock(tmp / "monitor.lock", 0)
            _write_json_atomic(tmp / "state.json", asdict(st))
            try:
                os.rename(tmp, final)
            except OSError as err:
                os.close(lock)
                os.close(mon)
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise RuntimeCliError("container with given ID already exists") from None
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, lock, mon

    def load(self, cid: str) -> ContainerState:
        try:
            data = json.loads((self.dir(cid) / "state.json").read_text())
        except FileNotFoundError:
            raise NotFound() from None
        except (OSError, ValueError, RecursionError) as err:
            raise RuntimeCliError(f"cannot read the state of container {cid}: {err}") from err
        return ContainerState.from_json(data)

    def save(self, st: ContainerState) -> None:
        _write_json_atomic(self.dir(st.id) / "state.json", asdict(st))

    def update(self, cid: str, **changes: object) -> ContainerState:
        st = replace(self.load(cid), **changes)  # type: ignore[arg-type]
        self.save(st)
        return st

    @contextlib.contextmanager
    def lock(self, cid: str, timeout: float = 120.0) -> Iterator[None]:
        """The container's mutation lock (a create in progress holds it)."""
        d = self.dir(cid)
        if not (d / "state.json").exists():
            raise NotFound()
        fd = _flock(d / "lock", timeout)
        try:
            yield
        finally:
            os.close(fd)

    def monitor_alive(self, cid: str) -> bool:
        return is_locked(self.dir(cid) / "monitor.lock")

    def status(self, st: ContainerState) -> str:
        """What the container is now: a dead monitor means stopped, whatever it wrote."""
        if st.status in ALIVE and not self.monitor_alive(st.id):
            return STOPPED
        return st.status

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if not d.name.startswith(".") and (d / "state.json").exists()
        )

    def wait_monitor_gone(self, cid: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.monitor_alive(cid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def remove(self, cid: str) -> None:
        shutil.rmtree(self.dir(cid), ignore_errors=True)
