"""The parts of Kommo's CRM API that :class:`~kommo_talks.testing.FakeKommo` serves beyond Talks.

Enough for ``client.request()`` and ``client.paginate()`` and a bot that moves
a talk's lead after closing it:

- ``GET /api/v4/account``: the account (``id``, ``name``, ``subdomain``,
  ``current_user_id``, ``country``, ``currency``, ``_links``), as Kommo's
  account endpoint answers;
- ``GET /api/v4/leads``: HAL pages of ``_embedded.leads`` in ``id`` order,
  ``page`` (default 1) and ``limit`` (default 50, at most 250), absolute
  ``_links.next`` while more follow, ``204 No Content`` for an empty page;
- ``PATCH /api/v4/leads/{id}`` with a JSON object of ``status_id`` and/or
  ``pipeline_id`` (positive integers): 200 with the lead's ``id``,
  ``updated_at`` and ``_links``; 404 for an unknown lead, 400 for a bad body.

It imports only the leaf :mod:`._wire` of the rest of ``testing``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

import orjson
from aiohttp import web

from ._wire import Route

__all__ = ["FakeCRM"]

DEFAULT_PIPELINE_ID: Final = 3177727
DEFAULT_STATUS_ID: Final = 32392156
_HAL: Final = "application/hal+json"
_MAX_LIMIT: Final = 250


class FakeCRM:
    """The account and its leads (see the module docstring); ``leads`` maps ID to payload."""

    def __init__(self, *, account_id: int, subdomain: str, leads: Iterable[int] = ()) -> None:
        self.account_id = account_id
        self.subdomain = subdomain
        self.leads: dict[int, dict[str, Any]] = {}
        for lead_id in leads:
            self.add_lead(lead_id)

    def add_lead(
        self,
        lead_id: int,
        *,
        status_id: int = DEFAULT_STATUS_ID,
        pipeline_id: int = DEFAULT_PIPELINE_ID,
    ) -> dict[str, Any]:
        """Add (or replace) a lead and return its stored payload."""
        now = int(time.time())
        lead = {
            "id": lead_id,
            "name": f"Lead #{lead_id}",
            "price": 0,
            "status_id": status_id,
            "pipeline_id": pipeline_id,
            "account_id": self.account_id,
            "created_at": now,
            "updated_at": now,
        }
        self.leads[lead_id] = lead
        return lead

    def routes(self) -> Iterable[Route]:
        """The CRM endpoints (route names ``account``, ``leads``, ``lead_update``)."""
        yield Route("GET", "/api/v4/account", "account", self._account)
        yield Route("GET", "/api/v4/leads", "leads", self._list_leads)
        yield Route("PATCH", "/api/v4/leads/{lead_id}", "lead_update", self._update_lead)

    async def _account(self, request: web.Request) -> web.StreamResponse:
        base = _base(request)
        body = {
            "id": self.account_id,
            "name": f"{self.subdomain.capitalize()} account",
            "subdomain": self.subdomain,
            "current_user_id": 504141,
            "country": "US",
            "currency": "USD",
            "is_technical_account": False,
            "_links": {"self": {"href": f"{base}/api/v4/account"}},
        }
        return _json(body)

    async def _list_leads(self, request: web.Request) -> web.StreamResponse:
        page = _positive(request.query.get("page"), 1)
        limit = _positive(request.query.get("limit"), 50)
        if page is None or limit is None:
            return _problem(400, "page and limit must be positive integers")
        if limit > _MAX_LIMIT:
            return _problem(422, "Limit 250 per page")
        ids = sorted(self.leads)
        chosen = ids[(page - 1) * limit : page * limit]
        if not chosen:
            return web.Response(status=204)
        base = _base(request)
        links: dict[str, Any] = {"self": {"href": _page_url(base, page, limit)}}
        if page * limit < len(ids):
            links["next"] = {"href": _page_url(base, page + 1, limit)}
        leads = [self._with_links(base, self.leads[i]) for i in chosen]
        return _json({"_page": page, "_links": links, "_embedded": {"leads": leads}})

    async def _update_lead(self, request: web.Request) -> web.StreamResponse:
        lead = self.leads.get(_positive(request.match_info["lead_id"], 0) or 0)
        if lead is None:
            return _problem(404, "Lead not found")
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _problem(400, "Request body is not valid JSON")
        changes = (
            {k: v for k, v in data.items() if k in ("status_id", "pipeline_id")}
            if (isinstance(data, dict))
            else {}
        )
        if not changes or any(type(v) is not int or v < 1 for v in changes.values()):
            return _problem(400, "status_id or pipeline_id must be a positive integer")
        lead.update(changes, updated_at=int(time.time()))
        base = _base(request)
        return _json({"id": lead["id"], "updated_at": lead["updated_at"], **_links(base, lead)})

    @staticmethod
    def _with_links(base: str, lead: dict[str, Any]) -> dict[str, Any]:
        return {**lead, **_links(base, lead)}


def _links(base: str, lead: dict[str, Any]) -> dict[str, Any]:
    return {"_links": {"self": {"href": f"{base}/api/v4/leads/{lead['id']}"}}}


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _page_url(base: str, page: int, limit: int) -> str:
    return f"{base}/api/v4/leads?page={page}&limit={limit}"


def _positive(value: str | None, default: int) -> int | None:
    if value is None:
        return default
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type=_HAL)


def _problem(status: int, detail: str) -> web.Response:
    body = {"title": "Error", "type": f"https://httpstatus.es/{status}", "status": status}
    body["detail"] = detail
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/problem+json"
    )
