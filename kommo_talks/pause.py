"""The client-wide pause that a server-given wait sets.

When Kommo says "retry after N seconds" (a 429 or 5xx with ``Retry-After``,
or a 429 body's ``retry_after``), the whole client stops sending until then,
not only the call that got the answer: the limit is per integration, and
sending on through it is how accounts get blocked.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import RateLimitError, ServerError

__all__ = ["ServerPause"]


class ServerPause:
    """The deadline of the latest server-given wait, and the answer that set it."""

    __slots__ = ("_clock", "_error", "_until")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until = 0.0
        self._error: RateLimitError | ServerError | None = None

    def extend(self, wait: float, error: RateLimitError | ServerError) -> float:
        """Pause for ``wait`` seconds from now, unless a later deadline is already set.

        Returns the seconds this added to the pause (0 within a longer one).
        """
        now = self._clock()
        until = now + wait
        if until < self._until:
            return 0.0
        added = until - max(now, self._until)
        self._until = until
        self._error = error
        return added

    def remaining(self) -> float:
        """Seconds left in the pause (zero or negative when not paused)."""
        return self._until - self._clock()

    def error_for(self, method: str, url: str, remaining: float) -> RateLimitError | ServerError:
        """The exception a call raises when the rest of the pause exceeds its ``max_delay``.

        It copies the class, status and problem of the answer that set the
        pause, names this call's request, has no request id, and carries the
        rest of the wait as ``retry_after``.
        """
        source = self._error
        assert source is not None, "error_for() called while not paused"
        return type(source)(
            source.status,
            retry_after=remaining,
            title=source.title,
            detail=source.detail,
            type=source.type,
            problem=source.problem,
            request_method=method,
            request_url=url,
            request_id=None,
        )
