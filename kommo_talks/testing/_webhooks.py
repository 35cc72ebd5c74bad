"""Webhook deliveries of :class:`~kommo_talks.testing.FakeKommo`, as Kommo sends them.

Kommo posts account webhooks as ``application/x-www-form-urlencoded`` bodies
with bracketed keys and string values (``account[...]`` first, then
``talk[update][0][is_in_work]=0`` and the like) from
``User-Agent: amoCRM-WebHook-client/1.0``, waits at most 2 s for a 2xx
answer, and sends one delivery after another. A customer's message arrives
as ``message[add]`` (``author[type]=external``), a manager's as
``outgoing_message[add]`` (``author[type]=internal`` with
``author[user_id]``): the shapes that real deliveries and other clients show
(Kommo's own pages do not document the outgoing section). The fake does the
same from one background task with its own ``aiohttp.ClientSession``,
records every delivery, and does not retry a failed one (Kommo does, later).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol
from urllib.parse import urlencode

import aiohttp
import attrs

__all__ = [
    "MANAGER_USER_ID",
    "FakeWebhooks",
    "Sender",
    "WebhookDelivery",
    "message_add_body",
    "talk_event_body",
]

FORM: Final = "application/x-www-form-urlencoded"
USER_AGENT: Final = "amoCRM-WebHook-client/1.0"
"""What Kommo's webhook deliveries send as their ``User-Agent``."""
MANAGER_USER_ID: Final = 1000001
"""The ``author[user_id]`` of the fake's outgoing messages: the manager's Kommo user ID."""

# The talk fields Kommo's talk[add] / talk[update] deliveries carry.
_TALK_FIELDS: Final = (
    "talk_id",
    "created_at",
    "updated_at",
    "rate",
    "contact_id",
    "chat_id",
    "entity_id",
    "entity_type",
    "is_in_work",
    "is_read",
    "origin",
)
# Kommo's element types for the entity a message is attached to.
_ELEMENT_TYPES: Final = {"lead": "2", "customer": "12"}


@attrs.frozen
class WebhookDelivery:
    """One webhook the fake posted.

    Attributes:
        url: where it was posted (as given to ``add_webhook``).
        body: the form-encoded body sent.
        status: the HTTP status answered, or ``None`` when no answer came
            (connection refused, timed out).
        error: why no answer came, or ``None``.
    """

    url: str
    body: bytes
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True if the answer was a 2xx (what Kommo counts as delivered)."""
        return self.status is not None and 200 <= self.status < 300


def _text(value: Any) -> str:
    """Kommo's string form of a payload value: ``1``/``0`` for flags, ``""`` for null."""
    if value is None:
        return ""
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


@attrs.frozen
class Sender:
    """The account a delivery comes from: its ``account[...]`` keys."""

    account_id: int
    subdomain: str
    base_url: str

    def pairs(self) -> list[tuple[str, str]]:
        """The ``account[...]`` form pairs: first, in this order, as recent deliveries have them."""
        return [
            ("account[subdomain]", self.subdomain),
            ("account[id]", str(self.account_id)),
            ("account[_links][self]", self.base_url),
        ]


def talk_event_body(action: str, talks: Iterable[Mapping[str, Any]], *, sender: Sender) -> bytes:
    """A ``talk[add]`` or ``talk[update]`` delivery body for the given talk payloads.

    ``action`` is ``"add"`` or ``"update"``; the talks are numbered ``[0]``,
    ``[1]``, ... in order, after ``sender``'s ``account[...]`` keys.
    """
    if action not in ("add", "update"):
        raise ValueError(f"action must be 'add' or 'update', got {action!r}")
    pairs = sender.pairs()
    for index, talk in enumerate(talks):
        prefix = f"talk[{action}][{index}]"
        pairs.extend((f"{prefix}[{name}]", _text(talk.get(name))) for name in _TALK_FIELDS)
    return urlencode(pairs).encode("ascii")


def message_add_body(
    talk: Mapping[str, Any],
    text: str,
    *,
    direction: str,
    author_name: str,
    message_id: str,
    created_at: int,
    sender: Sender,
) -> bytes:
    """A delivery of one message in ``talk``'s chat, in the section its direction uses.

    ``"incoming"`` gives ``message[add][0]`` (the customer, ``author[type]``
    ``external``, with the entity the message is attached to);
    ``"outgoing"`` gives ``outgoing_message[add][0]`` (a manager,
    ``author[type]`` ``internal`` with ``author[user_id]``, and the customer
    as ``recipient``). Both carry ``message_type`` ``text``.
    """
    if direction == "incoming":
        prefix, fields = "message[add][0]", _incoming_fields(talk, author_name)
    else:
        prefix, fields = "outgoing_message[add][0]", _outgoing_fields(talk, author_name)
    fields = {
        "id": message_id,
        "chat_id": talk.get("chat_id"),
        "talk_id": talk.get("talk_id"),
        "contact_id": talk.get("contact_id"),
        "text": text,
        "created_at": created_at,
        "message_type": "text",
        "type": direction,
        **fields,
        "origin": talk.get("origin"),
    }
    pairs = sender.pairs()
    # A value the talk lacks is left out, not sent empty (a site chat's message
    # came without its entity keys).
    pairs.extend((f"{prefix}[{k}]", _text(v)) for k, v in fields.items() if v is not None)
    return urlencode(pairs).encode("utf-8")


def _incoming_fields(talk: Mapping[str, Any], author_name: str) -> dict[str, Any]:
    entity_type = talk.get("entity_type")
    entity_id = talk.get("entity_id")
    if entity_type in _ELEMENT_TYPES and entity_id is not None:
        element_type, element_id = _ELEMENT_TYPES[entity_type], entity_id
    else:  # attached to the contact
        element_type, element_id = "1", talk.get("contact_id")
    return {
        "element_type": element_type,
        "element_id": element_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "author][id": _customer_id(talk),
        "author][type": "external",
        "author][name": author_name,
        # No author[avatar_url]: Kommo leaves the key out rather than send it empty.
    }


def _outgoing_fields(talk: Mapping[str, Any], author_name: str) -> dict[str, Any]:
    return {
        "source_id": talk.get("source_id"),
        "author][id": uuid.uuid5(uuid.NAMESPACE_URL, f"kommo-user-{MANAGER_USER_ID}"),
        "author][type": "internal",
        "author][user_id": MANAGER_USER_ID,
        "author][name": author_name,
        "recipient][id": _customer_id(talk),
        "recipient][type": "external",
    }


def _customer_id(talk: Mapping[str, Any]) -> uuid.UUID:
    """The chat participant ID (a UUID, as in Kommo's examples) of the talk's contact."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"kommo-contact-{talk.get('contact_id')}")


def now() -> int:
    """Unix seconds, as Kommo's payloads carry them."""
    return int(time.time())


class WebhooksHost(Protocol):
    """What :class:`FakeWebhooks` reads from the fake that delivers."""

    @property
    def url(self) -> str: ...

    @property
    def webhook_timeout(self) -> float: ...

    @property
    def account_id(self) -> int: ...

    @property
    def subdomain(self) -> str: ...


class FakeWebhooks:
    """The fake's webhook subscriptions and its delivery task (see ``FakeKommo``)."""

    def __init__(self, host: WebhooksHost) -> None:
        self._host = host
        self.urls: list[str] = []
        self.deliveries: list[WebhookDelivery] = []
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def subscribe(self, url: str) -> None:
        """Post every later delivery to ``url`` too."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be an http:// or https:// URL, got {url!r}")
        self.urls.append(url)

    def send(self, body: bytes) -> None:
        """Queue ``body`` for every subscribed URL (needs a running event loop)."""
        if not self.urls:
            return
        for url in self.urls:
            self._queue.put_nowait((url, body))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._deliver_all())

    def emit(self, body: bytes) -> bytes:
        """Queue ``body`` for delivery and return it; ``RuntimeError`` if nobody subscribed."""
        if not self.urls:
            raise RuntimeError("no webhook subscribed: call fake.add_webhook(url) first")
        self.send(body)
        return body

    def emit_talk(self, action: str, talk: Mapping[str, Any]) -> bytes:
        """Queue a ``talk[add]`` or ``talk[update]`` delivery of one talk."""
        return self.emit(talk_event_body(action, [talk], sender=self._sender()))

    def emit_message(
        self,
        talk: Mapping[str, Any],
        text: str,
        *,
        direction: str,
        author_name: str | None,
        message_id: str | None,
    ) -> bytes:
        """Queue a message delivery (see ``FakeKommo.emit_message`` for the defaults)."""
        if direction not in ("incoming", "outgoing"):
            raise ValueError(f"direction must be 'incoming' or 'outgoing', got {direction!r}")
        if author_name is None:
            author_name = "Customer" if direction == "incoming" else "Manager"
        body = message_add_body(
            talk,
            text,
            direction=direction,
            author_name=author_name,
            message_id=message_id or str(uuid.uuid4()),
            created_at=now(),
            sender=self._sender(),
        )
        return self.emit(body)

    def talk_closed(self, talk: dict[str, Any]) -> None:
        """The fake's close listener: a ``talk[update]`` with ``is_in_work`` 0."""
        if self.urls:
            self.send(talk_event_body("update", [talk], sender=self._sender()))

    def _sender(self) -> Sender:
        host = self._host
        return Sender(host.account_id, host.subdomain, host.url)

    async def idle(self) -> None:
        """Return once every queued delivery has been answered, refused or timed out."""
        await self._queue.join()

    async def close(self) -> None:
        """Drop what is still queued, stop the delivery task, close the session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        queue, self._queue = self._queue, asyncio.Queue()
        while not queue.empty():  # dropped: an idle() waiting on them returns
            queue.get_nowait()
            queue.task_done()

    async def _deliver_all(self) -> None:
        queue = self._queue
        while not queue.empty():
            url, body = queue.get_nowait()
            try:
                self.deliveries.append(await self._deliver(url, body))
            finally:
                queue.task_done()

    async def _deliver(self, url: str, body: bytes) -> WebhookDelivery:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self._host.webhook_timeout)
        headers = {"Content-Type": FORM, "User-Agent": USER_AGENT}
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await response.read()
                return WebhookDelivery(url, body, response.status)
        except TimeoutError:
            return WebhookDelivery(url, body, None, f"no answer in {timeout.total:g} s")
        except Exception as exc:  # a delivery failure, never the end of the delivery task
            return WebhookDelivery(url, body, None, f"{type(exc).__name__}: {exc}")
