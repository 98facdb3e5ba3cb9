"""The exception the agent turns into an error response, and its log. Standard library only."""

from __future__ import annotations

import os


class AgentFailure(Exception):
    """A request the agent cannot carry out; ``kind`` lets the host map it
    ("invalid", "not_found", "exists", "unsupported", "failed")."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


def log(msg: str) -> None:
    """One line on the agent's stderr (the guest console)."""
    try:
        os.write(2, f"vmpod-agent: {msg}\n".encode())
    except OSError:
        pass
