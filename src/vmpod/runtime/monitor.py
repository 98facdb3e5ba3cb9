"""The per-container monitor process: how it starts, logs and exits.

``create`` forks it (no double fork: podman's conmon and containerd's shims are
subreapers that ``waitpid()`` the pid written to --pid-file and take its exit
status as the container's). It keeps the stdio ``create`` was given; the
``Session`` (session.py) owns the sandbox and relays the container's stdio, the
control server (control.py) answers the other runtime commands on
``monitor.sock``. When the container's process ends the monitor stops the VM
and exits with that status, re-raising the signal when the process died of one.
QEMU dies with it even on SIGKILL (PDEATHSIG), and a dead monitor reads as
"stopped".

With an output log (``MonitorArgs.output_log``, how `vmpod run -d` keeps a
container's output) the container's stdout/stderr go to that rotating file and
the monitor's own stdio becomes /dev/null, unless the log ``tee``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import NoReturn

from vmpod.errors import VmpodError
from vmpod.runtime.exits import exit_like
from vmpod.runtime.logs import setup_logging
from vmpod.runtime.session import MonitorArgs, Session

log = logging.getLogger(__name__)
VM_WATCH_INTERVAL = 0.5  # seconds between looks at the VM of a container not started yet


def monitor_main(args: MonitorArgs, keep: tuple[int, ...]) -> NoReturn:
    """Entry point in the forked child; never returns."""
    status = 255
    try:
        become_monitor({args.ready_fd, *keep}, args.log_path, args.log_format, args.debug)
        detached = args.output_log is not None and not args.output_log.tee
        if args.plan.terminal or detached:  # the pty (or the log) is the container's stdio, not ours
            null_stdio()
        status = asyncio.run(supervised(Session(args)))
    except BaseException as err:  # the monitor must always exit with a status
        log.error("monitor failed: %s", err, exc_info=not isinstance(err, VmpodError))
    logging.shutdown()
    exit_like(status)


async def supervised(session: Session, interval: float = VM_WATCH_INTERVAL) -> int:
    """``session.run()``, with the VM watched from the moment the container exists:
    until its process is started, nothing else would notice the VM dying (QEMU
    killed, its file server gone, a guest panic), and the container would read
    as created, with its monitor alive and no VM (fault matrix, issue 11). Once
    started, the process's watcher sees it too; finishing twice is a no-op."""
    watch = asyncio.create_task(_watch_vm(session, interval))
    try:
        return await session.run()
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def _watch_vm(session: Session, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        sandbox = session.sandbox
        # (no container yet: the boot is in progress, and fails by itself)
        if sandbox is not None and session.container is not None and not sandbox.alive:
            why = await sandbox.failure(grace=0)
            log.error("container %s lost its VM: %s", session.a.cid, why or "QEMU exited")
            session.finish(128 + signal.SIGKILL)  # as runc reports a container killed with its kernel
            return


def become_monitor(keep: set[int], log_path: str, log_format: str, debug: bool) -> None:
    """A forked monitor's first steps: its own session, none of the parent's fds
    but stdio and ``keep``, and its log (--log, never the container's stderr)."""
    os.setsid()
    drop_log_handlers()
    close_fds({0, 1, 2, *keep})
    log_to(log_path, log_format, debug)


def null_stdio() -> None:
    """/dev/null as fds 0-2: the monitor holds none of its caller's pipes."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def log_to(path: str, fmt: str, debug: bool) -> None:
    """The monitor logs to --log (never to the container's stderr), or nowhere."""
    if path:
        setup_logging(path, fmt, debug)
        logging.getLogger("vmpod").setLevel(logging.DEBUG if debug else logging.WARNING)
    else:
        logging.getLogger().addHandler(logging.NullHandler())
        logging.lastResort = None


def drop_log_handlers() -> None:
    """The parent's log handlers (their files are about to be closed)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()


def close_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
