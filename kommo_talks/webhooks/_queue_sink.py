"""The durable event sink: a delivery is ``200`` only once Redis stored every event of it.

Imports no Redis library: it only awaits ``queue.append`` (``RedisWebhookQueue``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Final, Protocol

from ..errors import CoordinationError
from ._intake import OK, TOO_MANY_PENDING, Answer, too_many_pending
from ._models import WebhookEvent

__all__ = ["APPEND_TIMEOUT", "EventQueue", "QueueSink"]

logger = logging.getLogger("kommo_talks.webhooks")

APPEND_TIMEOUT: Final = 1.5
"""Seconds the receiver waits for Redis to store a delivery before answering ``503``.

Kommo waits 2 s for an answer; the rest is left for reading and answering.
"""

NOT_STORED: Final = Answer(503, "events not stored, retry later")


class EventQueue(Protocol):
    """What the receiver needs of a queue (``RedisWebhookQueue`` is one)."""

    async def append(
        self,
        events: Iterable[WebhookEvent],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[str | None]:
        """Store every event (or raise ``CoordinationError``)."""
        ...


class QueueSink:
    """Appends each delivery's events to a queue; ``OK`` only after the append returned.

    Redis down, refusing, or slower than ``timeout`` seconds: ``503`` (Kommo
    retries, and the queue's dedupe keeps a half-stored delivery from being
    stored twice). At most ``max_pending`` events wait for Redis at once
    (more: ``503``); once stored, nothing is in memory, so :meth:`close`
    has nothing to drain.
    """

    def __init__(
        self, queue: EventQueue, max_pending: int, timeout: float = APPEND_TIMEOUT
    ) -> None:
        """Raises ``ValueError``: ``max_pending`` below 1, ``timeout`` not positive and finite."""
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._queue = queue
        self._max_pending = max_pending
        self._timeout = timeout
        self.pending = 0

    async def accept(self, events: tuple[WebhookEvent, ...]) -> Answer:
        """Store ``events`` (``OK``) or answer ``503``: never ``OK`` for an event not stored."""
        if not events:
            return OK
        if too_many_pending(self.pending, len(events), self._max_pending):
            return TOO_MANY_PENDING
        self.pending += len(events)
        try:
            await self._queue.append(events, timeout=self._timeout)
        except (CoordinationError, TimeoutError) as exc:
            logger.warning("webhook delivery answered 503: %s", exc)
            return NOT_STORED
        finally:
            self.pending -= len(events)
        return OK

    async def close(self) -> None:
        """Nothing to wait for: every event answered ``200`` is in the queue already."""
