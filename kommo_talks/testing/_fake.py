"""``FakeKommo``: an in-process Kommo Talks API on 127.0.0.1, for tests and demos.

``FakeKommo`` holds the settings and composes the parts: :class:`Talks` (the
talks and their routes), :class:`TalkList`, :class:`FakeOAuth` (behind
:class:`TokenEndpoint`), :class:`FakeWebhooks`, and the :class:`Gate` every
request passes. The parts see the fake only through small protocols.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from ._crm import FakeCRM
from ._faults import Fault, FaultPlan
from ._gate import Gate
from ._listing import TalkList
from ._oauth import FakeOAuth, TokenEndpoint
from ._stats import FakeStats, RecordedRequest
from ._talks import Talks, example_talk, list_item, talk_payload
from ._webhooks import FakeWebhooks, WebhookDelivery
from ._wire import RouteSource

# example_talk and talk_payload: the benchmarks import them from here.
__all__ = ["FakeKommo", "example_talk", "talk_payload"]

_EXAMPLE_LEAD = example_talk(1)["entity_id"]


class FakeKommo:
    """An in-process fake of Kommo's Talks API, served on ``127.0.0.1``.

    ``async with FakeKommo() as fake:`` starts it on a free port; ``fake.url``
    is its base URL and ``fake.token`` a valid long-lived token. It answers
    like Kommo: ``application/hal+json`` talks, ``application/problem+json``
    errors (401 bad token, 404 unknown talk, 422 already closed, 402/403 when
    switched on, 429 beyond an enforced rate limit), and records every request.

    Args:
        talks: IDs of the open talks it starts with (default 1-100), each a
            copy of the API reference's example with its own ``talk_id``.
        rate_limit: requests admitted per rolling ``rate_window`` seconds
            (every route counts); beyond it, a 429 problem+json with
            ``retry_after``. ``None`` (the default) enforces nothing.
        rate_window: the rolling window in seconds (Kommo: 1).
        retry_after: the ``retry_after`` of its 429 bodies, in seconds (Kommo
            documents 300; the default 1 keeps tests short).
        retry_after_header: also send a ``Retry-After`` header with 429s.
        nps_bot: when true, a close without ``force_close`` launches the NPS
            bot (202, the talk stays open), as on accounts that enable it.
        record: keep every request in :attr:`requests` (off for long benchmarks).
        strict_rotation: see :class:`~kommo_talks.testing.FakeOAuth`.
        account_id: the account's ID (``GET /api/v4/account``, its talks, its webhooks).
        subdomain: the account's subdomain (``GET /api/v4/account``, its webhooks).

    Faults: :meth:`script`, :meth:`random_faults`. Permissions: :meth:`deny`,
    :meth:`block`. Counters: :attr:`stats`. Webhooks: :meth:`add_webhook`, the
    ``emit_*`` methods, :meth:`webhooks_idle`, :attr:`webhook_deliveries`.
    """

    def __init__(
        self,
        *,
        talks: Iterable[int] = range(1, 101),
        rate_limit: float | None = None,
        rate_window: float = 1.0,
        retry_after: float = 1,
        retry_after_header: bool = False,
        nps_bot: bool = False,
        record: bool = True,
        strict_rotation: bool = False,
        account_id: int = 17029541,
        subdomain: str = "example",
    ) -> None:
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive or None")
        self.token: str = "fake-long-lived-" + secrets.token_urlsafe(16)
        """A valid long-lived token for ``LongLivedToken``."""
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.retry_after = retry_after
        self.retry_after_header = retry_after_header
        self.nps_bot = nps_bot
        self.record = record
        self.webhook_timeout: float = 2.0
        """Seconds a webhook receiver has to answer (Kommo: 2)."""
        self.stats = FakeStats()
        self.requests: list[RecordedRequest] = []
        self.oauth = FakeOAuth(strict_rotation=strict_rotation)
        self.crm = FakeCRM(account_id=account_id, subdomain=subdomain, leads=[_EXAMPLE_LEAD])
        """The account and its leads (``GET /api/v4/account``, ``/api/v4/leads``)."""
        self._talks = Talks(self, talks)
        self.talks: dict[int, dict[str, Any]] = self._talks.by_id
        """The talks it holds, by ID, as API payloads (without links)."""
        self.nps_launched: list[int] = self._talks.nps_launched
        """IDs of talks whose close launched the NPS bot instead of closing."""
        # Every endpoint comes from one of these parts (each has routes());
        # a module that serves more of Kommo adds its part here.
        self._endpoints: tuple[RouteSource, ...] = (
            self._talks,
            TalkList(self, self._talks),
            TokenEndpoint(self.oauth),
            self.crm,
        )
        self.faults = FaultPlan(r.name for part in self._endpoints for r in part.routes())
        self._gate = Gate(self)
        self._webhooks = FakeWebhooks(self)
        self.on_talk_closed(self._webhooks.talk_closed)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # -- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (only once started)."""
        if self._url is None:
            raise RuntimeError("FakeKommo is not started: use `async with FakeKommo() as fake`")
        return self._url

    async def start(self) -> None:
        """Start serving on 127.0.0.1 on a free port."""
        if self._runner is not None:
            return
        app = web.Application()
        app.on_response_prepare.append(_add_request_id)
        for part in self._endpoints:
            for route in part.routes():
                app.router.add_route(route.method, route.path, self._gate.wrap(route))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self._runner = runner
        self._url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop serving and delivering webhooks (idempotent).

        Webhook deliveries still queued are dropped: ``await
        fake.webhooks_idle()`` first to see them through.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._webhooks.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- state -----------------------------------------------------------------

    @property
    def account_id(self) -> int:
        """The fake account's ID (``id`` of ``GET /api/v4/account``)."""
        return self.crm.account_id

    @property
    def subdomain(self) -> str:
        """The fake account's subdomain (``subdomain`` of ``GET /api/v4/account``)."""
        return self.crm.subdomain

    def add_talk(self, talk_id: int, **fields: Any) -> dict[str, Any]:
        """Add (or replace) a talk of this account; ``fields`` override the example's values.

        Returns the stored payload, which tests may change in place.
        """
        return self._talks.add(talk_id, **fields)

    def is_open(self, talk_id: int) -> bool:
        """True if the talk exists and is in work (not closed)."""
        talk = self.talks.get(talk_id)
        return bool(talk and talk["is_in_work"])

    def closed_talks(self) -> list[int]:
        """IDs of the talks that are closed, in ID order."""
        return sorted(k for k, v in self.talks.items() if not v["is_in_work"])

    def payload(self, talk_id: int) -> dict[str, Any]:
        """The full JSON payload ``GET /api/v4/talks/{id}`` answers for a talk.

        It has the documented fields only: ``status`` and ``source_id``
        given to :meth:`add_talk` show in :meth:`list_item` alone.
        """
        return talk_payload(self.url, talk_id, self.talks[talk_id])

    def list_item(self, talk_id: int) -> dict[str, Any]:
        """A talk as ``GET /api/v4/talks`` lists it: no ``missed_at``; ``status``, ``source_id``."""
        return list_item(self.url, talk_id, self.talks[talk_id])

    def deny(self, status: int = 403, *, talk_id: int | None = None) -> None:
        """Answer ``status`` (402 or 403, problem+json) for one talk, or the whole account."""
        if status not in (402, 403):
            raise ValueError("deny() takes 402 (account unpaid) or 403 (forbidden)")
        if talk_id is None:
            self._gate.denied_account = status
        else:
            self._talks.denied[talk_id] = status

    def allow(self, *, talk_id: int | None = None) -> None:
        """Undo :meth:`deny` for one talk, or for the account and every talk."""
        if talk_id is None:
            self._gate.denied_account = None
            self._talks.denied.clear()
        else:
            self._talks.denied.pop(talk_id, None)

    def block(self, blocked: bool = True) -> None:
        """Act as Kommo's IP/account block: an HTML 403 page for every request."""
        self._gate.blocked = blocked

    def script(self, route: str, *faults: Fault | int) -> None:
        """Queue faults for the next requests on ``route``, one per request.

        ``route`` is ``"get"``, ``"close"``, ``"list"`` or ``"token"``. An
        ``int`` means :meth:`Fault.error` of that status, so
        ``fake.script("close", 503, 503)`` fails the next two closes.
        """
        self.faults.script(route, faults)

    def random_faults(
        self,
        rate: float,
        faults: Sequence[Fault | int] = (503, Fault.dropped()),
        *,
        routes: Iterable[str] = ("get", "close"),
        seed: int | None = 0,
    ) -> None:
        """Give each request on ``routes`` a ``rate`` chance of one of ``faults``."""
        chosen = [Fault.error(f) if isinstance(f, int) else f for f in faults]
        self.faults.randomize(rate, chosen, routes, seed)

    def on_talk_closed(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(talk_payload)`` whenever the fake closes a talk."""
        self._talks.closed_listeners.append(listener)

    def valid_token(self, token: str) -> bool:
        """True if ``token`` is the long-lived token or a live OAuth access token."""
        return secrets.compare_digest(token, self.token) or self.oauth.accepts(token)

    # -- webhooks ------------------------------------------------------------------

    def add_webhook(self, url: str) -> None:
        """Subscribe ``url`` to the fake's account webhooks.

        From then on, every talk the fake closes is posted to it as a
        Kommo-format ``talk[update]`` body (``is_in_work`` ``0``), and the
        ``emit_*`` methods post there too. Put your receiver's secret in the
        URL as Kommo would (``...?secret=...``). Deliveries run in the
        background, one after another, each with :attr:`webhook_timeout`;
        they are recorded in :attr:`webhook_deliveries` and never retried.

        Raises:
            ValueError: ``url`` is not an ``http://`` or ``https://`` URL.
        """
        self._webhooks.subscribe(url)

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """Every webhook delivery made so far (url, body, status), in order."""
        return self._webhooks.deliveries

    async def webhooks_idle(self) -> None:
        """Wait until every webhook delivery queued so far has been answered or failed.

        Deliveries that a receiver's callback causes later (a bot closing a
        talk, say) are not waited for: wait for what your bot does instead.
        """
        await self._webhooks.idle()

    async def emit_talk_added(self, talk_id: int) -> bytes:
        """Post a ``talk[add]`` delivery for a talk the fake holds (see :meth:`add_talk`).

        Returns the body queued; ``await webhooks_idle()`` to see it delivered.

        Raises:
            KeyError: no such talk. RuntimeError: no webhook subscribed.
        """
        return self._webhooks.emit_talk("add", self._talks.held(talk_id))

    async def emit_talk_updated(self, talk_id: int) -> bytes:
        """Post a ``talk[update]`` delivery with the talk's current state.

        Change ``fake.talks[talk_id]`` first to act as an edit made in
        Kommo (``is_in_work`` false: closed by a manager; ``is_read`` true:
        marked answered). Returns the body queued.

        Raises:
            KeyError: no such talk. RuntimeError: no webhook subscribed.
        """
        return self._webhooks.emit_talk("update", self._talks.held(talk_id))

    async def emit_message(
        self,
        talk_id: int,
        text: str,
        *,
        direction: str = "incoming",
        author_name: str | None = None,
        message_id: str | None = None,
    ) -> bytes:
        """Post a delivery of a message written in a talk's chat.

        ``direction`` is ``"incoming"`` (from the customer: a
        ``message[add]`` with ``author[type]=external``) or ``"outgoing"``
        (from a manager: an ``outgoing_message[add]`` with
        ``author[type]=internal`` and ``author[user_id]``, the shape of
        Kommo's ``add_outgoing_message`` webhook as other clients model it).
        ``author_name`` defaults to ``"Customer"`` or ``"Manager"``,
        ``message_id`` to a new UUID. Returns the body queued.

        Raises:
            ValueError: a bad ``direction``. KeyError: no such talk.
            RuntimeError: no webhook subscribed.
        """
        talk = self._talks.held(talk_id)
        return self._webhooks.emit_message(
            talk, text, direction=direction, author_name=author_name, message_id=message_id
        )


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # Kommo tags every answer with a request id; so does the fake.
    response.headers.setdefault("X-Request-Id", secrets.token_hex(8))
