"""``WebhookReceiver``: serve Kommo's deliveries, answer first, act after.

The rules live in ``_intake`` (no web framework); ``_aiohttp`` and ``_asgi``
adapt them to ``aiohttp.web`` and to any ASGI server or framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from . import _aiohttp
from ._asgi import ASGIApp, AsgiWebhookApp
from ._intake import WebhookIntake
from ._models import InvalidEvent
from ._pool import CallbackPool, WebhookCallback
from ._queue_sink import APPEND_TIMEOUT, QueueSink

if TYPE_CHECKING:
    from ._queue import RedisWebhookQueue

__all__ = ["WebhookCallback", "WebhookReceiver"]


class WebhookReceiver:
    """Receives Kommo webhooks in ``aiohttp.web`` or ASGI; runs a callback or fills a queue.

    Serve it with :meth:`setup` (or :meth:`handle`) in an ``aiohttp.web``
    application, or mount :meth:`asgi_app` in FastAPI, Starlette or any
    ASGI server: the rules below are the same for both.

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
    application's ``client_max_size`` (aiohttp's limit) or the ASGI app's
    ``max_body_size`` (nothing is called); ``503`` when accepting the
    delivery would leave more than ``max_pending`` events waiting or running
    (a delivery is always accepted when nothing is pending) or once draining
    has started. Kommo retries a delivery answered ``503``, and none of its
    events was queued.

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
    graceful shutdown (:meth:`setup`'s hook, the ASGI lifespan, or
    :meth:`close`) does not. Give callbacks their own timeouts: draining
    waits for every one of them.

    With ``queue`` (a :class:`RedisWebhookQueue`) instead of ``callback``,
    nothing is run here: a delivery is answered ``200`` only after Redis
    acknowledged the append of every one of its events (one round trip),
    and ``503`` when Redis is unreachable, refuses, or has not answered
    within ``append_timeout`` seconds (default :data:`APPEND_TIMEOUT`,
    1.5 s, under Kommo's 2 s). No event answered ``200`` lives only in
    memory: a crash of the receiver loses none, and draining has nothing to
    wait for. ``max_pending`` then bounds the events waiting for Redis.
    :class:`WebhookWorker` processes run the callbacks.
    """

    def __init__(
        self,
        callback: WebhookCallback | None = None,
        *,
        queue: RedisWebhookQueue | None = None,
        secret: str | None = None,
        max_pending: int = 1000,
        read_timeout: float = 10.0,
        on_invalid: Callable[[InvalidEvent], object] | None = None,
        append_timeout: float = APPEND_TIMEOUT,
    ) -> None:
        """Build a receiver.

        Args:
            callback: ``await callback(event)`` runs for every good event.
            queue: store every good event in this queue instead (for
                :class:`WebhookWorker` processes to run).
            secret: if set, every delivery's URL must carry it as its
                ``secret`` query parameter.
            max_pending: the most events waiting or running at once.
            read_timeout: seconds a delivery has to send its whole body.
            on_invalid: a plain callable (not awaited), called with each
                :class:`InvalidEvent` of an accepted delivery before it is
                answered; what it raises is logged, and the answer stays ``200``.
            append_timeout: with ``queue``, seconds Redis has to store a
                delivery before it is answered ``503``.

        Raises:
            TypeError: neither or both of ``callback`` and ``queue`` are given.
            ValueError: ``max_pending`` is below 1, ``secret`` is empty, or
                ``read_timeout`` or ``append_timeout`` is not a positive, finite number.
        """
        if (callback is None) == (queue is None):
            raise TypeError(
                "WebhookReceiver needs exactly one of callback and queue: "
                "WebhookReceiver(callback, ...) or WebhookReceiver(queue=..., ...)"
            )
        self._pool: CallbackPool | QueueSink
        if queue is not None:
            self._pool = QueueSink(queue, max_pending, append_timeout)
        else:
            assert callback is not None
            self._pool = CallbackPool(callback, max_pending)
        self._intake = WebhookIntake(
            self._pool, secret=secret, read_timeout=read_timeout, on_invalid=on_invalid
        )

    @property
    def pending(self) -> int:
        """Accepted events whose callback has not finished yet (with a queue: not yet stored)."""
        return self._pool.pending

    @property
    def invalid_events(self) -> int:
        """Invalid events of accepted deliveries so far (see :class:`InvalidEvent`)."""
        return self._intake.invalid_events

    def setup(self, app: web.Application, path: str) -> None:
        """Add ``POST`` routes at ``path`` and ``path + "/"``, and an ``on_shutdown`` hook.

        Both spellings are served because Kommo may refuse to register a URL
        without a trailing slash. The hook drains the receiver; it runs
        before the application's cleanup, so callbacks may still use
        resources (a ``KommoClient``) that cleanup closes.
        """
        _aiohttp.add_routes(app, path, self.handle, self.close)

    async def handle(self, request: web.Request) -> web.Response:
        """The ``aiohttp.web`` request handler, for users who add the route themselves."""
        return await _aiohttp.handle(self._intake, request)

    def asgi_app(self, *, max_body_size: int = 1024**2) -> ASGIApp:
        """This receiver as a plain ASGI 3 application (no framework needed).

        Mount it where the webhook is served, e.g.
        ``app.mount("/kommo/hook", receiver.asgi_app())`` in FastAPI or
        Starlette. It answers ``POST`` on any path that reaches it (routing
        is the host's) and ``405`` to other methods; a body over
        ``max_body_size`` bytes (default 1 MiB, as aiohttp's) is answered ``413``.

        Draining: served directly by an ASGI server (``uvicorn module:app``),
        the app answers the lifespan protocol and drains on shutdown. Starlette
        and FastAPI do **not** run a mounted app's lifespan: their own lifespan
        must ``await receiver.close()`` before it closes what callbacks use.

        Raises:
            ValueError: ``max_body_size`` is below 1.
        """
        if max_body_size < 1:
            raise ValueError("max_body_size must be at least 1")
        return AsgiWebhookApp(self._intake, self.close, max_body_size=max_body_size)

    async def close(self) -> None:
        """Stop accepting deliveries (``503``) and wait for every accepted callback.

        Idempotent; the receiver cannot be reopened.
        """
        await self._intake.close()
