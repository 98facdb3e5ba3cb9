"""Guest side of the host link: a virtio-serial port, a vsock listener where the host
has vhost-vsock (kernel command line ``vmpod.channel=vsock``), or an already
connected stream socket (in-process tests).

Standard library only; socket is imported only for vsock (it costs start-up
time under TCG).
"""

from __future__ import annotations

import errno
import os
import select
import time

from vmpod.agent import protocol as p
from vmpod.agent.guest.errors import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

_EOF_RETRY = 0.1  # virtio-serial reads EOF while the host is away: look again then


class Channel:
    """Frames to the host (buffered in ``out``, written by the loop) and from it."""

    def __init__(
        self, fd: int = -1, *, eof_closes: bool = False, listener: socket.socket | None = None
    ) -> None:
        self.fd = fd
        self.listener = listener  # vsock: connections arrive through accept()
        self.conn: socket.socket | None = None
        self.eof_closes = eof_closes  # a socket's EOF is final, a port's is not
        self.closed = False
        self.out = bytearray()
        self.reader = p.FrameReader()
        self.paused_until = 0.0
        # A port's host went away (EOF): output queued for it is dropped (a frame
        # half-written to the old host would garble the next) and a fresh hello
        # greets whoever connects next: a restored snapshot's new host.
        self.host_away = False
        self.rehello = False

    def send(self, frame: bytes) -> None:
        self.out += frame

    def respond(self, rid: int, result: p.Message) -> None:
        resp = p.Response(id=rid, ok=True, result=p.encode(result))
        self.send(p.encode_json(p.RESPONSE, rid, p.encode(resp)))

    def refuse(self, rid: int, error: str, kind: str) -> None:
        resp = p.Response(id=rid, ok=False, error=error[:4000], error_kind=kind)
        self.send(p.encode_json(p.RESPONSE, rid, p.encode(resp)))

    def mask(self, now: float) -> int:
        """What to wait for: writable while output is queued, readable unless paused."""
        mask = select.EPOLLOUT if self.out else 0
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
        if not self.paused_until:
            mask |= select.EPOLLIN
        return mask

    def write_ready(self) -> bool:
        """Write what the fd takes; False when the peer is gone."""
        try:
            n = os.write(self.fd, self.out)
            del self.out[:n]
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            return False
        return True

    def read_ready(self) -> list[tuple[int, int, bytes]]:
        """Read once; the complete frames. Bad input is dropped: the reader restarts."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            if self.eof_closes:
                self.closed = True
            else:
                self.paused_until = time.monotonic() + _EOF_RETRY
                self.reader = p.FrameReader()
                if not self.host_away:
                    self.host_away = self.rehello = True
                    self.out.clear()
            return []
        self.host_away = False
        try:
            return self.reader.feed(data)
        except p.ProtocolViolation as err:
            log(f"dropping bad input from host: {err}")
            self.reader = p.FrameReader()
            return []

    def accept(self) -> None:
        """vsock: take the next connection, replacing the current one."""
        assert self.listener is not None
        conn, _ = self.listener.accept()
        if self.conn is not None:
            self.conn.close()
        conn.setblocking(False)
        self.conn, self.fd = conn, conn.fileno()
        self.reader = p.FrameReader()
        self.out.clear()  # a frame half-written to the old connection would garble the new

    def flush(self, timeout: float) -> None:
        """Write the queued output, waiting up to ``timeout`` seconds for the peer."""
        if self.fd < 0:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        deadline = time.monotonic() + timeout
        while self.out and time.monotonic() < deadline:
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if ready and not self.write_ready():
                return

    def close(self) -> None:
        for sock in (self.conn, self.listener):
            if sock is not None:
                sock.close()
        if self.conn is None and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def socket_channel(fd: int) -> Channel:
    """A channel over a connected stream socket the caller hands over (tests)."""
    os.set_blocking(fd, False)
    return Channel(fd, eof_closes=True)


def guest_channel() -> Channel:
    """The real guest's channel: vsock when the kernel command line asks, else the
    virtio-serial port named PORT_NAME (it may take a moment to appear)."""
    if "vmpod.channel=vsock" in _cmdline():
        import socket

        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, p.VSOCK_PORT))
        listener.listen(1)
        return Channel(listener=listener)
    for _ in range(100):
        dev = _find_port(p.PORT_NAME)
        if dev:
            return Channel(os.open(dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        time.sleep(0.02)
    raise RuntimeError(f"virtio port {p.PORT_NAME} not found")


def _find_port(name: str) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for port in entries:
        try:
            with open(f"{base}/{port}/name") as fh:
                if fh.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


def _cmdline() -> str:
    try:
        with open("/proc/cmdline") as fh:
            return fh.read()
    except OSError:
        return ""
