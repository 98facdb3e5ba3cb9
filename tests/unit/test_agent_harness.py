"""The host end of a real guest agent run in-process (used by the other test_agent_*
modules), and checks of the harness and the fake OCI runtime themselves.

The agent runs in a thread of the test process (``run_agent``) over a socketpair,
with tests/fixtures/fake_runc.py as its OCI runtime; the host end reads frames in
a second thread and the tests wait on one condition variable, never on sleeps.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmpod.agent import protocol as p
from vmpod.agent.guest.config import AgentConfig
from vmpod.agent.guest.server import run_agent

FAKE_RUNC = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_runc.py")
TIMEOUT = 10.0


def cgroup2_root() -> str:
    """Where this host mounts cgroup v2 (the guest: /sys/fs/cgroup)."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split()[4]
    return "/sys/fs/cgroup"


def agent_config(tmp: Path, **over: object) -> AgentConfig:
    values: dict[str, object] = {
        "bundles": str(tmp / "bundles"),
        "runtimes": {"runc": FAKE_RUNC, "crun": FAKE_RUNC},
        "runc_root": str(tmp / "runc-root"),
        "busybox": "/bin/echo",
        "modules_dir": str(tmp / "modules"),
        "cgroup_root": cgroup2_root(),
        "allow_dir_rootfs": True,
        "set_clock": False,
        "shared_dir": str(tmp / "shared"),  # (never the host's /run/vmpod)
    }
    values.update(over)
    return AgentConfig(**values)  # type: ignore[arg-type]


class Host:
    """Frames to and from one agent; every wait is bounded by TIMEOUT."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cond = threading.Condition()
        self.responses: dict[int, p.Response] = {}
        self.events: list[dict[str, object]] = []
        self.output: dict[tuple[int, int], bytearray] = {}
        self.output_at_exit: dict[int, tuple[int, int]] = {}
        self.credits: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.eof = False
        self.reader_error: BaseException | None = None
        self.next_id = 1
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    # -- incoming ---------------------------------------------------------------
    def _read(self) -> None:
        frames = p.FrameReader()
        try:
            while data := self.sock.recv(1 << 16):
                for kind, stream, payload in frames.feed(data):
                    with self.cond:
                        self._on_frame(kind, stream, payload)
                        self.cond.notify_all()
        except BaseException as err:  # the agent broke the protocol: fail the test
            self.reader_error = err
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _on_frame(self, kind: int, stream: int, payload: bytes) -> None:
        if kind == p.RESPONSE:
            resp = p.decode(p.Response, p.parse_json(payload))
            assert resp.id not in self.responses, f"second answer to request {resp.id}"
            self.responses[resp.id] = resp
        elif kind == p.EVENT:
            event = p.parse_json(payload)
            if event["event"] == "exit":
                s = int(event["stream"])  # type: ignore[call-overload]
                self.output_at_exit[s] = (len(self.out(s)), len(self.out(s, p.STDERR)))
            self.events.append(event)
        elif kind in (p.STDOUT, p.STDERR):
            self.output.setdefault((kind, stream), bytearray()).extend(payload)
        elif kind == p.CREDIT:
            self.credits[stream] = self.credits.get(stream, 0) + struct.unpack("!I", payload)[0]
        else:
            raise AssertionError(f"unexpected frame kind {kind} from the agent")

    def wait_for(self, pred: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: pred() or self.reader_error, timeout)
            if self.reader_error is not None:
                raise AssertionError(f"bad input from the agent: {self.reader_error!r}")
            if not ok:
                raise AssertionError(f"timed out waiting for {what}")

    def out(self, stream: int, kind: int = p.STDOUT) -> bytes:
        return bytes(self.output.get((kind, stream), b""))

    def hello(self) -> dict[str, object]:
        self.wait_for(lambda: self._events("hello"), "the hello event")
        return self._events("hello")[0]

    def _events(self, name: str, stream: int | None = None) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == name and (stream is None or e["stream"] == stream)]

    def exit_event(self, stream: int, timeout: float = TIMEOUT) -> p.ExitEvent:
        self.wait_for(lambda: self._events("exit", stream), f"exit of stream {stream}", timeout)
        [event] = self._events("exit", stream)
        return p.decode(p.ExitEvent, event)

    # -- outgoing ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, op: str, args: dict[str, object] | None = None) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.send(p.encode_json(p.REQUEST, rid, {"id": rid, "op": op, "args": args or {}}))
        return rid

    def response(self, rid: int, timeout: float = TIMEOUT) -> p.Response:
        self.wait_for(lambda: rid in self.responses, f"the answer to request {rid}", timeout)
        return self.responses[rid]

    def call(self, op: str, args: dict[str, object] | None = None) -> p.Message:
        """A request that must succeed; its result decoded with the op's result class."""
        resp = self.response(self.request(op, args))
        assert resp.ok, f"{op} failed: {resp.error_kind}: {resp.error}"
        return p.decode(p.OPS[op][1], resp.result)

    def refused(self, op: str, args: dict[str, object] | None = None) -> tuple[str, str]:
        """A request that must fail: (error_kind, error)."""
        resp = self.response(self.request(op, args))
        assert not resp.ok, f"{op} succeeded: {resp.result}"
        return resp.error_kind, resp.error

    def write_stdin(self, stream: int, data: bytes) -> None:
        """Send stdin within the guest's credit window, as the real client does."""
        for i in range(0, len(data), p.MAX_DATA):
            chunk = data[i : i + p.MAX_DATA]
            self._wait_for_credit(stream, len(chunk))
            self.sent[stream] = self.sent.get(stream, 0) + len(chunk)
            self.send(p.encode_frame(p.STDIN, stream, chunk))

    def _wait_for_credit(self, stream: int, size: int) -> None:
        room = p.STDIN_WINDOW - size
        self.wait_for(lambda: self.sent.get(stream, 0) - self.credits.get(stream, 0) <= room, "stdin credit")

    def close_stdin(self, stream: int) -> None:
        self.send(p.encode_frame(p.STDIN, stream, b""))


class InProcessAgent(Host):
    """A Host whose agent runs in a thread of this process."""

    def __init__(self, config: AgentConfig) -> None:
        host, self.guest = socket.socketpair()
        super().__init__(host)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._agent, args=(config,), daemon=True)
        self.thread.start()

    def _agent(self, config: AgentConfig) -> None:
        try:
            run_agent(self.guest, config)
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def stopped(self) -> None:
        """Wait for run_agent to return; re-raise what it raised."""
        assert self.done.wait(TIMEOUT), "run_agent did not return"
        self.thread.join(TIMEOUT)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Close the host end (EOF for the agent) and wait for everything to end."""
        if not self.done.is_set():
            self.sock.shutdown(socket.SHUT_WR)
        self.stopped()
        self.guest.close()
        self.reader.join(TIMEOUT)
        self.sock.close()
        if self.reader_error is not None:
            raise AssertionError(f"bad input from the agent: {self.reader_error!r}")


def in_process_agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    """Body of the ``agent`` fixtures: an agent with the default test config."""
    host = InProcessAgent(agent_config(tmp_path))
    try:
        yield host
    finally:
        host.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    yield from in_process_agent(tmp_path)


def make_rootfs(tmp: Path, name: str = "rootfs") -> Path:
    root = tmp / name
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1001::/home/alice:/bin/sh\nshort:x\n"
    )
    (root / "etc/group").write_text("root:x:0:\nstaff:x:50:alice\n")
    (root / "tmp").mkdir(exist_ok=True)
    return root


def create(
    host: Host, tmp: Path, cid: str, args: list[str], *, tty: bool = False, **extra: object
) -> p.ContainerCreated:
    """create_container with a plain-directory rootfs; the process runs ``args``."""
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": args, "env": ["PATH=/usr/bin:/bin"], "cwd": "/tmp", "terminal": tty},
    }
    result = host.call(
        "create_container",
        {
            "container_id": cid,
            "spec": spec,
            "rootfs_serial": str(make_rootfs(tmp)),
            "rootfs_fstype": "dir",
            **extra,
        },
    )
    assert isinstance(result, p.ContainerCreated)
    return result


def start(host: Host, cid: str, stream: int, *, stdin: bool = False) -> p.ProcessStarted:
    """start_container, answered once the process runs."""
    result = host.call(
        "start_container", {"container_id": cid, "stream": stream, "stdin": stdin, "wait_started": True}
    )
    assert isinstance(result, p.ProcessStarted) and result.started
    return result


# -- the harness and the fake runtime themselves ------------------------------


def test_fake_runc_version_and_unknown_container(tmp_path: Path) -> None:
    out = subprocess.run([FAKE_RUNC, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("runc version")
    res = subprocess.run(
        [FAKE_RUNC, "--root", str(tmp_path), "state", "nope"], capture_output=True, text=True
    )
    assert res.returncode == 1
    assert res.stderr.strip().endswith('level=error msg="container does not exist"')
    res = subprocess.run([FAKE_RUNC, "--root", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 1


def test_fake_runc_runs_a_bundle_and_logs_json_errors(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps(
            {
                "root": {"path": str(make_rootfs(tmp_path))},
                "process": {"args": ["sh", "-c", "pwd; exit 5"], "env": ["PATH=/bin"], "cwd": "/tmp"},
            }
        )
    )
    argv = [
        FAKE_RUNC,
        "--root",
        str(tmp_path / "r"),
        "--log",
        str(tmp_path / "log"),
        "--log-format",
        "json",
        "run",
        "--bundle",
        str(bundle),
        "--pid-file",
        str(tmp_path / "pid"),
        "--no-new-keyring",
        "c1",
    ]
    res = subprocess.run(argv, capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (5, f"{tmp_path}/rootfs/tmp\n")
    assert int((tmp_path / "pid").read_text()) > 0
    assert not (tmp_path / "r/c1").exists()  # gone with its process, like runc run
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["no-such-cmd-x"]}}))
    assert subprocess.run(argv, capture_output=True).returncode == 1
    entry = json.loads((tmp_path / "log").read_text().splitlines()[-1])
    assert entry["level"] == "error" and "executable file not found" in entry["msg"]


def test_harness_sees_hello_and_eof(agent: InProcessAgent) -> None:
    assert agent.hello()["protocol"] == p.PROTOCOL_VERSION
    agent.close()
    assert agent.eof
