"""Shared CLI plumbing: one-line errors with the right exit code, progress lines."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from vmpod.errors import VmpodError

P = ParamSpec("P")
T = TypeVar("T")


def progress(msg: str) -> None:
    click.echo(f"vmpod: {msg}…", err=True)


def fail(err: VmpodError) -> int:
    """Print ``err`` as one line (plus the guest console tail for VM failures)."""
    click.echo(f"vmpod: error: {err}", err=True)
    if "console_tail" not in err.details:
        return err.exit_code
    tail = str(err.details["console_tail"])
    if not tail.strip():
        click.echo(
            "vmpod: guest console is empty (nothing printed yet; --console keeps all kernel messages)",
            err=True,
        )
    else:
        click.echo("vmpod: guest console (last lines):", err=True)
        for line in tail.splitlines():
            click.echo(f"  | {line}", err=True)
    return err.exit_code


class Terminated(SystemExit):
    """SIGTERM arrived: unwinds the stack like Ctrl-C, so ``finally`` blocks clean up
    (temp dirs, VMs), then vmpod exits 143 as a process killed by SIGTERM would."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(_sig: int, _frame: object) -> None:
    raise Terminated


def guard(fn: Callable[[], T]) -> T:
    """Run a command body; VmpodError becomes one line and the error's exit code.

    While it runs, SIGTERM (with its default action) raises :class:`Terminated`
    instead of killing vmpod on the spot: cleanup runs and vmpod says so. Code that
    installs its own handler (signal forwarding to a running container) wins.
    """
    old = _install_sigterm()
    try:
        return fn()
    except VmpodError as err:
        sys.exit(fail(err))
    except Terminated:
        click.echo("vmpod: terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        click.echo("vmpod: interrupted", err=True)
        sys.exit(130)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _install_sigterm() -> signal.Handlers | None:
    """Install the SIGTERM handler if SIGTERM has its default action; returns that."""
    try:
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return None
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        return None
    return signal.SIG_DFL


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorator form of ``guard`` for click commands."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return guard(lambda: fn(*args, **kwargs))

    return wrapper
