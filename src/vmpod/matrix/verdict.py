"""Judging a guest's kernel log: oops, panic, BUG, WARN, lockups, OOM, taint."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_FINDINGS = 20
_STAMP = re.compile(r"^\s*\[\s*\d+\.\d+\]\s*")

# Ordered by severity: the first that matches names the verdict.
_PATTERNS = (
    ("panic", re.compile(r"Kernel panic - not syncing")),
    (
        "oops",
        re.compile(
            r"\bOops\b|general protection fault|BUG: unable to handle|"
            r"kernel BUG at|BUG: kernel NULL pointer"
        ),
    ),
    ("bug", re.compile(r"\bBUG: |UBSAN:|KASAN:|list_(add|del) corruption")),
    ("lockup", re.compile(r"soft lockup|hard LOCKUP|hung_task|rcu_sched detected stall")),
    # The guest ran out of memory: what the test saw is not the module's behaviour.
    ("oom", re.compile(r"Out of memory: Killed process|invoked oom-killer|out of memory: Killed process")),
    ("warn", re.compile(r"WARNING: CPU: |\bWARNING: at ")),
)
# /proc/sys/kernel/tainted bits that mean trouble (out-of-tree O and unsigned E
# are expected for the module under test).
_BAD_TAINT = {
    7: "D (kernel died: oops)",
    9: "W (warning)",
    14: "L (soft lockup)",
    5: "B (bad page)",
    4: "M (machine check)",
}


@dataclass(frozen=True)
class Verdict:
    status: str  # clean | warn | oom | lockup | bug | oops | panic
    findings: tuple[str, ...]  # the log lines and taint flags behind it

    @property
    def clean(self) -> bool:
        return self.status == "clean"


def judge(log: str, tainted: int = 0) -> Verdict:
    """The verdict on a whole log at once (see :class:`LogScanner` for a stream)."""
    scanner = LogScanner()
    scanner.feed(log)
    scanner.taint(tainted)
    return scanner.verdict()


_RANK = {name: i for i, (name, _) in enumerate(_PATTERNS)}


class LogScanner:
    """Judges a kernel log as it streams in, in bounded memory: it keeps the
    findings (the first :data:`MAX_FINDINGS`, one of each message) and the
    status, never the log. Lines of two sources (kernel log and console) that
    say the same thing count once."""

    def __init__(self) -> None:
        self.status = "clean"
        self.findings: list[str] = []
        self._seen: set[str] = set()

    def feed(self, text: str) -> None:
        """Scan whole lines (a kernel log chunk holds whole records)."""
        for line in text.splitlines():
            self._line(line)

    def _line(self, line: str) -> None:
        for name, rx in _PATTERNS:
            if rx.search(line):
                self._found(name, line.strip()[:300])
                break

    def _found(self, status: str, finding: str) -> None:
        if self.status == "clean" or _RANK.get(status, len(_RANK)) < _RANK.get(self.status, len(_RANK)):
            self.status = status
        key = _STAMP.sub("", finding)
        if key in self._seen or len(self.findings) >= MAX_FINDINGS:
            return
        self._seen.add(key)
        self.findings.append(finding)

    def taint(self, tainted: int) -> None:
        for bit, what in _BAD_TAINT.items():
            if tainted & (1 << bit):
                self._found("oops" if bit == 7 else "warn", f"kernel tainted: {what}")

    def verdict(self) -> Verdict:
        return Verdict(self.status, tuple(self.findings))
