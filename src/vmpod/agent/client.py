"""Host side of the agent channel (asyncio). The guest is hostile: every frame is
size-checked by the protocol reader, every JSON message schema-checked, every
request time-limited, and any violation closes the channel for good.

``request`` is the one choke point for RPCs (timeout, logging, latency).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vmpod.agent import protocol as p
from vmpod.errors import AgentError, AgentTimeout, ProtocolError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=p.Message)


@dataclass
class ProcessSink:
    """Where one process's output goes; ``exited`` resolves with the ExitEvent."""

    on_stdout: Callable[[bytes], None]
    on_stderr: Callable[[bytes], None]
    exited: asyncio.Future[p.ExitEvent] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    inflight: int = 0
    credit: asyncio.Event = field(default_factory=asyncio.Event)


class AgentRequestError(AgentError):
    """The agent carried out the request and said no (``kind`` from the guest)."""

    def __init__(self, op: str, message: str, kind: str) -> None:
        super().__init__(f"guest agent refused {op}: {message}", kind=kind, op=op)
        self.kind = kind


async def _open(channel: Path | tuple[int, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(channel, Path):
        return await asyncio.open_unix_connection(str(channel), limit=p.MAX_DATA * 2)
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, channel)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=p.MAX_DATA * 2)


class AgentClient:
    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[p.Response]] = {}
        self._sinks: dict[int, ProcessSink] = {}
        self._next_id = 1
        self._hello: asyncio.Future[p.Hello] | None = None
        # a reconnect (restored snapshot): frames the guest queued for its previous
        # host, before this connection's hello, are dropped instead of refused
        self._resync = False
        self._closed: BaseException | None = None
        self.hello: p.Hello | None = None
        # Called once with the error when the channel fails (a ProtocolError: the guest
        # is hostile or broken), so the owner can stop the VM without waiting for a caller.
        self.on_failure: Callable[[AgentError], None] | None = None

    async def connect(
        self,
        channel: Path | tuple[int, int],
        timeout: float,
        check_alive: Callable[[], None],
        *,
        resync: bool = False,
    ) -> p.Hello:
        """Connect and wait for the agent's hello. ``channel`` is the unix socket of a
        virtio-serial port, or ``(cid, port)`` for vsock. ``check_alive`` raises when
        the VM died, so a crashed boot fails at once instead of at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._resync = resync
        while True:
            check_alive()
            try:
                self._reader, self._writer = await _open(channel)
                break
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError):
                # vsock refuses until the agent listens; the unix socket appears with QEMU
                if loop.time() > deadline:
                    raise AgentTimeout(
                        f"guest agent did not answer within {timeout:g}s (no connection to {channel})"
                    ) from None
                await asyncio.sleep(0.005)
        self._hello = loop.create_future()
        self._task = asyncio.create_task(self._read_loop())
        try:
            if resync:
                self.hello = await self._resync_agent(deadline, check_alive)
                return self.hello
            while not self._hello.done():
                check_alive()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AgentTimeout(f"guest agent did not answer within {timeout:g}s")
                await asyncio.wait({self._hello}, timeout=min(0.05, remaining))
            self.hello = self._hello.result()
        except BaseException:
            await self.close()
            raise
        return self.hello

    async def _resync_agent(self, deadline: float, check_alive: Callable[[], None]) -> p.Hello:
        """Sync with an agent that greeted a previous host (a restored snapshot): it
        greets again only if it noticed that host go, so ping it until a ping
        answers or a hello comes. Request ids start far from the previous host's."""
        assert self._hello is not None
        loop = asyncio.get_running_loop()
        self._next_id = secrets.randbelow(1 << 30) + (1 << 30)
        while not self._hello.done():
            check_alive()
            if loop.time() > deadline:
                raise AgentTimeout("the restored guest agent did not answer")
            ping = asyncio.ensure_future(self._typed(p.PingResult, "ping", timeout=1.0))
            either: set[asyncio.Future[Any]] = {ping, self._hello}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not ping.done():
                ping.cancel()
            elif ping.exception() is None:
                uptime = ping.result().uptime
                return p.Hello(protocol=p.PROTOCOL_VERSION, agent_version="", kernel="", uptime=uptime)
            elif not isinstance(ping.exception(), AgentTimeout):
                raise ping.exception()  # type: ignore[misc]
        return self._hello.result()

    async def request(
        self, op: str, args: dict[str, object] | None = None, timeout: float = 30.0
    ) -> dict[str, object]:
        """Send one request and wait for its response."""
        if self._closed is not None:
            raise AgentError(f"guest agent channel is closed: {self._closed}")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[p.Response] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        start = time.monotonic()
        try:
            self._send(p.encode_json(p.REQUEST, rid, {"id": rid, "op": op, "args": args or {}}))
            resp = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AgentTimeout(f"guest agent did not answer '{op}' within {timeout:g}s", op=op) from None
        finally:
            self._pending.pop(rid, None)
            log.debug("agent %s took %.1f ms", op, (time.monotonic() - start) * 1000)
        if not resp.ok:  # (the agent keeps its messages shorter; a hostile one may not)
            raise AgentRequestError(op, resp.error[: p.MAX_ERROR], resp.error_kind[:64])
        return resp.result

    async def call(self, op: str, args: p.Message | None = None, timeout: float = 30.0) -> p.Message:
        """One op of ``protocol.OPS``: ``args`` must be its argument record (None for
        ops without arguments); the result is decoded (schema-checked) as its result
        record. The typed methods below are what callers use."""
        if op not in p.OPS:
            raise AgentError(f"unknown agent operation {op!r}")
        args_cls, result_cls = p.OPS[op]
        if (args is None) != (args_cls is None) or (args is not None and type(args) is not args_cls):
            raise TypeError(f"{op} takes {args_cls.__name__ if args_cls else 'no arguments'}")
        result = await self.request(op, p.encode(args) if args is not None else None, timeout)
        try:
            return p.decode(result_cls, result)
        except p.ProtocolViolation as err:
            raise ProtocolError(f"guest sent a malformed '{op}' result: {err}") from None

    async def _typed(self, cls: type[M], op: str, args: p.Message | None = None, timeout: float = 30.0) -> M:
        result = await self.call(op, args, timeout)
        assert isinstance(result, cls)
        return result

    # -- typed operations (one per protocol.OPS entry) ---------------------------
    async def ping(self) -> p.PingResult:
        return await self._typed(p.PingResult, "ping")

    async def guest_info(self) -> p.GuestInfo:
        return await self._typed(p.GuestInfo, "guest_info")

    async def shutdown(self, timeout: float = 2.0) -> None:
        await self._typed(p.Empty, "shutdown", None, timeout)

    async def set_clock(self, args: p.SetClock) -> None:
        await self._typed(p.Empty, "set_clock", args)

    async def create_container(self, args: p.CreateContainer) -> p.ContainerCreated:
        return await self._typed(p.ContainerCreated, "create_container", args, timeout=60)

    async def start_container(self, args: p.StartContainer, timeout: float = 30.0) -> p.ProcessStarted:
        return await self._typed(p.ProcessStarted, "start_container", args, timeout)

    async def exec(self, args: p.ExecProcess) -> p.ProcessStarted:
        return await self._typed(p.ProcessStarted, "exec", args)

    async def signal(self, args: p.SignalProcess) -> None:
        await self._typed(p.Empty, "signal", args)

    async def resize(self, args: p.ResizeTty) -> None:
        await self._typed(p.Empty, "resize", args)

    async def wait(self, args: p.WaitProcess, timeout: float = 30.0) -> p.ExitStatus:
        return await self._typed(p.ExitStatus, "wait", args, timeout)

    async def runtime(self, args: p.RuntimeCommand) -> p.CommandResult:
        return await self._typed(p.CommandResult, "runtime", args, timeout=60)

    async def load_module(self, args: p.LoadModule) -> p.CommandResult:
        return await self._typed(p.CommandResult, "load_module", args, timeout=60)

    async def unload_module(self, args: p.UnloadModule) -> p.CommandResult:
        return await self._typed(p.CommandResult, "unload_module", args, timeout=60)

    async def kernel_log(self, args: p.KernelLog) -> p.KernelLogResult:
        return await self._typed(p.KernelLogResult, "kernel_log", args)

    async def stats(self, args: p.GetStats) -> p.ContainerStats:
        return await self._typed(p.ContainerStats, "stats", args)

    async def criu_check(self) -> p.CommandResult:
        return await self._typed(p.CommandResult, "criu_check", None, timeout=120)

    async def checkpoint(self, args: p.CheckpointContainer) -> p.CommandResult:
        return await self._typed(p.CommandResult, "checkpoint", args, timeout=p.CHECKPOINT_TIMEOUT + 30)

    async def restore(self, args: p.RestoreContainer) -> p.ProcessStarted:
        return await self._typed(p.ProcessStarted, "restore", args, timeout=p.CHECKPOINT_TIMEOUT + 30)

    async def dump_memory(self, args: p.DumpMemory) -> p.MemoryDumped:
        return await self._typed(p.MemoryDumped, "dump_memory", args, timeout=p.MEMORY_DUMP_TIMEOUT + 30)

    async def reseed_random(self, args: p.ReseedRandom) -> None:
        await self._typed(p.Empty, "reseed_random", args)

    async def list_processes(self) -> p.ProcessList:
        return await self._typed(p.ProcessList, "list_processes")

    async def mount_shared(self) -> p.SharedMounted:
        return await self._typed(p.SharedMounted, "mount_shared", None, timeout=30)

    async def configure_network(self, args: p.ConfigureNetwork) -> p.NetworkConfigured:
        return await self._typed(p.NetworkConfigured, "configure_network", args, timeout=30)

    def attach(self, stream: int, sink: ProcessSink) -> None:
        self._sinks[stream] = sink

    async def write_stdin(self, stream: int, data: bytes) -> None:
        """Forward stdin, waiting for guest credit beyond the window."""
        sink = self._sinks[stream]
        for i in range(0, len(data), p.MAX_DATA):
            chunk = data[i : i + p.MAX_DATA]
            while sink.inflight + len(chunk) > p.STDIN_WINDOW and not sink.exited.done():
                sink.credit.clear()
                await sink.credit.wait()
            if self._closed is not None:
                raise AgentError(f"guest agent channel is closed: {self._closed}")
            if sink.exited.done():
                return
            sink.inflight += len(chunk)
            self._send(p.encode_frame(p.STDIN, stream, chunk))
            await self._drain()

    def close_stdin(self, stream: int) -> None:
        self._send(p.encode_frame(p.STDIN, stream, b""))

    def _send(self, frame: bytes) -> None:
        if self._writer is None or self._closed is not None:
            raise AgentError(f"guest agent channel is closed: {self._closed}")
        self._writer.write(frame)

    async def _drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        frames = p.FrameReader()
        try:
            while True:
                data = await self._reader.read(1 << 16)
                if not data:
                    raise AgentError("guest agent channel closed (the VM stopped?)")
                try:
                    batch = frames.feed(data)
                except p.ProtocolViolation as err:
                    for kind, stream, payload in err.frames:  # what came before the bad header
                        self._dispatch(kind, stream, payload)
                    raise
                for kind, stream, payload in batch:
                    self._dispatch(kind, stream, payload)
        except p.ProtocolViolation as err:
            self._fail(ProtocolError(f"guest broke the agent protocol: {err}"))
        except AgentError as err:
            self._fail(err)
        except (OSError, asyncio.IncompleteReadError) as err:
            self._fail(AgentError(f"guest agent channel failed: {err}"))
        except Exception as err:  # anything else the guest provokes is a violation too
            self._fail(
                ProtocolError(f"guest broke the agent protocol: {type(err).__name__}: {p.brief(str(err))}")
            )

    def _dispatch(self, kind: int, stream: int, payload: bytes) -> None:
        if self._resync and kind in (p.STDOUT, p.STDERR, p.CREDIT) and stream not in self._sinks:
            return  # meant for the previous host (see _resync)
        if kind in (p.STDOUT, p.STDERR):
            sink = self._sinks.get(stream)
            if sink is None:
                raise p.ProtocolViolation(f"output for unknown stream {stream}")
            if sink.exited.done():  # the guest sends all output before the exit event
                raise p.ProtocolViolation(f"output for stream {stream} after its exit")
            (sink.on_stdout if kind == p.STDOUT else sink.on_stderr)(payload)
        elif kind == p.CREDIT:
            sink = self._sinks.get(stream)
            if sink is None or len(payload) != 4:
                raise p.ProtocolViolation("bad credit frame")
            (n,) = struct.unpack("!I", payload)
            sink.inflight = max(0, sink.inflight - n)
            sink.credit.set()
        elif kind == p.RESPONSE:
            resp = p.decode(p.Response, p.parse_json(payload))
            fut = self._pending.get(resp.id)
            if fut is None:
                log.debug("late or unknown response %d dropped", resp.id)
            elif not fut.done():
                fut.set_result(resp)
        elif kind == p.EVENT:
            self._on_event(p.parse_json(payload))
        else:
            raise p.ProtocolViolation(f"unexpected frame kind {kind} from guest")

    def _on_event(self, obj: dict[str, object]) -> None:
        event = obj.get("event")
        if event == "hello":
            hello = p.decode(p.Hello, {k: v for k, v in obj.items() if k != "event"})
            if hello.protocol != p.PROTOCOL_VERSION:
                raise p.ProtocolViolation(f"agent speaks protocol {hello.protocol}")
            if self._resync and self._hello is not None:  # (see _resync_agent)
                if not self._hello.done():
                    self._hello.set_result(hello)
                return
            if self._hello is None or self._hello.done():  # one per connection, first
                raise p.ProtocolViolation("a second hello (did the guest agent restart?)")
            self._hello.set_result(hello)
        elif event == "exit":
            ev = p.decode(p.ExitEvent, obj)
            if not 0 <= ev.status <= 255:
                raise p.ProtocolViolation(f"exit status {ev.status} out of range")
            sink = self._sinks.get(ev.stream)
            if sink is not None and not sink.exited.done():
                sink.exited.set_result(ev)
                sink.credit.set()
        else:
            raise p.ProtocolViolation(f"unknown event {p.brief(event)}")

    def _fail(self, err: AgentError) -> None:
        self._closed = err
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        for sink in self._sinks.values():
            if not sink.exited.done():
                sink.exited.set_exception(err)
            sink.credit.set()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(err)
        if self._writer is not None:
            self._writer.close()
        if self.on_failure is not None:
            self.on_failure(err)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._writer.close()
        self._closed = self._closed or AgentError("closed by host")
