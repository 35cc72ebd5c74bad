"""OAuth2: nothing secret shows in reprs, messages or logs.

Over loopback HTTP against FakeKommo; the autouse ``leak_check`` fixture checks
that no token, code or client secret reaches the logs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from oauth_support import (
    FAST,
    NOW,
    FlakyStore,
    client_for,
    exchange,
    expired,
    leak_check,  # noqa: F401 - an autouse fixture
    oauth_for,
)

from kommo_talks import (
    KommoClient,
    MemoryTokenStore,
    OAuth2,
    RateLimitError,
    TokenRefreshError,
    TokenSet,
    TokenStoreError,
)
from kommo_talks.testing import FakeKommo, Fault

# -- nothing secret shows ------------------------------------------------------


def test_oauth2_repr_shows_no_secret(leak_check: list[str]) -> None:  # noqa: F811
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
    await exchange(fake, fake.oauth.issue_code(), store)
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
