"""The guest's serial console, drained from a pipe into a size-capped log.

QEMU's ``-chardev file`` appends without limit: a guest (a privileged container
writing to /dev/ttyS0 or /dev/kmsg) could fill the host's /run, which is RAM on
most hosts. Instead QEMU writes into a pipe that a thread of the VM's owner
drains into ``console.log``; when that file reaches half the cap it becomes
``console.log.1`` (replacing the older half) and a new one starts, so the two
never hold more than the cap and always hold the latest output: the tail that
boot-failure messages quote. A thread, not the event loop: a busy or blocked
loop must not stall the guest's console writes (QEMU blocks on a full pipe).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DEFAULT_CAP = 2 * 1024 * 1024  # bytes of console output kept, both halves together
TAIL_BYTES = 16384  # read for a tail: a screenful of lines, however long


@dataclass(frozen=True)
class ConsoleFiles:
    """Where one VM's console output goes: ``path`` (newest) and ``path.1``."""

    path: Path
    cap: int = DEFAULT_CAP

    @property
    def previous(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def tail(self, lines: int) -> str:
        """The last ``lines`` lines, across the rotation."""
        data = b""
        for part in (self.path, self.previous):
            need = TAIL_BYTES - len(data)
            if need <= 0:
                break
            try:
                with part.open("rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, fh.tell() - need))
                    data = fh.read() + data
            except OSError:
                continue
        text = data.decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])


class ConsoleDrain:
    """Owns the pipe QEMU's console writes to and the thread that drains it.

    ``open`` gives the write end for QEMU (inherited under the same number);
    ``spawned`` drops our copy once QEMU has it, so QEMU's exit is our EOF;
    ``close`` waits for the thread (after QEMU is gone) and is idempotent."""

    def __init__(self, files: ConsoleFiles) -> None:
        self.files = files
        self.write_fd = -1
        self._read_fd = -1
        self._thread: threading.Thread | None = None

    def open(self) -> int:
        self._read_fd, self.write_fd = os.pipe()
        self.files.path.parent.mkdir(parents=True, exist_ok=True)
        self.files.previous.unlink(missing_ok=True)
        out = self.files.path.open("wb")  # truncates, as -chardev file did
        self._thread = threading.Thread(target=self._drain, args=(out,), name="vm-console", daemon=True)
        self._thread.start()
        return self.write_fd

    def spawned(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self, timeout: float = 5.0) -> None:
        self.spawned()  # QEMU never started: this was the last write end
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _drain(self, out: BinaryIO) -> None:
        half = max(1, self.files.cap // 2)
        size = 0
        sink: BinaryIO | None = out
        try:
            while True:
                try:
                    data = os.read(self._read_fd, 65536)
                except InterruptedError:
                    continue
                if not data:
                    return
                # Keep draining whatever happens to the file: QEMU blocks on a
                # full pipe, and with it the guest's console writes.
                while data and sink is not None:
                    chunk, data = data[: half - size], data[half - size :]
                    try:
                        sink.write(chunk)
                        sink.flush()  # readable at once: console_tail during boot
                        size += len(chunk)
                        if size >= half:
                            sink.close()
                            os.replace(self.files.path, self.files.previous)
                            sink, size = self.files.path.open("wb"), 0
                    except OSError:
                        with contextlib.suppress(OSError):
                            sink.close()
                        sink = None  # a full or vanished state dir: drop output
        finally:
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()
            os.close(self._read_fd)
