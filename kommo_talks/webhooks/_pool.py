"""The in-memory event sink: ``await callback(event)`` in tracked background tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from ._intake import OK, TOO_MANY_PENDING, Answer, too_many_pending
from ._models import TalkEvent, WebhookEvent

__all__ = ["CallbackPool", "WebhookCallback"]

logger = logging.getLogger("kommo_talks.webhooks")

WebhookCallback: TypeAlias = Callable[[WebhookEvent], Awaitable[object]]
"""``await callback(event)``: what a :class:`WebhookReceiver` runs for each event."""


class CallbackPool:
    """Runs each accepted delivery's events, in order, in a task of its own.

    A delivery is taken only if, counting its own events, at most
    ``max_pending`` events would be waiting or running (or if nothing is
    pending, however large it is).
    """

    def __init__(self, callback: WebhookCallback, max_pending: int) -> None:
        """Raises ``ValueError`` if ``max_pending`` is below 1."""
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._callback = callback
        self._max_pending = max_pending
        self.pending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def accept(self, events: tuple[WebhookEvent, ...]) -> Answer:
        """Start a task for ``events`` (``OK``), or refuse them all (``503``)."""
        if not events:
            return OK
        if too_many_pending(self.pending, len(events), self._max_pending):
            return TOO_MANY_PENDING
        self.pending += len(events)
        # The loop first runs this task once the request's task yields: after
        # the server has written the answer (unless the socket's buffer is
        # full, when the two interleave). It runs in a copy of the request's context.
        task = asyncio.create_task(self._run(events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return OK

    async def _run(self, events: tuple[WebhookEvent, ...]) -> None:
        left = len(events)
        try:
            for event in events:
                try:
                    await self._callback(event)
                except (Exception, asyncio.CancelledError) as exc:
                    # A CancelledError is this task's only when the task is being
                    # cancelled (the loop is closing); else the callback met it.
                    task = asyncio.current_task()
                    if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                        raise
                    logger.exception("webhook callback failed on %s", _describe(event))
                self.pending -= 1
                left -= 1
        finally:
            self.pending -= left

    async def close(self) -> None:
        """Wait for every accepted event's callback to finish."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))


def _describe(event: WebhookEvent) -> str:
    """A short label for logs: no message text, which may be personal data."""
    where = f" of account {event.account_id}" if event.account_id is not None else ""
    if isinstance(event, TalkEvent):
        return f"talk[{event.action}] event for talk {event.talk_id}{where}"
    return f"message event {event.message_id!r} ({event.direction}) for talk {event.talk_id}{where}"
