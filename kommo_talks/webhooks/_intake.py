"""The receiver's rules without a web framework: one delivery in, one answer out.

:class:`WebhookIntake` takes what any HTTP server can give (the URL's
``secret`` query parameter and a way to read the body) and returns an
:class:`Answer`; the aiohttp and ASGI adapters only translate. Where the
events of an accepted delivery go is an :class:`EventSink`: today the
in-memory callback pool (``_pool.CallbackPool``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from ..errors import DecodeError
from ._models import InvalidEvent, WebhookEvent
from ._parse import parse_webhook

__all__ = ["OK", "Answer", "BodyTooLarge", "EventSink", "WebhookIntake", "too_many_pending"]

logger = logging.getLogger("kommo_talks.webhooks")


class Answer(NamedTuple):
    """What to answer a delivery: an HTTP status and a short plain-text body."""

    status: int
    text: str = ""


OK = Answer(200)
FORBIDDEN = Answer(403, "forbidden")
TOO_SLOW = Answer(408, "request body not received in time")
TOO_LARGE = Answer(413, "request body too large")
SHUTTING_DOWN = Answer(503, "shutting down")
TOO_MANY_PENDING = Answer(503, "too many pending events")


def too_many_pending(pending: int, incoming: int, max_pending: int) -> bool:
    """Refuse a delivery that would leave more than ``max_pending`` events pending.

    A delivery is always taken when nothing is pending, however large it is.
    """
    return pending > 0 and pending + incoming > max_pending


class BodyTooLarge(Exception):
    """Raised by a body reader when the body is over its size limit (answered ``413``)."""


class EventSink(Protocol):
    """Where the events of a delivery go once it has passed every check."""

    async def accept(self, events: tuple[WebhookEvent, ...]) -> Answer:
        """Take all of ``events`` (``OK``) or none of them (a ``503`` answer)."""
        ...

    async def close(self) -> None:
        """Wait until everything accepted is done with."""
        ...


class WebhookIntake:
    """Checks one delivery after another and hands their events to a sink.

    The order of the checks is the contract: the secret (``403``, in
    constant time, before the body is read), draining (``503``), the body
    within ``read_timeout`` (``408``; ``413`` if the reader says it is too
    large), a form (``400``), draining again, then the sink (``200`` or its
    ``503``). Invalid events are reported only for a delivery the sink took.
    """

    def __init__(
        self,
        sink: EventSink,
        *,
        secret: str | None,
        read_timeout: float,
        on_invalid: Callable[[InvalidEvent], object] | None,
    ) -> None:
        """Raises ``ValueError``: an empty ``secret``, a ``read_timeout`` not > 0 and finite."""
        if secret is not None and not secret:
            raise ValueError("secret must not be empty (use None for no secret)")
        if not (
            isinstance(read_timeout, int | float)
            and math.isfinite(read_timeout)
            and read_timeout > 0
        ):
            raise ValueError(
                f"read_timeout must be a positive number of seconds, got {read_timeout!r}"
            )
        self._sink = sink
        self._secret = None if secret is None else secret.encode("utf-8", "surrogatepass")
        self._read_timeout = float(read_timeout)
        self._on_invalid = on_invalid
        self.invalid_events = 0
        self.closing = False

    async def receive(
        self,
        secret: str | None,
        read_body: Callable[[], Awaitable[bytes]],
        *,
        body_complete: bool = False,
    ) -> Answer:
        """Check one delivery and answer it.

        Args:
            secret: the request's ``secret`` query parameter, ``None`` if absent.
            read_body: returns the whole body; raises :class:`BodyTooLarge`
                past the server's size limit. Called at most once.
            body_complete: the body has fully arrived (no read deadline needed).
        """
        if self._secret is not None and not self._secret_matches(secret):
            return FORBIDDEN
        if self.closing:
            return SHUTTING_DOWN
        try:
            body = await self._read(read_body, body_complete)
        except TimeoutError:
            return TOO_SLOW
        except BodyTooLarge:
            return TOO_LARGE
        try:
            webhook = parse_webhook(body, strict=False)
        except DecodeError as exc:
            return Answer(400, str(exc))
        if self.closing:
            return SHUTTING_DOWN
        answer = await self._sink.accept(webhook.events)
        if answer.status == 200:
            for invalid in webhook.invalid:
                self._report(invalid)
        return answer

    async def _read(self, read_body: Callable[[], Awaitable[bytes]], complete: bool) -> bytes:
        if complete:  # all there already (the common case): no timer
            return await read_body()
        async with asyncio.timeout(self._read_timeout):
            return await read_body()

    def _secret_matches(self, given: str | None) -> bool:
        assert self._secret is not None
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), self._secret
        )

    def _report(self, invalid: InvalidEvent) -> None:
        """Log, count and hand on one invalid event; ``on_invalid`` failing is only logged."""
        self.invalid_events += 1
        reason = str(invalid.error)  # a form key and a reason; a made-up key may be huge
        logger.warning("webhook event skipped: %s", reason[:500])
        if self._on_invalid is not None:
            try:
                self._on_invalid(invalid)
            except Exception:
                logger.exception("webhook on_invalid failed on %s", invalid.error.path)

    async def close(self) -> None:
        """Answer ``503`` from now on and wait until the sink is done. Idempotent."""
        self.closing = True
        await self._sink.close()
