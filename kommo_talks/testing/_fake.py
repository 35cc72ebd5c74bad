"""``FakeKommo``: an in-process Kommo Talks API on 127.0.0.1, for tests and demos."""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import attrs
import orjson
from aiohttp import web

from ._crm import FakeCRM
from ._faults import Fault, FaultPlan
from ._oauth import FakeOAuth
from ._webhooks import FakeWebhooks, WebhookDelivery, message_add_body, now, talk_event_body

__all__ = ["FakeKommo", "FakeStats", "RecordedRequest", "busiest_window"]

HAL_JSON = "application/hal+json"
PROBLEM_JSON = "application/problem+json"

# The documented example of GET /api/v4/talks/{id}; every default talk is a copy
# with its own talk_id (and links on the fake's host).
_EXAMPLE: dict[str, Any] = {
    "talk_id": 117,
    "created_at": 1631018291,
    "updated_at": 1631035929,
    "rate": 0,
    "contact_id": 3372695,
    "chat_id": "88278e98-2b8d-4ae2-a5f0-bfab511cd621",
    "entity_id": 667999637,
    "entity_type": "lead",
    "is_in_work": True,
    "is_read": True,
    "origin": "telegram",
    "missed_at": None,
    "account_id": 17029541,
}

_BLOCK_PAGE = (
    "<html><head><title>403 Forbidden</title></head><body>"
    "<center><h1>403 Forbidden</h1></center><hr><center>nginx</center></body></html>"
)
_PROXY_PAGE = (
    "<html><head><title>{status} Bad Gateway</title></head><body>"
    "<center><h1>{status} Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "ErrInternalServer",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def problem_response(
    status: int,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A Kommo-style ``application/problem+json`` answer."""
    body: dict[str, Any] = {"title": _TITLES.get(status, "Error")}
    if status != 500:  # Kommo's 500 has no "type"
        body["type"] = f"https://httpstatus.es/{status}"
    body["status"] = status
    body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def busiest_window(times: Iterable[float], window: float = 1.0) -> int:
    """The most of ``times`` (seconds) inside any rolling window of ``window`` seconds.

    Check a rate limit from the arrival times the fake recorded::

        assert busiest_window(r.at for r in fake.requests) <= 7
    """
    ordered = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


@attrs.define
class FakeStats:
    """What the fake has seen.

    Attributes:
        requests: requests received (every route).
        throttled: 429 answers served by the enforced rate limit.
        in_flight: requests being handled right now.
        max_in_flight: the most requests ever handled at once.
        by_route: requests per route name (``"get"``, ``"close"``, ``"list"``, ``"token"``).
    """

    requests: int = 0
    throttled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_route: collections.Counter[str] = attrs.Factory(collections.Counter)


@attrs.frozen
class RecordedRequest:
    """One request the fake received."""

    route: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float
    """``time.monotonic()`` when it arrived."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        record: keep every request in :attr:`requests` (turn off for long
            benchmarks).
        strict_rotation: see :class:`~kommo_talks.testing.FakeOAuth`.
        account_id, subdomain: the account ``GET /api/v4/account`` describes.

    Fault injection: :meth:`script` and :meth:`random_faults`. Permissions:
    :meth:`deny`, :meth:`block`. Counters: :attr:`stats`. Webhooks:
    :meth:`add_webhook`, :meth:`emit_message`, :meth:`emit_talk_added`,
    :meth:`emit_talk_updated`, :meth:`webhooks_idle`,
    :attr:`webhook_deliveries`.
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
        self.talks: dict[int, dict[str, Any]] = {}
        """The talks it holds, by ID, as API payloads (without links)."""
        self.crm = FakeCRM(
            account_id=account_id, subdomain=subdomain, leads=[_EXAMPLE["entity_id"]]
        )
        """The account and its leads (``GET /api/v4/account``, ``/api/v4/leads``)."""
        self.stats = FakeStats()
        self.requests: list[RecordedRequest] = []
        self.faults = FaultPlan()
        self.nps_launched: list[int] = []
        """IDs of talks whose close launched the NPS bot instead of closing."""
        self.oauth = FakeOAuth(self, strict_rotation=strict_rotation)
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.retry_after = retry_after
        self.retry_after_header = retry_after_header
        self.nps_bot = nps_bot
        self.record = record
        self._admitted: collections.deque[float] = collections.deque()
        self._denied_account: int | None = None
        self._denied_talks: dict[int, int] = {}
        self._blocked = False
        self._talk_closed_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.webhook_timeout: float = 2.0
        """Seconds a webhook receiver has to answer (Kommo: 2)."""
        self._webhooks = FakeWebhooks(self)
        self.on_talk_closed(self._webhooks.talk_closed)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        for talk_id in talks:
            self.add_talk(talk_id)

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
        app.router.add_get("/api/v4/talks/{talk_id}", self._route("get", self._get_talk))
        app.router.add_post("/api/v4/talks/{talk_id}/close", self._route("close", self._close))
        app.router.add_get("/api/v4/talks", self._route("list", self._list_talks))
        app.router.add_post("/oauth2/access_token", self._route("token", self.oauth.handle))
        self.crm.register(app.router, self._route)
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

    def add_talk(self, talk_id: int, **fields: Any) -> dict[str, Any]:
        """Add (or replace) a talk; ``fields`` override the example's values.

        Returns the stored payload, which tests may change in place.
        """
        talk = example_talk(talk_id)
        talk.update(fields)
        self.talks[talk_id] = talk
        return talk

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
            self._denied_account = status
        else:
            self._denied_talks[talk_id] = status

    def allow(self, *, talk_id: int | None = None) -> None:
        """Undo :meth:`deny` for one talk, or for the account and every talk."""
        if talk_id is None:
            self._denied_account = None
            self._denied_talks.clear()
        else:
            self._denied_talks.pop(talk_id, None)

    def block(self, blocked: bool = True) -> None:
        """Act as Kommo's IP/account block: an HTML 403 page for every request."""
        self._blocked = blocked

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
        self._talk_closed_listeners.append(listener)

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
        return self._emit(talk_event_body("add", [self._talk(talk_id)], base_url=self.url))

    async def emit_talk_updated(self, talk_id: int) -> bytes:
        """Post a ``talk[update]`` delivery with the talk's current state.

        Change ``fake.talks[talk_id]`` first to act as an edit made in
        Kommo (``is_in_work`` false: closed by a manager; ``is_read`` true:
        marked answered). Returns the body queued.

        Raises:
            KeyError: no such talk. RuntimeError: no webhook subscribed.
        """
        return self._emit(talk_event_body("update", [self._talk(talk_id)], base_url=self.url))

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
        if direction not in ("incoming", "outgoing"):
            raise ValueError(f"direction must be 'incoming' or 'outgoing', got {direction!r}")
        if author_name is None:
            author_name = "Customer" if direction == "incoming" else "Manager"
        body = message_add_body(
            self._talk(talk_id),
            text,
            direction=direction,
            author_name=author_name,
            message_id=message_id or str(uuid.uuid4()),
            created_at=now(),
            base_url=self.url,
        )
        return self._emit(body)

    def _talk(self, talk_id: int) -> dict[str, Any]:
        talk = self.talks.get(talk_id)
        if talk is None:
            raise KeyError(f"FakeKommo holds no talk {talk_id!r}: add it with add_talk() first")
        return talk

    def _emit(self, body: bytes) -> bytes:
        if not self._webhooks.urls:
            raise RuntimeError("no webhook subscribed: call fake.add_webhook(url) first")
        self._webhooks.send(body)
        return body

    # -- the request pipeline ------------------------------------------------------

    def _route(self, name: str, handler: Handler) -> Handler:
        async def dispatch(request: web.Request) -> web.StreamResponse:
            stats = self.stats
            stats.requests += 1
            stats.by_route[name] += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                if self.record:
                    self.requests.append(
                        RecordedRequest(
                            route=name,
                            method=request.method,
                            path=request.path,
                            query={k: request.query.getall(k) for k in request.query},
                            headers=dict(request.headers),
                            body=await request.read(),
                            at=time.monotonic(),
                        )
                    )
                return await self._answer(name, request, handler)
            finally:
                stats.in_flight -= 1

        return dispatch

    async def _answer(
        self, name: str, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if self._blocked:
            return web.Response(status=403, text=_BLOCK_PAGE, content_type="text/html")
        throttled = self._throttle()
        if throttled is not None:
            return throttled
        fault = self.faults.next(name)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None or fault.drop:
                if fault.after_effect:
                    await self._authorized(name, request, handler)
                if fault.drop:
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response(status=500)
                assert fault.status is not None
                return self._fault_answer(fault)
        return await self._authorized(name, request, handler)

    async def _authorized(
        self, name: str, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if name != "token":
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token or not self.valid_token(token):
                return problem_response(401, "Invalid user name or password")
            if self._denied_account is not None:
                return self._denied(self._denied_account)
        return await handler(request)

    def _throttle(self) -> web.Response | None:
        if self.rate_limit is None:
            return None
        now = time.monotonic()
        admitted = self._admitted
        while admitted and admitted[0] <= now - self.rate_window:
            admitted.popleft()
        if len(admitted) >= self.rate_limit:
            self.stats.throttled += 1
            headers = {"Retry-After": f"{self.retry_after:g}"} if self.retry_after_header else None
            return problem_response(
                429,
                "You have sent too many requests in a given amount of time. "
                "Please try again later.",
                headers=headers,
                retry_after=self.retry_after,
            )
        admitted.append(now)
        return None

    def _fault_answer(self, fault: Fault) -> web.Response:
        status = fault.status
        assert status is not None
        if fault.html:
            page = _BLOCK_PAGE if status == 403 else _PROXY_PAGE.format(status=status)
            return web.Response(status=status, text=page, content_type="text/html")
        headers = None
        extra: dict[str, Any] = {}
        if fault.retry_after is not None:
            if status == 429:
                extra["retry_after"] = fault.retry_after
            if fault.retry_after_header:
                headers = {"Retry-After": f"{fault.retry_after:g}"}
        detail = {
            500: "Our team are probably already working on the elimination of the problem",
            429: "You have sent too many requests in a given amount of time. "
            "Please try again later.",
        }.get(status, "Injected fault")
        return problem_response(status, detail, headers=headers, **extra)

    def _denied(self, status: int) -> web.Response:
        if status == 402:
            return problem_response(402, "Payment required")
        return problem_response(403, "Insufficient rights")

    def _talk_or_error(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = request.match_info["talk_id"]
        talk_id = int(raw) if raw.isdigit() else -1
        talk = self.talks.get(talk_id)
        if talk is None:
            return problem_response(404, f"Cannot {request.method} {request.url}")
        denied = self._denied_talks.get(talk_id)
        if denied is not None:
            return self._denied(denied)
        return talk

    # -- routes --------------------------------------------------------------------

    async def _get_talk(self, request: web.Request) -> web.StreamResponse:
        talk = self._talk_or_error(request)
        if isinstance(talk, web.Response):
            return talk
        talk_id = int(request.match_info["talk_id"])
        return web.Response(body=orjson.dumps(self.payload(talk_id)), content_type=HAL_JSON)

    async def _close(self, request: web.Request) -> web.StreamResponse:
        talk = self._talk_or_error(request)
        if isinstance(talk, web.Response):
            return talk
        body = await request.read()
        force = False
        if body:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                return problem_response(400, "Request body is not valid JSON")
            if not isinstance(data, dict) or not isinstance(data.get("force_close", False), bool):
                return problem_response(400, "force_close must be a boolean")
            force = data.get("force_close", False)
        if not talk["is_in_work"]:
            return problem_response(422, "Talk is already closed or being closed")
        if self.nps_bot and not force:
            self.nps_launched.append(int(request.match_info["talk_id"]))
            return web.Response(status=202)
        talk["is_in_work"] = False
        talk["updated_at"] = int(time.time())
        payload = dict(talk)
        for listener in self._talk_closed_listeners:
            listener(payload)
        return web.Response(status=202)

    async def _list_talks(self, request: web.Request) -> web.StreamResponse:
        from ._listing import list_talks

        return await list_talks(self, request)


def example_talk(talk_id: int) -> dict[str, Any]:
    """The API reference's example talk with ``talk_id`` (no links), as the fake stores it.

    Only ``talk_id`` differs from the documented example: every default talk
    has its ``chat_id``, contact and lead, as ``FakeKommo``'s contract says.
    """
    talk = dict(_EXAMPLE)
    talk["talk_id"] = talk_id
    return talk


# Stored with a talk for its list shape only: GET /api/v4/talks/{id} documents neither.
_LIST_ONLY = ("status", "source_id")


def talk_payload(base: str, talk_id: int, talk: dict[str, Any]) -> dict[str, Any]:
    """A stored talk as the API answers it, with ``_links`` and ``_embedded`` on ``base``."""
    body = {key: value for key, value in talk.items() if key not in _LIST_ONLY}
    body["_links"] = {"self": {"href": f"{base}/api/v4/talks/{talk_id}"}}
    contacts = [_ref(base, "contacts", talk["contact_id"])]
    leads, customers = [], []
    if talk.get("entity_type") == "lead" and talk.get("entity_id") is not None:
        leads.append(_ref(base, "leads", talk["entity_id"]))
    elif talk.get("entity_type") == "customer" and talk.get("entity_id") is not None:
        customers.append(_ref(base, "customers", talk["entity_id"]))
    body["_embedded"] = {"contacts": contacts, "leads": leads, "customers": customers}
    return body


def list_item(base: str, talk_id: int, talk: dict[str, Any]) -> dict[str, Any]:
    """A stored talk as the talks list carries it (see :func:`talk_payload`)."""
    item = talk_payload(base, talk_id, talk)
    item.pop("missed_at", None)
    item["status"] = talk.get("status") or ("in_work" if talk["is_in_work"] else "closed")
    item["source_id"] = talk.get("source_id")
    return item


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # Kommo tags every answer with a request id; so does the fake.
    response.headers.setdefault("X-Request-Id", secrets.token_hex(8))


def _ref(base: str, kind: str, entity_id: int) -> dict[str, Any]:
    return {"id": entity_id, "_links": {"self": {"href": f"{base}/api/v4/{kind}/{entity_id}"}}}
