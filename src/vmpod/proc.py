"""Running external tools: argv lists only, errors that carry argv, status and output."""

from __future__ import annotations

import ctypes
import errno
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from vmpod.errors import CommandError

_TAIL = 2000
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies, even by SIGKILL
    (QEMU and virtiofsd must never outlive the process that owns the VM).

    Helpers also get ``start_new_session=True`` (setsid runs before this, and
    PDEATHSIG survives it): the user's terminal and job control signal vmpod's
    process group — Ctrl-C sends SIGINT to the whole foreground group, shells
    and systemd signal groups too — and a helper in that group would die before
    vmpod could forward the signal to the container. Only vmpod stops helpers."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def descendant_named(root: int, prefix: str) -> int | None:
    """The first process below ``root`` (breadth first) whose name starts with
    ``prefix``: a VM's QEMU under its monitor, jailed (bwrap, its reaper, QEMU)
    or not."""
    todo = [root]
    while todo:
        pid = todo.pop(0)
        try:
            if pid != root and Path(f"/proc/{pid}/comm").read_text().startswith(prefix):
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return None


def tail(text: str | bytes, limit: int = _TAIL) -> str:
    """Last ``limit`` characters of tool output, decoded leniently."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-limit:].strip()


def spawn_vm_helper(
    argv: list[str], log: IO[bytes], pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start a process that serves a VM (QEMU, virtiofsd): stdin closed, output
    to ``log``, in a session of its own (no group signal from the user's
    terminal) and killed with its owner (``die_with_parent``)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
    )


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    input: bytes | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = True,
    hint: str = "",
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion; raise CommandError (with output tail) on failure.

    ``what`` names the step for the one-line message ("download kernel package").
    ``input`` is fed to stdin (else stdin is inherited). Every run is time-limited.
    ``check=False`` returns whatever the exit status, for tools whose status means
    nothing and whose output the caller validates; a missing tool or a timeout
    still raises.
    """
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            input=input,
            cwd=cwd,
            capture_output=True,
            timeout=timeout,
            check=False,
            # a tool must not outlive a vmpod killed with -9: it would go on
            # writing into a temp dir the next vmpod collects as stale
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError as err:
        raise CommandError(
            f"{what}: '{args[0]}' is not installed",
            argv=args,
            returncode=None,
            hint=hint or "run the README set-up command",
        ) from err
    except subprocess.TimeoutExpired as err:
        raise CommandError(
            f"{what}: '{args[0]}' timed out after {timeout}s",
            argv=args,
            returncode=None,
            output_tail=tail(err.stderr or b""),
        ) from err
    if check and proc.returncode != 0:
        out = tail(proc.stderr or proc.stdout)
        last = out.splitlines()[-1] if out else "no output"
        raise CommandError(
            f"{what} failed: {last}",
            argv=args,
            returncode=proc.returncode,
            output_tail=out,
            hint=_hint_for(out) or hint,
        )
    return proc


def _hint_for(output: str) -> str:
    low = output.lower()
    if "no space left" in low or "disk full" in low or "enospc" in low:
        return "the disk is full: free some space and retry"
    return ""


def is_disk_full(err: BaseException) -> bool:
    """True when an OSError or a failed tool reports ENOSPC."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, CommandError) and "disk is full" in err.hint
