"""The host <-> guest agent wire protocol, shared by client (host) and server (guest).

Standard library only: the guest runs this file on its own python3.

Wire format: a 12-byte header then a payload.

    magic "VP" | version u8 | kind u8 | stream u32 | length u32      (network order)

``REQUEST``/``RESPONSE``/``EVENT`` payloads are UTF-8 JSON objects (at most
``MAX_JSON`` bytes); ``STDIN``/``STDOUT``/``STDERR`` carry raw bytes of one
process (``stream`` names it; at most ``MAX_DATA`` bytes, an empty payload is
end-of-file); ``CREDIT`` is a u32 count of stdin bytes the guest consumed, the
window that keeps the host from flooding the guest. Every message that crosses
the boundary is a frozen dataclass decoded by ``decode`` which checks every
field's type: neither side trusts the other's bytes.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields

PROTOCOL_VERSION = 1
MAGIC = b"VP"
HEADER = struct.Struct("!2sBBII")
MAX_JSON = 64 * 1024
MAX_DATA = 256 * 1024
STDIN_WINDOW = 1024 * 1024          # stdin bytes in flight before the host waits
PORT_NAME = "org.vmpod.agent"       # virtio-serial port name
VSOCK_PORT = 1024

REQUEST, RESPONSE, EVENT, STDIN, STDOUT, STDERR, CREDIT = range(1, 8)
_KINDS = {REQUEST, RESPONSE, EVENT, STDIN, STDOUT, STDERR, CREDIT}
_JSON_KINDS = {REQUEST, RESPONSE, EVENT}


class ProtocolViolation(Exception):
    """The peer sent bytes that break the protocol; the channel must be dropped."""


# -- framing ---------------------------------------------------------------

def encode_frame(kind: int, stream: int, payload: bytes) -> bytes:
    limit = MAX_JSON if kind in _JSON_KINDS else MAX_DATA
    if len(payload) > limit:
        raise ValueError(f"frame payload {len(payload)} > {limit}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, stream, len(payload)) + payload


def encode_json(kind: int, stream: int, obj: dict[str, object]) -> bytes:
    return encode_frame(kind, stream, json.dumps(obj, separators=(",", ":")).encode())


def encode_data(kind: int, stream: int, data: bytes) -> list[bytes]:
    """Split ``data`` into frames of at most MAX_DATA bytes (b"" -> one EOF frame)."""
    if not data:
        return [encode_frame(kind, stream, b"")]
    return [encode_frame(kind, stream, data[i:i + MAX_DATA])
            for i in range(0, len(data), MAX_DATA)]


class FrameReader:
    """Incremental decoder: feed bytes, take complete ``(kind, stream, payload)``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            magic, version, kind, stream, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolViolation(f"bad frame magic {bytes(magic)!r}")
            if version != PROTOCOL_VERSION:
                raise ProtocolViolation(f"protocol version {version}, expected {PROTOCOL_VERSION}")
            if kind not in _KINDS:
                raise ProtocolViolation(f"unknown frame kind {kind}")
            limit = MAX_JSON if kind in _JSON_KINDS else MAX_DATA
            if length > limit:
                raise ProtocolViolation(f"frame of {length} bytes exceeds {limit}")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, stream, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
        return frames


def parse_json(payload: bytes) -> dict[str, object]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolViolation(f"invalid JSON payload: {err}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("JSON payload is not an object")
    return obj


# -- typed messages ----------------------------------------------------------

_SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _check(value: object, typ: str, where: str) -> object:
    """Validate ``value`` against a field annotation string; return it normalised."""
    if typ.endswith(" | None"):
        return None if value is None else _check(value, typ[:-7], where)
    if typ in _SCALARS:
        ok = isinstance(value, _SCALARS[typ]) and not (typ != "bool" and isinstance(value, bool))
        if not ok:
            raise ProtocolViolation(f"{where}: expected {typ}, got {type(value).__name__}")
        return value
    if typ.startswith("tuple[") and typ.endswith(", ...]"):
        if not isinstance(value, list):
            raise ProtocolViolation(f"{where}: expected a list")
        return tuple(_check(v, typ[6:-6], where) for v in value)
    if typ == "dict[str, str]":
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ProtocolViolation(f"{where}: expected an object of strings")
        return dict(value)
    if typ == "dict[str, object]":
        if not isinstance(value, dict):
            raise ProtocolViolation(f"{where}: expected an object")
        return dict(value)
    raise TypeError(f"unsupported field type {typ}")


def decode(cls: type, obj: dict[str, object]):  # type: ignore[no-untyped-def]
    """Build message ``cls`` from a JSON object, checking names and types."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(obj) - set(known)
    if unknown:
        raise ProtocolViolation(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    args = {}
    for name, f in known.items():
        if name in obj:
            args[name] = _check(obj[name], str(f.type), f"{cls.__name__}.{name}")
    try:
        return cls(**args)
    except TypeError as err:
        raise ProtocolViolation(f"{cls.__name__}: {err}") from None


def encode(msg: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(msg):  # type: ignore[arg-type]
        v = getattr(msg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass(frozen=True)
class Hello:
    """First event of the agent on a fresh connection."""
    protocol: int
    agent_version: str
    kernel: str
    uptime: float


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    id: int
    ok: bool
    result: dict[str, object] = field(default_factory=dict)
    error: str = ""
    error_kind: str = ""


@dataclass(frozen=True)
class ExitEvent:
    """A process ended; all of its output frames were sent before this event."""
    event: str
    stream: int
    status: int          # shell convention: 128+N for a signal, 127 command not found
    message: str = ""    # why it failed to start, when it did


# -- operations (Request.args) ----------------------------------------------

@dataclass(frozen=True)
class CreateContainer:
    """Prepare a bundle: mount the rootfs device (read-only lower + tmpfs upper)."""
    container_id: str
    spec: dict[str, object]        # OCI runtime config; root.path is set by the agent
    rootfs_serial: str             # virtio-blk serial of the disk holding the image
    rootfs_fstype: str = "erofs"
    user: str = ""                 # "name", "uid" or "uid:gid", resolved in the rootfs


@dataclass(frozen=True)
class StartContainer:
    """Run the container's process; its stdio becomes ``stream``."""
    container_id: str
    stream: int
    stdin: bool = False


@dataclass(frozen=True)
class ExecProcess:
    """Run another process in a running container (``runc exec``)."""
    container_id: str
    stream: int
    process: dict[str, object]     # OCI process object
    stdin: bool = False
    user: str = ""


@dataclass(frozen=True)
class SignalProcess:
    stream: int
    signal: int


@dataclass(frozen=True)
class ResizeTty:
    stream: int
    rows: int
    cols: int


@dataclass(frozen=True)
class WaitProcess:
    stream: int


@dataclass(frozen=True)
class SetClock:
    epoch_ns: int


@dataclass(frozen=True)
class GuestInfo:
    kernel: str
    uptime: float
    mem_total_kb: int
    mem_free_kb: int
    cpus: int
    python: str
    runc: str


OPS: dict[str, type] = {
    "ping": type(None), "guest_info": type(None), "shutdown": type(None),
    "create_container": CreateContainer, "start_container": StartContainer,
    "exec": ExecProcess, "signal": SignalProcess, "resize": ResizeTty,
    "wait": WaitProcess, "set_clock": SetClock,
}
