"""The way in of every request to :class:`~kommo_talks.testing.FakeKommo`.

In order: count and record it, then the IP block, the enforced rate limit,
an injected fault, the bearer token and an account-wide denial; only then
the route's own handler.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Protocol

from aiohttp import web

from ._faults import Fault, FaultPlan
from ._stats import FakeStats, RecordedRequest
from ._wire import BLOCK_PAGE, Handler, Route, denied_response, html_page, problem_response

__all__ = ["Gate"]

_TOO_MANY = "You have sent too many requests in a given amount of time. Please try again later."
_FAULT_DETAILS = {
    500: "Our team are probably already working on the elimination of the problem",
    429: _TOO_MANY,
}


class GateHost(Protocol):
    """The fake's settings and records the gate reads and fills."""

    stats: FakeStats
    requests: list[RecordedRequest]
    faults: FaultPlan
    rate_limit: float | None
    rate_window: float
    retry_after: float
    retry_after_header: bool
    record: bool

    def valid_token(self, token: str) -> bool: ...


class Gate:
    """Wraps each route's handler in the checks every request goes through."""

    def __init__(self, host: GateHost) -> None:
        self._host = host
        self.blocked = False
        self.denied_account: int | None = None
        self._admitted: collections.deque[float] = collections.deque()

    def wrap(self, route: Route) -> Handler:
        """The aiohttp handler that serves ``route`` behind the gate."""

        async def dispatch(request: web.Request) -> web.StreamResponse:
            stats = self._host.stats
            stats.requests += 1
            stats.by_route[route.name] += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                if self._host.record:
                    self._host.requests.append(await _recorded(route.name, request))
                return await self._answer(route, request)
            finally:
                stats.in_flight -= 1

        return dispatch

    async def _answer(self, route: Route, request: web.Request) -> web.StreamResponse:
        if self.blocked:
            return web.Response(status=403, text=BLOCK_PAGE, content_type="text/html")
        throttled = self._throttle()
        if throttled is not None:
            return throttled
        fault = self._host.faults.next(route.name)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status is not None or fault.drop:
                return await self._fail(fault, route, request)
        return await self._authorized(route, request)

    async def _fail(self, fault: Fault, route: Route, request: web.Request) -> web.StreamResponse:
        if fault.after_effect:
            await self._authorized(route, request)
        if fault.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        return _fault_answer(fault)

    async def _authorized(self, route: Route, request: web.Request) -> web.StreamResponse:
        if route.authorized:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token or not self._host.valid_token(token):
                return problem_response(401, "Invalid user name or password")
            if self.denied_account is not None:
                return denied_response(self.denied_account)
        return await route.handler(request)

    def _throttle(self) -> web.Response | None:
        host = self._host
        if host.rate_limit is None:
            return None
        now = time.monotonic()
        admitted = self._admitted
        while admitted and admitted[0] <= now - host.rate_window:
            admitted.popleft()
        if len(admitted) < host.rate_limit:
            admitted.append(now)
            return None
        host.stats.throttled += 1
        headers = {"Retry-After": f"{host.retry_after:g}"} if host.retry_after_header else None
        return problem_response(429, _TOO_MANY, headers=headers, retry_after=host.retry_after)


async def _recorded(name: str, request: web.Request) -> RecordedRequest:
    return RecordedRequest(
        route=name,
        method=request.method,
        path=request.path,
        query={k: request.query.getall(k) for k in request.query},
        headers=dict(request.headers),
        body=await request.read(),
        at=time.monotonic(),
    )


def _fault_answer(fault: Fault) -> web.Response:
    status = fault.status
    assert status is not None
    if fault.html:
        return html_page(status)
    headers = None
    extra: dict[str, Any] = {}
    if fault.retry_after is not None:
        if status == 429:
            extra["retry_after"] = fault.retry_after
        if fault.retry_after_header:
            headers = {"Retry-After": f"{fault.retry_after:g}"}
    detail = _FAULT_DETAILS.get(status, "Injected fault")
    return problem_response(status, detail, headers=headers, **extra)
