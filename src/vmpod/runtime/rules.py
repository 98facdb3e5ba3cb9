"""Which runtime command each container status allows, and runc's words when it
does not: the one place where container states are checked (the CLI before it
contacts the monitor, the monitor again under its own state)."""

from __future__ import annotations

from dataclasses import dataclass

from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.state import CREATED, CREATING, PAUSED, RUNNING, STOPPED


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[str]
    refusals: dict[str, str]  # status -> message ({id}, {status} filled in)
    otherwise: str  # message for any other refused status


_NOT_RUNNING = "container not running"
RULES: dict[str, Rule] = {
    "start": Rule(
        frozenset({CREATED}),
        {
            RUNNING: "cannot start an already running container",
            PAUSED: "cannot start an already running container",
            STOPPED: "cannot start a container that has stopped",
        },
        "cannot start a container in the {status} state",
    ),
    "kill": Rule(frozenset({CREATED, RUNNING, PAUSED}), {}, _NOT_RUNNING),
    "exec": Rule(
        frozenset({RUNNING}),
        {PAUSED: "cannot exec in a paused container"},
        "cannot exec in a stopped container",
    ),
    "delete": Rule(
        frozenset({CREATING, CREATED, STOPPED}),
        {},
        "cannot delete container {id} that is not stopped: {status}",
    ),
    "pause": Rule(frozenset({RUNNING}), {PAUSED: "container already paused"}, _NOT_RUNNING),
    "resume": Rule(frozenset({PAUSED}), {RUNNING: "container not paused"}, _NOT_RUNNING),
    "ps": Rule(frozenset({RUNNING, PAUSED}), {}, _NOT_RUNNING),
    "events": Rule(frozenset({RUNNING, PAUSED}), {}, _NOT_RUNNING),
    "update": Rule(frozenset({RUNNING, PAUSED}), {}, _NOT_RUNNING),
    "checkpoint": Rule(frozenset({RUNNING, PAUSED}), {}, _NOT_RUNNING),
}


def require(command: str, status: str, cid: str = "") -> None:
    """Raise runc's error unless ``command`` may run on a container in ``status``."""
    rule = RULES[command]
    if status in rule.allowed:
        return
    message = rule.refusals.get(status, rule.otherwise)
    raise RuntimeCliError(message.format(id=cid, status=status))
