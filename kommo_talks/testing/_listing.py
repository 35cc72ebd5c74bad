"""``GET /api/v4/talks`` of :class:`~kommo_talks.testing.FakeKommo`: pages, links, filters.

What it serves (Kommo's list endpoint for talks is new and its details are
unconfirmed; this follows how Kommo's other v4 lists behave and what the
published clients send):

- ``page`` (default 1) and ``limit`` (default 50, at most 250: a larger one
  is answered ``422`` with Kommo's documented ``"Limit 250 per page"``
  problem; a page or limit that is not a positive integer gets ``400``);
- talks in ``talk_id`` order under ``_embedded.talks``, each in the list
  shape Kommo's list descriptions give: the payload of ``GET
  /api/v4/talks/{id}`` without ``missed_at``, with ``status`` (``in_work``
  or ``closed`` from ``is_in_work``, unless the stored talk has its own)
  and ``source_id`` (the stored talk's, else ``null``); ``_page``; ``_links``
  with absolute ``self``, ``first``, ``prev`` (after page 1) and ``next``
  (while more talks follow) URLs on the fake's host that repeat the
  request's query with another ``page``;
- ``204 No Content`` (no body) when the page holds no talk;
- filters, combined with AND, several values of one key with OR:
  ``filter[talk_id]``, ``filter[contact_id]``, ``filter[entity_id]`` (each a
  scalar or ``[]`` list of integers; anything else is a ``400``),
  ``filter[entity_type]`` (strings) and ``filter[only_in_work]``: present
  means open talks only, whatever its value (``0`` included), as Kommo's
  flag is described to work. Other filter keys are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Protocol

from aiohttp import web
from yarl import URL

from ._talks import Talks, list_item
from ._wire import Route, hal_response, problem_response

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "TalkList"]

DEFAULT_PAGE: Final = 1
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 250
_PATH: Final = "/api/v4/talks"
_INT_FILTERS: Final = frozenset({"talk_id", "contact_id", "entity_id"})
_STR_FILTERS: Final = frozenset({"entity_type"})
# filter[KEY], filter[KEY][] and PHP's indexed filter[KEY][0]
_FILTER_KEY: Final = re.compile(r"filter\[([^\[\]]+)\](?:\[\d*\])?")

# key -> the accepted values; "only_in_work" -> {True}
_Wanted = dict[str, set[Any]]


class ListHost(Protocol):
    """What :class:`TalkList` reads from the fake that serves it."""

    @property
    def url(self) -> str: ...


class TalkList:
    """``GET /api/v4/talks`` (route ``"list"``) over the fake's :class:`Talks`."""

    def __init__(self, host: ListHost, talks: Talks) -> None:
        self._host = host
        self._talks = talks

    def routes(self) -> Iterable[Route]:
        """The one route it serves."""
        return (Route("GET", _PATH, "list", self.handle),)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer a talks list request (see the module docstring)."""
        query = request.query
        page = _positive_int(query.get("page"), DEFAULT_PAGE)
        limit = _positive_int(query.get("limit"), DEFAULT_LIMIT)
        if page is None:
            return problem_response(400, "page must be a positive integer")
        if limit is None:
            return problem_response(400, "limit must be a positive integer")
        if limit > MAX_LIMIT:
            return problem_response(422, f"Limit {MAX_LIMIT} per page")
        try:
            wanted = _compile_filters(_filters(query.items()))
        except ValueError as exc:
            return problem_response(400, str(exc))
        talks = self._talks.by_id
        ids = [i for i in sorted(talks) if _matches(talks[i], wanted)]
        start = (page - 1) * limit
        chosen = ids[start : start + limit]
        if not chosen:
            return web.Response(status=204)
        base = self._host.url
        return hal_response(
            {
                "_page": page,
                "_links": _links(base, query.items(), page, more=start + limit < len(ids)),
                "_embedded": {"talks": [list_item(base, i, talks[i]) for i in chosen]},
            }
        )


def _links(
    base_url: str, query: Iterable[tuple[str, str]], page: int, *, more: bool
) -> dict[str, dict[str, str]]:
    """``self``, ``first``, ``prev`` and ``next`` repeating the query with another page."""
    pairs = [(k, v) for k, v in query if k != "page"]
    base = URL(base_url).with_path(_PATH)

    def link(number: int) -> dict[str, str]:
        return {"href": str(base.with_query([("page", str(number)), *pairs]))}

    links = {"self": link(page), "first": link(1)}
    if page > 1:
        links["prev"] = link(page - 1)
    if more:
        links["next"] = link(page + 1)
    return links


def _positive_int(raw: str | None, default: int) -> int | None:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        return None
    return int(raw)


def _filters(query: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for key, value in query:
        match = _FILTER_KEY.fullmatch(key)
        if match is not None:
            filters.setdefault(match.group(1), []).append(value)
    return filters


def _compile_filters(filters: dict[str, list[str]]) -> _Wanted:
    wanted: _Wanted = {}
    for key, values in filters.items():
        if key in _INT_FILTERS:
            for value in values:
                if not (value.isascii() and value.isdigit()):
                    raise ValueError(f"filter[{key}] must be an integer, got {value!r}")
            wanted[key] = {int(v) for v in values}
        elif key in _STR_FILTERS:
            wanted[key] = set(values)
        elif key == "only_in_work":  # on by presence, whatever the value
            wanted["is_in_work"] = {True}
        # Other keys: ignored, as the module docstring says.
    return wanted


def _matches(talk: dict[str, Any], wanted: _Wanted) -> bool:
    return all(talk.get(key) in accepted for key, accepted in wanted.items())
