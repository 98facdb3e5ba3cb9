"""`vmpod-runtime run`: runc's create + start (+ wait and delete) in one call.

The monitor ``create`` forks is this process's child: without --detach we wait
for it (signals received are passed to it, and it passes them to the
container), delete the container and exit with its status (128+N for a
signal, as runc does). With --detach we return once it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from types import FrameType

from vmpod.runtime import lifecycle
from vmpod.runtime.create import LogOpts, create
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.state import Store, proc_start_time
from vmpod.signals import FORWARDED


def run(
    store: Store,
    cid: str,
    bundle: str,
    *,
    detach: bool,
    keep: bool = False,
    pid_file: str,
    console_socket: str,
    log_opts: LogOpts,
) -> int:
    """Create and start ``cid``; returns 0 (--detach) or the container's status."""
    create(store, cid, bundle, pid_file, console_socket, log_opts)
    try:
        lifecycle.start(store, cid)
    except BaseException:
        with contextlib.suppress(RuntimeCliError, OSError):
            lifecycle.delete(store, cid, force=True)
        raise
    if detach:
        return 0
    st = store.load(cid)
    status = wait_child(st.pid, st.monitor_start)
    if not keep:
        with contextlib.suppress(RuntimeCliError):
            lifecycle.delete(store, cid, force=True)
    return status


def wait_child(pid: int, start_time: int) -> int:
    """Wait for the monitor (our child), passing on the signals a container gets."""

    def forward(sig: int, _frame: FrameType | None) -> None:
        if proc_start_time(pid) == start_time:  # never a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    return wait_forwarding(pid, FORWARDED, forward)


def wait_forwarding(
    pid: int, signals: Iterable[int], forward: Callable[[int, FrameType | None], None]
) -> int:
    """Wait for our child ``pid`` with ``forward`` handling ``signals`` meanwhile;
    its status, 128+N when it died of signal N (as a shell reports it)."""
    old = {s: signal.signal(s, forward) for s in signals}
    try:
        _, wstatus = os.waitpid(pid, 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code
