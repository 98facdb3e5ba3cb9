"""fds 0, 1 and 2 of the vmpod commands: always open, so nothing else takes them.

A command started with a closed stdio fd (``vmpod run … >&-``) would hand that
number to the next thing it opens — the event loop's epoll fd, the agent's
socket — and then write the container's output into it: the run breaks with an
error that blames the agent channel, or output lands in the wrong place. Each
CLI's entry point calls :func:`reserve_stdio` first, before anything opens fds.
"""

from __future__ import annotations

import os
import sys

STDIO = (0, 1, 2)
_closed: frozenset[int] = frozenset()


def reserve_stdio() -> frozenset[int]:
    """Open /dev/null on each of fds 0-2 that is closed; returns which were.

    /dev/null because the user closed the fd: output there goes nowhere (as with
    ``docker run … >&-``) and input is empty. Python set ``sys.stdin/stdout/
    stderr`` to None for a closed fd at start-up; they get file objects again so
    ``print`` and click keep working."""
    global _closed
    closed = []
    for fd in STDIO:
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        # ascending: every lower std fd is open, so open() returns ``fd`` itself
        new = os.open(os.devnull, os.O_RDWR)
        if new != fd:
            os.dup2(new, fd)
            os.close(new)
        os.set_inheritable(fd, True)  # stdio of the tools we run, as any std fd
    streams = {0: ("stdin", "r"), 1: ("stdout", "w"), 2: ("stderr", "w")}
    for fd in closed:
        name, mode = streams[fd]
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, buffering=1, closefd=False))  # noqa: SIM115 (process-long)
    _closed = frozenset(closed) | _closed
    return frozenset(closed)


def closed_at_start() -> frozenset[int]:
    """The std fds :func:`reserve_stdio` found closed (now /dev/null)."""
    return _closed


def note_discarded_output() -> None:
    """Say so when stdout was closed at start: as docker does, a run goes on (its
    effects may be the point), but not silently, and not blaming anything else."""
    if 1 in _closed:
        print("vmpod: stdout is closed: the container's output is discarded", file=sys.stderr)
