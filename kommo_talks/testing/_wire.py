"""What every part of :class:`~kommo_talks.testing.FakeKommo` answers with: the leaf module.

Content types, Kommo's problem+json and HTML error pages, and :class:`Route`,
the value an endpoint component hands the fake to serve. It imports nothing
else from ``kommo_talks.testing``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol

import attrs
import orjson
from aiohttp import web

__all__ = [
    "HAL_JSON",
    "PROBLEM_JSON",
    "Handler",
    "Route",
    "RouteSource",
    "denied_response",
    "hal_response",
    "html_page",
    "problem_response",
]

HAL_JSON: Final = "application/hal+json"
PROBLEM_JSON: Final = "application/problem+json"

BLOCK_PAGE: Final = (
    "<html><head><title>403 Forbidden</title></head><body>"
    "<center><h1>403 Forbidden</h1></center><hr><center>nginx</center></body></html>"
)
_PROXY_PAGE: Final = (
    "<html><head><title>{status} Bad Gateway</title></head><body>"
    "<center><h1>{status} Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
_TITLES: Final = {
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

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.frozen
class Route:
    """One endpoint of the fake: what it serves and under which name it is counted.

    ``name`` is the route name of ``FakeKommo.script`` and ``FakeStats.by_route``;
    ``authorized`` routes answer 401 without a valid bearer token.
    """

    method: str
    path: str
    name: str
    handler: Handler
    authorized: bool = True


class RouteSource(Protocol):
    """A component of the fake that serves some endpoints."""

    def routes(self) -> Iterable[Route]:
        """The endpoints it serves."""
        ...


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


def hal_response(body: Any) -> web.Response:
    """A ``200`` with ``body`` as ``application/hal+json``."""
    return web.Response(body=orjson.dumps(body), content_type=HAL_JSON)


def denied_response(status: int) -> web.Response:
    """Kommo's 402 (account unpaid) or 403 (insufficient rights) problem."""
    if status == 402:
        return problem_response(402, "Payment required")
    return problem_response(403, "Insufficient rights")


def html_page(status: int) -> web.Response:
    """An nginx HTML error page: Kommo's block page for a 403, a proxy's page otherwise."""
    page = BLOCK_PAGE if status == 403 else _PROXY_PAGE.format(status=status)
    return web.Response(status=status, text=page, content_type="text/html")
