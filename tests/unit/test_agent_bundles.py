"""Guest bundles through the in-process agent: the disk + overlay route (with a
recording busybox), volume mounts, spawn failures, and the runtime's error lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import InProcessAgent, agent_config
from vmpod.agent import protocol as p
from vmpod.agent.guest import bundles, stats
from vmpod.agent.guest.config import AgentConfig
from vmpod.agent.guest.errors import AgentFailure


def _busybox(tmp_path: Path, status: int = 0) -> Path:
    """A busybox that records its argv, one call a line, and exits ``status``."""
    script = tmp_path / "busybox"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path}/busybox.log\n'
        f'[ {status} = 0 ] || echo "mount: permission denied" >&2\nexit {status}\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(bundles, "find_disk", lambda serial: f"/dev/disk-{serial}")
    return "/dev/disk-ctr"


def test_disk_rootfs_is_mounted_under_a_tmpfs_overlay(tmp_path: Path, disk: str) -> None:
    host = InProcessAgent(agent_config(tmp_path, busybox=str(_busybox(tmp_path))))
    try:
        spec: dict[str, list[object]] = {
            "mounts": [  # a volume's source is below the shared directory: left as it is
                {"destination": "/etc/hosts", "type": "bind", "source": f"{p.SHARED_DIR}/c1/v0"},
                {"destination": "/proc", "type": "proc", "source": "proc"},
                "not-a-mount",
            ]
        }
        created = host.call(
            "create_container",
            {
                "container_id": "c1",
                "spec": {"process": {"args": ["true"]}, **spec},
                "rootfs_serial": "ctr",
                "rootfs_fstype": "ext4",
            },
        )
        assert isinstance(created, p.ContainerCreated)
    finally:
        host.close()
    b = created.bundle
    assert (tmp_path / "busybox.log").read_text().splitlines() == [
        f"mount -t ext4 -o ro {disk} {b}/lower",
        f"mount -t tmpfs -o mode=0755 tmpfs {b}/rw",
        f"mount -t overlay -o lowerdir={b}/lower,upperdir={b}/rw/upper,workdir={b}/rw/work "
        f"overlay {b}/rootfs",
    ]
    config = json.loads(Path(b, "config.json").read_text())
    assert config["root"] == {"path": f"{b}/rootfs"}
    assert config["mounts"] == spec["mounts"]
    assert sorted(os.listdir(b)) == ["config.json", "lower", "rootfs", "rw"]


def test_a_failed_mount_is_reported_with_its_reason(tmp_path: Path, disk: str) -> None:
    host = InProcessAgent(agent_config(tmp_path, busybox=str(_busybox(tmp_path, status=1))))
    try:
        kind, error = host.refused(
            "create_container", {"container_id": "c1", "spec": {}, "rootfs_serial": "ctr"}
        )
        assert (kind, error) == ("failed", "mount container image: mount: permission denied")
    finally:
        host.close()


def test_a_runtime_that_cannot_be_spawned_leaks_nothing(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-runc")
    host = InProcessAgent(agent_config(tmp_path, runtimes={"runc": missing}))
    try:
        root = tmp_path / "rootfs"
        root.mkdir()
        host.call(
            "create_container",
            {
                "container_id": "c1",
                "spec": {"process": {}},
                "rootfs_serial": str(root),
                "rootfs_fstype": "dir",
            },
        )
        fds = sorted(os.listdir("/proc/self/fd"))
        kind, error = host.refused("start_container", {"container_id": "c1", "stream": 1})
        assert kind == "internal" and "FileNotFoundError" in error
        assert sorted(os.listdir("/proc/self/fd")) == fds
        # the stream was not taken by the failed start
        assert host.refused("wait", {"stream": 1})[0] == "not_found"
    finally:
        host.close()


def test_teardown_unmounts_the_layers(tmp_path: Path) -> None:
    config = AgentConfig(bundles=str(tmp_path), busybox=str(_busybox(tmp_path)))
    bundles.teardown(config, "c1")
    assert (tmp_path / "busybox.log").read_text().split("\n")[:3] == [
        f"umount -l {tmp_path}/c1/{d}" for d in ("rootfs", "rw", "lower")
    ]


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"level":"info","msg":"a"}\n{"level":"error","msg":"boom"}\n', "boom"),
        ('time="x" level=error msg="container not running"\n', "container not running"),
        ("plain failure\n\n", "plain failure"),
        ("", ""),
        ('["not", "an object"]\n', '["not", "an object"]'),
    ],
)
def test_runtime_error_line(text: str, message: str) -> None:
    assert bundles.runtime_error(text) == message


@pytest.mark.parametrize(
    "lines,result",
    [
        (
            ['{"level":"error","msg":"exec: \\"x\\": executable file not found in $PATH"}'],
            (127, 'exec: "x": executable file not found in $PATH'),
        ),
        (
            ['{"level":"fatal","msg":"open /x: No such file or directory"}'],
            (127, "open /x: No such file or directory"),
        ),
        (['{"level":"error","msg":"exec: permission denied"}', "not json"], (126, "exec: permission denied")),
        (
            ['{"level":"error","msg":"cgroup trouble"}', '{"level":"info","msg":"later"}'],
            (125, "cgroup trouble"),
        ),
        (['{"level":"warning","msg":"meh"}', '"a string"'], None),
    ],
)
def test_start_failure_from_the_runtime_log(
    tmp_path: Path, lines: list[str], result: tuple[int, str] | None
) -> None:
    log = tmp_path / "init.log"
    log.write_text("\n".join(lines) + "\n")
    assert bundles.start_failure(str(log)) == result
    assert bundles.start_failure(str(tmp_path / "missing.log")) is None


def test_stats_read_zero_where_files_are_missing(tmp_path: Path) -> None:
    empty = stats.container_stats(str(tmp_path), os.getpid())
    assert empty == p.ContainerStats(cpu_usage_usec=0, memory_bytes=0, pids=0)
    with pytest.raises(AgentFailure) as exc:
        stats.container_stats(str(tmp_path), 1 << 30)
    assert exc.value.kind == "invalid"


def test_unknown_runtime_names_are_refused() -> None:
    with pytest.raises(AgentFailure, match="unknown OCI runtime 'youki'"):
        AgentConfig().runtime_binary("youki")
    assert AgentConfig().runtime_binary("crun") == "/usr/bin/crun"
