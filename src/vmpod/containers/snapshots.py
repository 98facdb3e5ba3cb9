"""`vmpod snapshot NAME DIR` and `vmpod restore DIR`: a named container's whole VM
saved by its monitor (sandbox/snapshot.py), and started again as a new container.

Only containers of `vmpod run -d --root-in-vm` can be saved: everyone else's
root is a host directory on virtio-fs, whose device (vhost-user-fs) QEMU 7.2
cannot migrate. The snapshot keeps the container's record, bundle config and
runtime settings (``Manifest.extra``); a restore makes a new record from them —
new id and name, no network (its NICs, if the original had any, lead nowhere) —
and its monitor starts the VM from the snapshot and adopts the running
container: from then on it is an ordinary container (ps, exec, logs, stop, rm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vmpod.containers import rootfs
from vmpod.containers.manager import Manager
from vmpod.containers.records import ContainerError, Record, check_name, default_name, new_id
from vmpod.errors import ConfigError
from vmpod.fsutil import atomic_write
from vmpod.jsonsafe import parse_json
from vmpod.runtime import ipc
from vmpod.runtime.state import now_rfc3339
from vmpod.sandbox.snapshot import SnapshotError, load_manifest

SNAPSHOT_TIMEOUT = 900.0  # seconds: a large guest's RAM under a loaded host


def snapshot(m: Manager, ref: str, dest: Path, *, stop: bool = False) -> dict[str, object]:
    """Save container ``ref``'s VM into the new directory ``dest``."""
    dest = dest.absolute()
    if os.path.lexists(dest):
        raise ConfigError(f"{dest} already exists", hint="name a new directory for the snapshot")
    with m.locked(ref) as rec:
        if not rec.root_disk:
            raise ContainerError(
                f"container {rec.name} has its root on virtio-fs (a vhost-user-fs-device), which "
                "QEMU 7.2 cannot save",
                hint="run it with vmpod run -d --root-in-vm to snapshot it",
            )
        if not m.view(rec).alive:
            raise ContainerError(f"container {rec.name} is not running")
        d = m.dir(rec)
        extra = {
            "record": rec.to_json(),
            "spec": parse_json((d / "bundle" / "config.json").read_text()),
            "runtime": parse_json((d / "runtime.json").read_text()),
        }
        msg = {"op": "snapshot", "dir": str(dest), "stop": stop, "extra": extra}
        reply = ipc.request(m.store.dir(rec.id) / "monitor.sock", msg, timeout=SNAPSHOT_TIMEOUT)
        if stop:
            m.store.wait_monitor_gone(rec.id, 30)
            m.settle(rec)
    return reply


def restore(m: Manager, src: Path, name: str = "") -> Record:
    """A new container from snapshot ``src``, running (its monitor's pid started)."""
    from vmpod.containers.launch import start_container

    src = src.absolute()
    manifest = load_manifest(src)  # refuses a damaged snapshot before anything is made
    try:
        old = Record.from_json(dict(manifest.extra["record"]))  # type: ignore[call-overload]
        spec = dict(manifest.extra["spec"])  # type: ignore[call-overload]
        runtime = dict(manifest.extra["runtime"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(
            f"snapshot {src} was not taken by vmpod snapshot NAME DIR (no container record: {err})"
        ) from None
    cid = new_id()
    rec = Record(
        id=cid,
        name=check_name(name) if name else default_name(cid),
        image=old.image,
        image_digest=old.image_digest,
        lower=old.lower,
        command=old.command,
        created=now_rfc3339(),
        kernel=old.kernel,
        log_max_bytes=old.log_max_bytes,
        log_keep=old.log_keep,
        network="none",  # a clone must not reach what its original reaches
        root_disk=old.root_disk,
    )
    m.records.add(rec)
    try:
        _write_bundle(m, rec, spec, runtime)
        start_container(m, rec, snapshot=str(src))
    except BaseException:
        m.remove(rec.id, force=True)
        raise
    return rec


def _write_bundle(m: Manager, rec: Record, spec: dict[str, object], runtime: dict[str, object]) -> None:
    """The source's bundle config, rooted at the new record's overlay, and loopback only."""
    d = m.dir(rec)
    (d / "bundle").mkdir(mode=0o700)
    root = spec.get("root")
    linux = spec.get("linux")
    if (
        not isinstance(root, dict)
        or not isinstance(linux, dict)
        or not isinstance(linux.get("namespaces"), list)
    ):
        raise SnapshotError("the snapshot's container config has no root or namespaces")
    spec["root"] = {**root, "path": str(m.overlay(rec).merged)}
    namespaces = [n for n in linux["namespaces"] if not (isinstance(n, dict) and n.get("type") == "network")]
    spec["linux"] = {**linux, "namespaces": [*namespaces, {"type": "network"}]}
    spec.pop("annotations", None)
    atomic_write(d / "bundle" / "config.json", json.dumps(spec, indent=1).encode(), mode=0o600)
    atomic_write(d / "runtime.json", json.dumps(runtime).encode(), mode=0o600)
    rootfs.mount(m.overlay(rec))
