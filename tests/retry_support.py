"""Shared by the test_retries_* modules: the test policy and small helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import KommoClient, RetryPolicy
from kommo_talks.testing import FakeKommo

# Real-looking delays: on the fake clock they cost nothing, and the sleeps stay readable.
POLICY = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=10.0)

MakeClient = Callable[..., KommoClient]


def attempts(fake: FakeKommo, route: str) -> int:
    return fake.stats.by_route[route]


def backoff_caps(n: int, policy: RetryPolicy = POLICY) -> Iterator[float]:
    """The full-jitter cap of each of the first ``n`` retries."""
    for retry in range(1, n + 1):
        yield min(policy.max_delay, policy.base_delay * 2 ** (retry - 1))


@asynccontextmanager
async def scripted_server(answers: list[web.Response]) -> AsyncIterator[str]:
    """Serve ``answers`` in order on every path; yield the base URL."""
    pending = iter(answers)

    async def handler(request: web.Request) -> web.Response:
        return next(pending)

    async with serving(answering_everything(handler)) as url:
        yield url
