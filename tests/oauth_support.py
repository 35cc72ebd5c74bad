"""Shared by the test_oauth_* modules: fixtures, helpers and test stores."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from kommo_talks import (
    KommoClient,
    MemoryTokenStore,
    OAuth2,
    RetryPolicy,
    TokenSet,
    TokenStoreError,
)
from kommo_talks.testing import FakeKommo

FAST = RetryPolicy(max_attempts=5, base_delay=0.001, max_delay=1.0)
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
# Generous bound for waits that end as soon as the awaited thing happens.
BOUND = 30.0


# -- fixtures and helpers ------------------------------------------------------


@pytest.fixture(autouse=True)
def leak_check(caplog: pytest.LogCaptureFixture, fake: FakeKommo) -> Iterator[list[str]]:
    """Capture every log record at DEBUG; at teardown, no secret may appear in them.

    Tests add secrets of their own (made-up tokens) to the yielded list.
    """
    caplog.set_level(logging.DEBUG)
    extra: list[str] = []
    yield extra
    # At teardown `caplog.text` holds only the teardown phase: format every phase's records,
    # tracebacks included.
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    text = "\n".join(formatter.format(record) for record in records)
    for secret in {*fake.oauth.secret_values(), fake.token, *extra}:
        assert secret not in text


def oauth_for(fake: FakeKommo, store: Any) -> OAuth2:
    return OAuth2(fake.oauth.client_id, fake.oauth.client_secret, fake.oauth.redirect_uri, store)


@contextlib.asynccontextmanager
async def client_for(fake: FakeKommo, auth: OAuth2, **options: Any) -> AsyncIterator[KommoClient]:
    options.setdefault("retry", FAST)
    async with KommoClient(fake.url, auth=auth, rate_limit=None, **options) as client:
        yield client


def expired(tokens: TokenSet) -> TokenSet:
    """The same pair, as a store holds it once its expiry time has passed."""
    return attrs.evolve(tokens, expires_at=datetime.now(UTC) - timedelta(seconds=1))


def pair(tokens: TokenSet | None) -> tuple[str, str] | None:
    """The two tokens of a pair: the client and the fake compute ``expires_at`` apart."""
    return None if tokens is None else (tokens.access_token, tokens.refresh_token)


def api_bearers(fake: FakeKommo) -> list[str]:
    """The bearer tokens of the API requests the fake received, in order."""
    return [
        r.headers["Authorization"].removeprefix("Bearer ")
        for r in fake.requests
        if r.route != "token"
    ]


def token_bodies(fake: FakeKommo) -> list[dict[str, Any]]:
    return [r.json() for r in fake.requests if r.route == "token"]


class FlakyStore(MemoryTokenStore):
    """A memory store whose next ``failures`` saves raise TokenStoreError."""

    def __init__(self, tokens: TokenSet | None = None) -> None:
        super().__init__(tokens)
        self.failures = 0
        self.saves = 0

    async def save(self, tokens: TokenSet) -> None:
        self.saves += 1
        if self.failures:
            self.failures -= 1
            raise TokenStoreError("cannot write the token store: disk full")
        await super().save(tokens)


class LockingStore(MemoryTokenStore):
    """A store with its own refresh_lock(), recording when it is held."""

    def __init__(self, tokens: TokenSet | None = None) -> None:
        super().__init__(tokens)
        self.lock = asyncio.Lock()
        self.waiting = asyncio.Event()
        self.held = 0
        self.events: list[str] = []

    @contextlib.asynccontextmanager
    async def refresh_lock(self) -> AsyncIterator[None]:
        self.waiting.set()
        async with self.lock:
            self.held += 1
            self.events.append("locked")
            try:
                yield
            finally:
                self.events.append("unlocked")

    async def load(self) -> TokenSet | None:
        self.events.append("load")
        return await super().load()

    async def save(self, tokens: TokenSet) -> None:
        self.events.append("save")
        await super().save(tokens)


async def exchange(fake: FakeKommo, code: str, store: Any, **options: Any) -> TokenSet:
    return await OAuth2.exchange_code(
        fake.url,
        code,
        client_id=options.pop("client_id", fake.oauth.client_id),
        client_secret=options.pop("client_secret", fake.oauth.client_secret),
        redirect_uri=options.pop("redirect_uri", fake.oauth.redirect_uri),
        store=store,
        **options,
    )
