"""The agent wire protocol: framing, size limits and schema-checked messages."""

from __future__ import annotations

import json
import random
import struct

import pytest

from vmpod.agent import protocol as p
from vmpod.agent.protocol import FrameReader, ProtocolViolation


def header(
    kind: int, stream: int, length: int, *, magic: bytes = b"VP", version: int = p.PROTOCOL_VERSION
) -> bytes:
    return struct.pack("!2sBBII", magic, version, kind, stream, length)


# -- framing ---------------------------------------------------------------


def test_encode_frame_exact_bytes() -> None:
    frame = p.encode_frame(p.REQUEST, 7, b"{}")
    assert frame == b"VP\x01\x01\x00\x00\x00\x07\x00\x00\x00\x02{}"
    assert p.HEADER.size == 12


def test_encode_json_is_compact_and_round_trips() -> None:
    frame = p.encode_json(p.EVENT, 3, {"event": "hello", "n": [1, 2]})
    assert frame[12:] == b'{"event":"hello","n":[1,2]}'
    [(kind, stream, payload)] = FrameReader().feed(frame)
    assert (kind, stream) == (p.EVENT, 3)
    assert p.parse_json(payload) == {"event": "hello", "n": [1, 2]}


@pytest.mark.parametrize("kind", [p.REQUEST, p.RESPONSE, p.EVENT])
def test_encode_frame_json_limit(kind: int) -> None:
    assert len(p.encode_frame(kind, 0, b"x" * p.MAX_JSON)) == 12 + p.MAX_JSON
    with pytest.raises(ValueError):
        p.encode_frame(kind, 0, b"x" * (p.MAX_JSON + 1))


@pytest.mark.parametrize("kind", [p.STDIN, p.STDOUT, p.STDERR])
def test_encode_frame_data_limit(kind: int) -> None:
    # data kinds may exceed the JSON limit, up to MAX_DATA
    assert len(p.encode_frame(kind, 0, b"x" * (p.MAX_JSON + 1))) == 12 + p.MAX_JSON + 1
    assert len(p.encode_frame(kind, 0, b"x" * p.MAX_DATA)) == 12 + p.MAX_DATA
    with pytest.raises(ValueError):
        p.encode_frame(kind, 0, b"x" * (p.MAX_DATA + 1))


def test_encode_data_empty_is_one_eof_frame() -> None:
    assert p.encode_data(p.STDOUT, 9, b"") == [header(p.STDOUT, 9, 0)]


def test_encode_data_splits_at_max_data() -> None:
    data = bytes(range(256)) * ((2 * p.MAX_DATA + 1) // 256 + 1)
    data = data[: 2 * p.MAX_DATA + 1]
    frames = p.encode_data(p.STDERR, 4, data)
    assert [len(f) - 12 for f in frames] == [p.MAX_DATA, p.MAX_DATA, 1]
    reader = FrameReader()
    out = [f for chunk in frames for f in reader.feed(chunk)]
    assert [(k, s) for k, s, _ in out] == [(p.STDERR, 4)] * 3
    assert b"".join(pl for _, _, pl in out) == data


def _sample_stream() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    expected = [
        (p.REQUEST, 1, b'{"id":1,"op":"ping","args":{}}'),
        (p.STDOUT, 5, b"hello\n"),
        (p.STDIN, 5, b""),
        (p.CREDIT, 5, struct.pack("!I", 4096)),
        (p.STDERR, 0xFFFFFFFF, bytes(range(256)) * 3),
        (p.EVENT, 0, b'{"event":"exit","stream":5,"status":0}'),
    ]
    wire = b"".join(p.encode_frame(k, s, pl) for k, s, pl in expected)
    return wire, expected


def test_frame_reader_byte_by_byte() -> None:
    wire, expected = _sample_stream()
    reader = FrameReader()
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i : i + 1])
    assert got == expected


def test_frame_reader_one_frame_only_on_last_byte() -> None:
    frame = p.encode_frame(p.STDOUT, 2, b"abcdef")
    reader = FrameReader()
    for b in frame[:-1]:
        assert reader.feed(bytes([b])) == []
    assert reader.feed(frame[-1:]) == [(p.STDOUT, 2, b"abcdef")]
    assert reader.feed(b"") == []


@pytest.mark.parametrize("seed", range(5))
def test_frame_reader_random_chunks(seed: int) -> None:
    wire, expected = _sample_stream()
    rng = random.Random(seed)
    reader = FrameReader()
    got = []
    i = 0
    while i < len(wire):
        n = rng.randint(0, 40)
        got += reader.feed(wire[i : i + n])
        i += n
    assert got == expected


def test_frame_reader_all_at_once() -> None:
    wire, expected = _sample_stream()
    assert FrameReader().feed(wire) == expected


def test_bad_magic_detected_once_header_complete() -> None:
    bad = header(p.REQUEST, 0, 0, magic=b"XP")
    reader = FrameReader()
    assert reader.feed(bad[:11]) == []
    with pytest.raises(ProtocolViolation, match="magic"):
        reader.feed(bad[11:])


def test_bad_version() -> None:
    with pytest.raises(ProtocolViolation, match="version 2"):
        FrameReader().feed(header(p.REQUEST, 0, 0, version=2))
    with pytest.raises(ProtocolViolation, match="version 0"):
        FrameReader().feed(header(p.REQUEST, 0, 0, version=0))


@pytest.mark.parametrize("kind", [0, 8, 9, 255])
def test_bad_kind(kind: int) -> None:
    with pytest.raises(ProtocolViolation, match=f"kind {kind}"):
        FrameReader().feed(header(kind, 0, 0))


def test_bad_frame_after_good_frame_in_same_chunk() -> None:
    good = p.encode_frame(p.STDOUT, 1, b"ok")
    with pytest.raises(ProtocolViolation) as info:
        FrameReader().feed(good + header(p.REQUEST, 0, 0, magic=b"\x00\x00"))
    assert info.value.frames == [(p.STDOUT, 1, b"ok")]  # the good frame is not lost


@pytest.mark.parametrize("kind", [p.REQUEST, p.RESPONSE, p.EVENT])
def test_oversized_json_length_rejected_from_header_alone(kind: int) -> None:
    reader = FrameReader()
    # at the limit: waits for the payload
    assert reader.feed(header(kind, 0, p.MAX_JSON)) == []
    with pytest.raises(ProtocolViolation, match="exceeds"):
        FrameReader().feed(header(kind, 0, p.MAX_JSON + 1))
    with pytest.raises(ProtocolViolation):
        FrameReader().feed(header(kind, 0, 0xFFFFFFFF))


@pytest.mark.parametrize("kind", [p.STDIN, p.STDOUT, p.STDERR, p.CREDIT])
def test_oversized_data_length_rejected_from_header_alone(kind: int) -> None:
    assert FrameReader().feed(header(kind, 0, p.MAX_JSON + 1)) == []
    assert FrameReader().feed(header(kind, 0, p.MAX_DATA)) == []
    with pytest.raises(ProtocolViolation, match="exceeds"):
        FrameReader().feed(header(kind, 0, p.MAX_DATA + 1))


def test_random_bytes_only_raise_protocol_violation() -> None:
    rng = random.Random(1234)
    kinds = list(range(10))
    violations = frames_seen = 0
    for _ in range(3000):
        reader = FrameReader()
        style = rng.random()
        if style < 0.4:
            # plausible header, random kind / length, random tail
            data = header(
                rng.choice(kinds),
                rng.getrandbits(32),
                rng.choice([0, 1, 5, 30, p.MAX_JSON + 1, p.MAX_DATA + 1, rng.getrandbits(32)]),
            )
            data += rng.randbytes(rng.randint(0, 60))
        elif style < 0.6:
            data = b"VP" + bytes([rng.choice([0, 1, 1, 2])]) + rng.randbytes(rng.randint(0, 60))
        else:
            data = rng.randbytes(rng.randint(0, 80))
        try:
            i = 0
            while i < len(data):
                n = rng.randint(1, 16)
                for kind, _stream, payload in reader.feed(data[i : i + n]):
                    frames_seen += 1
                    assert kind in range(1, 8)
                    limit = p.MAX_JSON if kind in (p.REQUEST, p.RESPONSE, p.EVENT) else p.MAX_DATA
                    assert len(payload) <= limit
                i += n
        except ProtocolViolation:
            violations += 1
    # the generator exercises both outcomes
    assert violations > 500
    assert frames_seen > 50


# -- JSON ------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"}",
        b"\xff\xfe\x00",
        b"[]",
        b"1",
        b'"s"',
        b"null",
        b"true",
        b'{"a":1} x',
        b"\x00" * 10,
        b"{'a': 1}",
    ],
)
def test_parse_json_garbage(payload: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        p.parse_json(payload)


def test_parse_json_object() -> None:
    assert p.parse_json(b'{"a":[1,{"b":null}]}') == {"a": [1, {"b": None}]}


def test_parse_json_deep_nesting_is_a_violation() -> None:
    payload = b"[" * 30000 + b"]" * 30000
    assert len(payload) <= p.MAX_JSON
    with pytest.raises(ProtocolViolation):
        p.parse_json(b'{"a":' + payload + b"}")


# -- typed messages ----------------------------------------------------------


class Sample(p.Message):
    names: tuple[str, ...]
    labels: dict[str, str]
    limit: int | None = None
    ratio: float = 1.0
    extra: dict[str, object] = {}  # noqa: RUF012  (Message copies dict defaults)


def test_decode_request_defaults() -> None:
    assert p.decode(p.Request, {"id": 3, "op": "ping"}) == p.Request(id=3, op="ping", args={})


def test_decode_hello() -> None:
    hello = p.decode(p.Hello, {"protocol": 1, "agent_version": "0.1", "kernel": "6.1.0", "uptime": 0.25})
    assert hello == p.Hello(protocol=1, agent_version="0.1", kernel="6.1.0", uptime=0.25)


def test_float_accepts_int_but_not_bool() -> None:
    obj = {"protocol": 1, "agent_version": "v", "kernel": "k", "uptime": 3}
    assert p.decode(p.Hello, obj).uptime == 3
    with pytest.raises(ProtocolViolation, match="uptime"):
        p.decode(p.Hello, {**obj, "uptime": True})
    with pytest.raises(ProtocolViolation, match="uptime"):
        p.decode(p.Hello, {**obj, "uptime": "3.0"})


@pytest.mark.parametrize(
    "cls,obj,where",
    [
        (p.Request, {"id": True, "op": "ping"}, "Request.id"),
        (p.Request, {"id": False, "op": "ping"}, "Request.id"),
        (p.Request, {"id": "1", "op": "ping"}, "Request.id"),
        (p.Request, {"id": 1.0, "op": "ping"}, "Request.id"),
        (p.Request, {"id": 1, "op": 5}, "Request.op"),
        (p.Request, {"id": 1, "op": "x", "args": []}, "Request.args"),
        (p.Request, {"id": 1, "op": "x", "args": None}, "Request.args"),
        (p.Response, {"id": 1, "ok": 1}, "Response.ok"),
        (p.Response, {"id": 1, "ok": "true"}, "Response.ok"),
        (p.Response, {"id": 1, "ok": False, "error": None}, "Response.error"),
        (p.ExitEvent, {"event": "exit", "stream": 1, "status": True}, "ExitEvent.status"),
        (p.SignalProcess, {"stream": 1, "signal": 9.0}, "SignalProcess.signal"),
        (p.StartContainer, {"container_id": "c", "stream": 1, "stdin": 1}, "StartContainer.stdin"),
    ],
)
def test_decode_wrong_types(cls: type, obj: dict[str, object], where: str) -> None:
    with pytest.raises(ProtocolViolation, match=where.replace(".", r"\.")):
        p.decode(cls, obj)


def test_decode_unknown_field_rejected() -> None:
    with pytest.raises(ProtocolViolation, match="unknown fields.*'evil'"):
        p.decode(p.Request, {"id": 1, "op": "ping", "evil": 1})


@pytest.mark.parametrize(
    "cls,obj",
    [
        (p.Request, {"op": "ping"}),
        (p.Response, {"id": 1}),
        (p.Hello, {"protocol": 1, "agent_version": "v", "kernel": "k"}),
        (p.ExitEvent, {"event": "exit", "stream": 1}),
        (p.CreateContainer, {"container_id": "c", "spec": {}}),
    ],
)
def test_decode_missing_required_field(cls: type, obj: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation, match=cls.__name__):
        p.decode(cls, obj)


def test_decode_tuple_dict_optional_fields() -> None:
    s = p.decode(
        Sample, {"names": ["a", "b"], "labels": {"k": "v"}, "limit": None, "ratio": 2, "extra": {"x": [1]}}
    )
    assert s == Sample(names=("a", "b"), labels={"k": "v"}, limit=None, ratio=2, extra={"x": [1]})
    assert isinstance(s.names, tuple)
    assert p.decode(Sample, {"names": [], "labels": {}, "limit": 4}).limit == 4


@pytest.mark.parametrize(
    "obj",
    [
        {"names": "ab", "labels": {}},  # str is not a list
        {"names": ("a",), "labels": {}},  # only JSON lists
        {"names": [1], "labels": {}},
        {"names": ["a", None], "labels": {}},
        {"names": [], "labels": {"k": 1}},
        {"names": [], "labels": ["k"]},
        {"names": [], "labels": {}, "limit": True},
        {"names": [], "labels": {}, "limit": "3"},
        {"names": [], "labels": {}, "extra": []},
    ],
)
def test_decode_container_type_errors(obj: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        p.decode(Sample, obj)


def test_unsupported_annotation_is_a_programming_error() -> None:
    class Odd(p.Message):
        x: list[int]

    with pytest.raises(TypeError):
        p.decode(Odd, {"x": [1]})


@pytest.mark.parametrize(
    "msg",
    [
        p.Hello(protocol=1, agent_version="0.1", kernel="6.1.0-1-cloud-amd64", uptime=1.5),
        p.Request(id=1, op="exec", args={"a": [1, 2]}),
        p.Response(id=2, ok=False, result={}, error="boom", error_kind="NotFound"),
        p.ExitEvent(event="exit", stream=3, status=137, message="killed"),
        p.CreateContainer(
            container_id="c1",
            spec={"ociVersion": "1.0.2"},
            rootfs_serial="rootfs",
            rootfs_fstype="ext4",
            user="1000:1000",
        ),
        p.StartContainer(container_id="c1", stream=5, stdin=True),
        p.ExecProcess(container_id="c1", stream=6, process={"args": ["sh"]}, user="root"),
        p.SignalProcess(stream=5, signal=15),
        p.ResizeTty(stream=5, rows=24, cols=80),
        p.WaitProcess(stream=5),
        p.SetClock(epoch_ns=1_700_000_000_000_000_000),
        p.GuestInfo(
            kernel="6.1", uptime=2.0, mem_total_kb=1024, mem_free_kb=512, cpus=2, python="3.11", runc="1.1"
        ),
        Sample(names=("a", "b"), labels={"k": "v"}, limit=7),
    ],
)
def test_encode_decode_round_trip_through_json(msg: p.Message) -> None:
    obj = json.loads(json.dumps(p.encode(msg)))
    assert p.decode(type(msg), obj) == msg


def test_encode_turns_tuples_into_lists() -> None:
    assert p.encode(Sample(names=("a",), labels={})) == {
        "names": ["a"],
        "labels": {},
        "limit": None,
        "ratio": 1.0,
        "extra": {},
    }


def test_ops_table() -> None:
    assert p.OPS["create_container"] == (p.CreateContainer, p.ContainerCreated)
    assert p.OPS["exec"] == (p.ExecProcess, p.ProcessStarted)
    assert p.OPS["ping"] == (None, p.PingResult)
    assert p.OPS["stats"] == (p.GetStats, p.ContainerStats)
    for args_cls, result_cls in p.OPS.values():
        for cls in (args_cls, result_cls):
            if cls is not None:
                assert issubclass(cls, p.Message)
                with pytest.raises(ProtocolViolation):
                    p.decode(cls, {"__nope__": 1})


@pytest.mark.parametrize(
    "cls,obj",
    [
        (p.PingResult, {"uptime": 1.5}),
        (p.ContainerCreated, {"bundle": "/run/vmpod/containers/c1"}),
        (p.ProcessStarted, {"pid": 42}),  # what agents before "started" sent
        (p.ProcessStarted, {"pid": 42, "started": False}),
        (p.ExitStatus, {"status": 137}),
        (p.Empty, {}),
        (p.CommandResult, {"status": 0, "stdout": "x"}),
        (p.CommandResult, {"status": 1, "stdout": "", "stderr": "e", "error": "boom"}),
        (p.ContainerStats, {"cpu_usage_usec": 1, "memory_bytes": 2, "pids": 3}),
    ],
)
def test_result_classes_decode_what_the_agent_sends(cls: type[p.Message], obj: dict[str, object]) -> None:
    msg = p.decode(cls, obj)
    assert {k: v for k, v in p.encode(msg).items() if k in obj} == obj


def test_results_are_schema_checked() -> None:
    with pytest.raises(ProtocolViolation):
        p.decode(p.ProcessStarted, {"pid": "42"})
    with pytest.raises(ProtocolViolation):
        p.decode(p.ContainerStats, {"cpu_usage_usec": 1, "memory_bytes": 2})
    with pytest.raises(ProtocolViolation):
        p.decode(p.Empty, {"anything": 1})
    assert p.decode(p.CommandResult, {"status": 0, "stdout": ""}).error == ""


def test_message_records_are_frozen_keyword_only_values() -> None:
    r = p.Request(id=1, op="ping")
    with pytest.raises(AttributeError):
        r.id = 2
    with pytest.raises(TypeError):
        p.Request(1, "ping")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="no fields"):
        p.Request(id=1, op="ping", bogus=1)
    with pytest.raises(TypeError, match="needs field 'op'"):
        p.Request(id=1)
    assert r == p.Request(id=1, op="ping", args={})
    assert r != p.Request(id=1, op="pong")
    assert r != p.WaitProcess(stream=1)
    assert hash(r) == hash(p.Request(id=1, op="ping"))
    assert repr(r) == "Request(id=1, op='ping', args={})"


def test_message_dict_defaults_are_not_shared() -> None:
    a, b = p.Request(id=1, op="x"), p.Request(id=2, op="y")
    a.args["k"] = "v"
    assert b.args == {}
    assert p.Request(id=3, op="z").args == {}


def test_lone_surrogates_from_the_guest_become_replacement_characters() -> None:
    # JSON allows "\ud800"; kept, it would raise UnicodeEncodeError when the host
    # prints the guest's message. A pair still decodes to its character.
    obj = p.parse_json(b'{"id": 1, "ok": false, "error": "bad \\ud800 name \\ud83d\\ude00"}')
    resp = p.decode(p.Response, obj)
    assert resp.error == "bad \ufffd\ufffd\ufffd name \U0001f600"
    resp.error.encode("utf-8")  # printable as it is
