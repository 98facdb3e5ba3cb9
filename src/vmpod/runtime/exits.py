"""How runtime processes end with a container's status (the monitor, an exec relay)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from typing import NoReturn

from vmpod.signals import FATAL


def exit_like(status: int) -> NoReturn:
    """Exit with the container's status: 128+N from a fatal signal N is re-raised."""
    sig = status - 128
    if sig in FATAL:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of ours
        if sig != signal.SIGKILL:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        time.sleep(1)
    os._exit(status & 0xFF)
