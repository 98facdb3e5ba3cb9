"""The host <-> guest agent wire protocol, shared by client (host) and agent (guest).

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

Messages are small frozen records (``Message``) rather than ``dataclasses``:
importing dataclasses (and inspect behind it) and creating the classes cost
0.26 s of a 1.0 s agent start-up under TCG, measured with -X importtime in
the guest; everything here sits on the cold-start path.
"""

from __future__ import annotations

import json
import struct

PROTOCOL_VERSION = 1
MAGIC = b"VP"
HEADER = struct.Struct("!2sBBII")
MAX_JSON = 64 * 1024
MAX_DATA = 256 * 1024
MAX_ERROR = 4000  # characters of a refusal's message (Response.error) the host shows
STDIN_WINDOW = 1024 * 1024  # stdin bytes in flight before the host waits
PORT_NAME = "org.vmpod.agent"  # virtio-serial port name
VSOCK_PORT = 1024

REQUEST, RESPONSE, EVENT, STDIN, STDOUT, STDERR, CREDIT = range(1, 8)
_KINDS = {REQUEST, RESPONSE, EVENT, STDIN, STDOUT, STDERR, CREDIT}
_JSON_KINDS = {REQUEST, RESPONSE, EVENT}


TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~0.15 s to import in the guest; annotations only
    from typing import TypeVar

    M = TypeVar("M", bound="Message")


class ProtocolViolation(Exception):
    """The peer sent bytes that break the protocol; the channel must be dropped.
    ``frames``: the complete frames that came before the violation in the bytes fed
    (``FrameReader.feed``), still worth handling (a process's last output, its exit)."""

    def __init__(self, message: str, frames: list[tuple[int, int, bytes]] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


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
    return [encode_frame(kind, stream, data[i : i + MAX_DATA]) for i in range(0, len(data), MAX_DATA)]


class FrameReader:
    """Incremental decoder: feed bytes, take complete ``(kind, stream, payload)``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (less than its header + its limit)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """The frames ``data`` completes; a bad header raises ProtocolViolation
        carrying the complete frames before it."""
        self._buf += data
        frames: list[tuple[int, int, bytes]] = []
        while len(self._buf) >= HEADER.size:
            magic, version, kind, stream, length = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolViolation(f"bad frame magic {bytes(magic)!r}", frames)
            if version != PROTOCOL_VERSION:
                raise ProtocolViolation(f"protocol version {version}, expected {PROTOCOL_VERSION}", frames)
            if kind not in _KINDS:
                raise ProtocolViolation(f"unknown frame kind {kind}", frames)
            limit = MAX_JSON if kind in _JSON_KINDS else MAX_DATA
            if length > limit:
                raise ProtocolViolation(f"frame of {length} bytes exceeds {limit}", frames)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, stream, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames


def parse_json(payload: bytes) -> dict[str, object]:
    """A JSON object from a UTF-8 payload (json.loads alone would also take UTF-16
    and UTF-32); anything else is a ProtocolViolation."""
    try:
        obj = json.loads(payload.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        # RecursionError: deeply nested arrays fit in MAX_JSON but blow the stack.
        raise ProtocolViolation(f"invalid JSON payload: {type(err).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation("JSON payload is not an object")
    return obj


def brief(value: object, limit: int = 60) -> str:
    """``repr`` of a peer's value for an error message: one line, at most ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- typed messages ----------------------------------------------------------

_SCALARS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _check(value: object, typ: str, where: str) -> object:
    """Validate ``value`` against a field annotation string; return it normalised."""
    if typ.endswith(" | None"):
        return None if value is None else _check(value, typ[:-7], where)
    if typ in _SCALARS:
        ok = isinstance(value, _SCALARS[typ]) and not (typ != "bool" and isinstance(value, bool))
        if not ok:
            raise ProtocolViolation(f"{where}: expected {typ}, got {type(value).__name__}")
        if isinstance(value, str) and not value.isascii():
            # a lone surrogate ("\ud800": JSON allows the escape) would raise later,
            # when the host prints it; the guest's text is shown, never executed
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return value
    if typ.startswith("tuple[") and typ.endswith(", ...]"):
        if not isinstance(value, list):
            raise ProtocolViolation(f"{where}: expected a list")
        return tuple(_check(v, typ[6:-6], where) for v in value)
    if typ == "dict[str, str]":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ProtocolViolation(f"{where}: expected an object of strings")
        return dict(value)
    if typ == "dict[str, object]":
        if not isinstance(value, dict):
            raise ProtocolViolation(f"{where}: expected an object")
        return dict(value)
    if typ in _NESTED:  # a message inside a message (a JSON object)
        if not isinstance(value, dict):
            raise ProtocolViolation(f"{where}: expected an object")
        return decode(_NESTED[typ], value)
    raise TypeError(f"unsupported field type {typ}")


class Message:
    """A frozen, typed record: fields come from the class annotations (strings,
    checked by ``_check``); class attributes give defaults. A field may hold
    messages of a class marked ``nested = True`` (e.g. ``tuple[NetRoute, ...]``)."""

    __slots__ = ()
    _fields: tuple[tuple[str, str], ...] = ()
    nested = False

    def __init_subclass__(cls) -> None:
        cls._fields = tuple(cls.__dict__.get("__annotations__", {}).items())
        if cls.__dict__.get("nested"):
            _NESTED[cls.__name__] = cls

    def __init__(self, **values: object) -> None:
        for name, _typ in self._fields:
            if name in values:
                value = values.pop(name)
            elif name in type(self).__dict__:
                value = type(self).__dict__[name]
                value = dict(value) if isinstance(value, dict) else value
            else:
                raise TypeError(f"{type(self).__name__} needs field '{name}'")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(values)}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self._fields
        )

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, n)) for n, _ in self._fields))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._fields)
        return f"{type(self).__name__}({inner})"


def decode(cls: type[M], obj: dict[str, object]) -> M:
    """Build message ``cls`` from a JSON object, checking names and types."""
    known = dict(cls._fields)
    unknown = set(obj) - set(known)
    if unknown:
        raise ProtocolViolation(f"{cls.__name__}: unknown fields {brief(sorted(unknown))}")
    args = {
        name: _check(obj[name], typ, f"{cls.__name__}.{name}") for name, typ in known.items() if name in obj
    }
    try:
        return cls(**args)
    except TypeError as err:
        raise ProtocolViolation(f"{cls.__name__}: {err}") from None


_NESTED: dict[str, type[Message]] = {}  # field types that are messages, by class name


def encode(msg: Message) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, _typ in msg._fields:
        out[name] = _plain(getattr(msg, name))
    return out


def _plain(value: object) -> object:
    if isinstance(value, Message):
        return encode(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class Hello(Message):
    """First event of the agent on a fresh connection."""

    protocol: int
    agent_version: str
    kernel: str
    uptime: float


class Request(Message):
    id: int
    op: str
    args: dict[str, object] = {}


class Response(Message):
    id: int
    ok: bool
    result: dict[str, object] = {}
    error: str = ""
    error_kind: str = ""


class ExitEvent(Message):
    """A process ended; all of its output frames were sent before this event."""

    event: str
    stream: int
    status: int  # shell convention: 128+N for a signal, 127 command not found
    message: str = ""  # why it failed to start, when it did


# -- operations: arguments (Request.args) and results (Response.result) ---------


class Empty(Message):
    """The result of an operation that answers nothing but success."""


class PingResult(Message):
    uptime: float


class CreateContainer(Message):
    """Prepare a bundle. The rootfs is a disk (erofs/ext4: read-only lower + tmpfs
    upper) or, with ``virtiofs``, a directory of the shared file system used as it
    is (writes reach the host). Host volumes are bind mounts in ``spec`` whose
    sources lie below SHARED_DIR."""

    container_id: str
    spec: dict[str, object]  # OCI runtime config; root.path is set by the agent
    # erofs/ext4: virtio-blk serial of the disk; virtiofs: path below SHARED_DIR
    rootfs_serial: str
    rootfs_fstype: str = "erofs"  # erofs, ext4 or virtiofs ("dir" only in in-process tests)
    user: str = ""  # "name", "uid" or "uid:gid", resolved in the rootfs
    runtime: str = "runc"  # OCI runtime in the guest: "runc" or "crun"
    # namespace type ("ipc", "uts") -> the running container whose namespace it
    # joins (a pod's members share the first container's, as in the engine's pod)
    join_namespaces: dict[str, str] = {}


class ContainerCreated(Message):
    bundle: str  # the bundle directory in the guest


class StartContainer(Message):
    """Run the container's process; its stdio becomes ``stream``."""

    container_id: str
    stream: int
    stdin: bool = False
    # Answer only once the guest runtime has started the process (its pid file exists)
    # or gave up, so that exec/ps/kill right after start find the container.
    wait_started: bool = False


class ExecProcess(Message):
    """Run another process in a running container (``runc exec``)."""

    container_id: str
    stream: int
    process: dict[str, object]  # OCI process object
    stdin: bool = False
    user: str = ""


class ProcessStarted(Message):
    """Result of start_container and exec."""

    pid: int  # the guest OCI runtime's pid (not the container's)
    # False only when wait_started was asked and the runtime gave up before the
    # process ran; its ExitEvent says why.
    started: bool = True


class SignalProcess(Message):
    stream: int
    signal: int


class ResizeTty(Message):
    stream: int
    rows: int
    cols: int


class WaitProcess(Message):
    stream: int


class ExitStatus(Message):
    """Result of wait: the process's status, as in its ExitEvent."""

    status: int


class SetClock(Message):
    epoch_ns: int


class GuestInfo(Message):
    kernel: str
    uptime: float
    mem_total_kb: int
    mem_free_kb: int
    cpus: int
    python: str
    runc: str


class RuntimeCommand(Message):
    """Run the guest OCI runtime on a container: ``<runtime> COMMAND ARGS... ID``."""

    container_id: str
    command: str  # one of RUNTIME_COMMANDS
    args: tuple[str, ...] = ()
    resources: dict[str, object] = {}  # for "update": written to a file, --resources FILE


RUNTIME_COMMANDS = ("ps", "pause", "resume", "kill", "events", "update", "state")


class CommandResult(Message):
    """Outcome of a short helper command in the guest (output size-limited)."""

    status: int
    stdout: str
    stderr: str = ""
    # When status != 0: the message of the command's last error line (an OCI
    # runtime's JSON "msg" or logrus msg="..."), else its last output line.
    error: str = ""


class CheckpointContainer(Message):
    """``runc checkpoint`` of a running container (CRIU in the guest). The images go
    to ``image_dir`` and CRIU's work files (dump.log) to ``work_dir``: directories
    below SHARED_DIR that the host shared writable for this checkpoint."""

    container_id: str
    image_dir: str  # relative to SHARED_DIR
    work_dir: str  # relative to SHARED_DIR
    leave_running: bool = True
    tcp_established: bool = False
    file_locks: bool = False


class RestoreContainer(Message):
    """``runc restore`` of a created container (create_container made its bundle)
    from the CRIU images in ``image_dir``; the restored tree's stdio becomes
    ``stream``, as a started container's."""

    container_id: str
    stream: int
    image_dir: str  # relative to SHARED_DIR
    work_dir: str  # relative to SHARED_DIR (restore.log)
    tcp_established: bool = False
    file_locks: bool = False
    leave_stopped: bool = False  # CRIU leaves every task stopped (SIGSTOP) until SIGCONT


class DumpMemory(Message):
    """Read the memory of process ``pid`` (as the container's pid namespace numbers
    it) of a running container into ``dir`` (relative to SHARED_DIR, shared
    writable for this dump): ``maps.txt`` (its /proc/PID/maps) and one file per
    readable region, ``<start>-<end>.bin`` (16 hex digits each), at most
    ``max_bytes`` in all."""

    container_id: str
    pid: int
    dir: str
    max_bytes: int


class MemoryDumped(Message):
    vm_pid: int  # the process's pid in the VM
    comm: str
    regions: int  # files written
    bytes: int
    unreadable: tuple[str, ...] = ()  # maps lines of readable regions the kernel refused


class LoadModule(Message):
    """insmod a module the host shipped in the initramfs (under MODULES_DIR)."""

    path: str
    params: tuple[str, ...] = ()


class UnloadModule(Message):
    name: str


class KernelLog(Message):
    """Kernel log records after sequence number ``since``."""

    since: int = -1


class KernelLogResult(Message):
    text: str  # "[seconds] message" lines, at most MAX_LOG bytes (the newest)
    last_seq: int
    tainted: int  # /proc/sys/kernel/tainted
    truncated: bool = False


class GetStats(Message):
    container_id: str


class ContainerStats(Message):
    """Usage of the container's cgroup (v2) in the guest; a missing file reads 0."""

    cpu_usage_usec: int
    memory_bytes: int
    pids: int


class SharedMounted(Message):
    path: str  # where the guest sees the host's shared directory


class NetInterface(Message):
    """One NIC of the VM, found by its MAC; brought up with these addresses."""

    nested = True
    mac: str  # xx:xx:xx:xx:xx:xx, the virtio-net device's (the pod veth's) address
    mtu: int = 1500
    addresses: tuple[str, ...] = ()  # "address/prefix", IPv4 or IPv6
    name: str = ""  # rename the interface to this ("": keep the kernel's name)


class NetRoute(Message):
    """A route out of the NIC whose MAC is ``mac``; applied in the order given
    (a gateway outside every prefix needs its own on-link route first)."""

    nested = True
    dest: str  # a network, "10.0.0.0/8"; "0.0.0.0/0" or "::/0" is the default route
    mac: str
    gateway: str = ""  # "": on-link (no gateway)
    metric: int = 0  # 0: the kernel's default


class ConfigureNetwork(Message):
    """Bring up ``lo`` and the VM's NICs, then add the routes (once per VM)."""

    interfaces: tuple[NetInterface, ...]
    routes: tuple[NetRoute, ...] = ()
    hostname: str = ""  # "": leave the guest's hostname alone


class NetworkConfigured(Message):
    names: tuple[str, ...]  # the guest's name for each interface, in order


class ReseedRandom(Message):
    """Mix host randomness into the guest's pool and force a reseed of its CRNG: a
    restored snapshot (a clone) must not go on with its twin's random state."""

    entropy: str  # hex, RESEED_BYTES bytes from the host's CSPRNG


class ProcessInfo(Message):
    """One process the agent relays (a container's init or an exec)."""

    nested = True
    stream: int
    container_id: str
    init: bool  # the container's init process (else an exec)
    running: bool
    status: int = -1  # its exit status once it ended (-1 while it runs)


class ProcessList(Message):
    """What the agent runs: how a host that reconnects (a restored snapshot) adopts it."""

    processes: tuple[ProcessInfo, ...]


RESEED_BYTES = 64

MAX_NICS = 8
MAX_ADDRESSES = 16  # per interface
MAX_ROUTES = 64
MODULES_DIR = "/run/vmpod/modules"  # where /init leaves host-provided modules
CRIU_MODULES_DIR = "/run/vmpod/criu-modules"  # CRIU's modules and their load order ("order")
MAX_OUTPUT = 32 * 1024
CHECKPOINT_TIMEOUT = 900.0  # seconds a CRIU dump or restore may take (TCG is slow)
MEMORY_DUMP_TIMEOUT = 900.0  # seconds a dump_memory may take
SHARED_DIR = "/run/vmpod/shared"  # where the agent mounts the host's shared directory
SHARED_FS_TAG = "vmpod"  # its virtio-fs tag
MAX_LOG = 48 * 1024

OPS: dict[str, tuple[type[Message] | None, type[Message]]] = {
    # op: (Request.args class, None when the op takes no arguments; Response.result class)
    "ping": (None, PingResult),
    "guest_info": (None, GuestInfo),
    "shutdown": (None, Empty),
    "create_container": (CreateContainer, ContainerCreated),
    "start_container": (StartContainer, ProcessStarted),
    "exec": (ExecProcess, ProcessStarted),
    "signal": (SignalProcess, Empty),
    "resize": (ResizeTty, Empty),
    "wait": (WaitProcess, ExitStatus),
    "set_clock": (SetClock, Empty),
    "runtime": (RuntimeCommand, CommandResult),
    "load_module": (LoadModule, CommandResult),
    "unload_module": (UnloadModule, CommandResult),
    "kernel_log": (KernelLog, KernelLogResult),
    "stats": (GetStats, ContainerStats),
    "mount_shared": (None, SharedMounted),  # the host's shared directory (virtio-fs)
    "configure_network": (ConfigureNetwork, NetworkConfigured),
    "criu_check": (None, CommandResult),  # `criu check`: can this guest checkpoint/restore?
    "checkpoint": (CheckpointContainer, CommandResult),
    "restore": (RestoreContainer, ProcessStarted),
    "dump_memory": (DumpMemory, MemoryDumped),  # a process's memory, for forensics
    "reseed_random": (ReseedRandom, Empty),  # after a snapshot restore
    "list_processes": (None, ProcessList),  # after a host reconnect
}
