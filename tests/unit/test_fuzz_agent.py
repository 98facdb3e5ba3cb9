"""Hostile guest (issue 11): property-based tests of the host's side of the agent
channel against generated malformed, oversized, truncated, out-of-order and slow
frames (tests/fixtures/hostile.py). Properties: nothing but ProtocolViolation
(protocol level) or the AgentError family (client) ever escapes; requests in
flight fail with the protocol error as soon as the guest breaks the protocol and
the client drops the channel; the bytes the host buffers stay bounded whatever a
header claims. The last test checks that the suite fed over 100,000 frames.

Deterministic for CI: derandomize=True, no example database, no deadline.
"""

from __future__ import annotations

import asyncio
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fixtures import hostile as h
from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, AgentRequestError, ProcessSink
from vmpod.errors import AgentError, AgentTimeout, ProtocolError

FRAMES: Counter[str] = Counter()  # frames fed, per test
MIN_FRAMES = 100_000
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
MESSAGE_CLASSES: tuple[type[p.Message], ...] = (
    p.Response,
    p.ExitEvent,
    p.Hello,
    *{r for _a, r in p.OPS.values()},
)


def one_line(err: BaseException) -> None:
    text = str(err)
    assert "\n" not in text and len(text) <= 400, text


# -- (a) the protocol layer: FrameReader, parse_json, decode -----------------------------


def _header_broken(f: h.Frame) -> bool:
    return f.what.startswith(("header:", "garbage"))


def _feed_all(reader: p.FrameReader, chunks: list[bytes], got: list[tuple[int, int, bytes]]) -> None:
    """Feed every chunk, collecting frames in ``got`` (kept on a violation)."""
    for c in chunks:
        got += reader.feed(c)
        # a complete frame is always taken: what stays is less than the largest frame
        assert reader.buffered < p.HEADER.size + p.MAX_DATA


def _decode_everything(payload: bytes) -> None:
    """What the host does with a JSON payload, for every message it could be."""
    try:
        obj = p.parse_json(payload)
    except p.ProtocolViolation as err:
        one_line(err)
        return
    for cls in MESSAGE_CLASSES:
        for candidate in (obj, obj.get("result")):
            if isinstance(candidate, dict):
                try:
                    p.decode(cls, candidate)
                except p.ProtocolViolation as err:
                    one_line(err)


@settings(FUZZ, max_examples=1000)
@given(st.data())
def test_reader_frames_any_split_and_raises_only_violations(data: st.DataObject) -> None:
    _check_reader(data.draw(h.streams()), data, "reader")


@settings(FUZZ, max_examples=600)
@given(st.data())
def test_reader_on_long_streams(data: st.DataObject) -> None:
    _check_reader(data.draw(h.bulk_streams()), data, "reader-bulk")


def _check_reader(frames: list[h.Frame], data: st.DataObject, name: str) -> None:
    chunks = data.draw(h.cuts(b"".join(f.data for f in frames)))
    broken = next((i for i, f in enumerate(frames) if _header_broken(f)), None)
    complete = [f for f in frames[:broken] if f.complete]
    expected = [p.HEADER.unpack_from(f.data)[2:4] + (f.data[p.HEADER.size :],) for f in complete]
    reader = p.FrameReader()
    got: list[tuple[int, int, bytes]] = []
    try:
        _feed_all(reader, chunks, got)
    except p.ProtocolViolation as err:
        one_line(err)
        assert broken is not None, f"violation without a broken header: {err}"
        assert got + err.frames == expected  # nothing before the bad header is lost
    else:
        assert broken is None, f"{frames[broken].what} was accepted"
        assert got == expected
    FRAMES[name] += len(frames) if broken is None else broken + 1
    for kind, _stream, payload in got if broken is None else []:
        if kind in (p.RESPONSE, p.EVENT):
            _decode_everything(payload)


@settings(FUZZ, max_examples=400)
@given(
    st.lists(st.one_of(h.bad_json_frame(), h.bad_message(), h.good_response(), h.good_exit()), max_size=20)
)
@example([h.Frame(h.jframe(p.EVENT, 0, {"event": "x" * 60000}), True, "long")])
def test_json_payloads_raise_only_violations(frames: list[h.Frame]) -> None:
    FRAMES["json"] += len(frames)
    for f in frames:
        _decode_everything(f.data[p.HEADER.size :])


@pytest.mark.parametrize("length", [p.MAX_DATA + 1, 2**31, 2**32 - 1])
def test_a_header_that_claims_gigabytes_buffers_nothing(length: int) -> None:
    reader = p.FrameReader()
    tracemalloc.start()
    try:
        with pytest.raises(p.ProtocolViolation, match="exceeds"):
            reader.feed(p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.STDOUT, 1, length))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_reader_memory_stays_bounded(data: st.DataObject) -> None:
    """tracemalloc's peak while a stream goes through the reader in chunks of at most
    64 KiB (what the client reads at a time): a few of the largest frames at most,
    whatever the stream says."""
    frames = data.draw(h.streams(max_frames=60))
    read = 1 << 16
    chunks = [
        c[i : i + read]
        for c in data.draw(h.cuts(b"".join(f.data for f in frames)))
        for i in range(0, len(c), read)
    ]
    FRAMES["memory"] += len(frames)
    reader = p.FrameReader()
    tracemalloc.start()
    try:
        for c in chunks:
            try:
                for _kind, _stream, payload in reader.feed(c):
                    del payload
            except p.ProtocolViolation:
                break
            del c
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (p.HEADER.size + p.MAX_DATA), peak


# -- (b) a real AgentClient on a unix socket, the fake guest writing the stream ----------


@pytest.fixture(scope="module")
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmpod-fuzz-") as d:
        yield Path(d)


async def _guest_side(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, chunks: list[bytes], fatal: bool, pause: float
) -> bool:
    """Say hello (in pieces as small as the chunks when ``pause``), wait until every
    request is in flight, write the chunks; then hang up (nothing fatal was sent) or
    wait for the host to hang up. True: the host did."""
    hello = h.jframe(p.EVENT, 0, {"event": "hello", **h.HELLO})
    step = max(1, len(chunks[0])) if pause else len(hello)
    for i in range(0, len(hello), step):
        w.write(hello[i : i + step])
        await w.drain()
        await asyncio.sleep(pause)
    frames, asked = p.FrameReader(), 0
    while asked < len(h.ASKED):
        data = await r.read(1 << 16)
        if not data:
            return True
        asked += len(frames.feed(data))
    try:
        for c in chunks:
            w.write(c)
            await w.drain()
            await asyncio.sleep(pause)
    except ConnectionError:
        return True  # the host dropped the channel before the end: fine when fatal
    if not fatal:
        w.close()
        return False
    try:
        while await r.read(1 << 16):
            pass
    except ConnectionError:
        pass  # reset: the host closed with our bytes unread
    w.close()
    return True


async def _client_run(
    path: Path, chunks: list[bytes], fatal: bool, pause: float
) -> tuple[AgentClient, list[object], dict[int, ProcessSink], bool]:
    path.unlink(missing_ok=True)
    host_hung_up: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            hung_up = await _guest_side(r, w, chunks, fatal, pause)
        except Exception as err:  # reported by the test
            if not host_hung_up.done():
                host_hung_up.set_exception(err)
        else:
            if not host_hung_up.done():
                host_hung_up.set_result(hung_up)

    server = await asyncio.start_unix_server(handle, path=str(path))
    client = AgentClient()
    try:
        await client.connect(path, timeout=10.0, check_alive=lambda: None)
        sinks = {s: ProcessSink(on_stdout=lambda _b: None, on_stderr=lambda _b: None) for s in h.SINKS}
        for s, sink in sinks.items():
            client.attach(s, sink)
        results = await asyncio.gather(*(client.ping() for _ in h.ASKED), return_exceptions=True)
        hung_up = await host_hung_up
        return client, list(results), sinks, hung_up
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def _check_client(frames: list[h.Frame], chunks: list[bytes], sock_dir: Path, pause: float = 0.0) -> None:
    outcome = h.label(frames)
    fatal = outcome.fatal_at is not None
    # no request times out here (30 s): the guard only stops a hung client
    client, results, sinks, hung_up = asyncio.run(
        asyncio.wait_for(_client_run(sock_dir / "g.sock", chunks, fatal, pause), 10)
    )
    closed = client._closed
    assert isinstance(closed, AgentError)
    one_line(closed)
    for rid, res in zip(h.ASKED, results, strict=True):
        if isinstance(res, AgentRequestError):  # the guest's own words, within a limit
            assert len(str(res)) <= p.MAX_ERROR + 100, len(str(res))
        elif isinstance(res, BaseException):
            assert isinstance(res, AgentError), repr(res)
            one_line(res)
        else:
            assert isinstance(res, p.PingResult)
        if rid not in outcome.answered:
            assert isinstance(res, ProtocolError if fatal else AgentError), (rid, res)
    if fatal:
        assert isinstance(closed, ProtocolError), f"{frames[outcome.fatal_at or 0].what}: {closed}"
        assert hung_up, "the client kept the channel open after a violation"
    else:
        assert not isinstance(closed, ProtocolError), closed
    for sink in sinks.values():
        assert sink.exited.done()
        if sink.exited.exception() is not None:
            assert isinstance(sink.exited.exception(), AgentError)
    with pytest.raises(AgentError):
        asyncio.run(client.request("ping"))


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_client_survives_hostile_streams(sock_dir: Path, data: st.DataObject) -> None:
    frames = data.draw(h.streams())
    FRAMES["client"] += h.processed(frames)
    chunks = data.draw(h.cuts(b"".join(f.data for f in frames)))
    _check_client(frames, chunks, sock_dir)


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_client_on_long_streams(sock_dir: Path, data: st.DataObject) -> None:
    frames = data.draw(h.bulk_streams())
    FRAMES["client-bulk"] += h.processed(frames)
    chunks = data.draw(h.cuts(b"".join(f.data for f in frames)))
    _check_client(frames, chunks, sock_dir)


@settings(FUZZ, max_examples=30)
@given(st.data())
def test_client_under_slow_delivery(sock_dir: Path, data: st.DataObject) -> None:
    """Byte by byte or in small pieces, with a real pause between them."""
    frames = data.draw(h.streams(max_frames=6))
    FRAMES["slow"] += h.processed(frames)
    blob = b"".join(f.data for f in frames)
    step = max(data.draw(st.sampled_from([1, 3, 13, 512])), -(-len(blob) // 300))  # <= 300 pauses
    chunks = [blob[i : i + step] for i in range(0, len(blob), step)] or [b""]
    _check_client(frames, chunks, sock_dir, pause=0.0005)


def test_strategy_labels_follow_the_client_rules() -> None:
    """The oracle itself: output after its stream's exit is fatal, answers count once."""
    out = h.Frame(h.frame(p.STDOUT, 1, b"x"), False, "output", output=1)
    ex = h.Frame(h.jframe(p.EVENT, 1, {"event": "exit", "stream": 1, "status": 0}), False, "exit", exits=1)
    resp = h.Frame(h.jframe(p.RESPONSE, 2, {"id": 2, "ok": True}), False, "response", answers=2)
    assert h.label([out, resp, ex]) == h.Outcome(None, frozenset({2}))
    assert h.label([resp, ex, out]) == h.Outcome(2, frozenset({2}))


FLOOD = 32 * 1024 * 1024  # bytes a guest pushes at the client


@pytest.mark.parametrize("then_lie", [False, True], ids=["output flood", "4 GiB header after it"])
def test_client_memory_stays_bounded_under_a_flood(sock_dir: Path, then_lie: bool) -> None:
    """32 MiB of output frames, then perhaps a header that claims 4 GiB: the client
    holds at most a few frames at a time (tracemalloc's peak over the whole run)."""
    received = 0

    def count(b: bytes) -> None:
        nonlocal received
        received += len(b)

    async def main() -> AgentError | None:
        path = sock_dir / "flood.sock"
        path.unlink(missing_ok=True)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(h.jframe(p.EVENT, 0, {"event": "hello", **h.HELLO}))
            chunk = h.frame(p.STDOUT, 1, b"o" * p.MAX_DATA)
            try:
                for _ in range(FLOOD // p.MAX_DATA):
                    w.write(chunk)
                    await w.drain()
                if then_lie:
                    w.write(p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.STDOUT, 1, 2**32 - 1) + b"x" * 65536)
                    await w.drain()
                while await r.read(1 << 16):
                    pass
            except ConnectionError:
                pass
            w.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        client = AgentClient()
        try:
            sink = ProcessSink(on_stdout=count, on_stderr=count)
            client.attach(1, sink)
            await client.connect(path, timeout=10.0, check_alive=lambda: None)
            while received < FLOOD and client._closed is None:
                await asyncio.sleep(0.01)
            if then_lie:
                with pytest.raises(ProtocolError):
                    await sink.exited
            return client._closed if isinstance(client._closed, AgentError) else None
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    tracemalloc.start()
    try:
        closed = asyncio.run(asyncio.wait_for(main(), 60))
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == FLOOD
    assert peak < 4 * 1024 * 1024, peak
    FRAMES["memory"] += FLOOD // p.MAX_DATA + then_lie
    if then_lie:
        assert isinstance(closed, ProtocolError) and "exceeds" in str(closed), closed
    else:
        assert closed is None, closed


def test_a_guest_that_stalls_mid_frame_times_requests_out(sock_dir: Path) -> None:
    """Half a response, then silence: the request ends at its own time limit."""

    async def main() -> None:
        path = sock_dir / "stall.sock"
        path.unlink(missing_ok=True)
        stop = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(h.jframe(p.EVENT, 0, {"event": "hello", **h.HELLO}))
            await r.read(1 << 16)
            w.write(h.jframe(p.RESPONSE, 1, {"id": 1, "ok": True, "result": {"uptime": 1.0}})[:20])
            await stop.wait()
            w.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        client = AgentClient()
        try:
            await client.connect(path, timeout=10.0, check_alive=lambda: None)
            with pytest.raises(AgentTimeout, match="did not answer 'ping' within 0.2s"):
                await client.request("ping", timeout=0.2)
        finally:
            stop.set()
            await client.close()
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_zz_the_suite_fed_enough_frames() -> None:
    """Runs last in this file: the total only means something after a full run."""
    if set(FRAMES) != {"reader", "reader-bulk", "json", "memory", "client", "client-bulk", "slow"}:
        pytest.skip(f"only part of the suite ran: {dict(FRAMES)}")
    total = sum(FRAMES.values())
    print(f"hostile-guest frames: {total} {dict(FRAMES)}")
    assert total >= MIN_FRAMES, dict(FRAMES)
