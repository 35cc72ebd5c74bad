"""OAuth2: refusals and transient failures of the token endpoint, closing during a refresh.

Over loopback HTTP against FakeKommo; the autouse ``leak_check`` fixture checks
that no token, code or client secret reaches the logs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from oauth_support import (
    FAST,
    api_bearers,
    client_for,
    expired,
    leak_check,  # noqa: F401 - an autouse fixture
    oauth_for,
    pair,
    token_bodies,
)

from kommo_talks import (
    ClientClosedError,
    CloseStatus,
    KommoClient,
    MemoryTokenStore,
    OAuth2,
    TokenRefreshError,
)
from kommo_talks.testing import FakeKommo, Fault

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
