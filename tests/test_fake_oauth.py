"""FakeOAuth: the fake token endpoint's grants, rotation rules, refusals and controls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from kommo_talks import KommoClient, MemoryTokenStore, OAuth2, RetryPolicy, TokenRefreshError
from kommo_talks.testing import FakeKommo, Fault
from kommo_talks.testing._oauth import OAUTH_PROBLEM_TYPE


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def grant(fake: FakeKommo, kind: str, value: str, **override: str) -> dict[str, str]:
    body = {
        "client_id": fake.oauth.client_id,
        "client_secret": fake.oauth.client_secret,
        "grant_type": kind,
        "code" if kind == "authorization_code" else "refresh_token": value,
        "redirect_uri": fake.oauth.redirect_uri,
    }
    body.update(override)
    return body


async def post(
    http: aiohttp.ClientSession, fake: FakeKommo, body: Any, *, form: bool = False
) -> tuple[int, dict[str, Any]]:
    kwargs = {"data": body} if form else {"json": body}
    async with http.post(f"{fake.url}/oauth2/access_token", **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def get_talk(http: aiohttp.ClientSession, fake: FakeKommo, access_token: str) -> int:
    headers = {"Authorization": f"Bearer {access_token}"}
    async with http.get(f"{fake.url}/api/v4/talks/1", headers=headers) as response:
        return response.status


async def refresh(http: aiohttp.ClientSession, fake: FakeKommo, token: str) -> dict[str, Any]:
    status, body = await post(http, fake, grant(fake, "refresh_token", token))
    assert status == 200, body
    return body


def assert_revoked(status: int, body: dict[str, Any]) -> None:
    assert status == 401
    assert body["hint"] == "Token has been revoked"
    assert body["type"] == OAUTH_PROBLEM_TYPE
    assert body["status"] == 401
    assert {"title", "detail"} <= body.keys()


async def test_code_grant_answers_kommos_token_fields(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    code = fake.oauth.issue_code()
    status, body = await post(http, fake, grant(fake, "authorization_code", code))
    assert status == 200
    assert body.keys() == {
        "token_type",
        "expires_in",
        "access_token",
        "refresh_token",
        "server_time",
    }
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86400
    assert type(body["server_time"]) is int
    assert fake.oauth.exchanges == 1
    assert await get_talk(http, fake, body["access_token"]) == 200


async def test_form_encoded_body_is_accepted(fake: FakeKommo, http: aiohttp.ClientSession) -> None:
    tokens = fake.oauth.issue_tokens()
    status, body = await post(
        http, fake, grant(fake, "refresh_token", tokens.refresh_token), form=True
    )
    assert status == 200
    assert body["refresh_token"] != tokens.refresh_token
    assert fake.oauth.refreshes == 1


async def test_old_refresh_token_works_until_the_new_access_token_is_used(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    old = fake.oauth.issue_tokens()
    first = await refresh(http, fake, old.refresh_token)
    second = await refresh(http, fake, old.refresh_token)  # a retry: the new pair is unused
    assert first["refresh_token"] != second["refresh_token"]
    assert await get_talk(http, fake, second["access_token"]) == 200
    assert_revoked(*await post(http, fake, grant(fake, "refresh_token", old.refresh_token)))
    # The pair that lost the race is dead too; the used one lives on.
    assert await get_talk(http, fake, first["access_token"]) == 401
    assert_revoked(*await post(http, fake, grant(fake, "refresh_token", first["refresh_token"])))
    await refresh(http, fake, second["refresh_token"])
    assert fake.oauth.refreshes == 3
    assert fake.oauth.refused == 2


async def test_exchanging_the_new_refresh_token_revokes_the_old_one(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    old = fake.oauth.issue_tokens()
    new = await refresh(http, fake, old.refresh_token)
    await refresh(http, fake, new["refresh_token"])
    assert_revoked(*await post(http, fake, grant(fake, "refresh_token", old.refresh_token)))
    assert fake.oauth.is_revoked(old.refresh_token)
    # The newest unused pair's parent still works: its own child is not used yet.
    assert not fake.oauth.is_revoked(new["refresh_token"])


async def test_strict_rotation_kills_the_old_refresh_token_at_once(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeKommo(strict_rotation=True) as fake:
        old = fake.oauth.issue_tokens()
        new = await refresh(http, fake, old.refresh_token)
        assert_revoked(*await post(http, fake, grant(fake, "refresh_token", old.refresh_token)))
        # Its access token still works until it expires; the new pair works.
        assert await get_talk(http, fake, old.access_token) == 200
        assert await get_talk(http, fake, new["access_token"]) == 200
        await refresh(http, fake, new["refresh_token"])


@pytest.mark.parametrize(
    ("override", "status", "hint"),
    [
        ({"client_secret": "wrong"}, 401, None),
        ({"client_id": "someone-else"}, 401, None),
        ({"client_id": ""}, 400, "Check the `client_id` parameter"),
        (
            {"redirect_uri": "https://evil.example/cb"},
            400,
            "Redirect URI is not associated with client",
        ),
        ({"grant_type": "password"}, 400, "Check the `grant_type` parameter"),
        ({"refresh_token": "never-issued"}, 400, "Cannot decrypt the refresh token"),
        ({"refresh_token": ""}, 400, "Check the `refresh_token` parameter"),
    ],
)
async def test_refusals_use_kommos_oauth_problem_body(
    fake: FakeKommo,
    http: aiohttp.ClientSession,
    override: dict[str, str],
    status: int,
    hint: str | None,
) -> None:
    tokens = fake.oauth.issue_tokens()
    body = grant(fake, "refresh_token", tokens.refresh_token, **override)
    got_status, problem = await post(http, fake, body)
    assert got_status == status
    assert problem.get("hint") == hint
    assert problem["type"] == OAUTH_PROBLEM_TYPE
    if status == 401:
        assert problem["title"] == "Invalid client"
    assert fake.oauth.refreshes == 0
    assert fake.oauth.refused == 1
    assert not fake.oauth.is_revoked(tokens.refresh_token)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b""])
async def test_a_body_that_is_neither_json_object_nor_form_is_refused(
    fake: FakeKommo, http: aiohttp.ClientSession, raw: bytes
) -> None:
    async with http.post(
        f"{fake.url}/oauth2/access_token",
        data=raw,
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"


async def test_codes_are_single_use_and_expire(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    code = fake.oauth.issue_code()
    assert (await post(http, fake, grant(fake, "authorization_code", code)))[0] == 200
    status, body = await post(http, fake, grant(fake, "authorization_code", code))
    assert (status, body["hint"]) == (400, "Authorization code has been revoked")
    late = fake.oauth.issue_code()
    start = fake.oauth.clock()
    fake.oauth.clock = lambda: start + fake.oauth.code_ttl
    status, body = await post(http, fake, grant(fake, "authorization_code", late))
    assert (status, body["hint"]) == (400, "Authorization code has expired")


async def test_access_tokens_expire_by_ttl_or_on_demand(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    fake.oauth.access_token_ttl = 3600
    code = fake.oauth.issue_code()
    _, body = await post(http, fake, grant(fake, "authorization_code", code))
    assert body["expires_in"] == 3600
    start = fake.oauth.clock()
    fake.oauth.clock = lambda: start + 3599
    assert await get_talk(http, fake, body["access_token"]) == 200
    fake.oauth.clock = lambda: start + 3601
    assert await get_talk(http, fake, body["access_token"]) == 401
    fake.oauth.clock = lambda: start
    assert await get_talk(http, fake, body["access_token"]) == 200
    fake.oauth.expire_access_tokens()
    assert await get_talk(http, fake, body["access_token"]) == 401
    # Expiry does not touch the refresh token.
    await refresh(http, fake, body["refresh_token"])


async def test_revoke_all_ends_every_pair(fake: FakeKommo, http: aiohttp.ClientSession) -> None:
    tokens = fake.oauth.issue_tokens()
    fake.oauth.revoke_all()
    assert await get_talk(http, fake, tokens.access_token) == 401
    assert_revoked(*await post(http, fake, grant(fake, "refresh_token", tokens.refresh_token)))


async def test_issue_tokens_and_secret_values(fake: FakeKommo) -> None:
    tokens = fake.oauth.issue_tokens(expires_in=120)
    code = fake.oauth.issue_code()
    assert fake.oauth.issued == [tokens]
    assert fake.valid_token(tokens.access_token)
    assert {fake.oauth.client_secret, code, tokens.access_token, tokens.refresh_token} <= (
        fake.oauth.secret_values()
    )
    for text in (repr(fake.oauth), repr(tokens)):
        for secret in fake.oauth.secret_values():
            assert secret not in text


async def test_latency_slows_the_token_endpoint(fake: FakeKommo, fake_clock: Any) -> None:
    fake.oauth.latency = 0.2
    store = MemoryTokenStore(fake.oauth.issue_tokens(expires_in=1))
    auth = OAuth2(fake.oauth.client_id, fake.oauth.client_secret, fake.oauth.redirect_uri, store)
    async with KommoClient(
        fake.url,
        auth=auth,
        rate_limit=None,
        timeout=0.02,
        retry=RetryPolicy(max_attempts=2),
        sleep=fake_clock.sleep,
        clock=fake_clock.now,
    ) as client:
        with pytest.raises(TokenRefreshError, match="could not be reached after 2 attempt"):
            await client.get_talk(1)


async def test_gate_holds_token_requests(fake: FakeKommo, http: aiohttp.ClientSession) -> None:
    tokens = fake.oauth.issue_tokens()
    fake.oauth.gate = asyncio.Event()
    pending = asyncio.ensure_future(refresh(http, fake, tokens.refresh_token))
    await fake.oauth.at_gate.wait()
    assert not pending.done()
    assert fake.oauth.refreshes == 0
    fake.oauth.gate.set()
    await pending
    assert fake.oauth.refreshes == 1


async def test_token_route_takes_scripted_faults(
    fake: FakeKommo, http: aiohttp.ClientSession
) -> None:
    tokens = fake.oauth.issue_tokens()
    fake.script("token", 503, Fault.error(429, retry_after=1))
    assert (await post(http, fake, grant(fake, "refresh_token", tokens.refresh_token)))[0] == 503
    assert (await post(http, fake, grant(fake, "refresh_token", tokens.refresh_token)))[0] == 429
    await refresh(http, fake, tokens.refresh_token)
    assert fake.oauth.refreshes == 1
    assert fake.stats.by_route["token"] == 3
