"""The real guest agent, in a thread of the test process, driven over the real
protocol with the fake OCI runtime: containers, processes, stdio, exits."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import (
    InProcessAgent,
    agent_config,
    create,
    in_process_agent,
    start,
)
from vmpod.agent import protocol as p


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    yield from in_process_agent(tmp_path)


def test_hello_ping_and_guest_info(agent: InProcessAgent) -> None:
    hello = p.decode(p.Hello, {k: v for k, v in agent.hello().items() if k != "event"})
    assert hello.protocol == p.PROTOCOL_VERSION and hello.kernel == os.uname().release
    ping = agent.call("ping")
    assert isinstance(ping, p.PingResult) and ping.uptime > 0
    info = agent.call("guest_info")
    assert isinstance(info, p.GuestInfo)
    assert info.runc.startswith("runc version") and info.cpus >= 1
    assert 0 < info.mem_free_kb <= info.mem_total_kb


def test_start_relays_stdin_stdout_stderr_and_exit_status(agent: InProcessAgent, tmp_path: Path) -> None:
    created = create(agent, tmp_path, "c1", ["sh", "-c", 'read line; echo "out:$line"; echo err >&2; exit 3'])
    assert created.bundle == str(tmp_path / "bundles/c1")
    started = agent.call("start_container", {"container_id": "c1", "stream": 1, "stdin": True})
    assert isinstance(started, p.ProcessStarted) and started.pid > 0
    waiting = agent.request("wait", {"stream": 1})  # answered once it exits
    agent.write_stdin(1, b"hello\n")
    agent.close_stdin(1)
    ev = agent.exit_event(1)
    assert (ev.status, ev.message) == (3, "")
    assert (agent.out(1), agent.out(1, p.STDERR)) == (b"out:hello\n", b"err\n")
    assert agent.output_at_exit[1] == (10, 4)  # all output came before the event
    assert agent.credits[1] == len(b"hello\n")
    assert p.decode(p.ExitStatus, agent.response(waiting).result).status == 3
    assert agent.call("wait", {"stream": 1}) == p.ExitStatus(status=3)


def test_exec_stdin_larger_than_the_credit_window(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    start(agent, "c1", 1, stdin=True)
    data = os.urandom(p.STDIN_WINDOW * 2 + 12345)
    ex = agent.call(
        "exec",
        {
            "container_id": "c1",
            "stream": 2,
            "stdin": True,
            "process": {"args": ["cat"], "env": ["PATH=/bin"]},
        },
    )
    assert isinstance(ex, p.ProcessStarted) and ex.started
    agent.write_stdin(2, data)
    agent.close_stdin(2)
    assert agent.exit_event(2).status == 0
    assert agent.out(2) == data
    assert agent.credits[2] == len(data)
    agent.close_stdin(1)
    assert agent.exit_event(1).status == 0


def test_output_beyond_the_high_water_mark_arrives_whole(agent: InProcessAgent, tmp_path: Path) -> None:
    size = 6 * 1024 * 1024
    create(agent, tmp_path, "c1", ["head", "-c", str(size), "/dev/zero"])
    start(agent, "c1", 1)
    assert agent.exit_event(1).status == 0
    assert agent.out(1) == bytes(size)


def test_tty_process_and_resize(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["sh", "-c", "read x; stty size; exit 0"], tty=True)
    start(agent, "c1", 1, stdin=True)
    assert agent.call("resize", {"stream": 1, "rows": 33, "cols": 77}) == p.Empty()
    agent.write_stdin(1, b"go\n")
    assert agent.exit_event(1).status == 0
    assert b"33 77" in agent.out(1) and agent.out(1, p.STDERR) == b""
    # a finished process has no terminal left to resize
    assert agent.refused("resize", {"stream": 1, "rows": 1, "cols": 1})[0] == "invalid"


def test_tty_exec_without_stdin(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    start(agent, "c1", 1, stdin=True)
    agent.call(
        "exec",
        {
            "container_id": "c1",
            "stream": 2,
            "process": {
                "args": ["sh", "-c", "test -t 1 && echo tty"],
                "env": ["PATH=/bin"],
                "terminal": True,
            },
        },
    )
    assert agent.exit_event(2).status == 0
    assert agent.out(2).strip() == b"tty"
    agent.close_stdin(1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_signal_ends_the_container_process(agent: InProcessAgent, tmp_path: Path, sig: int) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    start(agent, "c1", 1, stdin=True)
    assert agent.call("signal", {"stream": 1, "signal": sig}) == p.Empty()
    assert agent.exit_event(1).status == 128 + sig
    # signalling a finished process is a no-op, not an error
    assert agent.call("signal", {"stream": 1, "signal": sig}) == p.Empty()


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["no-such-command-xyz"], 127, "executable file not found"),
        (["/etc/passwd"], 126, "permission denied"),
    ],
)
def test_start_failures_map_to_shell_statuses(
    agent: InProcessAgent, tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    create(agent, tmp_path, "c1", args)
    started = agent.call("start_container", {"container_id": "c1", "stream": 1, "wait_started": True})
    assert started == p.ProcessStarted(pid=started.pid, started=False)  # type: ignore[attr-defined]
    ev = agent.exit_event(1)
    assert ev.status == status and message in ev.message


def test_exec_of_a_missing_command_is_127(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    start(agent, "c1", 1, stdin=True)
    agent.call(
        "exec",
        {"container_id": "c1", "stream": 2, "process": {"args": ["nope-not-here"], "env": ["PATH=/bin"]}},
    )
    ev = agent.exit_event(2)
    assert ev.status == 127 and "nope-not-here" in ev.message
    agent.close_stdin(1)
    assert agent.exit_event(1).status == 0


def test_two_containers_at_once(agent: InProcessAgent, tmp_path: Path) -> None:
    for cid, stream in (("a", 1), ("b", 2)):
        create(agent, tmp_path / cid, cid, ["sh", "-c", 'read x; echo "$x from $0"', cid])
        start(agent, cid, stream, stdin=True)
    agent.write_stdin(2, b"second\n")
    assert agent.exit_event(2).status == 0
    assert agent.out(2) == b"second from b\n"
    assert not [e for e in agent.events if e.get("stream") == 1]
    agent.write_stdin(1, b"first\n")
    assert agent.exit_event(1).status == 0
    assert agent.out(1) == b"first from a\n"


def test_users_and_bundle_layout(agent: InProcessAgent, tmp_path: Path) -> None:
    created = create(agent, tmp_path, "c1", ["cat"], user="alice", runtime="crun")
    bundle = Path(created.bundle)
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["user"] == {"uid": 1000, "gid": 1001}
    # a directory rootfs is the root itself: no symlink (runc refuses one), no copy
    assert config["root"]["path"] == str(tmp_path / "rootfs")
    assert os.listdir(bundle) == ["config.json"]
    start(agent, "c1", 1, stdin=True)
    agent.close_stdin(1)
    assert agent.exit_event(1).status == 0
    # exec into a container whose process ended: the runtime's error, as status 125
    agent.call("exec", {"container_id": "c1", "stream": 9, "process": {"args": ["true"]}})
    assert agent.exit_event(9) == p.ExitEvent(
        event="exit", stream=9, status=125, message="container does not exist"
    )


def test_exec_users_are_resolved_in_the_container_root(agent: InProcessAgent, tmp_path: Path) -> None:
    created = create(agent, tmp_path, "c1", ["cat"], runtime="crun")
    bundle = Path(created.bundle)
    start(agent, "c1", 1, stdin=True)
    for user, want in (
        ("alice:staff", {"uid": 1000, "gid": 50}),
        ("7:8", {"uid": 7, "gid": 8}),
        ("1000", {"uid": 1000, "gid": 1001}),
        ("42", {"uid": 42, "gid": 0}),
    ):
        stream = 2 + len(list(bundle.glob("exec-*.json")))
        args = {"container_id": "c1", "stream": stream, "user": user, "process": {"args": ["true"]}}
        resp = agent.response(agent.request("exec", args))
        assert resp.ok, resp.error
        assert json.loads((bundle / f"exec-{stream}.json").read_text())["user"] == want
        assert agent.exit_event(stream).status == 0
    for user in ("nobody", "alice:nogroup", "short"):
        kind, error = agent.refused(
            "exec", {"container_id": "c1", "stream": 99, "user": user, "process": {"args": ["true"]}}
        )
        assert kind == "invalid" and "unable to find" in error
    agent.close_stdin(1)
    assert agent.exit_event(1).status == 0


def test_runtime_commands(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    ps = agent.call("runtime", {"container_id": "c1", "command": "ps"})
    # not running yet: the runtime's own error message comes back parsed
    assert ps == p.CommandResult(
        status=1,
        stdout="",
        stderr=ps.stderr,  # type: ignore[attr-defined]
        error="container does not exist",
    )
    start(agent, "c1", 1, stdin=True)
    ps = agent.call("runtime", {"container_id": "c1", "command": "ps", "args": ["--format", "json"]})
    assert isinstance(ps, p.CommandResult) and (ps.status, ps.error) == (0, "")
    [pid] = json.loads(ps.stdout)
    for command in ("pause", "resume", "state", "events"):
        res = agent.call("runtime", {"container_id": "c1", "command": command})
        assert isinstance(res, p.CommandResult) and res.status == 0, res
    res = agent.call(
        "runtime", {"container_id": "c1", "command": "update", "resources": {"memory": {"limit": 1 << 20}}}
    )
    assert isinstance(res, p.CommandResult) and res.status == 0
    state = json.loads((tmp_path / "runc-root/c1/state.json").read_text())
    assert state["resources"] == {"memory": {"limit": 1 << 20}} and state["pid"] == pid
    agent.call("runtime", {"container_id": "c1", "command": "kill", "args": ["--all", "9"]})
    assert agent.exit_event(1).status == 137


def test_stats_of_a_running_container(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    assert agent.refused("stats", {"container_id": "c1"})[0] == "invalid"  # not started
    start(agent, "c1", 1, stdin=True)
    stats = agent.call("stats", {"container_id": "c1"})
    assert isinstance(stats, p.ContainerStats)
    assert all(type(v) is int for v in (stats.cpu_usage_usec, stats.memory_bytes, stats.pids))
    assert stats.pids >= 1 and stats.cpu_usage_usec >= 0 and stats.memory_bytes >= 0
    agent.close_stdin(1)
    agent.exit_event(1)
    assert agent.refused("stats", {"container_id": "c1"})[0] == "invalid"  # ended


def test_modules_through_busybox(agent: InProcessAgent, tmp_path: Path) -> None:
    # the harness's "busybox" is /bin/echo: the command line comes back as output
    path = str(tmp_path / "modules/m.ko")
    res = agent.call("load_module", {"path": path, "params": ["a=1", "b=x y"]})
    assert res == p.CommandResult(status=0, stdout=f"insmod {path} a=1 b=x y\n")
    assert agent.call("unload_module", {"name": "m_1-x"}) == p.CommandResult(status=0, stdout="rmmod m_1-x\n")


def test_failing_helper_commands_carry_their_last_error_line(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_text(
        "#!/bin/sh\necho some noise >&2\necho \"$1: can't insert '$2': Invalid module format\" >&2\nexit 1\n"
    )
    busybox.chmod(0o755)
    host = InProcessAgent(agent_config(tmp_path, busybox=str(busybox)))
    try:
        path = str(tmp_path / "modules/bad.ko")
        res = host.call("load_module", {"path": path})
        assert isinstance(res, p.CommandResult) and res.status == 1
        assert res.error == f"insmod: can't insert '{path}': Invalid module format"
    finally:
        host.close()


def test_set_clock_and_kernel_log(agent: InProcessAgent) -> None:
    # this config leaves the host's clock alone
    assert agent.call("set_clock", {"epoch_ns": 1_700_000_000_000_000_000}) == p.Empty()
    resp = agent.response(agent.request("kernel_log", {"since": -1}))
    if resp.ok:
        log = p.decode(p.KernelLogResult, resp.result)
        assert log.last_seq >= -1 and len(log.text.encode()) <= p.MAX_LOG
    else:  # no /dev/kmsg for us here: still an answer, not a dead agent
        assert resp.error_kind == "internal"
        assert agent.call("ping")


def _dead(pid: int) -> bool:
    """Gone, or a zombie whose parent (killed too) left it to init."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_shutdown_kills_processes_and_returns(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    runtime = start(agent, "c1", 1, stdin=True).pid
    child = int((tmp_path / "bundles/c1/init.pid").read_text())
    assert agent.call("shutdown") == p.Empty()
    agent.stopped()
    with pytest.raises(ProcessLookupError):  # the agent reaped its own child
        os.kill(runtime, 0)
    assert _dead(child)


def test_channel_eof_stops_the_agent_and_its_processes(agent: InProcessAgent, tmp_path: Path) -> None:
    create(agent, tmp_path, "c1", ["cat"])
    runtime = start(agent, "c1", 1, stdin=True).pid
    agent.close()
    with pytest.raises(ProcessLookupError):
        os.kill(runtime, 0)
