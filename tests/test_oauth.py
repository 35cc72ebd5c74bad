"""OAuth2: proactive and reactive refresh, single flight, save before use, rotation, leaks.

Every test runs over loopback HTTP against FakeKommo and its token endpoint.
An autouse fixture captures every log record at DEBUG and, at teardown,
checks that no token, code or client secret ever reached the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from kommo_talks import (
    ClientClosedError,
    CloseStatus,
    FileTokenStore,
    KommoClient,
    MemoryTokenStore,
    OAuth2,
    RateLimitError,
    RetryPolicy,
    TokenRefreshError,
    TokenSet,
    TokenStoreError,
    UnauthorizedError,
)
from kommo_talks.oauth import Plan, Step, is_stale, plan_refresh
from kommo_talks.testing import FakeKommo, Fault

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


# -- the pure decisions --------------------------------------------------------


def _pair(n: int, *, expires_in: float = 3600) -> TokenSet:
    return TokenSet(f"access-{n}", f"refresh-{n}", NOW + timedelta(seconds=expires_in))


@pytest.mark.parametrize(
    ("expires_in", "stale"), [(-5, True), (0, True), (59, True), (60, True), (61, False)]
)
def test_is_stale_within_60_seconds_of_expiry(expires_in: float, stale: bool) -> None:
    assert is_stale(_pair(1, expires_in=expires_in), NOW) is stale


def test_is_stale_when_the_access_token_was_rejected() -> None:
    assert is_stale(_pair(1), NOW, rejected="access-1")
    assert not is_stale(_pair(1), NOW, rejected="access-0")


def test_plan_refresh_decisions() -> None:
    fresh, stale, other = _pair(1), _pair(1, expires_in=10), _pair(2)
    plan = plan_refresh(fresh, kept=None, exchanged=None, now=NOW)
    assert plan == Plan(Step.USE, fresh)
    assert plan_refresh(stale, kept=None, exchanged=None, now=NOW) == Plan(Step.REFRESH, stale)
    # Our pair was rejected, but another holder saved a newer one: use it, no refresh.
    assert plan_refresh(other, kept=None, exchanged=None, now=NOW, rejected="access-1") == Plan(
        Step.USE, other
    )
    assert plan_refresh(fresh, kept=None, exchanged=None, now=NOW, rejected="access-1") == Plan(
        Step.REFRESH, fresh
    )
    assert plan_refresh(None, kept=None, exchanged=None, now=NOW) == Plan(Step.MISSING, None)


def test_plan_refresh_saves_the_kept_pair_only_if_the_store_did_not_move_on() -> None:
    old, kept, other = _pair(1, expires_in=10), _pair(2), _pair(3)
    assert plan_refresh(old, kept=kept, exchanged="refresh-1", now=NOW) == Plan(
        Step.SAVE_KEPT, kept
    )
    assert plan_refresh(other, kept=kept, exchanged="refresh-1", now=NOW) == Plan(
        Step.USE, other, drop_kept=True
    )
    assert plan_refresh(None, kept=kept, exchanged="refresh-1", now=NOW) == Plan(
        Step.MISSING, None, drop_kept=True
    )


# -- using and refreshing ------------------------------------------------------


async def test_fresh_token_is_sent_without_refresh(fake: FakeKommo) -> None:
    tokens = fake.oauth.issue_tokens()
    async with client_for(fake, oauth_for(fake, MemoryTokenStore(tokens))) as client:
        talk = await client.get_talk(1)
    assert talk.talk_id == 1
    assert api_bearers(fake) == [tokens.access_token]
    assert fake.stats.by_route["token"] == 0


@pytest.mark.parametrize(("expires_in", "refreshed"), [(59, True), (120, False)])
async def test_token_expiring_within_60_seconds_is_refreshed_before_use(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture, expires_in: int, refreshed: bool
) -> None:
    tokens = fake.oauth.issue_tokens(expires_in=expires_in)
    store = MemoryTokenStore(tokens)
    async with client_for(fake, oauth_for(fake, store)) as client:
        await client.get_talk(1)
    assert fake.oauth.refreshes == int(refreshed)
    stored = await store.load()
    if refreshed:
        new = fake.oauth.issued[-1]
        assert pair(stored) == pair(new)
        assert api_bearers(fake) == [new.access_token]
        assert "refreshed the tokens" in caplog.text
    else:
        assert stored == tokens
        assert api_bearers(fake) == [tokens.access_token]


async def test_refresh_sends_kommos_documented_json_body(fake: FakeKommo) -> None:
    tokens = fake.oauth.issue_tokens()
    async with client_for(fake, oauth_for(fake, MemoryTokenStore(expired(tokens)))) as client:
        await client.get_talk(1)
    [request] = [r for r in fake.requests if r.route == "token"]
    assert request.method == "POST"
    assert request.path == "/oauth2/access_token"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("kommo-talks/")
    assert "Authorization" not in request.headers
    assert request.json() == {
        "client_id": fake.oauth.client_id,
        "client_secret": fake.oauth.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": tokens.refresh_token,
        "redirect_uri": fake.oauth.redirect_uri,
    }


async def test_expired_token_refreshes_once_under_load(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    store = MemoryTokenStore(expired(old))
    async with client_for(fake, oauth_for(fake, store)) as client:
        talks = await asyncio.gather(*(client.get_talk(i) for i in range(1, 101)))
    assert [t.talk_id for t in talks] == list(range(1, 101))
    assert fake.stats.by_route["token"] == 1
    assert fake.oauth.refreshes == 1
    new = fake.oauth.issued[-1]
    assert pair(await store.load()) == pair(new)
    # Proactive: the stale token was never sent.
    assert set(api_bearers(fake)) == {new.access_token}


async def test_401_on_expired_token_refreshes_once_under_load(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    store = MemoryTokenStore(old)  # looks valid, but Kommo has expired it
    fake.oauth.expire_access_tokens()
    async with client_for(fake, oauth_for(fake, store)) as client:
        talks = await asyncio.gather(*(client.get_talk(i) for i in range(1, 101)))
    assert [t.talk_id for t in talks] == list(range(1, 101))
    assert fake.stats.by_route["token"] == 1
    new = fake.oauth.issued[-1]
    assert pair(await store.load()) == pair(new)
    bearers = api_bearers(fake)
    assert set(bearers) == {old.access_token, new.access_token}
    assert bearers.count(new.access_token) == 100  # every call replayed or sent once with it


async def test_401_refreshes_and_replays_the_request(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    fake.oauth.expire_access_tokens()
    async with client_for(fake, oauth_for(fake, MemoryTokenStore(old))) as client:
        await client.close_talk(7, force=True)
    new = fake.oauth.issued[-1]
    assert [(r.route, r.headers.get("Authorization")) for r in fake.requests] == [
        ("close", f"Bearer {old.access_token}"),
        ("token", None),
        ("close", f"Bearer {new.access_token}"),
    ]
    assert not fake.is_open(7)


async def test_401_with_one_attempt_refreshes_but_raises(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    fake.oauth.expire_access_tokens()
    store = MemoryTokenStore(old)
    async with client_for(fake, oauth_for(fake, store), retry=RetryPolicy(max_attempts=1)) as c:
        with pytest.raises(UnauthorizedError) as caught:
            await c.get_talk(1)
        assert caught.value.status == 401
        assert fake.oauth.refreshes == 1
        new = fake.oauth.issued[-1]
        assert pair(await store.load()) == pair(new)
        # The next call uses the refreshed pair at once.
        await c.get_talk(1)
    assert api_bearers(fake) == [old.access_token, new.access_token]
    assert fake.oauth.refreshes == 1


async def test_second_401_after_refresh_raises_unauthorized(fake: FakeKommo) -> None:
    fake.script("get", 401, 401)
    store = MemoryTokenStore(fake.oauth.issue_tokens())
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(UnauthorizedError):
            await client.get_talk(1)
    assert fake.oauth.refreshes == 1
    assert fake.stats.by_route["get"] == 2


async def test_401_for_a_token_already_replaced_requests_nothing(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    auth = oauth_for(fake, MemoryTokenStore(expired(old)))
    async with client_for(fake, auth) as client:
        await client.get_talk(1)  # refreshes proactively
        assert fake.oauth.refreshes == 1
        # A late 401 to the old token: another task already refreshed since it was issued.
        assert await auth.handle_unauthorized(client, old.access_token) is True
        assert fake.stats.by_route["token"] == 1
        await client.get_talk(2)
    assert fake.oauth.refreshes == 1


async def test_handle_unauthorized_before_any_token_says_no(fake: FakeKommo) -> None:
    auth = oauth_for(fake, MemoryTokenStore(fake.oauth.issue_tokens()))
    async with client_for(fake, auth) as client:
        assert await auth.handle_unauthorized(client, "never-issued") is False
    assert fake.stats.requests == 0


async def test_no_tokens_in_store_says_how_to_authorize(fake: FakeKommo) -> None:
    async with client_for(fake, oauth_for(fake, MemoryTokenStore())) as client:
        with pytest.raises(TokenRefreshError) as caught:
            await client.get_talk(1)
    message = str(caught.value)
    assert "no OAuth2 tokens" in message
    assert "exchange_code" in message
    assert "kommo-talks auth" in message
    assert fake.stats.requests == 0


# -- single flight -------------------------------------------------------------


async def test_refresh_failure_reaches_every_waiter(fake: FakeKommo) -> None:
    store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
    fake.oauth.revoke_all()
    async with client_for(fake, oauth_for(fake, store)) as client:
        results = await asyncio.gather(
            *(client.get_talk(i) for i in range(1, 21)), return_exceptions=True
        )
    assert all(isinstance(r, TokenRefreshError) for r in results)
    assert {r.hint for r in results if isinstance(r, TokenRefreshError)} == {
        "Token has been revoked"
    }
    assert fake.stats.by_route["token"] == 1
    assert api_bearers(fake) == []


async def test_cancelled_waiter_does_not_cancel_the_refresh(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    store = MemoryTokenStore(expired(old))
    fake.oauth.gate = asyncio.Event()
    async with client_for(fake, oauth_for(fake, store)) as client:
        task = asyncio.create_task(client.get_talk(1))
        async with asyncio.timeout(BOUND):
            await fake.oauth.at_gate.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.oauth.gate.set()
        await client.get_talk(2)
    new = fake.oauth.issued[-1]
    assert fake.stats.by_route["token"] == 1
    assert pair(await store.load()) == pair(new)
    assert api_bearers(fake) == [new.access_token]


@dataclasses.dataclass
class DataclassStore:
    """A user's own store: a dataclass, so unhashable, with no refresh_lock()."""

    tokens: TokenSet | None

    async def load(self) -> TokenSet | None:
        return self.tokens

    async def save(self, tokens: TokenSet) -> None:
        self.tokens = tokens


@pytest.mark.parametrize("kind", ["MemoryTokenStore", "unhashable dataclass"])
async def test_oauth2_instances_sharing_a_lockless_store_refresh_once(
    fake: FakeKommo, kind: str
) -> None:
    stale = expired(fake.oauth.issue_tokens())
    store = MemoryTokenStore(stale) if kind == "MemoryTokenStore" else DataclassStore(stale)
    first, second = oauth_for(fake, store), oauth_for(fake, store)
    async with client_for(fake, first) as one, client_for(fake, second) as two:
        await asyncio.gather(*(c.get_talk(i) for i in range(1, 11) for c in (one, two)))
    assert fake.oauth.refreshes == 1
    assert set(api_bearers(fake)) == {fake.oauth.issued[-1].access_token}


async def test_store_refresh_lock_is_held_across_load_refresh_save(fake: FakeKommo) -> None:
    store = LockingStore(expired(fake.oauth.issue_tokens()))
    async with client_for(fake, oauth_for(fake, store)) as client:
        await asyncio.gather(*(client.get_talk(i) for i in range(1, 11)))
    assert store.events == ["locked", "load", "save", "unlocked"]
    assert fake.oauth.refreshes == 1


async def test_holder_skips_the_refresh_when_another_already_did_it(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    store = LockingStore(expired(old))
    auth = oauth_for(fake, store)
    async with client_for(fake, auth) as client:
        async with store.lock:  # another holder refreshes meanwhile
            waiting = asyncio.create_task(client.get_talk(1))
            async with asyncio.timeout(BOUND):
                await store.waiting.wait()
            newer = fake.oauth.issue_tokens()
            await MemoryTokenStore.save(store, newer)
        await waiting
    assert fake.oauth.refreshes == 0
    assert api_bearers(fake) == [newer.access_token]


# -- save before use -----------------------------------------------------------


async def test_failed_save_propagates_and_new_token_is_never_sent(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    old = fake.oauth.issue_tokens()
    store = FlakyStore(expired(old))
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError, match="disk full"):
            await client.get_talk(1)
        new = fake.oauth.issued[-1]
        assert fake.oauth.refreshes == 1
        assert api_bearers(fake) == []
        stored = await store.load()
        assert stored is not None
        assert stored.refresh_token == old.refresh_token
        # The next call saves the kept pair first, then uses it: no second refresh.
        await client.get_talk(2)
        await client.get_talk(3)
    assert pair(await store.load()) == pair(new)
    assert store.saves == 2
    assert fake.oauth.refreshes == 1
    assert api_bearers(fake) == [new.access_token, new.access_token]
    assert "kept in memory" in caplog.text


async def test_kept_pair_is_retried_until_the_store_takes_it(fake: FakeKommo) -> None:
    store = FlakyStore(expired(fake.oauth.issue_tokens()))
    store.failures = 3
    async with client_for(fake, oauth_for(fake, store)) as client:
        for _ in range(3):
            with pytest.raises(TokenStoreError):
                await client.get_talk(1)
        assert api_bearers(fake) == []
        await client.get_talk(1)
    new = fake.oauth.issued[-1]
    assert fake.oauth.refreshes == 1
    assert pair(await store.load()) == pair(new)
    assert api_bearers(fake) == [new.access_token]


async def test_kept_pair_is_dropped_when_the_store_moved_on(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(expired(fake.oauth.issue_tokens()))
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError):
            await client.get_talk(1)
        kept = fake.oauth.issued[-1]
        # Another process refreshed (or the user re-authorized) meanwhile.
        newer = fake.oauth.issue_tokens()
        await MemoryTokenStore.save(store, newer)
        await client.get_talk(1)
    assert api_bearers(fake) == [newer.access_token]
    assert kept.access_token not in api_bearers(fake)
    assert await store.load() == newer
    assert fake.oauth.refreshes == 1
    assert "dropping the unsaved token pair" in caplog.text


async def test_failed_save_on_reactive_refresh_propagates(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    fake.oauth.expire_access_tokens()
    store = FlakyStore(old)
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError):
            await client.get_talk(1)
        await client.get_talk(1)
    new = fake.oauth.issued[-1]
    assert api_bearers(fake) == [old.access_token, new.access_token]
    assert fake.oauth.refreshes == 1


# -- refusals and transient failures -------------------------------------------


async def test_refused_refresh_raises_with_kommos_hint(fake: FakeKommo) -> None:
    # Two processes holding copies of one pair, without a shared lock:
    # the first refreshes and uses the new pair, which revokes the old refresh token.
    tokens = fake.oauth.issue_tokens()
    first = oauth_for(fake, MemoryTokenStore(expired(tokens)))
    second = oauth_for(fake, MemoryTokenStore(expired(tokens)))
    async with client_for(fake, first) as one, client_for(fake, second) as two:
        await one.get_talk(1)
        with pytest.raises(TokenRefreshError) as caught:
            await two.get_talk(1)
    error = caught.value
    assert error.hint == "Token has been revoked"
    assert error.status == 401
    assert "Token has been revoked" in str(error)
    assert "authorized again" in str(error)
    for secret in fake.oauth.secret_values():
        assert secret not in str(error)
        assert secret not in repr(error)
        assert secret not in repr(error.problem)
    assert fake.stats.by_route["token"] == 2  # refused at once, not retried


async def test_bad_client_secret_is_refused(fake: FakeKommo) -> None:
    store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
    auth = OAuth2(fake.oauth.client_id, "not-the-secret", fake.oauth.redirect_uri, store)
    async with client_for(fake, auth) as client:
        with pytest.raises(TokenRefreshError) as caught:
            await client.get_talk(1)
    assert caught.value.status == 401
    assert "Invalid client" in str(caught.value)
    assert "check the integration's client ID, client secret" in str(caught.value)
    assert fake.stats.by_route["token"] == 1


async def test_transient_refresh_failures_retry_with_the_same_refresh_token(
    fake: FakeKommo, fake_clock: Any
) -> None:
    old = fake.oauth.issue_tokens()
    store = MemoryTokenStore(expired(old))
    fake.script("token", 503, Fault.dropped())
    async with client_for(
        fake, oauth_for(fake, store), sleep=fake_clock.sleep, clock=fake_clock.now
    ) as client:
        await client.get_talk(1)
    bodies = token_bodies(fake)
    assert len(bodies) == 3
    assert {b["refresh_token"] for b in bodies} == {old.refresh_token}
    assert len(fake_clock.sleeps) == 2  # one backoff per failed attempt
    assert fake.oauth.refreshes == 1
    new = fake.oauth.issued[-1]
    assert pair(await store.load()) == pair(new)
    assert api_bearers(fake) == [new.access_token]


async def test_refresh_that_keeps_failing_raises_token_refresh_error(
    fake: FakeKommo, fake_clock: Any
) -> None:
    old = fake.oauth.issue_tokens()
    store = MemoryTokenStore(expired(old))
    fake.script("token", *[503] * 5)
    async with client_for(
        fake, oauth_for(fake, store), sleep=fake_clock.sleep, clock=fake_clock.now
    ) as client:
        with pytest.raises(TokenRefreshError) as caught:
            await client.get_talk(1)
        assert caught.value.status == 503
        assert fake.stats.by_route["token"] == 5
        # The pair is untouched: the next call tries again with the same refresh token.
        await client.get_talk(1)
    assert pair(await store.load()) == pair(fake.oauth.issued[-1])
    assert {b["refresh_token"] for b in token_bodies(fake)} == {old.refresh_token}


async def test_lost_refresh_answer_is_retried_with_the_old_token(
    fake: FakeKommo, fake_clock: Any
) -> None:
    # Kommo rotated the pair but the answer was lost: the old refresh token still works.
    old = fake.oauth.issue_tokens()
    fake.script("token", Fault.dropped(after_effect=True))
    store = MemoryTokenStore(expired(old))
    async with client_for(
        fake, oauth_for(fake, store), sleep=fake_clock.sleep, clock=fake_clock.now
    ) as client:
        await client.get_talk(1)
    lost, new = fake.oauth.issued[-2:]
    assert fake.oauth.refreshes == 2
    assert pair(await store.load()) == pair(new)
    assert fake.oauth.is_revoked(old.refresh_token)
    assert fake.oauth.is_revoked(lost.refresh_token)


async def test_strict_rotation_refuses_the_retry_of_a_lost_answer(fake_clock: Any) -> None:
    async with FakeKommo(strict_rotation=True) as strict:
        old = strict.oauth.issue_tokens()
        strict.script("token", Fault.dropped(after_effect=True))
        store = MemoryTokenStore(expired(old))
        async with client_for(
            strict, oauth_for(strict, store), sleep=fake_clock.sleep, clock=fake_clock.now
        ) as client:
            with pytest.raises(TokenRefreshError) as caught:
                await client.get_talk(1)
        assert caught.value.hint == "Token has been revoked"
        assert pair(await store.load()) == pair(expired(old))
        for secret in strict.oauth.secret_values():
            assert secret not in str(caught.value)


async def test_strict_rotation_works_for_ordinary_refreshes() -> None:
    async with FakeKommo(strict_rotation=True) as strict:
        store = MemoryTokenStore(expired(strict.oauth.issue_tokens()))
        async with client_for(strict, oauth_for(strict, store)) as client:
            await client.get_talk(1)
            strict.oauth.expire_access_tokens()
            await client.get_talk(2)
        assert strict.oauth.refreshes == 2
        assert pair(await store.load()) == pair(strict.oauth.issued[-1])


# -- exchange_code -------------------------------------------------------------


async def _exchange(fake: FakeKommo, code: str, store: Any, **options: Any) -> TokenSet:
    return await OAuth2.exchange_code(
        fake.url,
        code,
        client_id=options.pop("client_id", fake.oauth.client_id),
        client_secret=options.pop("client_secret", fake.oauth.client_secret),
        redirect_uri=options.pop("redirect_uri", fake.oauth.redirect_uri),
        store=store,
        **options,
    )


async def test_exchange_code_saves_and_returns_the_first_pair(fake: FakeKommo) -> None:
    store = MemoryTokenStore()
    code = fake.oauth.issue_code()
    tokens = await _exchange(fake, code, store)
    assert pair(tokens) == pair(fake.oauth.issued[-1])
    assert await store.load() == tokens
    assert tokens.expires_at > datetime.now(UTC) + timedelta(hours=23)
    [request] = fake.requests
    assert request.json() == {
        "client_id": fake.oauth.client_id,
        "client_secret": fake.oauth.client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": fake.oauth.redirect_uri,
    }
    assert request.headers["User-Agent"].startswith("kommo-talks/")
    async with client_for(fake, oauth_for(fake, store)) as client:
        await client.get_talk(1)
    assert api_bearers(fake) == [tokens.access_token]
    assert fake.oauth.exchanges == 1


@pytest.mark.parametrize(
    ("spend_first", "hint"),
    [
        (False, "Cannot decrypt the authorization code"),
        (True, "Authorization code has been revoked"),
    ],
)
async def test_exchange_code_refused(fake: FakeKommo, spend_first: bool, hint: str) -> None:
    previous = fake.oauth.issue_tokens()
    store = MemoryTokenStore(previous)
    if spend_first:
        code = fake.oauth.issue_code()
        await _exchange(fake, code, MemoryTokenStore())
    else:
        code = "not-a-code-issued-by-kommo"
    with pytest.raises(TokenRefreshError) as caught:
        await _exchange(fake, code, store)
    assert caught.value.status == 400
    assert caught.value.hint == hint
    assert code not in str(caught.value)
    assert await store.load() == previous


async def test_exchange_code_of_an_expired_code(fake: FakeKommo) -> None:
    code = fake.oauth.issue_code()
    fake.oauth.clock = lambda: 10**10  # far beyond the code's 20 minutes
    with pytest.raises(TokenRefreshError) as caught:
        await _exchange(fake, code, MemoryTokenStore())
    assert caught.value.hint == "Authorization code has expired"


async def test_exchange_code_checks_the_base_url_before_sending(fake: FakeKommo) -> None:
    with pytest.raises(ValueError, match="https"):
        await OAuth2.exchange_code(
            "http://example.kommo.com",
            fake.oauth.issue_code(),
            client_id="id",
            client_secret="secret-value",
            redirect_uri="https://example.com/cb",
            store=MemoryTokenStore(),
        )
    assert fake.stats.requests == 0


async def test_exchange_code_retries_a_transient_failure(fake: FakeKommo) -> None:
    fake.script("token", 502)
    store = MemoryTokenStore()
    tokens = await _exchange(fake, fake.oauth.issue_code(), store, retry=FAST)
    assert await store.load() == tokens
    assert fake.stats.by_route["token"] == 2


# -- FileTokenStore ------------------------------------------------------------


async def test_file_store_round_trip_and_refresh_persists_the_rotated_pair(
    fake: FakeKommo, tmp_path: Path
) -> None:
    path = tmp_path / "kommo-tokens.json"
    first = await _exchange(fake, fake.oauth.issue_code(), FileTokenStore(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await FileTokenStore(path).load() == first

    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(1)
    assert api_bearers(fake) == [first.access_token]

    fake.oauth.expire_access_tokens()
    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(2)
    rotated = fake.oauth.issued[-1]
    assert rotated != first
    assert pair(await FileTokenStore(path).load()) == pair(rotated)
    assert json.loads(path.read_text())["refresh_token"] == rotated.refresh_token
    assert fake.oauth.is_revoked(first.refresh_token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A new process starts from the file and needs no refresh.
    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(3)
    assert api_bearers(fake)[-1] == rotated.access_token
    assert fake.oauth.refreshes == 1


async def test_processes_sharing_a_token_file_refresh_once(fake: FakeKommo, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    await FileTokenStore(path).save(expired(fake.oauth.issue_tokens()))
    # Separate stores and OAuth2 objects, as in separate processes: only the file lock is shared.
    auths = [oauth_for(fake, FileTokenStore(path)) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(fake, a)) for a in auths]
        await asyncio.gather(*(c.get_talk(i) for i in range(1, 6) for c in clients))
    assert fake.oauth.refreshes == 1
    rotated = fake.oauth.issued[-1]
    assert set(api_bearers(fake)) == {rotated.access_token}
    assert pair(await FileTokenStore(path).load()) == pair(rotated)


async def test_exchange_code_replaces_a_corrupt_token_file(fake: FakeKommo, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{ this is not json")
    store = FileTokenStore(path)
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError, match="corrupt"):
            await client.get_talk(1)
    assert path.read_text() == "{ this is not json"  # never overwritten by a refresh
    tokens = await _exchange(fake, fake.oauth.issue_code(), store)
    assert await FileTokenStore(path).load() == tokens
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- nothing secret shows ------------------------------------------------------


def test_oauth2_repr_shows_no_secret(leak_check: list[str]) -> None:
    tokens = TokenSet("ACCESS-visible-secret", "REFRESH-visible-secret", NOW)
    leak_check.extend(("ACCESS-visible-secret", "REFRESH-visible-secret", "CLIENT-SECRET"))
    auth = OAuth2("client-1", "CLIENT-SECRET", "https://example.com/cb", MemoryTokenStore(tokens))
    for text in (repr(auth), str(auth), repr(auth.store), repr(tokens), str(tokens)):
        for secret in ("ACCESS-visible-secret", "REFRESH-visible-secret", "CLIENT-SECRET"):
            assert secret not in text
    assert "client-1" in repr(auth)
    logging.getLogger("kommo_talks").debug("auth=%r tokens=%r", auth, tokens)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("", "secret", "https://example.com/cb"), "client_id"),
        (("id", "  ", "https://example.com/cb"), "client_secret"),
        (("id", "secret", ""), "redirect_uri"),
    ],
)
def test_oauth2_rejects_empty_arguments(args: tuple[str, str, str], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        OAuth2(*args, MemoryTokenStore())


def test_oauth2_rejects_a_store_without_load_and_save() -> None:
    with pytest.raises(ValueError, match="TokenStore"):
        OAuth2("id", "secret", "https://example.com/cb", object())  # type: ignore[arg-type]


async def test_a_whole_lifecycle_logs_no_secret(
    fake: FakeKommo, fake_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Exchange, proactive refresh, reactive refresh, failed save, refusal: all at DEBUG.
    store = FlakyStore()
    await _exchange(fake, fake.oauth.issue_code(), store)
    auth = oauth_for(fake, store)
    async with client_for(fake, auth, sleep=fake_clock.sleep, clock=fake_clock.now) as client:
        await client.get_talk(1)
        fake.oauth.expire_access_tokens()
        fake.script("token", 503)
        await client.get_talk(2)
        store.failures = 1
        fake.oauth.expire_access_tokens()
        with pytest.raises(TokenStoreError):
            await client.get_talk(3)
        await client.get_talk(3)
        fake.oauth.revoke_all()
        with pytest.raises(TokenRefreshError) as caught:
            await client.get_talk(4)
        logging.getLogger("kommo_talks").info("failed: %s (%r)", caught.value, caught.value)
    text = caplog.text
    assert "refreshed the tokens" in text
    assert "authorization code exchanged" in text
    assert "Token has been revoked" in text


async def test_a_refresh_due_during_a_long_pause_is_not_sent_and_the_call_is_named(
    fake: FakeKommo,
) -> None:
    store = MemoryTokenStore(fake.oauth.issue_tokens())
    async with client_for(fake, oauth_for(fake, store)) as client:
        await client.get_talk(1)
        fake.script("get", Fault.error(429, retry_after=120))  # far above FAST.max_delay
        with pytest.raises(RateLimitError):
            await client.get_talk(1)
        await store.save(expired(fake.oauth.issue_tokens()))
        tokens_before = fake.stats.by_route.get("token", 0)

        with pytest.raises(RateLimitError) as caught:
            await client.close_talk(2, force=True)

    assert caught.value.request_method == "POST"
    assert caught.value.request_url == f"{fake.url}/api/v4/talks/2/close"
    assert fake.stats.by_route.get("token", 0) == tokens_before  # no refresh was sent
    assert fake.is_open(2)


async def test_a_401_answered_during_a_long_pause_sends_no_refresh(fake: FakeKommo) -> None:
    store = MemoryTokenStore(fake.oauth.issue_tokens())
    async with client_for(fake, oauth_for(fake, store)) as client:
        await client.get_talk(1)
        fake.script("close", Fault(status=401, delay=0.1))  # answered after the 429 below
        fake.script("get", Fault.error(429, retry_after=120))
        closing, getting = await asyncio.gather(
            client.close_talk(2, force=True), client.get_talk(1), return_exceptions=True
        )

    assert isinstance(getting, RateLimitError)
    assert isinstance(closing, RateLimitError)  # not a refresh of a token that was fine
    assert closing.request_url == f"{fake.url}/api/v4/talks/2/close"
    assert fake.stats.by_route.get("token", 0) == 0


async def test_closing_a_client_mid_refresh_keeps_the_rotated_pair() -> None:
    # Strict rotation: the old refresh token dies the moment Kommo rotates it; and
    # the answer with the new pair is slow to come back.
    fake = FakeKommo(strict_rotation=True)
    rotated = asyncio.Event()
    answer = fake.oauth.handle

    async def rotate_then_answer_late(request: web.Request) -> web.StreamResponse:
        response = await answer(request)
        rotated.set()
        await asyncio.sleep(0.2)  # the server's latency
        return response

    fake.oauth.handle = rotate_then_answer_late  # type: ignore[method-assign]
    async with fake:
        store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
        client = KommoClient(fake.url, auth=oauth_for(fake, store), retry=FAST, rate_limit=None)
        call = asyncio.create_task(client.get_talk(1))
        await rotated.wait()  # Kommo has rotated; its answer is on its way
        call.cancel()
        await client.close()

        saved = await store.load()
        assert saved is not None
        assert saved.refresh_token == fake.oauth.issued[-1].refresh_token  # not lost
        async with client_for(fake, oauth_for(fake, store)) as again:
            await again.get_talk(2)  # works: no "Token has been revoked"
    assert call.cancelled()


class HeldLimiter:
    """A RateLimiter that holds every caller until released."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def acquire(self) -> None:
        self.waiting.set()
        await self.release.wait()


async def test_a_refresh_cut_short_by_closing_its_client_is_flown_again_by_another(
    fake: FakeKommo,
) -> None:
    store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
    auth = oauth_for(fake, store)  # one OAuth2 shared by two clients
    held = HeldLimiter()
    first = KommoClient(fake.url, auth=auth, retry=FAST, rate_limit=held)
    async with client_for(fake, auth) as second:
        stuck = asyncio.create_task(first.get_talk(1))  # its refresh waits in its limiter
        await held.waiting.wait()
        joined = asyncio.gather(second.get_talk(2), second.get_talk(3))  # join that refresh
        closing = asyncio.create_task(first.close())
        held.release.set()
        await closing

        talks = await joined

    assert [talk.talk_id for talk in talks] == [2, 3]
    with pytest.raises(ClientClosedError):
        await stuck
    assert fake.oauth.refreshes == 1  # the closed client's refresh never went out


async def test_a_close_cancelled_while_it_waits_for_a_refresh_still_closes_the_session(
    fake: FakeKommo,
) -> None:
    store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
    held = HeldLimiter()
    client = KommoClient(fake.url, auth=oauth_for(fake, store), retry=FAST, rate_limit=held)
    call = asyncio.create_task(client.get_talk(1))  # its refresh waits in the limiter
    await held.waiting.wait()
    session = client._pipeline._session._session
    closing = asyncio.create_task(client.close())
    await asyncio.sleep(0)  # close() is now waiting for the refresh
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    held.release.set()
    with pytest.raises(ClientClosedError):
        await call

    assert session is not None
    assert session.closed  # no "Unclosed client session"


async def test_a_refused_refresh_token_is_not_sent_again_until_the_store_changes(
    fake: FakeKommo,
) -> None:
    store = MemoryTokenStore(expired(fake.oauth.issue_tokens()))
    fake.oauth.revoke_all()  # the integration was deactivated: re-authorization needed
    async with client_for(fake, oauth_for(fake, store)) as client:
        outcomes = await client.close_talks(range(1, 51), force=True, concurrency=5)
        refused = fake.stats.by_route["token"]
        await store.save(fake.oauth.issue_tokens())  # authorized again (exchange_code)
        await client.close_talk(7, force=True)

    assert [o.status for o in outcomes] == [CloseStatus.FAILED] * 50
    assert all(isinstance(o.error, TokenRefreshError) for o in outcomes)
    assert refused == 1  # one refused request, not one per talk
    assert not fake.is_open(7)  # the new pair is used at once
