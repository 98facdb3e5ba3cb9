"""Foreign output kept within bounds: the start, then only a tail."""

from __future__ import annotations

MAX_TEST_OUTPUT = 8 << 20  # bytes of a test's output kept (the start), plus a tail
TEST_OUTPUT_TAIL = 64 << 10  # the last bytes, kept after the cap: the failure line


class CappedOutput:
    """A test's stdout and stderr: the first ``cap`` bytes, then only a tail.

    A test printing without end cannot grow vmpod's memory or test.log past
    ``cap`` + ``tail`` bytes; :attr:`dropped` counts what was left out.
    """

    def __init__(
        self, cap: int = MAX_TEST_OUTPUT, tail: int = TEST_OUTPUT_TAIL, what: str = "test output"
    ) -> None:
        self.cap, self.tail_size, self.what = cap, tail, what
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        extra = len(self.tail) - self.tail_size
        if extra > 0:
            del self.tail[:extra]
            self.dropped += extra

    def note(self) -> str:
        if not self.dropped:
            return ""
        return (
            f"{self.what} truncated: {self.dropped} bytes dropped after the first "
            f"{self.cap >> 10} KiB (the last {self.tail_size >> 10} KiB are kept)"
        )

    def getvalue(self) -> bytes:
        if not self.dropped:
            return bytes(self.head + self.tail)
        return bytes(self.head) + f"\n[vmpod: {self.note()}]\n".encode() + bytes(self.tail)

    def last_line(self) -> str:
        text = bytes(self.tail or self.head).decode(errors="replace").strip().splitlines()
        return text[-1][:160] if text else ""
