"""The retry loop over loopback HTTP: the replay after a 401, the rate limit end to end.

The rate-limit test runs on the real clock; the others on a fake one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from retry_support import POLICY, MakeClient, attempts, scripted_server

from kommo_talks import (
    ForbiddenError,
    KommoClient,
    LongLivedToken,
    RateLimitError,
    RetryPolicy,
    ServerError,
    UnauthorizedError,
)
from kommo_talks.testing import FakeKommo, Fault

if TYPE_CHECKING:
    from conftest import FakeClock


# -- the replay after a 401 shares the attempt budget ------------------------------------------


class RefreshingAuth:
    """An Auth strategy that can refresh: serves ``tokens`` in turn, one per 401."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.refreshes = 0

    async def aclose(self) -> None:
        pass

    async def access_token(self, endpoint: object) -> str:
        return self.tokens[0]

    async def handle_unauthorized(self, endpoint: object, rejected_token: str) -> bool:
        self.refreshes += 1
        if len(self.tokens) > 1 and rejected_token == self.tokens[0]:
            self.tokens.pop(0)
            return True
        return False


async def test_401_refreshes_and_replays_with_the_new_token(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    auth = RefreshingAuth("stale-token", fake.token)
    client = make_client(auth=auth)

    assert (await client.get_talk(21)).talk_id == 21

    assert auth.refreshes == 1
    assert [r.headers["Authorization"] for r in fake.requests] == [
        "Bearer stale-token",
        f"Bearer {fake.token}",
    ]


async def test_the_replay_after_401_is_spent_from_the_attempt_budget(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    auth = RefreshingAuth("stale-token", fake.token)
    client = make_client(auth=auth, retry=RetryPolicy(max_attempts=3, base_delay=0.5))
    fake.script("close", Fault.slow(0), 503, 503, 503)  # the first request meets the stale token

    with pytest.raises(ServerError):
        await client.close_talk(22, force=True)

    assert auth.refreshes == 1
    assert attempts(fake, "close") == 3  # 401, replay (503), one retry (503): not four


async def test_401_then_retries_within_the_budget_succeed(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    auth = RefreshingAuth("stale-token", fake.token)
    client = make_client(auth=auth, retry=RetryPolicy(max_attempts=3, base_delay=0.5))
    fake.script("close", Fault.slow(0), 503)

    await client.close_talk(22, force=True)  # returns None on success, raises otherwise
    assert attempts(fake, "close") == 3


async def test_max_attempts_one_refreshes_but_raises_unauthorized(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    auth = RefreshingAuth("stale-token", fake.token)
    client = make_client(auth=auth, retry=RetryPolicy(max_attempts=1))

    with pytest.raises(UnauthorizedError):
        await client.get_talk(23)

    assert auth.refreshes == 1  # the refresh happened, for the next call
    assert attempts(fake, "get") == 1
    assert (await client.get_talk(23)).talk_id == 23


async def test_a_second_401_is_not_refreshed_again(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    auth = RefreshingAuth("stale-token", "also-stale", fake.token)
    client = make_client(auth=auth)

    with pytest.raises(UnauthorizedError):
        await client.get_talk(24)

    assert auth.refreshes == 1
    assert attempts(fake, "get") == 2


# -- rate limit end to end, on the real clock -----------------------------------------------


async def test_many_concurrent_callers_at_the_client_limit_get_no_429() -> None:
    rate = 20
    async with (
        FakeKommo(rate_limit=rate, rate_window=0.95) as fake,
        KommoClient(
            fake.url,
            LongLivedToken(fake.token),
            rate_limit=rate,
            retry=RetryPolicy(max_attempts=1),
        ) as client,
    ):
        talks = await asyncio.gather(*(client.get_talk(n) for n in range(1, 51)))

    assert [t.talk_id for t in talks] == list(range(1, 51))
    assert fake.stats.throttled == 0
    assert fake.stats.requests == 50


async def test_without_a_client_limit_the_same_burst_is_throttled() -> None:
    # The control for the test above: the fake really enforces its limit.
    async with (
        FakeKommo(rate_limit=20, rate_window=0.95, retry_after=300) as fake,
        KommoClient(
            fake.url,
            LongLivedToken(fake.token),
            rate_limit=None,
            retry=RetryPolicy(max_attempts=1),
        ) as client,
    ):
        results = await asyncio.gather(
            *(client.get_talk(n) for n in range(1, 51)), return_exceptions=True
        )

    throttled = [r for r in results if isinstance(r, RateLimitError)]
    assert len(throttled) == fake.stats.throttled == 30
    assert all(r.retry_after == 300 for r in throttled)


# -- what the answer means ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/problem+json", "Application/Problem+JSON", "APPLICATION/JSON"]
)
async def test_a_403_problem_body_is_a_permission_error_whatever_the_type_case(
    fake_clock: FakeClock, content_type: str
) -> None:
    answers = [
        web.Response(
            status=403,
            body=b'{"title": "Forbidden", "status": 403, "detail": "Insufficient rights"}',
            headers={"Content-Type": content_type},
        )
    ]
    async with (
        scripted_server(answers) as url,
        KommoClient(url, LongLivedToken("t"), rate_limit=None, retry=POLICY) as client,
    ):
        with pytest.raises(ForbiddenError) as caught:
            await client.close_talk(1)

    # Media types are case-insensitive: this is not Kommo's HTML block page,
    # so a batch must not stop on it.
    assert not caught.value.is_block
    assert caught.value.detail == "Insufficient rights"
