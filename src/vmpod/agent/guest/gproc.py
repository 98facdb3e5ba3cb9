"""Guest side: starting and waiting for helper processes without subprocess.

posix_spawn rather than subprocess: importing subprocess costs ~0.1 s under TCG.
Standard library only.
"""

from __future__ import annotations

import os
import select


def spawn(argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """Start ``argv`` in a new session with the given stdio; returns its pid.

    posix_spawn rather than subprocess: importing subprocess costs ~0.1 s under TCG.
    Every other fd the agent holds is close-on-exec (Python's default).
    """
    actions = [
        (os.POSIX_SPAWN_DUP2, stdin, 0),
        (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_DUP2, stderr, 2),
    ]
    return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsid=True)


def run_capture(argv: list[str], limit: int, timeout: float = 30) -> tuple[int, str, str]:
    """Run a short command; (status, stdout, stderr), each cut to ``limit`` bytes.
    Killed when it is silent for ``timeout`` seconds."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn(argv, null, out_w, err_w)
    finally:
        for fd in (out_w, err_w, null):
            os.close(fd)
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = set(bufs)
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], timeout)
        if not ready:
            break  # a helper that hangs must not hang the agent forever
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                if len(bufs[fd]) < limit:
                    bufs[fd] += chunk[: limit - len(bufs[fd])]
            else:
                open_fds.discard(fd)
    for fd in bufs:
        os.close(fd)
    if open_fds:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return (
        os.waitstatus_to_exitcode(status),
        bufs[out_r].decode(errors="replace"),
        bufs[err_r].decode(errors="replace"),
    )
