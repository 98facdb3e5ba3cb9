"""Guest side of the host link: a virtio-serial port, or a vsock listener where the
host has vhost-vsock (kernel command line ``vmpod.channel=vsock``).

Standard library only (runs on the guest's python3).
"""
from __future__ import annotations

import os
import time

from vmpod.agent import protocol as p

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket


class Channel:
    """The host link: a virtio-serial port here, a vsock connection where available."""

    def __init__(self) -> None:
        self.fd = -1
        # socket is imported only for vsock (it costs start-up time under TCG)
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.out = bytearray()
        self.reader = p.FrameReader()

    def open(self) -> None:
        if "vmpod.channel=vsock" in _cmdline():
            import socket
            self.listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            self.listener.bind((socket.VMADDR_CID_ANY, p.VSOCK_PORT))
            self.listener.listen(1)
            return
        for _ in range(100):
            dev = _find_port(p.PORT_NAME)
            if dev:
                self.fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                return
            time.sleep(0.02)
        raise RuntimeError(f"virtio port {p.PORT_NAME} not found")

    def send(self, frame: bytes) -> None:
        self.out += frame


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
