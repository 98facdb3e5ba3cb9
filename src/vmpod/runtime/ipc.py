"""How runtime commands talk to a container's monitor: a unix socket in the state dir.

Messages are length-prefixed JSON objects (u32 big-endian + UTF-8 JSON, at most
MAX_MESSAGE bytes); a message may carry file descriptors (SCM_RIGHTS): that is
how ``exec`` hands its stdio to the monitor. Requests are ``{"op": ...}``;
replies ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; an exec
connection stays open for ``resize``/``signal`` requests and the final
``{"event": "exit", "status": N}``.

Unix socket paths are limited to 107 bytes; longer ones (deep --root dirs,
podman's console sockets) are reached through /proc/self/fd/<dir fd>/<name>.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import struct
from pathlib import Path

from vmpod.runtime.errors import RuntimeCliError

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
_LEN = struct.Struct("!I")


def _short(path: Path, fn: object) -> None:
    """Call ``fn(address)`` with a usable address for ``path`` (bind or connect)."""
    if len(os.fsencode(str(path))) < 100:
        fn(str(path))  # type: ignore[operator]
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    try:
        fn(f"/proc/self/fd/{dfd}/{path.name}")  # type: ignore[operator]
    finally:
        os.close(dfd)


def connect_unix(path: Path, timeout: float | None = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        _short(path, sock.connect)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        path.unlink(missing_ok=True)
        _short(path, sock.bind)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def encode(msg: dict[str, object]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(data)) + data


def send_console(path: str, fd: int, name: str = "/dev/ptmx") -> None:
    """Hand a pty master to a --console-socket the way runc does (SCM_RIGHTS)."""
    try:
        sock = connect_unix(Path(path))
    except OSError as err:
        raise RuntimeCliError(f"cannot connect to console socket {path}: {err.strerror}") from err
    with sock:
        socket.send_fds(sock, [name.encode()], [fd])


def _take_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


class _Framer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def take(self) -> tuple[dict[str, object], list[int]] | None:
        if len(self.buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self.buf)
        if n > MAX_MESSAGE:
            raise ValueError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
        if len(self.buf) < 4 + n:
            return None
        obj = json.loads(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        if not isinstance(obj, dict):
            raise ValueError("message is not a JSON object")
        fds, self.fds = self.fds, []
        return obj, fds


class Client:
    """Blocking client used by the CLI commands."""

    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        try:
            self.sock = connect_unix(path, timeout)
        except OSError as err:
            raise RuntimeCliError(f"cannot reach the container's monitor: {err.strerror}") from err
        self._framer = _Framer()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: dict[str, object], fds: list[int] | None = None) -> None:
        data = encode(msg)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def recv(self) -> dict[str, object]:
        while True:
            got = self._framer.take()
            if got is not None:
                for fd in got[1]:
                    os.close(fd)
                return got[0]
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise RuntimeCliError("the container's monitor did not answer") from None
            except OSError:
                chunk = b""  # reset: the monitor died
            if not chunk:
                raise RuntimeCliError("the container's monitor closed the connection")
            self._framer.buf += chunk

    def request(self, msg: dict[str, object], fds: list[int] | None = None) -> dict[str, object]:
        self.send(msg, fds)
        reply = self.recv()
        if not reply.get("ok"):
            raise RuntimeCliError(str(reply.get("error") or "the monitor refused the request"))
        return reply


def request(path: Path, msg: dict[str, object], timeout: float | None = 30.0) -> dict[str, object]:
    client = Client(path, timeout)
    try:
        return client.request(msg)
    finally:
        client.close()


class Conn:
    """One accepted connection on the monitor's asyncio loop (fd passing included)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._framer = _Framer()
        self._loop = asyncio.get_running_loop()
        self.closed = False

    async def _readable(self) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, lambda: None if fut.done() else fut.set_result(None))
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def recv(self) -> tuple[dict[str, object], list[int]] | None:
        """The next message and the fds that came with it; None at EOF."""
        while True:
            got = self._framer.take()
            if got is not None:
                return got
            await self._readable()
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                continue
            except OSError:
                data, anc = b"", []
            _take_fds(anc, self._framer.fds)
            if not data:
                for fd in self._framer.fds:
                    os.close(fd)
                self._framer.fds = []
                return None
            self._framer.buf += data

    async def send(self, msg: dict[str, object]) -> None:
        if self.closed:
            return
        try:
            await self._loop.sock_sendall(self.sock, encode(msg))
        except OSError:
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self.sock.close()
