"""Named containers' lifecycle: run, start, stop, kill, rm, and what they are now.

A container is a record (``records``) plus, while it has a VM, a vmpod-runtime
container of the same id in the runtime store under ``Paths.run / "runtime"``
(one monitor per container, the runtime's own functions). The runtime state,
when there is one, is the truth about the process; the record keeps what must
survive it (exit code, timestamps) and is brought up to date under its lock.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmpod.containers import network as net
from vmpod.containers import rootfs
from vmpod.containers.records import ContainerError, NoSuchContainer, Record, Records
from vmpod.mounts import remove_tree
from vmpod.paths import Paths
from vmpod.proc import descendant_named
from vmpod.runtime import ipc, lifecycle
from vmpod.runtime.errors import NotFound, RuntimeCliError
from vmpod.runtime.outputlog import DEFAULT_KEEP, DEFAULT_MAX_BYTES, LogSink
from vmpod.runtime.state import CREATED, CREATING, PAUSED, RUNNING, STOPPED, Store, now_rfc3339

STOP_TIMEOUT = 10.0
CREATED_S, RUNNING_S, PAUSED_S, EXITED_S, UNKNOWN_S = "created", "running", "paused", "exited", "unknown"
_STATES = {CREATING: CREATED_S, CREATED: CREATED_S, RUNNING: RUNNING_S, PAUSED: PAUSED_S, STOPPED: EXITED_S}


@dataclass(frozen=True)
class View:
    """A container as it is now: the record, and the runtime's word on its process."""

    record: Record
    state: str  # created | running | paused | exited | unknown
    exit_code: int | None
    monitor_pid: int = 0
    finished: str = ""
    sandbox_dir: str = ""

    @property
    def alive(self) -> bool:
        return self.state in (RUNNING_S, PAUSED_S) or (self.state == CREATED_S and self.monitor_pid > 0)

    def status_text(self) -> str:
        if self.state == EXITED_S:
            return f"Exited ({self.exit_code if self.exit_code is not None else 'unknown'})"
        return self.state.capitalize()


class Manager:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.records = Records(paths.home / "containers")
        self.store = Store(paths.run / "runtime")

    # -- where things are ---------------------------------------------------------
    def dir(self, rec: Record) -> Path:
        return self.records.dir(rec.id)

    def overlay(self, rec: Record) -> rootfs.Overlay:
        return rootfs.Overlay.of(self.dir(rec), rec.lower)

    def log_path(self, rec: Record) -> Path:
        return self.dir(rec) / "container.log"

    def log_sink(self, rec: Record, tee: bool) -> LogSink:
        return LogSink(
            str(self.log_path(rec)),
            rec.log_max_bytes or DEFAULT_MAX_BYTES,
            rec.log_keep or DEFAULT_KEEP,
            tee,
        )

    # -- status -------------------------------------------------------------------
    def view(self, rec: Record) -> View:
        try:
            st = self.store.load(rec.id)
        except NotFound:  # no VM (never made, removed, or a host reboot): the record
            state = EXITED_S if rec.started else CREATED_S
            return View(rec, state, rec.exit_code, finished=rec.finished)
        except RuntimeCliError:
            return View(rec, UNKNOWN_S, rec.exit_code, finished=rec.finished)
        status = self.store.status(st)
        state = _STATES.get(status, UNKNOWN_S)
        if state == EXITED_S:
            code = st.exit_status if st.exit_status is not None else rec.exit_code
            if code is None and rec.started and st.pid > 0:
                # its monitor died (SIGKILL, a crash) before it could record a status:
                # the VM died with it (PDEATHSIG), and every process in it as SIGKILLed
                code = 128 + signal.SIGKILL
            return View(
                rec, state, code, finished=rec.finished or self._stopped_at(rec), sandbox_dir=st.sandbox_dir
            )
        return View(rec, state, None, monitor_pid=st.pid, sandbox_dir=st.sandbox_dir)

    def _stopped_at(self, rec: Record) -> str:
        try:
            mtime = (self.store.dir(rec.id) / "state.json").stat().st_mtime
        except OSError:
            return ""
        return datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def settle(self, rec: Record) -> Record:
        """Write what the runtime knows of an ended process into the record (under
        its lock), so it survives the runtime state."""
        v = self.view(rec)
        if v.state != EXITED_S or (rec.finished and rec.exit_code == v.exit_code):
            return rec
        return self.records.update(rec.id, finished=v.finished or now_rfc3339(), exit_code=v.exit_code)

    def views(self) -> list[View]:
        out = []
        for rec in self.records.all():
            # busy or gone: report what is known, do not wait
            with contextlib.suppress(ContainerError), self.records.lock(rec.id, timeout=0):
                rec = self.settle(self.records.load(rec.id))
            out.append(self.view(rec))
        return out

    # -- commands -----------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, ref: str, timeout: float = 60.0) -> Iterator[Record]:
        rec = self.records.resolve(ref)
        with self.records.lock(rec.id, timeout):
            yield self.settle(self.records.load(rec.id))

    def kill(self, ref: str, sig: int) -> None:
        with self.locked(ref) as rec:
            v = self.view(rec)
            if not v.alive:
                raise ContainerError(f"container {rec.name} is not running")
            ipc.request(self.store.dir(rec.id) / "monitor.sock", {"op": "kill", "signal": sig, "all": False})

    def stop(self, ref: str, timeout: float = STOP_TIMEOUT) -> Record:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the VM goes with it."""
        with self.locked(ref, timeout=timeout + 60) as rec:
            if not self.view(rec).alive:
                return rec
            sock = self.store.dir(rec.id) / "monitor.sock"
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(RuntimeCliError):
                    ipc.request(sock, {"op": "kill", "signal": int(sig), "all": sig == signal.SIGKILL})
                if self.store.wait_monitor_gone(rec.id, wait):
                    break
            else:  # the VM does not end its container: end the VM
                lifecycle.destroy(self.store, self.store.load(rec.id))
            return self.settle(rec)

    def remove(self, ref: str, force: bool) -> None:
        """Delete the container's VM (``force``: even running), unmount its rootfs,
        then its record, logs and writable layer. Volumes are never touched."""
        rec = self.records.resolve(ref)
        try:
            with self.records.lock(rec.id, timeout=120):
                rec = self.settle(self.records.load(rec.id))
                v = self.view(rec)
                if v.state in (RUNNING_S, PAUSED_S) and not force:
                    raise ContainerError(
                        f"container {rec.name} is {v.state}", hint="stop it first or use rm -f"
                    )
                self._drop(rec)
        except NoSuchContainer:
            if not force:  # removed by a concurrent rm: what -f wanted
                raise

    def _drop(self, rec: Record) -> None:
        lifecycle.delete(self.store, rec.id, force=True)
        if self.store.dir(rec.id).exists():
            raise ContainerError(f"the runtime state of {rec.name} could not be removed")
        net.detach(self.paths, rec.id)  # its namespace, lease, published ports
        rootfs.unmount(self.overlay(rec))
        d = self.dir(rec)
        trash = d.with_name(f".trash-{rec.id}")
        os.rename(d, trash)  # the name is free and lookups skip it from here on
        remove_tree(trash)

    def inspect(self, ref: str) -> dict[str, object]:
        with self.locked(ref) as rec:
            v = self.view(rec)
        return {
            "id": rec.id,
            "name": rec.name,
            "image": rec.image,
            "image_digest": rec.image_digest,
            "command": list(rec.command),
            "kernel": rec.kernel,
            "state": {
                "status": v.state,
                "running": v.state in (RUNNING_S, PAUSED_S),
                "exit_code": v.exit_code,
                "monitor_pid": v.monitor_pid,
                "vm_pid": vm_pid(v.monitor_pid),
                "created": rec.created,
                "started": rec.started,
                "finished": v.finished,
            },
            "rootfs": (
                {"disk": rec.root_disk, "writes": "in the VM (--root-in-vm)"}
                if rec.root_disk
                else {"lower": rec.lower, **{k: str(p) for k, p in _layers(self.overlay(rec)).items()}}
            ),
            "mounts": [
                {"source": m.source, "destination": m.destination, "mode": "ro" if m.readonly else "rw"}
                for m in rec.mounts
            ],
            "log_path": str(self.log_path(rec)),
            "runtime_root": str(self.store.root),
            "auto_remove": rec.auto_remove,
        }


def _layers(ov: rootfs.Overlay) -> dict[str, Path]:
    return {"upper": ov.upper, "merged": ov.merged}


def vm_pid(monitor_pid: int) -> int:
    """The QEMU below a monitor (0 if none)."""
    if monitor_pid <= 0:
        return 0
    return descendant_named(monitor_pid, "qemu-system") or 0
