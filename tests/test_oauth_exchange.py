"""OAuth2.exchange_code: the first grant.

Over loopback HTTP against FakeKommo; the autouse ``leak_check`` fixture checks
that no token, code or client secret reaches the logs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from oauth_support import (
    FAST,
    api_bearers,
    client_for,
    exchange,
    leak_check,  # noqa: F401 - an autouse fixture
    oauth_for,
    pair,
)

from kommo_talks import (
    MemoryTokenStore,
    OAuth2,
    TokenRefreshError,
)
from kommo_talks.testing import FakeKommo

# -- exchange_code -------------------------------------------------------------


async def test_exchange_code_saves_and_returns_the_first_pair(fake: FakeKommo) -> None:
    store = MemoryTokenStore()
    code = fake.oauth.issue_code()
    tokens = await exchange(fake, code, store)
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
        await exchange(fake, code, MemoryTokenStore())
    else:
        code = "not-a-code-issued-by-kommo"
    with pytest.raises(TokenRefreshError) as caught:
        await exchange(fake, code, store)
    assert caught.value.status == 400
    assert caught.value.hint == hint
    assert code not in str(caught.value)
    assert await store.load() == previous


async def test_exchange_code_of_an_expired_code(fake: FakeKommo) -> None:
    code = fake.oauth.issue_code()
    fake.oauth.clock = lambda: 10**10  # far beyond the code's 20 minutes
    with pytest.raises(TokenRefreshError) as caught:
        await exchange(fake, code, MemoryTokenStore())
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
    tokens = await exchange(fake, fake.oauth.issue_code(), store, retry=FAST)
    assert await store.load() == tokens
    assert fake.stats.by_route["token"] == 2
