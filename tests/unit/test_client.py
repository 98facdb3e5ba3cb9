"""AgentClient against a fake, sometimes hostile, guest agent on a unix socket."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, AgentRequestError, ProcessSink
from vmpod.errors import AgentError, AgentTimeout, ProtocolError

HELLO = {"protocol": p.PROTOCOL_VERSION, "agent_version": "0.1-test", "kernel": "6.1.0-fake", "uptime": 0.5}
Guest = Callable[["FakeGuest"], Awaitable[None]]


class FakeGuest:
    """One accepted connection, from the guest's side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = p.FrameReader()
        self.queue: list[tuple[int, int, bytes]] = []

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def hello(self, **over: object) -> None:
        self.send(p.encode_json(p.EVENT, 0, {"event": "hello", **HELLO, **over}))

    async def frame(self) -> tuple[int, int, bytes]:
        while not self.queue:
            data = await self.reader.read(1 << 16)
            if not data:
                raise EOFError("host closed")
            self.queue += self.frames.feed(data)
        return self.queue.pop(0)

    async def request(self) -> dict[str, object]:
        kind, stream, payload = await self.frame()
        assert kind == p.REQUEST
        obj = p.parse_json(payload)
        assert obj["id"] == stream
        return obj

    def respond(self, rid: int, ok: bool = True, **rest: object) -> None:
        self.send(p.encode_json(p.RESPONSE, rid, {"id": rid, "ok": ok, **rest}))


def req_id(req: dict[str, object]) -> int:
    """The id of a request read by ``FakeGuest.request`` (an int on the wire)."""
    rid = req["id"]
    assert isinstance(rid, int)
    return rid


def run(
    guest: Guest, body: Callable[[AgentClient, Path], Awaitable[None]], tmp_path: Path, *, hello: bool = True
) -> None:
    """Serve ``guest`` on a socket, connect a client (unless ``hello`` is False,
    then ``body`` connects itself) and run ``body``; all within 5 s."""
    sock = tmp_path / "a.sock"

    async def main() -> None:
        done = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            g = FakeGuest(r, w)
            try:
                await guest(g)
                await done.wait()
            except (EOFError, ConnectionError):
                pass
            finally:
                w.close()

        server = await asyncio.start_unix_server(handle, path=str(sock))
        client = AgentClient()
        try:
            if hello:
                await client.connect(sock, timeout=2.0, check_alive=lambda: None)
            await body(client, sock)
        finally:
            done.set()
            await client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 5.0))


def sink_recorder() -> tuple[ProcessSink, list[tuple[str, bytes]]]:
    events: list[tuple[str, bytes]] = []
    sink = ProcessSink(
        on_stdout=lambda b: events.append(("out", b)), on_stderr=lambda b: events.append(("err", b))
    )
    return sink, events


# -- connect -------------------------------------------------------------------


def test_connect_returns_hello(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()

    async def body(client: AgentClient, sock: Path) -> None:
        hello = await client.connect(sock, timeout=2.0, check_alive=lambda: None)
        assert hello == p.Hello(**HELLO)
        assert client.hello == hello

    run(guest, body, tmp_path, hello=False)


def test_connect_waits_for_socket_to_appear(tmp_path: Path) -> None:
    sock = tmp_path / "late.sock"

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(p.encode_json(p.EVENT, 0, {"event": "hello", **HELLO}))
            await asyncio.sleep(1)
            w.close()

        async def late_server() -> asyncio.AbstractServer:
            await asyncio.sleep(0.1)
            return await asyncio.start_unix_server(handle, path=str(sock))

        task = asyncio.create_task(late_server())
        client = AgentClient()
        hello = await client.connect(sock, timeout=2.0, check_alive=lambda: None)
        assert hello.kernel == "6.1.0-fake"
        await client.close()
        server = await task
        server.close()

    asyncio.run(asyncio.wait_for(main(), 5.0))


def test_connect_rejects_other_protocol_version(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello(protocol=2)

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(ProtocolError, match="protocol 2"):
            await client.connect(sock, timeout=2.0, check_alive=lambda: None)

    run(guest, body, tmp_path, hello=False)


def test_connect_rejects_malformed_hello(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello(uptime="soon")

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(ProtocolError, match="uptime"):
            await client.connect(sock, timeout=2.0, check_alive=lambda: None)

    run(guest, body, tmp_path, hello=False)


def test_connect_check_alive_raises_before_socket(tmp_path: Path) -> None:
    class VmDied(Exception):
        pass

    def dead() -> None:
        raise VmDied("qemu exited with 1")

    async def main() -> None:
        client = AgentClient()
        start = time.monotonic()
        with pytest.raises(VmDied, match="qemu exited"):
            await client.connect(tmp_path / "none.sock", timeout=5.0, check_alive=dead)
        assert time.monotonic() - start < 1.0

    asyncio.run(main())


def test_connect_check_alive_raises_while_waiting_for_hello(tmp_path: Path) -> None:
    class VmDied(Exception):
        pass

    calls = []

    def alive() -> None:
        calls.append(1)
        if len(calls) >= 3:
            raise VmDied("guest panicked")

    async def guest(g: FakeGuest) -> None:
        pass  # never says hello

    async def body(client: AgentClient, sock: Path) -> None:
        start = time.monotonic()
        with pytest.raises(VmDied, match="panicked"):
            await client.connect(sock, timeout=5.0, check_alive=alive)
        assert time.monotonic() - start < 1.0

    run(guest, body, tmp_path, hello=False)


def test_connect_timeout_without_hello(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        pass  # accepts, stays silent

    async def body(client: AgentClient, sock: Path) -> None:
        start = time.monotonic()
        with pytest.raises(AgentTimeout, match="did not answer"):
            await client.connect(sock, timeout=0.2, check_alive=lambda: None)
        assert 0.15 < time.monotonic() - start < 1.5

    run(guest, body, tmp_path, hello=False)


def test_connect_timeout_when_socket_never_appears(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(AgentTimeout, match="no connection to"):
            await AgentClient().connect(tmp_path / "none.sock", timeout=0.1, check_alive=lambda: None)

    asyncio.run(asyncio.wait_for(main(), 5.0))


# -- requests ------------------------------------------------------------------


def test_request_round_trip(tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []

    async def guest(g: FakeGuest) -> None:
        g.hello()
        for _ in range(2):
            req = await g.request()
            seen.append(req)
            g.respond(req_id(req), result={"echo": req["args"], "op": req["op"]})

    async def body(client: AgentClient, sock: Path) -> None:
        assert await client.request("ping", {"x": 1}) == {"echo": {"x": 1}, "op": "ping"}
        assert await client.request("guest_info") == {"echo": {}, "op": "guest_info"}

    run(guest, body, tmp_path)
    assert seen == [{"id": 1, "op": "ping", "args": {"x": 1}}, {"id": 2, "op": "guest_info", "args": {}}]


def test_concurrent_requests_answered_out_of_order(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        a = await g.request()
        b = await g.request()
        g.respond(req_id(b), result={"n": b["op"]})
        g.respond(req_id(a), result={"n": a["op"]})

    async def body(client: AgentClient, sock: Path) -> None:
        r = await asyncio.gather(client.request("first"), client.request("second"))
        assert list(r) == [{"n": "first"}, {"n": "second"}]

    run(guest, body, tmp_path)


def test_request_timeout_and_late_response_dropped(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        first = await g.request()
        second = await g.request()
        g.respond(req_id(first), result={"late": True})  # nobody waits any more
        g.respond(req_id(second), result={"ok": 2})

    async def body(client: AgentClient, sock: Path) -> None:
        start = time.monotonic()
        with pytest.raises(AgentTimeout, match="'slow'") as info:
            await client.request("slow", timeout=0.1)
        assert time.monotonic() - start < 1.0
        assert info.value.details["op"] == "slow"
        assert client._pending == {}
        assert await client.request("next", timeout=2) == {"ok": 2}

    run(guest, body, tmp_path)


def test_error_response_raises_request_error(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        req = await g.request()
        g.respond(req_id(req), ok=False, error="no such container c9", error_kind="NotFound")
        req = await g.request()
        g.respond(req_id(req), result={"still": "fine"})

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(AgentRequestError) as info:
            await client.request("start_container", {"container_id": "c9"})
        assert info.value.kind == "NotFound"
        assert "no such container c9" in str(info.value)
        assert "start_container" in str(info.value)
        assert isinstance(info.value, AgentError)
        # a refusal does not break the channel
        assert await client.request("ping") == {"still": "fine"}

    run(guest, body, tmp_path)


# -- hostile guests --------------------------------------------------------------


def _assert_channel_dead(client: AgentClient) -> Awaitable[None]:
    async def check() -> None:
        with pytest.raises(AgentError, match="closed"):
            await client.request("ping", timeout=1)

    return check()


def test_oversized_frame_header_fails_pending_request_at_once(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        # only the header: a 64 KiB + 1 response that never arrives
        g.send(p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.RESPONSE, 1, p.MAX_JSON + 1))

    async def body(client: AgentClient, sock: Path) -> None:
        start = time.monotonic()
        with pytest.raises(ProtocolError, match="exceeds"):
            await client.request("ping", timeout=4)
        assert time.monotonic() - start < 1.0
        await _assert_channel_dead(client)

    run(guest, body, tmp_path)


HOSTILE: dict[str, bytes] = {
    "invalid json": p.encode_frame(p.RESPONSE, 1, b"{not json"),
    "json array": p.encode_frame(p.RESPONSE, 1, b"[1]"),
    "response wrong type": p.encode_json(p.RESPONSE, 1, {"id": "1", "ok": True}),
    "response bool id": p.encode_json(p.RESPONSE, 1, {"id": True, "ok": True}),
    "response unknown field": p.encode_json(p.RESPONSE, 1, {"id": 1, "ok": True, "x": 1}),
    "unknown event": p.encode_json(p.EVENT, 0, {"event": "surprise"}),
    "event without name": p.encode_json(p.EVENT, 0, {}),
    "exit status 999": p.encode_json(p.EVENT, 5, {"event": "exit", "stream": 5, "status": 999}),
    "exit status -1": p.encode_json(p.EVENT, 5, {"event": "exit", "stream": 5, "status": -1}),
    "bad magic": b"XX" + p.encode_frame(p.RESPONSE, 1, b"{}")[2:],
    "bad version": b"VP\x07" + p.encode_frame(p.RESPONSE, 1, b"{}")[3:],
    "stdin from guest": p.encode_frame(p.STDIN, 5, b"x"),
    "request from guest": p.encode_json(p.REQUEST, 1, {"id": 1, "op": "ping"}),
    "output for unknown stream": p.encode_frame(p.STDOUT, 77, b"x"),
    "short credit": p.encode_frame(p.CREDIT, 5, b"\x00\x00\x01"),
    "credit unknown stream": p.encode_frame(p.CREDIT, 77, struct.pack("!I", 1)),
    # found by tests/unit/test_fuzz_agent.py: a second hello was silently accepted,
    # and JSON in UTF-16 or UTF-32 (which json.loads detects) passed for UTF-8
    "second hello": p.encode_json(p.EVENT, 0, {"event": "hello", **HELLO}),
    "utf-16 json": p.encode_frame(p.EVENT, 0, '{"event":"exit","stream":5,"status":0}'.encode("utf-16")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frame_fails_pending_request_and_sinks(tmp_path: Path, name: str) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(HOSTILE[name])

    async def body(client: AgentClient, sock: Path) -> None:
        sink, events = sink_recorder()
        client.attach(5, sink)
        start = time.monotonic()
        with pytest.raises(ProtocolError):
            await client.request("ping", timeout=4)
        assert time.monotonic() - start < 1.0
        with pytest.raises(ProtocolError):
            await sink.exited
        assert events == []
        await _assert_channel_dead(client)

    run(guest, body, tmp_path)


def test_output_after_its_exit_is_a_protocol_error(tmp_path: Path) -> None:
    """Found by the fuzz suite: output the guest sent after a stream's exit event
    reached the sink of a finished process and the channel stayed open."""

    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(p.encode_json(p.EVENT, 5, {"event": "exit", "stream": 5, "status": 0}))
        g.send(p.encode_frame(p.STDOUT, 5, b"late"))

    async def body(client: AgentClient, sock: Path) -> None:
        sink, events = sink_recorder()
        client.attach(5, sink)
        with pytest.raises(ProtocolError, match="after its exit"):
            await client.request("ping", timeout=4)
        assert (await sink.exited).status == 0
        assert events == []
        await _assert_channel_dead(client)

    run(guest, body, tmp_path)


def test_frames_before_a_bad_header_are_still_handled(tmp_path: Path) -> None:
    """Found by the fuzz suite's memory test: the frames read in the same chunk as a
    bad header were dropped, so a process's last output and its exit were lost."""

    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(
            p.encode_frame(p.STDOUT, 5, b"last words")
            + p.encode_json(p.EVENT, 5, {"event": "exit", "stream": 5, "status": 7})
            + b"XX"
            + p.encode_frame(p.RESPONSE, 1, b"{}")[2:]
        )

    async def body(client: AgentClient, sock: Path) -> None:
        sink, events = sink_recorder()
        client.attach(5, sink)
        with pytest.raises(ProtocolError, match="bad frame magic"):
            await client.request("ping", timeout=4)
        assert events == [("out", b"last words")]
        assert (await sink.exited).status == 7

    run(guest, body, tmp_path)


@pytest.mark.parametrize(
    "frame",
    [
        p.encode_json(p.EVENT, 0, {"event": "x\n" * 20000}),
        p.encode_json(p.RESPONSE, 1, {"id": 1, "ok": True, "y\n" * 20000: 1}),
    ],
    ids=["event name", "field name"],
)
def test_guest_text_in_a_protocol_error_is_one_short_line(tmp_path: Path, frame: bytes) -> None:
    """Found by the fuzz suite: a 40 kB event or field name, newlines included, went
    whole into the error the user sees."""

    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(frame)

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(ProtocolError) as info:
            await client.request("ping", timeout=4)
        assert "\n" not in str(info.value) and len(str(info.value)) < 200, str(info.value)

    run(guest, body, tmp_path)


def test_on_failure_hears_of_a_violation_once(tmp_path: Path) -> None:
    """The hook a sandbox can use to stop a hostile guest's VM at once."""
    heard: list[AgentError] = []

    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(b"\0" * 64)

    async def body(client: AgentClient, sock: Path) -> None:
        client.on_failure = heard.append
        with pytest.raises(ProtocolError):
            await client.request("ping", timeout=4)

    run(guest, body, tmp_path)
    assert len(heard) == 1 and isinstance(heard[0], ProtocolError)


def test_a_refusal_message_is_kept_to_a_bounded_size(tmp_path: Path) -> None:
    """Found by the fuzz suite: a guest's refusal of 30 kB went whole into the error."""

    async def guest(g: FakeGuest) -> None:
        g.hello()
        g.respond(req_id(await g.request()), ok=False, error="line\n" * 6000, error_kind="k" * 1000)

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(AgentRequestError) as info:
            await client.request("ping", timeout=4)
        assert len(str(info.value)) <= p.MAX_ERROR + 50 and len(info.value.kind) <= 64

    run(guest, body, tmp_path)


def test_deeply_nested_json_is_a_protocol_error(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.send(p.encode_frame(p.RESPONSE, 1, b"[" * 30000 + b"]" * 30000))

    async def body(client: AgentClient, sock: Path) -> None:
        with pytest.raises(ProtocolError):
            await client.request("ping", timeout=0.5)

    run(guest, body, tmp_path)


def test_guest_closing_socket_fails_pending_request(tmp_path: Path) -> None:
    async def guest(g: FakeGuest) -> None:
        g.hello()
        await g.request()
        g.writer.close()

    async def body(client: AgentClient, sock: Path) -> None:
        sink, _ = sink_recorder()
        client.attach(3, sink)
        start = time.monotonic()
        with pytest.raises(AgentError, match="closed") as info:
            await client.request("ping", timeout=4)
        assert type(info.value) is AgentError
        assert time.monotonic() - start < 1.0
        with pytest.raises(AgentError):
            await sink.exited
        await _assert_channel_dead(client)

    run(guest, body, tmp_path)


# -- process output and stdin ------------------------------------------------------


def test_output_reaches_sink_in_order_and_exit_resolves(tmp_path: Path) -> None:
    big = bytes(range(256)) * 1200  # > MAX_DATA: split across frames

    async def guest(g: FakeGuest) -> None:
        g.hello()
        req = await g.request()
        g.respond(req_id(req))
        g.send(p.encode_frame(p.STDOUT, 5, b"one\n"))
        g.send(p.encode_frame(p.STDERR, 5, b"warn\n"))
        g.send(p.encode_frame(p.STDOUT, 5, b"two\n"))
        for f in p.encode_data(p.STDOUT, 5, big):
            g.send(f)
        g.send(p.encode_frame(p.STDOUT, 6, b"other process\n"))
        g.send(p.encode_frame(p.STDERR, 5, b""))
        g.send(p.encode_frame(p.STDOUT, 5, b""))
        g.send(p.encode_json(p.EVENT, 5, {"event": "exit", "stream": 5, "status": 3, "message": ""}))

    async def body(client: AgentClient, sock: Path) -> None:
        sink, events = sink_recorder()
        other, other_events = sink_recorder()
        client.attach(5, sink)
        client.attach(6, other)
        await client.request("start_container", {"container_id": "c", "stream": 5})
        ev = await asyncio.wait_for(sink.exited, 2)
        assert ev == p.ExitEvent(event="exit", stream=5, status=3, message="")
        assert events[:3] == [("out", b"one\n"), ("err", b"warn\n"), ("out", b"two\n")]
        assert b"".join(b for k, b in events[3:-2] if k == "out") == big
        assert all(k == "out" for k, _ in events[3:-2])
        assert events[-2:] == [("err", b""), ("out", b"")]
        assert other_events == [("out", b"other process\n")]
        assert not other.exited.done()

    run(guest, body, tmp_path)


def test_stdin_waits_for_credit_beyond_window(tmp_path: Path) -> None:
    data = bytes((i * 7 + i // 251) % 256 for i in range(p.STDIN_WINDOW + 300_000 + 17))
    got = bytearray()
    stalled: list[int] = []

    async def guest(g: FakeGuest) -> None:
        g.hello()
        while len(got) < p.STDIN_WINDOW:
            kind, stream, payload = await g.frame()
            assert (kind, stream) == (p.STDIN, 9)
            assert 0 < len(payload) <= p.MAX_DATA
            got.extend(payload)
        assert len(got) == p.STDIN_WINDOW
        # the host must now stop until credit arrives
        try:
            await asyncio.wait_for(g.frame(), 0.2)
            stalled.append(-1)
        except TimeoutError:
            stalled.append(len(got))
        g.send(p.encode_frame(p.CREDIT, 9, struct.pack("!I", len(got))))
        while True:
            kind, stream, payload = await g.frame()
            assert (kind, stream) == (p.STDIN, 9)
            if not payload:
                break
            got.extend(payload)
        g.send(p.encode_json(p.EVENT, 9, {"event": "exit", "stream": 9, "status": 0}))

    async def body(client: AgentClient, sock: Path) -> None:
        sink, _ = sink_recorder()
        client.attach(9, sink)
        writer = asyncio.create_task(client.write_stdin(9, data))
        await asyncio.sleep(0.1)
        assert not writer.done()
        assert sink.inflight == p.STDIN_WINDOW
        await asyncio.wait_for(writer, 2)
        client.close_stdin(9)
        ev = await asyncio.wait_for(sink.exited, 2)
        assert ev.status == 0

    run(guest, body, tmp_path)
    assert stalled == [p.STDIN_WINDOW]
    assert len(got) == len(data)
    assert bytes(got) == data


def test_stdin_writer_released_when_process_exits(tmp_path: Path) -> None:
    received = []

    async def guest(g: FakeGuest) -> None:
        g.hello()
        total = 0
        while total < p.STDIN_WINDOW:
            _, _, payload = await g.frame()
            total += len(payload)
        received.append(total)
        g.send(p.encode_json(p.EVENT, 4, {"event": "exit", "stream": 4, "status": 141}))

    async def body(client: AgentClient, sock: Path) -> None:
        sink, _ = sink_recorder()
        client.attach(4, sink)
        await asyncio.wait_for(client.write_stdin(4, b"y" * (3 * p.STDIN_WINDOW)), 2)
        assert (await sink.exited).status == 141

    run(guest, body, tmp_path)
    assert received == [p.STDIN_WINDOW]


def test_vsock_connect_is_attempted_and_times_out() -> None:
    # CID 3 with nothing listening: refused (or unsupported) until the deadline.
    async def main() -> None:
        with pytest.raises((AgentTimeout, OSError)):
            await AgentClient().connect((3, 1024), timeout=0.1, check_alive=lambda: None)

    asyncio.run(main())
