"""The aiohttp session of a pipeline: created lazily in the running loop, one per event loop."""

from __future__ import annotations

import asyncio

import aiohttp

from .errors import ClientClosedError
from .ratelimit import RateLimiter

__all__ = ["SessionHolder"]


class SessionHolder:
    """The session a pipeline sends with, its event loop and its connection permits.

    Attributes:
        loop: the event loop the session was first used in, or ``None``.
        closed: set by the pipeline's ``close()``: nothing is sent any more.
        slots: with a rate limit, one permit per pooled connection (see
            :func:`connection_slots`), else ``None``.
    """

    __slots__ = (
        "_limiter",
        "_max_connections",
        "_owns",
        "_session",
        "_timeout",
        "_trace_configs",
        "closed",
        "loop",
        "slots",
    )

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        *,
        max_connections: int,
        timeout: aiohttp.ClientTimeout,
        limiter: RateLimiter | None,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        self._session = session
        self._trace_configs = trace_configs
        self._owns = session is None
        self._max_connections = max_connections
        self._timeout = timeout
        self._limiter = limiter
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.slots = None if session is None else connection_slots(session, limiter)

    def current(self) -> aiohttp.ClientSession:
        """The session to send with now (created on first use); raise if there is none."""
        session = self._session
        if self.closed:
            raise ClientClosedError("this KommoClient is closed")
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                auto_decompress=True,
                trace_configs=self._trace_configs,
            )
            self.slots = connection_slots(session, self._limiter)
            self.loop = asyncio.get_running_loop()
        elif session.closed:
            raise ClientClosedError("the aiohttp session lent to this KommoClient is closed")
        elif self.loop is None:  # a lent session's first use
            self.loop = asyncio.get_running_loop()
        return session

    async def ready(self) -> aiohttp.ClientSession:
        """The session to send with in the running loop; raise if the client cannot send.

        A client used again in a new event loop (a second ``asyncio.run()``)
        with its own session opens a new one there: the old one, whose loop
        has closed, is closed without touching that loop.

        Raises:
            ClientClosedError: the client is closed, the session lent to it
                is closed or belongs to another event loop, or its own session
                belongs to another event loop that is still open.
        """
        loop = asyncio.get_running_loop()
        old_loop = self.loop
        if old_loop is not None and old_loop is not loop and not self.closed:
            if not self._owns:
                raise ClientClosedError(
                    "the aiohttp session lent to this KommoClient belongs to another event "
                    "loop: lend it a session created in this loop, or use one client per loop"
                )
            if not old_loop.is_closed():
                raise ClientClosedError(
                    "this KommoClient's session belongs to another event loop that is still "
                    "open: close the client there first, or use one client per loop"
                )
            old, self._session, self.loop = self._session, None, None
            if old is not None:
                await old.close()  # its loop is closed: aiohttp leaves that loop alone
        return self.current()

    async def close(self) -> None:
        """Close the session if it is the holder's own (a lent one stays open)."""
        session, self._session = self._session, None
        if session is not None and self._owns and not session.closed:
            await session.close()


def connection_slots(
    session: aiohttp.ClientSession, limiter: RateLimiter | None
) -> asyncio.Semaphore | None:
    """One permit per connection the session's pool allows, when a rate limit applies.

    A request takes a permit before its rate-limit slot and gives it back once
    answered. Requests that would wait for a free connection wait here instead,
    so the limiter's slots stay the send times: requests queued in the pool
    would otherwise go out together, over the limit. ``None`` without a limiter
    or without a pool limit.
    """
    if limiter is None:
        return None
    connector = session.connector
    limits = [
        limit
        for limit in (getattr(connector, "limit", 0), getattr(connector, "limit_per_host", 0))
        if isinstance(limit, int) and limit > 0
    ]
    return asyncio.Semaphore(min(limits)) if limits else None
