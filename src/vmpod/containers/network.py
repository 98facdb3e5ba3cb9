"""`vmpod run --network bridge -p ...`: a CNI attachment per container.

vmpod makes the container's network namespace with the CNI plugins (network
``vmpod``, bridge ``vmpod0``: ``network/cni.py``), exactly as podman does for
vmpod-runtime, and the sandbox wires that namespace into the VM. The attachment
(namespace, IPAM lease, port mappings, firewall rules) lives as long as its
container: a foreground run detaches when it ends, a kept container when it is
removed (or started again). Attachments whose owner died are collected on the
next run.

pyroute2 runs an asyncio loop of its own: async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from vmpod.errors import ConfigError, VmpodError
from vmpod.fsutil import is_locked, lock_file
from vmpod.network import cni
from vmpod.network.ports import PortMapping, check_distinct, parse_publish
from vmpod.paths import Paths

log = logging.getLogger(__name__)
MODES = ("bridge", "none")


def parse_network(mode: str, publish: tuple[str, ...]) -> tuple[str, tuple[PortMapping, ...]]:
    """(mode, ports) from ``--network`` and ``-p``; one-line errors for bad input."""
    if mode not in MODES:
        if mode == "host":
            raise ConfigError(
                "--network host: a VM has its own network stack and cannot share the host's",
                hint="use --network bridge with -p to publish ports",
            )
        raise ConfigError(f"unknown network {mode!r}", hint=f"use --network {' or '.join(MODES)}")
    ports = tuple(parse_publish(p) for p in publish)
    if ports and mode != "bridge":
        raise ConfigError(f"-p needs a network: --network {mode} has none", hint="use --network bridge")
    check_distinct(ports)
    return mode, ports


def netns_path(container_id: str) -> str:
    """The namespace `attach` makes for ``container_id`` (known before it exists)."""
    return f"/run/netns/{cni.netns_name(container_id)}"


def _owner_lock(paths: Paths, container_id: str) -> Path:
    return cni.state_dir(paths) / "owners" / f"{container_id}.lock"


def _in_use(paths: Paths, container_id: str) -> bool:
    """A live foreground run (its owner lock), or a kept container's record."""
    if is_locked(_owner_lock(paths, container_id)):
        return True
    return (paths.home / "containers" / container_id).is_dir()


def attach(paths: Paths, container_id: str, ports: tuple[PortMapping, ...]) -> cni.Attachment:
    """The container's namespace on vmpod's bridge network, ports published. The
    caller owns it: a kept container by its record, a foreground run by
    ``owned``'s lock."""
    state = cni.state_dir(paths)
    try:
        cni.collect_stale(state, lambda cid: _in_use(paths, cid))
    except VmpodError as err:
        log.warning("stale network attachments: %s", err)
    network = cni.ensure_network(cni.conf_dir(), cni.default_network(paths))
    detach(paths, container_id)  # a kept container's previous run, if it left one
    return cni.attach(network, container_id, ports, state_dir=state)


@contextlib.contextmanager
def owned(paths: Paths, container_id: str) -> Iterator[None]:
    """Marks ``container_id``'s attachment as in use while the block runs (a
    foreground run): another vmpod's stale collection leaves it alone."""
    path = _owner_lock(paths, container_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = lock_file(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def detach(paths: Paths, container_id: str) -> None:
    """Release ``container_id``'s attachment, if it has one (idempotent)."""
    record = cni.state_dir(paths) / f"{container_id}.json"
    if record.exists():
        cni.detach(cni.load_attachment(record))
