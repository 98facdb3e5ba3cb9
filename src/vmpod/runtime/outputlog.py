"""A container's output log: JSON lines (docker's json-file style), size-capped and
rotated, and readers that follow it across rotation.

``container.log`` is the live file; ``container.log.1`` .. ``.N-1`` are older
ones (``keep`` files in all). Each line is ``{"time": RFC3339, "stream":
"stdout"|"stderr", "log": TEXT}``; a chunk is split at newlines, so a line holds
at most one line of output (undecodable bytes become U+FFFD). Standard library
only: the monitor writes it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 3
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class LogSink:
    """Where the monitor writes a container's output instead of (or besides) its fds."""

    path: str
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP  # files in all, the live one included
    tee: bool = False  # also write to the monitor's stdout/stderr (foreground runs)


@dataclass(frozen=True)
class Entry:
    time: str
    stream: str
    text: str


def _stamp() -> str:
    t = time.time_ns()
    return datetime.fromtimestamp(t // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{t % 10**9:09d}Z"


def rotated(path: Path, index: int) -> Path:
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


class RotatingLog:
    """Appends entries to ``path``; past ``max_bytes`` the files shift by one
    (the oldest beyond ``keep`` is dropped). Thread-safe; errors drop output
    (a full disk must not kill the container), ``failed`` tells."""

    def __init__(self, sink: LogSink) -> None:
        if sink.max_bytes < 1024 or sink.keep < 1:
            raise ValueError("log files need at least 1 KiB and one file")
        self.sink = sink
        self.path = Path(sink.path)
        self.failed = False
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, stream: str, data: bytes) -> None:
        stamp = _stamp()
        text = data.decode("utf-8", errors="replace")
        lines = b"".join(
            json.dumps({"time": stamp, "stream": stream, "log": part}).encode() + b"\n"
            for part in text.splitlines(keepends=True)
        )
        with self._lock:
            try:
                if self._size and self._size + len(lines) > self.sink.max_bytes:
                    self._rotate()
                os.write(self._fd, lines)
                self._size += len(lines)
            except OSError:
                self.failed = True

    def writer(self, stream: str) -> Callable[[bytes], None]:
        return lambda data: self.write(stream, data)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        rotated(self.path, self.sink.keep - 1).unlink(missing_ok=True)
        for i in range(self.sink.keep - 1, 0, -1):
            src = rotated(self.path, i - 1)
            if src.exists():
                os.rename(src, rotated(self.path, i))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def parse(line: bytes) -> Entry | None:
    """One log line as an Entry; None for a torn or foreign line."""
    try:
        obj = json.loads(line)
        return Entry(str(obj["time"]), str(obj["stream"]), str(obj["log"]))
    except (ValueError, KeyError, TypeError):
        return None


def read(path: Path, keep: int = DEFAULT_KEEP) -> Iterator[Entry]:
    """Every entry still kept, oldest first."""
    for i in range(keep - 1, -1, -1):
        try:
            with open(rotated(path, i), "rb") as fh:
                for line in fh:
                    if (e := parse(line)) is not None:
                        yield e
        except FileNotFoundError:
            continue


def follow(
    path: Path, alive: Callable[[], bool], keep: int = DEFAULT_KEEP, poll: float = 0.1
) -> Iterator[Entry]:
    """The kept entries, then new ones as they come, across rotations, until
    ``alive()`` is false and everything written before is read."""
    yield from _old(path, keep)
    fh = _open(path)
    try:
        while True:
            if fh is not None:
                yield from _complete(fh)
                if _replaced(fh, path):  # rotated: the rest of the old file, then the new
                    yield from _complete(fh)
                    fh.close()
                    fh = _open(path)
                    continue
            if not alive():  # what was written before the end is still read
                if fh is None:
                    if (fh := _open(path)) is None:
                        return
                    continue
                yield from _complete(fh)
                if not _replaced(fh, path):
                    return
                continue
            time.sleep(poll)
    finally:
        if fh is not None:
            fh.close()


def _complete(fh: BinaryIO) -> Iterator[Entry]:
    """Whole lines from ``fh``; a line still being written is left for later."""
    while line := fh.readline():
        if not line.endswith(b"\n"):
            fh.seek(-len(line), os.SEEK_CUR)
            return
        if (e := parse(line)) is not None:
            yield e


def _old(path: Path, keep: int) -> Iterator[Entry]:
    for i in range(keep - 1, 0, -1):
        try:
            with open(rotated(path, i), "rb") as fh:
                yield from (e for ln in fh if (e := parse(ln)) is not None)
        except FileNotFoundError:
            continue


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _replaced(fh: BinaryIO, path: Path) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return True
