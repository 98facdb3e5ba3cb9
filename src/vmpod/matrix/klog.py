"""The guest's kernel log, read while a kernel's steps run and judged as it comes.

The agent answers each read with at most ``MAX_LOG`` bytes (the newest records
after ``since``). Judging one read at the end saw only the last 48 KiB: a BUG
followed by a flood was lost. Reading every second and judging each chunk sees
every record the guest kept; a read that still came back truncated is noted,
and then the console (which the kernel writes its errors to) is judged too.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from vmpod.errors import VmpodError
from vmpod.matrix.capped import CappedOutput
from vmpod.matrix.verdict import LogScanner, Verdict
from vmpod.sandbox import KernelLogResult

POLL_INTERVAL = 1.0
DMESG_HEAD = 1 << 20  # bytes of dmesg.log kept from the start (the first BUG), then a tail
DMESG_TAIL = 256 << 10
_MAX_PAGES = 64  # reads in a row while the agent says it left records out


class _Guest(Protocol):
    async def kernel_log(self, since: int = -1) -> KernelLogResult: ...


class KernelLogTap:
    """Reads ``sandbox``'s kernel log from :meth:`begin` on; bounded memory."""

    def __init__(self, sandbox: _Guest, interval: float | None = None) -> None:
        self.sandbox = sandbox
        self.interval = POLL_INTERVAL if interval is None else interval
        self.scanner = LogScanner()
        self.text = CappedOutput(DMESG_HEAD, DMESG_TAIL, what="kernel log")
        self.since = -1
        self.tainted = 0
        self.lost = False  # a read left records out (more than MAX_LOG between reads)
        self.complete = False  # the last read after the steps succeeded
        self._lock = asyncio.Lock()

    async def begin(self) -> None:
        """Skip what the kernel printed while booting: the module is not loaded yet."""
        self.since = (await self.sandbox.kernel_log()).last_seq

    async def read(self) -> None:
        """Judge every record since the last read (raises when the guest is gone)."""
        async with self._lock:
            for _ in range(_MAX_PAGES):
                r = await self.sandbox.kernel_log(self.since)
                if r.text:
                    self.scanner.feed(r.text)
                    self.text.write(r.text.encode() + b"\n")
                self.since, self.tainted = max(self.since, r.last_seq), r.tainted
                if not r.truncated:
                    return
                self.lost = True

    async def poll(self) -> None:
        """Read every ``interval`` until cancelled; a failed read is left to the
        steps (which see the same dead guest) and the final :meth:`finish`."""
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(VmpodError):
                await self.read()

    async def finish(self) -> None:
        await self.read()
        self.complete = True

    def verdict(self, console: str) -> Verdict:
        """The verdict over everything read; the console is judged too when the
        kernel log is incomplete (the guest died, hung or flooded its log)."""
        if not self.complete or self.lost:
            self.scanner.feed(console)
        self.scanner.taint(self.tainted)
        return self.scanner.verdict()

    def notes(self) -> list[str]:
        out = []
        if self.lost:
            out.append("kernel log: more than 48 KiB between two reads, older lines lost; console judged too")
        if self.text.dropped:
            out.append(self.text.note() + " in dmesg.log")
        return out
