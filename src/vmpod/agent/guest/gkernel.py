"""Guest side: kernel log, module names, uptime and memory. Standard library only."""

from __future__ import annotations

import os

from vmpod.agent.protocol import KernelLogResult

MODULE_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def kernel_log(since: int, limit: int) -> KernelLogResult:
    """Kernel log records with sequence number > ``since`` (newest ``limit`` bytes)."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    lines: list[str] = []
    last = since
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while reading; go on
                continue
            head, _, msg = rec.decode(errors="replace").partition(";")
            fields = head.split(",")
            if len(fields) < 3 or not fields[1].isdigit():
                continue
            seq = int(fields[1])
            if seq <= since:
                continue
            last = seq
            usec = int(fields[2]) if fields[2].isdigit() else 0
            text = msg.split("\n")[0]
            lines.append(f"[{usec / 1e6:12.6f}] {text}")
    finally:
        os.close(fd)
    out = "\n".join(lines)
    truncated = len(out.encode()) > limit
    if truncated:
        out = out.encode()[-limit:].decode(errors="replace")
    try:
        with open("/proc/sys/kernel/tainted") as fh:
            tainted = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        tainted = 0
    return KernelLogResult(text=out, last_seq=last, tainted=tainted, truncated=truncated)


def uptime() -> float:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError):
        return 0.0


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB, by key."""
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out
