"""Signal sets shared by every front end (standard library only, cheap to import)."""

from __future__ import annotations

import signal

# Signals whose default action ends a process: a status of 128+N is re-raised for
# these, and one sent to a container that has not started yet ends it.
FATAL = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25, 26, 27, 29, 30, 31})
# What a front end passes on to the container's process (SIGKILL/SIGSTOP cannot be caught).
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
    signal.SIGALRM,
)
# The ones that ask a foreground process to end: `vmpod run` forwards these with a
# grace-period kill (a second one, or the grace running out, kills the container).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
