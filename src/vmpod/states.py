"""Explicit state machines: an Enum of states and a transition table, checked in one place.

VMs, sandboxes and containers each have one; an illegal transition or an
operation in the wrong state raises ``StateError`` naming the state, so callers
never compare state strings themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Generic, TypeVar

from vmpod.errors import StateError

S = TypeVar("S", bound=Enum)


class StateMachine(Generic[S]):
    """The current state of one object and the transitions it may take.

    ``on_change`` (optional) is told of every transition, e.g. to persist it.
    """

    def __init__(
        self,
        what: str,
        initial: S,
        table: Mapping[S, frozenset[S]],
        on_change: Callable[[S], None] | None = None,
    ) -> None:
        self.what = what
        self._state = initial
        self._table = table
        self._on_change = on_change

    @property
    def state(self) -> S:
        return self._state

    def can(self, new: S) -> bool:
        return new in self._table.get(self._state, frozenset())

    def to(self, new: S) -> None:
        """Move to ``new``; raises StateError if the table does not allow it."""
        if new is self._state:
            return
        if not self.can(new):
            raise StateError(
                f"{self.what} is {self._state.value}: it cannot become {new.value}",
                state=self._state.value,
                target=new.value,
            )
        self._state = new
        if self._on_change is not None:
            self._on_change(new)

    def require(self, action: str, *allowed: S) -> None:
        """Raise unless the current state is one of ``allowed``."""
        if self._state not in allowed:
            raise StateError(
                f"cannot {action}: {self.what} is {self._state.value}", state=self._state.value, action=action
            )

    def __repr__(self) -> str:
        return f"StateMachine({self.what!r}, {self._state.value})"
