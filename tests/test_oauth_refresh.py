"""OAuth2: the pure refresh decisions, proactive and reactive refresh, single flight.

Over loopback HTTP against FakeKommo; the autouse ``leak_check`` fixture checks
that no token, code or client secret reaches the logs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest
from oauth_support import (
    BOUND,
    NOW,
    LockingStore,
    api_bearers,
    client_for,
    expired,
    leak_check,  # noqa: F401 - an autouse fixture
    oauth_for,
    pair,
)

from kommo_talks import (
    MemoryTokenStore,
    RetryPolicy,
    TokenRefreshError,
    TokenSet,
    UnauthorizedError,
)
from kommo_talks.oauth import Plan, Step, is_stale, plan_refresh
from kommo_talks.testing import FakeKommo

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
        assert await auth.handle_unauthorized(client._pipeline, old.access_token) is True
        assert fake.stats.by_route["token"] == 1
        await client.get_talk(2)
    assert fake.oauth.refreshes == 1


async def test_handle_unauthorized_before_any_token_says_no(fake: FakeKommo) -> None:
    auth = oauth_for(fake, MemoryTokenStore(fake.oauth.issue_tokens()))
    async with client_for(fake, auth) as client:
        assert await auth.handle_unauthorized(client._pipeline, "never-issued") is False
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
