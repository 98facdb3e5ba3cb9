"""Errors of the runtime CLI: one line on stderr and in --log, exit status 1 (runc's)."""

from __future__ import annotations

from vmpod.errors import VmpodError


class RuntimeCliError(VmpodError):
    """A refused or failed runtime command (unknown id, wrong state, bad bundle...)."""

    exit_code = 1


class NotFound(RuntimeCliError):
    def __init__(self) -> None:
        super().__init__("container does not exist")
