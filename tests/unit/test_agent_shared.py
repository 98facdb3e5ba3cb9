"""The guest side of the host's shared directory (virtio-fs), through the
in-process agent: mount_shared once, virtiofs root filesystems found below the
mount and never outside it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_bundles import _busybox
from tests.unit.test_agent_harness import InProcessAgent, agent_config, make_rootfs, start
from vmpod.agent import protocol as p
from vmpod.agent.guest import shared
from vmpod.agent.guest.config import AgentConfig
from vmpod.agent.guest.errors import AgentFailure


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """What the host shares: a container's rootfs, and ways out of the tree."""
    base = tmp_path / "shared"
    make_rootfs(base / "c1", "rootfs")
    (base / "c1" / "file").write_text("not a directory\n")
    outside = make_rootfs(tmp_path, "outside")
    (base / "c1" / "escape").symlink_to(outside)
    (base / "c1" / "up").symlink_to("../..")
    (base / "self").symlink_to(".")
    (base / "c1" / "alias").symlink_to("rootfs")  # stays inside: fine
    return base


@pytest.fixture
def agent(tmp_path: Path, tree: Path) -> Iterator[InProcessAgent]:
    host = InProcessAgent(agent_config(tmp_path, shared_dir=str(tree), shared_premounted=True))
    try:
        yield host
    finally:
        host.close()


def create_args(cid: str, rel: str, *args: str, user: str = "") -> dict[str, object]:
    spec = {"process": {"args": list(args) or ["true"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/"}}
    return {
        "container_id": cid,
        "spec": spec,
        "rootfs_serial": rel,
        "rootfs_fstype": "virtiofs",
        "user": user,
    }


def test_mount_shared_once(agent: InProcessAgent, tree: Path) -> None:
    kind, error = agent.refused("create_container", create_args("c1", "c1/rootfs"))
    assert (kind, error) == ("invalid", "the shared directory is not mounted")
    assert agent.call("mount_shared") == p.SharedMounted(path=str(tree))
    assert agent.refused("mount_shared") == ("exists", "the shared directory is already mounted")


def test_a_virtiofs_rootfs_is_the_shared_directory_itself(agent: InProcessAgent, tree: Path) -> None:
    agent.call("mount_shared")
    created = agent.call(
        "create_container", create_args("c1", "c1/rootfs", "sh", "-c", "echo hi > written", user="alice")
    )
    assert isinstance(created, p.ContainerCreated)
    config = json.loads(Path(created.bundle, "config.json").read_text())
    assert config["root"]["path"] == str(tree / "c1" / "rootfs")
    assert config["process"]["user"] == {"uid": 1000, "gid": 1001}  # from the shared rootfs
    assert os.listdir(created.bundle) == ["config.json"]  # no overlay, no mounts
    start(agent, "c1", 1)
    assert agent.exit_event(1).status == 0
    assert (tree / "c1" / "rootfs" / "written").read_text() == "hi\n"  # the host sees the write
    # a path that resolves inside the tree is fine
    alias = agent.call("create_container", create_args("c2", "c1/alias"))
    assert isinstance(alias, p.ContainerCreated)
    config = json.loads(Path(alias.bundle, "config.json").read_text())
    assert config["root"]["path"] == str(tree / "c1" / "rootfs")


@pytest.mark.parametrize(
    "rel,kind",
    [
        ("", "invalid"),
        ("..", "invalid"),
        ("../outside", "invalid"),
        ("c1/../c1/rootfs", "invalid"),
        ("./c1/rootfs", "invalid"),
        ("/c1/rootfs", "invalid"),
        ("/", "invalid"),
        ("c1//rootfs", "invalid"),
        ("c1/rootfs/", "invalid"),
        ("c1/root fs", "invalid"),
        ("c2/rootfs", "not_found"),
        ("c1/file", "not_found"),
        ("c1/escape", "not_found"),  # a symlink out of the tree
        ("c1/up", "not_found"),
        ("self", "not_found"),  # the shared root itself is no container's
    ],
)
def test_virtiofs_paths_stay_below_the_shared_mount(agent: InProcessAgent, rel: str, kind: str) -> None:
    agent.call("mount_shared")
    got, error = agent.refused("create_container", create_args("c9", rel))
    assert got == kind
    assert error == (f"invalid shared path {rel!r}" if kind == "invalid" else f"no shared directory {rel!r}")
    assert isinstance(agent.call("ping"), p.PingResult)


def test_shared_path(tmp_path: Path, tree: Path) -> None:
    config = AgentConfig(shared_dir=str(tree))
    assert shared.shared_path(config, "c1/rootfs") == str(tree / "c1" / "rootfs")
    for rel in ("..", "/etc", "c1/../../x", "c1/escape"):
        with pytest.raises(AgentFailure):
            shared.shared_path(config, rel)
    # the shared directory reached through a symlink: paths are compared resolved
    (tmp_path / "link").symlink_to(tree)
    linked = AgentConfig(shared_dir=str(tmp_path / "link"))
    assert shared.shared_path(linked, "c1/rootfs") == str(tree / "c1" / "rootfs")


def test_mount_shared_mounts_virtiofs_by_its_tag(tmp_path: Path) -> None:
    where = tmp_path / "guest" / "shared"
    host = InProcessAgent(agent_config(tmp_path, busybox=str(_busybox(tmp_path)), shared_dir=str(where)))
    try:
        assert host.call("mount_shared") == p.SharedMounted(path=str(where))
    finally:
        host.close()
    assert where.is_dir()
    log = (tmp_path / "busybox.log").read_text().splitlines()
    assert log == [f"mount -t virtiofs {p.SHARED_FS_TAG} {where}"]


def test_a_failed_mount_shared_is_reported_and_may_be_retried(tmp_path: Path) -> None:
    where = tmp_path / "guest" / "shared"
    busybox = _busybox(tmp_path, status=1)
    host = InProcessAgent(agent_config(tmp_path, busybox=str(busybox), shared_dir=str(where)))
    try:
        kind, error = host.refused("mount_shared")
        assert (kind, error) == ("failed", "mount the shared directory: mount: permission denied")
        kind, error = host.refused("create_container", create_args("c1", "c1/rootfs"))
        assert (kind, error) == ("invalid", "the shared directory is not mounted")
        busybox.write_text("#!/bin/sh\nexit 0\n")
        assert host.call("mount_shared") == p.SharedMounted(path=str(where))
    finally:
        host.close()
