"""Judging a guest's kernel log: oops, panic, BUG, WARN, lockups, taint."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    status: str  # clean | warn | lockup | bug | oops | panic
    findings: tuple[str, ...]  # the log lines and taint flags behind it

    @property
    def clean(self) -> bool:
        return self.status == "clean"


def judge(log: str, tainted: int = 0) -> Verdict:
    findings: list[str] = []
    status = "clean"
    rank = {name: i for i, (name, _) in enumerate(_PATTERNS)}
    for line in log.splitlines():
        for name, rx in _PATTERNS:
            if rx.search(line):
                findings.append(line.strip()[:300])
                if status == "clean" or rank[name] < rank[status]:
                    status = name
                break
    for bit, what in _BAD_TAINT.items():
        if tainted & (1 << bit):
            findings.append(f"kernel tainted: {what}")
            if status == "clean":
                status = "oops" if bit == 7 else "warn"
    return Verdict(status, tuple(findings[:20]))
