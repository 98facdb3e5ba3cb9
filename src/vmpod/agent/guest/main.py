"""The real guest's entry point: /opt/vmpod/agent.py runs ``main()`` as PID 1.

Standard library only.
"""

from __future__ import annotations

import os
import time

from vmpod.agent.guest.channel import guest_channel
from vmpod.agent.guest.config import AgentConfig
from vmpod.agent.guest.errors import log
from vmpod.agent.guest.server import Agent


def main() -> None:
    os.umask(0o022)
    os.environ["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    config = AgentConfig()
    _loopback_up()
    try:
        Agent(guest_channel(), config).serve()
    except BaseException as err:  # PID 1 exiting panics the kernel: say why first
        log(f"fatal: {type(err).__name__}: {err}")
        import traceback

        traceback.print_exc()
        os.sync()
        os.execv(config.busybox, [config.busybox, "poweroff", "-f"])
    _idle()


def _loopback_up() -> None:
    """``lo`` up, as every container (even with no network) expects; an ioctl, not
    a busybox run (~15 ms under TCG)."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, req))[1]
            fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
    except OSError as err:
        log(f"cannot bring lo up: {err}")


def _idle() -> None:
    """After shutdown the host quits QEMU; until then PID 1 must not exit (the kernel
    would panic), so it only reaps what is left."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(3600)
