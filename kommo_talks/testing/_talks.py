"""The talks :class:`~kommo_talks.testing.FakeKommo` holds, and ``GET``/close of one talk."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from ._wire import Route, denied_response, hal_response, problem_response

__all__ = ["Talks", "example_talk", "list_item", "talk_payload", "varied_talk"]

# The documented example of GET /api/v4/talks/{id}; every default talk is a copy
# with its own talk_id (and links on the fake's host).
_EXAMPLE: Final[dict[str, Any]] = {
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

# Stored with a talk for its list shape only: GET /api/v4/talks/{id} documents neither.
_LIST_ONLY: Final = ("status", "source_id")


def example_talk(talk_id: int) -> dict[str, Any]:
    """The API reference's example talk with ``talk_id`` (no links), as the fake stores it.

    Only ``talk_id`` differs from the documented example: every default talk
    has its ``chat_id``, contact and lead, as ``FakeKommo``'s contract says.
    """
    talk = dict(_EXAMPLE)
    talk["talk_id"] = talk_id
    return talk


# What varied_talk draws from: channels Kommo names as origins, and lead/customer/none.
_ORIGINS: Final = ("telegram", "whatsapp", "instagram_business", "onlinechat", "viber")
_ENTITIES: Final = (("lead", 6), ("customer", 2), (None, 2))
_NEWEST: Final = 1_764_547_200  # 2025-12-01 00:00 UTC: varied talks were created before it
_DAY: Final = 86_400


def varied_talk(talk_id: int, *, seed: int = 0, closed_share: float = 0.1) -> dict[str, Any]:
    """A plausible talk with ``talk_id``, as the fake stores it: one of many kinds, not the example.

    Each talk is drawn from its own generator, seeded by ``seed`` and
    ``talk_id``, so a talk is the same however many are made: its origin
    (telegram, whatsapp, instagram_business, onlinechat, viber), a lead, a
    customer or no entity, its own contact and chat, a creation time in the
    90 days before December 2025, read or not (an unread one may have
    ``missed_at``), and closed with ``closed_share`` odds (then with a
    rating). Store it as ``fake.talks[talk_id] = varied_talk(talk_id)``;
    ``FakeKommo``'s default talks stay the documented example.
    """
    rng = random.Random(f"kommo-talks:{seed}:{talk_id}")
    entity_type = rng.choices([e for e, _ in _ENTITIES], [w for _, w in _ENTITIES])[0]
    created = _NEWEST - rng.randrange(90 * _DAY)
    updated = created + rng.randrange(2 * _DAY)
    is_read = rng.random() < 0.6
    is_in_work = rng.random() >= closed_share
    return {
        "talk_id": talk_id,
        "created_at": created,
        "updated_at": updated,
        "rate": 0 if is_in_work else rng.choice((0, 3, 4, 5)),
        "contact_id": rng.randrange(1_000_000, 9_999_999),
        "chat_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "entity_id": None if entity_type is None else rng.randrange(100_000_000, 999_999_999),
        "entity_type": entity_type,
        "is_in_work": is_in_work,
        "is_read": is_read,
        "origin": rng.choice(_ORIGINS),
        "missed_at": None if is_read or rng.random() < 0.5 else updated + rng.randrange(3600),
        "account_id": _EXAMPLE["account_id"],
    }


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


def _ref(base: str, kind: str, entity_id: int) -> dict[str, Any]:
    return {"id": entity_id, "_links": {"self": {"href": f"{base}/api/v4/{kind}/{entity_id}"}}}


class TalksHost(Protocol):
    """What :class:`Talks` reads from the fake that serves it."""

    @property
    def url(self) -> str: ...

    @property
    def nps_bot(self) -> bool: ...

    @property
    def account_id(self) -> int: ...


class Talks:
    """The talks by ID, per-talk denials, and the ``get`` and ``close`` routes."""

    def __init__(self, host: TalksHost, ids: Iterable[int]) -> None:
        self._host = host
        self.by_id: dict[int, dict[str, Any]] = {}
        self.denied: dict[int, int] = {}
        self.nps_launched: list[int] = []
        self.closed_listeners: list[Callable[[dict[str, Any]], None]] = []
        for talk_id in ids:
            self.add(talk_id)

    def add(self, talk_id: int, **fields: Any) -> dict[str, Any]:
        """Store (or replace) the example talk ``talk_id`` in the host's account; ``fields`` win."""
        talk = example_talk(talk_id)
        talk["account_id"] = self._host.account_id
        talk.update(fields)
        self.by_id[talk_id] = talk
        return talk

    def held(self, talk_id: int) -> dict[str, Any]:
        """The stored talk; ``KeyError`` naming :meth:`FakeKommo.add_talk` if there is none."""
        talk = self.by_id.get(talk_id)
        if talk is None:
            raise KeyError(f"FakeKommo holds no talk {talk_id!r}: add it with add_talk() first")
        return talk

    def routes(self) -> Iterable[Route]:
        """``GET /api/v4/talks/{id}`` (``"get"``) and its ``/close`` (``"close"``)."""
        return (
            Route("GET", "/api/v4/talks/{talk_id}", "get", self._get),
            Route("POST", "/api/v4/talks/{talk_id}/close", "close", self._close),
        )

    def _lookup(self, request: web.Request) -> tuple[int, dict[str, Any]] | web.Response:
        raw = request.match_info["talk_id"]
        talk_id = int(raw) if raw.isdigit() else -1
        talk = self.by_id.get(talk_id)
        if talk is None:
            return problem_response(404, f"Cannot {request.method} {request.url}")
        denied = self.denied.get(talk_id)
        if denied is not None:
            return denied_response(denied)
        return talk_id, talk

    async def _get(self, request: web.Request) -> web.StreamResponse:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        talk_id, talk = found
        return hal_response(talk_payload(self._host.url, talk_id, talk))

    async def _close(self, request: web.Request) -> web.StreamResponse:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        talk_id, talk = found
        force = _force_close(await request.read())
        if isinstance(force, web.Response):
            return force
        if not talk["is_in_work"]:
            return problem_response(422, "Talk is already closed or being closed")
        if self._host.nps_bot and not force:
            self.nps_launched.append(talk_id)
            return web.Response(status=202)
        talk["is_in_work"] = False
        talk["updated_at"] = int(time.time())
        payload = dict(talk)
        for listener in self.closed_listeners:
            listener(payload)
        return web.Response(status=202)


def _force_close(body: bytes) -> bool | web.Response:
    """The close body's ``force_close`` (``False`` without a body), or a 400 answer."""
    if not body:
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return problem_response(400, "Request body is not valid JSON")
    if not isinstance(data, dict) or not isinstance(data.get("force_close", False), bool):
        return problem_response(400, "force_close must be a boolean")
    return bool(data.get("force_close", False))
