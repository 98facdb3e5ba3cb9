"""The agent's checkpoint/restore ops in process: what they refuse, the runc
command lines they run (a recording runtime), and the restore bundle's CRIU
configuration (the new container's cgroup as CRIU's cgroup root)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import InProcessAgent, agent_config, create
from vmpod.agent import protocol as p
from vmpod.agent.guest import bundles
from vmpod.agent.guest.errors import AgentFailure


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    d = tmp_path / "shared"
    (d / "c1" / "criu" / "checkpoint").mkdir(parents=True)
    (d / "c1" / "criu" / "work").mkdir()
    return d


@pytest.fixture
def agent(tmp_path: Path, shared: Path) -> Iterator[InProcessAgent]:
    runc = tmp_path / "runc"  # records its argv, succeeds
    runc.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/runc.log\n')
    runc.chmod(0o755)
    config = agent_config(
        tmp_path,
        shared_dir=str(shared),
        shared_premounted=True,
        runtimes={"runc": str(runc), "crun": str(runc)},
        criu_modules=str(tmp_path / "no-modules"),
    )
    host = InProcessAgent(config)
    try:
        yield host
    finally:
        host.close()


def _ckpt(cid: str = "c1", **over: object) -> dict[str, object]:
    return {"container_id": cid, "image_dir": "c1/criu/checkpoint", "work_dir": "c1/criu/work", **over}


def test_checkpoint_is_refused_until_it_can_work(agent: InProcessAgent, tmp_path: Path) -> None:
    assert agent.refused("checkpoint", _ckpt("nope"))[0] == "not_found"
    create(agent, tmp_path, "c1", ["true"])
    assert agent.refused("checkpoint", _ckpt()) == ("invalid", "the shared directory is not mounted")
    agent.call("mount_shared")
    kind, _ = agent.refused("checkpoint", _ckpt(image_dir="c1/../../etc"))
    assert kind == "invalid"
    assert agent.refused("checkpoint", _ckpt(work_dir="c1/criu/missing"))[0] == "not_found"
    create(agent, tmp_path, "c2", ["true"], runtime="crun")
    kind, error = agent.refused("checkpoint", _ckpt("c2"))
    assert kind == "unsupported" and "needs runc" in error


def test_checkpoint_runs_runc_checkpoint(agent: InProcessAgent, tmp_path: Path, shared: Path) -> None:
    create(agent, tmp_path, "c1", ["true"])
    agent.call("mount_shared")
    res = agent.call("checkpoint", _ckpt(leave_running=False, tcp_established=True))
    assert isinstance(res, p.CommandResult) and res.status == 0
    argv = (tmp_path / "runc.log").read_text().split()
    images, work = shared / "c1/criu/checkpoint", shared / "c1/criu/work"
    assert argv == [
        *("--root", str(tmp_path / "runc-root"), "checkpoint"),
        *("--image-path", str(images), "--work-path", str(work), "--tcp-established", "c1"),
    ]


def test_restore_only_once_and_not_after_start(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["true"])
    agent.call("mount_shared")
    args = {**_ckpt(), "stream": 5}
    args.pop("image_dir")
    assert agent.refused("restore", args)[0] == "invalid"  # image_dir is required
    started = agent.call("restore", {**_ckpt(), "stream": 5})
    assert isinstance(started, p.ProcessStarted)
    assert agent.refused("restore", {**_ckpt(), "stream": 6}) == (
        "exists",
        "container c1 was started already",
    )


def test_restore_config_names_the_cgroup(tmp_path: Path) -> None:
    spec = {"process": {"args": ["sh"]}, "linux": {"cgroupsPath": "/vmpod/abc"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    bundles.restore_config(str(tmp_path))
    out = json.loads((tmp_path / "config.json").read_text())
    conf = out["annotations"][bundles.CRIU_CONFIG_ANNOTATION]
    assert Path(conf).read_text() == "tcp-close\ncgroup-root /vmpod/abc\n"
    (tmp_path / "config.json").write_text(json.dumps({"process": {"terminal": True}}))
    with pytest.raises(AgentFailure, match="terminal"):
        bundles.restore_config(str(tmp_path))


def test_restore_argv_is_a_foreground_restore() -> None:
    argv = bundles.restore_argv("/usr/bin/runc", "/b", "c1", "/i", "/w", ["--file-locks"], "/b/pid", "/b/log")
    assert argv[argv.index("restore") :] == [
        *("restore", "--image-path", "/i", "--work-path", "/w", "--bundle", "/b"),
        *("--pid-file", "/b/pid", "--file-locks", "c1"),
    ]
    assert "--detach" not in argv  # runc stays the tree's parent: its stdio are relayed
    assert bundles.criu_flags(True, False, True) == ["--leave-running", "--file-locks"]
