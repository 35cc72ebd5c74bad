"""An asyncio.Lock that follows the running event loop (internal)."""

from __future__ import annotations

import asyncio

__all__ = ["LoopLock"]


class LoopLock:
    """Gives the ``asyncio.Lock`` of the running event loop; a new one when the loop changes.

    An ``asyncio.Lock`` binds to the loop it first waits in. Objects that may
    outlive an ``asyncio.run()`` (a module-level rate limiter, a token store
    used by a CLI that runs several) hold one of these instead: one after
    another, several loops can use them; two loops at once cannot.
    """

    __slots__ = ("_lock", "_loop")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.Lock:
        """The lock for the running loop (call it inside that loop)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock
