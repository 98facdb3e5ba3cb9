"""A dumped process's memory, as CRIU wrote it: ``pagemap-<pid>.img`` (decoded by
pycriu) lists runs of pages by virtual address; the runs whose pages were dumped
are stored back to back, 4 KiB a page, in ``pages-<pages_id>.img`` (raw bytes, no
framing: nothing to decode). Reading and searching map a virtual address to its
offset in that file. Every number comes from a hostile archive: runs must be
page-aligned, inside the 64-bit space and inside the pages file.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import ForensicsError

PAGE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4  # pagemap entry flags (criu/pagemap.proto)
MAX_RUNS = 1 << 20  # pagemap entries of one process
MAX_READ = 1 << 20  # bytes one read (argv, environment) may take
CONTEXT = 24  # bytes shown each side of a search hit
_ADDR_LIMIT = 1 << 64


@dataclass(frozen=True)
class Run:
    """``size`` bytes at virtual address ``vaddr``, at ``offset`` in the pages file."""

    vaddr: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.vaddr + self.size


@dataclass(frozen=True)
class Hit:
    address: int
    match: bytes
    before: bytes
    after: bytes


def _int(entry: dict[str, object], key: str, what: str, default: int | None = None) -> int:
    value = entry.get(key, default)
    if type(value) is not int or value < 0:
        raise ForensicsError(f"{what}: '{key}' is not a non-negative integer")
    return value


def runs_of(entries: list[object], pages_size: int, what: str) -> tuple[int, tuple[Run, ...]]:
    """(pages_id, runs present in the pages file) of a decoded pagemap image;
    adjacent runs are merged so that a search finds what straddles them."""
    if not entries or not isinstance(entries[0], dict):
        raise ForensicsError(f"{what}: no pagemap header")
    if len(entries) > MAX_RUNS:
        raise ForensicsError(f"{what}: more than {MAX_RUNS} entries")
    pages_id = _int(entries[0], "pages_id", what)
    runs: list[Run] = []
    offset = 0
    for entry in entries[1:]:
        if not isinstance(entry, dict):
            raise ForensicsError(f"{what}: an entry is not an object")
        vaddr, nr = _int(entry, "vaddr", what), _int(entry, "nr_pages", what)
        if "flags" in entry:
            present = bool(_int(entry, "flags", what) & PE_PRESENT)
        else:  # images before CRIU 3.x's flags: in_parent or here
            present = not entry.get("in_parent")
        size = nr * PAGE
        if vaddr % PAGE or nr == 0 or vaddr + size > _ADDR_LIMIT:
            raise ForensicsError(f"{what}: entry at {vaddr:#x} ({nr} pages) is not a valid range")
        if not present:
            continue  # in a parent image (pre-dump) or lazy: not in this pages file
        if offset + size > pages_size:
            raise ForensicsError(f"{what} lists more pages than its pages-{pages_id}.img holds")
        last = runs[-1] if runs else None
        if last is not None and last.end == vaddr and last.offset + last.size == offset:
            runs[-1] = Run(last.vaddr, last.size + size, last.offset)
        else:
            runs.append(Run(vaddr, size, offset))
        offset += size
    return pages_id, tuple(runs)


class Memory:
    """One process's dumped pages: ``read`` a virtual range, ``search`` them all."""

    def __init__(self, pages: Path, runs: tuple[Run, ...]) -> None:
        self.pages = pages
        self.runs = tuple(sorted(runs, key=lambda r: r.vaddr))

    @classmethod
    def load(cls, root: Path, pagemap_entries: list[object], what: str) -> Memory:
        """From a decoded ``pagemap-N.img`` and the pages image it names below ``root``."""
        head = pagemap_entries[0] if pagemap_entries else None
        pages_id = _int(head, "pages_id", what) if isinstance(head, dict) else -1
        path = root / f"pages-{pages_id}.img"
        try:
            st = path.lstat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ForensicsError(f"{what} names pages-{pages_id}.img, which is not in the archive")
        _, runs = runs_of(pagemap_entries, st.st_size, what)
        return cls(path, runs)

    def read(self, address: int, size: int) -> bytes | None:
        """``size`` bytes at ``address`` (at most MAX_READ); None unless all were dumped."""
        size = min(size, MAX_READ)
        out = bytearray()
        with open(self.pages, "rb") as fh:
            for run in self.runs:
                if run.end <= address or size <= 0:
                    continue
                if run.vaddr > address:
                    return None  # a hole: those pages were not dumped
                take = min(size, run.end - address)
                fh.seek(run.offset + address - run.vaddr)
                chunk = fh.read(take)
                if len(chunk) != take:
                    return None
                out += chunk
                address, size = address + take, size - take
        return bytes(out) if size <= 0 else None

    def search(self, pattern: re.Pattern[bytes], limit: int) -> Iterator[Hit]:
        """At most ``limit`` matches of ``pattern`` (within one run of pages each)."""
        if limit <= 0 or not self.runs:
            return
        fd = os.open(self.pages, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size == 0:
                return
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mm:
                for run in self.runs:
                    start, end = run.offset, run.offset + run.size
                    for m in pattern.finditer(mm, start, end):
                        if m.end() == m.start():
                            continue  # an empty match says nothing
                        yield Hit(
                            address=run.vaddr + m.start() - start,
                            match=m.group(),
                            before=mm[max(start, m.start() - CONTEXT) : m.start()],
                            after=mm[m.end() : min(end, m.end() + CONTEXT)],
                        )
                        limit -= 1
                        if limit <= 0:
                            return
        finally:
            os.close(fd)


def strings(data: bytes, limit: int = 4096) -> tuple[str, ...]:
    """NUL-separated strings (argv, environment), undecodable bytes escaped."""
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return tuple(p.decode("utf-8", "backslashreplace") for p in parts[:limit])


def printable(data: bytes) -> str:
    """Bytes for a one-line display: printable ASCII as is, the rest escaped."""
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\x{b:02x}" for b in data)


def dotted(data: bytes) -> str:
    """Bytes as ``hexdump -C`` shows them: printable ASCII, every other byte a dot."""
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data)
