"""The agent's event loop: one epoll over every fd, each with a handler. Stdlib only.

select.epoll directly, not selectors: importing selectors costs start-up time
under TCG.
"""

from __future__ import annotations

import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[[int, int], None]  # (fd, ready mask)

EVENT_READ, EVENT_WRITE = select.EPOLLIN, select.EPOLLOUT
_HANGUP = select.EPOLLHUP | select.EPOLLERR


class Loop:
    """fd -> (interest mask, handler); ``want`` changes a mask, 0 unregisters."""

    def __init__(self) -> None:
        self._poll = select.epoll()
        self._registered: dict[int, int] = {}
        self._handlers: dict[int, Handler] = {}

    def want(self, fd: int, mask: int, handler: Handler | None = None) -> None:
        """Wait for ``mask`` on ``fd`` (0: stop waiting), handing events to ``handler``."""
        if handler is not None:
            self._handlers[fd] = handler
        old = self._registered.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self._poll.unregister(fd)
            del self._registered[fd]
        elif not old:
            self._poll.register(fd, mask)
            self._registered[fd] = mask
        else:
            self._poll.modify(fd, mask)
            self._registered[fd] = mask

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` for good; call before closing it."""
        self.want(fd, 0)
        self._handlers.pop(fd, None)

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: forever) and run the ready handlers."""
        for fd, mask in self._poll.poll(-1 if timeout is None else timeout):
            handler = self._handlers.get(fd)
            if mask & _HANGUP:
                mask |= EVENT_READ  # let the read see EOF/EIO
            # A handler earlier in this batch may have dropped the fd: skip it then.
            if handler is not None and fd in self._registered:
                handler(fd, mask & self._registered[fd])

    def close(self) -> None:
        self._poll.close()
        self._registered.clear()
        self._handlers.clear()
