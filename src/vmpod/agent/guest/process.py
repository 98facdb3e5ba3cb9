"""Guest side: one process (container init or exec) and the fds carrying its stdio.

Standard library only.
"""

from __future__ import annotations

import os

from vmpod.agent import protocol as p


class Proc:
    """One process (container init or exec) and the fds that carry its stdio."""

    def __init__(
        self,
        stream: int,
        cid: str,
        pid: int,
        outs: dict[int, int],
        stdin_fd: int | None,
        tty_fd: int | None,
        pid_file: str,
        log_file: str,
    ) -> None:
        self.stream, self.cid, self.pid = stream, cid, pid
        self.outs = outs  # fd -> STDOUT/STDERR frame kind
        self.stdin_fd = stdin_fd
        self.tty_fd = tty_fd
        self.pid_file, self.log_file = pid_file, log_file  # the runtime's
        self.pidfd = -1
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.status: int | None = None
        self.exited_at = 0.0
        self.waiters: list[int] = []
        self.start_waiters: list[int] = []  # start requests answered once it runs
        self.done = False

    def target_pid(self) -> int:
        """The container process itself when the runtime wrote its pid, else the runtime."""
        try:
            with open(self.pid_file) as fh:
                return int(fh.read(32).strip())
        except (OSError, ValueError):
            return self.pid


def open_stdio(tty: bool, stdin: bool) -> tuple[tuple[int, int, int], dict[int, int], int | None, int | None]:
    """(child's stdin/stdout/stderr, our output fds -> kind, our stdin fd, our pty master).

    Raw fds we own (not Popen's pipe objects): the loop closes them itself.
    """
    if tty:
        master, slave = os.openpty()
        return (slave, slave, slave), {master: p.STDOUT}, master if stdin else None, master
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
    return ((in_r, out_w, err_w), {out_r: p.STDOUT, err_r: p.STDERR}, in_w if stdin else None, None)
