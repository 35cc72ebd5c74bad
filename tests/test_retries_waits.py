"""The retry loop over loopback HTTP: server-given waits and the client-wide pause.

Clients sleep on a fake clock: waits are recorded in ``fake_clock.sleeps``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from retry_support import POLICY, MakeClient, attempts, backoff_caps, scripted_server

from kommo_talks import (
    KommoClient,
    LongLivedToken,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TokenRefreshError,
)
from kommo_talks.testing import FakeKommo, Fault

if TYPE_CHECKING:
    from conftest import FakeClock


# -- server-given waits -------------------------------------------------------------------


async def test_retry_after_seconds_is_slept_instead_of_backoff(
    kommo: KommoClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    fake.script("close", Fault.error(503, retry_after=2, retry_after_header=True))

    await kommo.close_talk(14, force=True)

    assert fake_clock.sleeps == [2.0]
    assert not fake.is_open(14)


async def test_429_body_retry_after_is_slept(
    kommo: KommoClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    fake.script("get", Fault.error(429, retry_after=0.25))

    await kommo.get_talk(14)

    assert fake_clock.sleeps == [0.25]


async def test_server_wait_within_max_delay_is_kept_when_retries_run_out(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=2, max_delay=10.0))
    fake.script("get", Fault.error(429, retry_after=0.5), Fault.error(429, retry_after=0.75))

    with pytest.raises(RateLimitError) as caught:
        await client.get_talk(1)

    assert caught.value.retry_after == 0.75
    assert fake_clock.sleeps == [0.5]


@pytest.mark.parametrize(
    ("fault", "error_class", "wait"),
    [
        (Fault.error(429, retry_after=300), RateLimitError, 300.0),
        (Fault.error(429, retry_after=60, retry_after_header=True), RateLimitError, 60.0),
        (Fault.error(503, retry_after=60, retry_after_header=True), ServerError, 60.0),
        (Fault.error(500, retry_after=11, retry_after_header=True), ServerError, 11.0),
    ],
)
async def test_server_wait_above_max_delay_raises_at_once(
    kommo: KommoClient,
    fake: FakeKommo,
    fake_clock: FakeClock,
    fault: Fault,
    error_class: type[RateLimitError | ServerError],
    wait: float,
) -> None:
    fake.script("close", fault)

    with pytest.raises(error_class) as caught:
        await kommo.close_talk(15, force=True)

    assert type(caught.value) is error_class
    assert caught.value.retry_after == wait
    assert attempts(fake, "close") == 1  # four attempts were left: none is used
    assert fake_clock.sleeps == []


# -- a server of our own, for headers FakeKommo does not send ------------------------------


def clocked_client(url: str, fake_clock: FakeClock) -> KommoClient:
    """A client of ``url`` whose waits run on the fake clock."""
    return KommoClient(
        url,
        LongLivedToken("t"),
        rate_limit=None,
        retry=POLICY,
        sleep=fake_clock.sleep,
        clock=fake_clock.now,
    )


def in_seconds(seconds: int) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


async def test_retry_after_http_date_is_slept(fake_clock: FakeClock) -> None:
    answers = [
        web.Response(status=503, headers={"Retry-After": in_seconds(6)}),
        web.Response(status=202),
    ]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        await client.close_talk(1, force=True)  # returns None on success, raises otherwise

    (slept,) = fake_clock.sleeps
    assert 4.0 < slept <= 6.0  # HTTP dates have whole seconds


async def test_retry_after_http_date_beyond_max_delay_raises(fake_clock: FakeClock) -> None:
    answers = [web.Response(status=429, headers={"Retry-After": in_seconds(120)})]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        with pytest.raises(RateLimitError) as caught:
            await client.close_talk(1, force=True)

    assert caught.value.retry_after is not None
    assert 118.0 < caught.value.retry_after <= 120.0
    assert fake_clock.sleeps == []


async def test_retry_after_header_wins_over_the_429_body(fake_clock: FakeClock) -> None:
    answers = [
        web.json_response(
            {"title": "Too Many Requests", "status": 429, "retry_after": 7},
            status=429,
            headers={"Retry-After": "2"},
            content_type="application/problem+json",
        ),
        web.Response(status=202),
    ]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        await client.close_talk(1, force=True)  # returns None on success, raises otherwise

    assert fake_clock.sleeps == [2.0]


async def test_unreadable_retry_after_falls_back_to_backoff(fake_clock: FakeClock) -> None:
    answers = [
        web.Response(status=503, headers={"Retry-After": "\u00b2"}),
        web.Response(status=503, headers={"Retry-After": "soon"}),
        web.Response(status=202),
    ]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        await client.close_talk(1, force=True)  # returns None on success, raises otherwise

    assert len(fake_clock.sleeps) == 2
    for slept, cap in zip(fake_clock.sleeps, backoff_caps(2), strict=True):
        assert 0.0 <= slept <= cap


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", id="date-huge-year"),
        pytest.param("9" * 400, id="400-digit-number"),
    ],
)
async def test_a_hostile_retry_after_is_ignored_and_the_client_keeps_working(
    fake_clock: FakeClock, header: str
) -> None:
    answers = [
        web.Response(status=503, headers={"Retry-After": header}),
        web.Response(status=503, headers={"Retry-After": header}),
        web.Response(status=202),
    ]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        await client.close_talk(1, force=True)  # returns None on success, raises otherwise

    assert len(fake_clock.sleeps) == 2  # ordinary backoffs, no server-given pause
    for slept, cap in zip(fake_clock.sleeps, backoff_caps(2), strict=True):
        assert 0.0 <= slept <= cap


async def test_a_day_long_retry_after_pauses_the_client_for_an_hour_at_most(
    fake_clock: FakeClock,
) -> None:
    answers = [
        web.Response(status=429, headers={"Retry-After": "86400"}),
        web.Response(status=202),
    ]
    async with (
        scripted_server(answers) as url,
        clocked_client(url, fake_clock) as client,
    ):
        with pytest.raises(RateLimitError) as caught:
            await client.close_talk(1, force=True)
        assert caught.value.retry_after == 3600.0

        fake_clock.time += 3600.0
        await client.close_talk(1, force=True)  # returns None on success, raises otherwise


# -- the client-wide pause ------------------------------------------------------------------


async def test_a_server_wait_makes_other_calls_wait(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=1, max_delay=10.0))
    fake.script("get", Fault.error(429, retry_after=0.5))
    with pytest.raises(RateLimitError):
        await client.get_talk(1)
    fake_clock.time += 0.2

    await client.close_talk(2, force=True)  # another call, another route

    assert fake_clock.sleeps == [pytest.approx(0.3)]  # the rest of the wait, then it sent
    assert not fake.is_open(2)


async def test_no_wait_once_the_pause_has_passed(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=1, max_delay=10.0))
    fake.script("get", Fault.error(429, retry_after=0.5))
    with pytest.raises(RateLimitError):
        await client.get_talk(1)
    fake_clock.time += 0.5

    await client.get_talk(2)

    assert fake_clock.sleeps == []


async def test_a_long_pause_fails_other_calls_without_sending(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client()
    fake.script("get", Fault.error(429, retry_after=120))
    with pytest.raises(RateLimitError) as first:
        await client.get_talk(1)
    fake_clock.time += 20

    with pytest.raises(RateLimitError) as caught:
        await client.close_talk(7, force=True)

    error = caught.value
    assert type(error) is RateLimitError
    assert error.status == 429
    assert error.problem == first.value.problem
    assert error.problem["retry_after"] == 120
    assert error.retry_after == pytest.approx(100.0)
    assert error.request_method == "POST"
    assert error.request_url == f"{fake.url}/api/v4/talks/7/close"
    assert error.request_id is None
    assert fake.stats.requests == 1  # the close was never sent
    assert fake.is_open(7)


async def test_a_long_5xx_pause_fails_other_calls_with_server_error(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client()
    fake.script("close", Fault.error(503, retry_after=45, retry_after_header=True))
    with pytest.raises(ServerError):
        await client.close_talk(1)

    with pytest.raises(ServerError) as caught:
        await client.get_talk(2)

    assert caught.value.status == 503
    assert caught.value.request_method == "GET"
    assert caught.value.retry_after == pytest.approx(45.0)
    assert fake.stats.requests == 1


async def test_the_pause_belongs_to_the_client_that_got_the_answer(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    paused = make_client(retry=RetryPolicy(max_attempts=1, max_delay=10.0))
    other = make_client()
    fake.script("get", Fault.error(429, retry_after=5))
    with pytest.raises(RateLimitError):
        await paused.get_talk(1)

    await other.get_talk(2)
    assert fake_clock.sleeps == []
    await paused.get_talk(3)
    assert fake_clock.sleeps == [5.0]


@pytest.mark.parametrize(("first", "second", "latest"), [(60, 30, 60), (30, 60, 60)])
async def test_overlapping_waits_keep_the_latest_deadline(
    kommo: KommoClient, fake: FakeKommo, first: int, second: int, latest: int
) -> None:
    # Both answers arrive while both requests are in flight; the second one 20 ms later.
    fake.script("get", Fault.error(429, retry_after=first))
    fake.script("close", Fault(status=429, retry_after=second, delay=0.02))
    results = await asyncio.gather(
        kommo.get_talk(1), kommo.close_talk(2, force=True), return_exceptions=True
    )
    assert all(isinstance(r, RateLimitError) for r in results)

    with pytest.raises(RateLimitError) as caught:
        await kommo.get_talk(3)

    assert caught.value.retry_after == pytest.approx(latest)
    assert caught.value.problem["retry_after"] == latest  # the answer that set it
    assert fake.stats.requests == 2


class HeldLimiter:
    """A RateLimiter whose first acquire is held until the test releases it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def acquire(self) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.release.wait()


async def test_a_request_queued_for_the_limiter_waits_for_a_pause_set_meanwhile(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    limiter = HeldLimiter()
    client = make_client(rate_limit=limiter, retry=RetryPolicy(max_attempts=1, max_delay=10.0))
    queued = asyncio.create_task(client.close_talk(2, force=True))
    for _ in range(5):
        await asyncio.sleep(0)
    assert limiter.calls == 1  # past the pause check, waiting for a rate-limit slot

    fake.script("get", Fault.error(429, retry_after=4))
    with pytest.raises(RateLimitError):
        await client.get_talk(1)
    limiter.release.set()
    await queued

    assert fake_clock.sleeps == [4.0]  # it waited out the pause before sending
    assert limiter.calls == 3  # and took a fresh slot after the wait
    assert not fake.is_open(2)


async def test_a_server_wait_from_the_token_endpoint_pauses_the_client(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=1, max_delay=10.0))
    fake.script("token", Fault.error(429, retry_after=3))
    with pytest.raises(TokenRefreshError):
        await client._pipeline.request_tokens({"grant_type": "refresh_token", "refresh_token": "r"})

    await client.get_talk(1)

    assert fake_clock.sleeps == [3.0]


async def test_a_long_pause_sends_no_token_request(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client()
    fake.script("get", Fault.error(429, retry_after=120))
    with pytest.raises(RateLimitError):
        await client.get_talk(1)

    with pytest.raises(RateLimitError):
        await client._pipeline.request_tokens({"grant_type": "refresh_token", "refresh_token": "r"})

    assert attempts(fake, "token") == 0
