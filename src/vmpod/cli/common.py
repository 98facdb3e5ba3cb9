"""Shared CLI plumbing: one-line errors with the right exit code, progress lines."""

from __future__ import annotations

import functools
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


def guard(fn: Callable[[], T]) -> T:
    """Run a command body; VmpodError becomes one line and the error's exit code."""
    try:
        return fn()
    except VmpodError as err:
        sys.exit(fail(err))
    except KeyboardInterrupt:
        click.echo("vmpod: interrupted", err=True)
        sys.exit(130)


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorator form of ``guard`` for click commands."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return guard(lambda: fn(*args, **kwargs))

    return wrapper
