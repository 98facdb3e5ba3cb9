"""A progress callback type shared by asset builders."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def silent(_msg: str) -> None:
    """Progress sink that discards messages."""
