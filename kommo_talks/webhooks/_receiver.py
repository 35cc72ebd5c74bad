"""``WebhookReceiver``: serve Kommo's deliveries in ``aiohttp.web``, answer first, act after."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from aiohttp import web

from ..errors import DecodeError
from ._models import InvalidEvent, TalkEvent, WebhookEvent
from ._parse import parse_webhook

__all__ = ["WebhookCallback", "WebhookReceiver"]

logger = logging.getLogger("kommo_talks.webhooks")

WebhookCallback: TypeAlias = Callable[[WebhookEvent], Awaitable[object]]
"""``await callback(event)``: what a :class:`WebhookReceiver` runs for each event."""


class WebhookReceiver:
    """Receives Kommo webhooks in an ``aiohttp.web`` app; ``await callback(event)`` each.

    Kommo waits at most 2 s for an answer and disables a hook after 100
    failed ones in 2 hours, so a delivery is answered ``200`` as soon as it
    is parsed, before any callback runs; callbacks run afterwards in
    background tasks that this receiver tracks.

    A delivery some of whose events fail their checks is still answered
    ``200`` (a retry would fail the same way): its good events go to
    ``callback``, and each bad one is logged at ``WARNING`` on the
    ``kommo_talks.webhooks`` logger (its form key and the reason, never the
    body), counted in :attr:`invalid_events` and handed to ``on_invalid``
    (see :func:`parse_webhook` with ``strict=False``).

    Other answers: ``403`` when ``secret`` is set and the ``secret`` query
    parameter of the request is missing or differs (checked in constant
    time, before the body is read); ``408`` for a body not complete within
    ``read_timeout`` seconds (nothing is parsed); ``400`` for a body that is
    not a form at all (not UTF-8, more fields than ``parse_webhook``'s
    limit; nothing is called); ``413`` for a body larger than the
    application's ``client_max_size`` (aiohttp's limit; nothing is called);
    ``503`` when accepting the delivery would leave more than
    ``max_pending`` events waiting or running (a delivery is always accepted
    when nothing is pending) or once draining has started. Kommo retries a
    delivery answered ``503``, and none of its events was queued.

    The events of one delivery are handed to ``callback`` one after another,
    in the delivery's order; different deliveries run concurrently, each in
    a task of its own (which runs in a copy of its request's context). Kommo
    puts related events in one delivery in a meaningful order (a talk added,
    then updated; a message, then the talk closed), and a bot that reacts to
    them concurrently could act on them out of order. A callback that needs
    more concurrency can start its own tasks.

    An exception raised by ``callback`` is logged with its traceback on the
    ``kommo_talks.webhooks`` logger, and the next event goes on. An accepted
    event lives in memory until its callback ends: a crash loses it, a
    graceful shutdown (:meth:`setup`'s hook, or :meth:`close`) does not.
    Give callbacks their own timeouts: draining waits for every one of them.
    """

    def __init__(
        self,
        callback: WebhookCallback | None = None,
        *,
        secret: str | None = None,
        max_pending: int = 1000,
        read_timeout: float = 10.0,
        on_invalid: Callable[[InvalidEvent], object] | None = None,
    ) -> None:
        """Build a receiver.

        Args:
            callback: ``await callback(event)`` runs for every good event.
            secret: if set, every delivery's URL must carry it as its
                ``secret`` query parameter.
            max_pending: the most events waiting or running at once.
            read_timeout: seconds a delivery has to send its whole body.
            on_invalid: a plain callable (not awaited), called with each
                :class:`InvalidEvent` of an accepted delivery before it is
                answered; what it raises is logged, and the answer stays ``200``.

        Raises:
            TypeError: ``callback`` is missing.
            ValueError: ``max_pending`` is below 1, ``secret`` is empty, or
                ``read_timeout`` is not a positive, finite number.
        """
        if callback is None:
            raise TypeError("WebhookReceiver needs a callback: WebhookReceiver(callback, ...)")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
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
        self._callback = callback
        self._max_pending = max_pending
        self._secret = None if secret is None else secret.encode("utf-8", "surrogatepass")
        self._read_timeout = float(read_timeout)
        self._on_invalid = on_invalid
        self._pending = 0
        self._invalid_events = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def pending(self) -> int:
        """Accepted events whose callback has not finished yet."""
        return self._pending

    @property
    def invalid_events(self) -> int:
        """Invalid events of accepted deliveries so far (see :class:`InvalidEvent`)."""
        return self._invalid_events

    def setup(self, app: web.Application, path: str) -> None:
        """Add ``POST`` routes at ``path`` and ``path + "/"``, and an ``on_shutdown`` hook.

        Both spellings are served because Kommo may refuse to register a URL
        without a trailing slash. The hook drains the receiver; it runs
        before the application's cleanup, so callbacks may still use
        resources (a ``KommoClient``) that cleanup closes.
        """
        app.router.add_post(path, self.handle)
        other = path[:-1] if path.endswith("/") else path + "/"
        if other:
            app.router.add_post(other, self.handle)
        app.on_shutdown.append(self._on_shutdown)

    async def handle(self, request: web.Request) -> web.Response:
        """The request handler, for users who add the route themselves."""
        if self._secret is not None and not self._secret_matches(request):
            return web.Response(status=403, text="forbidden")
        if self._draining:
            return _shutting_down()
        body = await self._read(request)
        if body is None:
            return web.Response(status=408, text="request body not received in time")
        try:
            webhook = parse_webhook(body, strict=False)
        except DecodeError as exc:
            return web.Response(status=400, text=str(exc))
        if self._draining:
            return _shutting_down()
        events = webhook.events
        if events and self._pending and self._pending + len(events) > self._max_pending:
            return web.Response(status=503, text="too many pending events")
        for invalid in webhook.invalid:
            self._report(invalid)
        if events:
            self._pending += len(events)
            # The loop first runs this task once the request's task yields:
            # after aiohttp has written this answer (unless the socket's
            # buffer is full, when the two interleave).
            task = asyncio.create_task(self._run(events))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.Response(status=200)

    async def _read(self, request: web.Request) -> bytes | None:
        """The whole body, or ``None`` if it did not arrive within ``read_timeout``.

        Over ``client_max_size``, aiohttp answers ``413``.
        """
        if request.content.is_eof():  # all there already (the common case): no timer
            return await request.read()
        try:
            async with asyncio.timeout(self._read_timeout):
                return await request.read()
        except TimeoutError:
            return None

    def _secret_matches(self, request: web.Request) -> bool:
        assert self._secret is not None
        given = request.query.get("secret")
        return given is not None and hmac.compare_digest(
            given.encode("utf-8", "surrogatepass"), self._secret
        )

    def _report(self, invalid: InvalidEvent) -> None:
        """Log, count and hand on one invalid event; ``on_invalid`` failing is only logged."""
        self._invalid_events += 1
        reason = str(invalid.error)  # a form key and a reason; a made-up key may be huge
        logger.warning("webhook event skipped: %s", reason[:500])
        if self._on_invalid is not None:
            try:
                self._on_invalid(invalid)
            except Exception:
                logger.exception("webhook on_invalid failed on %s", invalid.error.path)

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
                self._pending -= 1
                left -= 1
        finally:
            self._pending -= left

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting deliveries (``503``) and wait for every accepted callback.

        Idempotent; the receiver cannot be reopened.
        """
        self._draining = True
        while self._tasks:
            await asyncio.wait(list(self._tasks))


def _shutting_down() -> web.Response:
    return web.Response(status=503, text="shutting down")


def _describe(event: WebhookEvent) -> str:
    """A short label for logs: no message text, which may be personal data."""
    where = f" of account {event.account_id}" if event.account_id is not None else ""
    if isinstance(event, TalkEvent):
        return f"talk[{event.action}] event for talk {event.talk_id}{where}"
    return f"message event {event.message_id!r} ({event.direction}) for talk {event.talk_id}{where}"
