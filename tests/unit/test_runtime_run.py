"""`vmpod-runtime run`'s wait: the child's status (128+N for a signal), signals passed on."""

from __future__ import annotations

import os
import signal
import threading
import time

from vmpod.runtime.run import wait_child
from vmpod.runtime.state import proc_start_time


def _child(body: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            if body == "exit7":
                os._exit(7)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(42))
            time.sleep(30)
        finally:
            os._exit(1)
    return pid


def test_the_status_is_the_childs() -> None:
    pid = _child("exit7")
    assert wait_child(pid, proc_start_time(pid)) == 7


def test_a_signal_death_reads_as_128_plus_n() -> None:
    pid = _child("sleep")
    os.kill(pid, signal.SIGKILL)
    assert wait_child(pid, proc_start_time(pid)) == 128 + signal.SIGKILL


def test_signals_we_get_are_passed_to_the_child() -> None:
    pid = _child("sleep")
    time.sleep(0.2)  # its handler is installed
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert wait_child(pid, proc_start_time(pid)) == 42
