"""The retry loop over real loopback HTTP against FakeKommo.

Clients here sleep on a fake clock (``sleep=fake_clock.sleep, clock=fake_clock.now``):
backoffs and server-given waits are recorded in ``fake_clock.sleeps`` and take
no real time. Only the end-to-end rate-limit test runs on the real clock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import (
    APIError,
    ForbiddenError,
    KommoClient,
    LongLivedToken,
    NotFoundError,
    PaymentRequiredError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TalkAlreadyClosedError,
    TokenRefreshError,
    TransportError,
    UnauthorizedError,
)
from kommo_talks.errors import RedactedError
from kommo_talks.testing import FakeKommo, Fault

if TYPE_CHECKING:
    from conftest import FakeClock

# Real-looking delays: on the fake clock they cost nothing, and the sleeps stay readable.
POLICY = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=10.0)

MakeClient = Callable[..., KommoClient]


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


def attempts(fake: FakeKommo, route: str) -> int:
    return fake.stats.by_route[route]


def backoff_caps(n: int, policy: RetryPolicy = POLICY) -> Iterator[float]:
    """The full-jitter cap of each of the first ``n`` retries."""
    for retry in range(1, n + 1):
        yield min(policy.max_delay, policy.base_delay * 2 ** (retry - 1))


# -- retryable statuses ---------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retryable_status_then_success_returns_the_talk(
    kommo: KommoClient, fake: FakeKommo, fake_clock: FakeClock, status: int
) -> None:
    fake.script("get", status)

    talk = await kommo.get_talk(8)

    assert talk.talk_id == 8
    assert attempts(fake, "get") == 2
    (slept,) = fake_clock.sleeps
    assert 0.0 <= slept <= POLICY.base_delay  # full jitter of the first retry


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retryable_status_then_success_closes_the_talk(
    kommo: KommoClient, fake: FakeKommo, status: int
) -> None:
    fake.script("close", status)

    assert await kommo.close_talk(8, force=True) is None

    assert not fake.is_open(8)
    assert attempts(fake, "close") == 2


async def test_html_proxy_pages_are_retried(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("get", Fault.error(502, html=True), Fault.error(504, html=True))

    assert (await kommo.get_talk(3)).talk_id == 3
    assert attempts(fake, "get") == 3


async def test_each_retry_waits_within_its_full_jitter_cap(
    kommo: KommoClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    fake.script("get", 503, 503, 503, 503)

    await kommo.get_talk(1)

    assert len(fake_clock.sleeps) == 4
    for slept, cap in zip(fake_clock.sleeps, backoff_caps(4), strict=True):
        assert 0.0 <= slept <= cap


async def test_seeded_rng_gives_reproducible_backoff(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    runs = []
    for _ in range(2):
        fake_clock.sleeps.clear()
        fake.script("get", 503, 503, 503)
        await make_client(rng=random.Random(99)).get_talk(1)
        runs.append(list(fake_clock.sleeps))

    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3


# -- non-retryable statuses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, APIError),
        (401, UnauthorizedError),
        (402, PaymentRequiredError),
        (403, ForbiddenError),
        (404, NotFoundError),
        (422, APIError),
    ],
)
async def test_non_retryable_status_is_sent_exactly_once(
    kommo: KommoClient,
    fake: FakeKommo,
    fake_clock: FakeClock,
    status: int,
    error_class: type[APIError],
) -> None:
    fake.script("get", status)

    with pytest.raises(error_class) as caught:
        await kommo.get_talk(2)

    assert type(caught.value) is error_class
    assert caught.value.status == status
    assert attempts(fake, "get") == 1
    assert fake_clock.sleeps == []


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, APIError),
        (401, UnauthorizedError),
        (402, PaymentRequiredError),
        (403, ForbiddenError),
        (404, NotFoundError),
        (422, TalkAlreadyClosedError),
    ],
)
async def test_non_retryable_status_on_close_is_sent_exactly_once(
    kommo: KommoClient, fake: FakeKommo, status: int, error_class: type[APIError]
) -> None:
    fake.script("close", status)

    with pytest.raises(error_class) as caught:
        await kommo.close_talk(2, force=True)

    assert type(caught.value) is error_class
    assert caught.value.request_method == "POST"
    assert attempts(fake, "close") == 1
    assert fake.is_open(2)


async def test_html_block_page_is_not_retried(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("close", Fault.error(403, html=True))

    with pytest.raises(ForbiddenError) as caught:
        await kommo.close_talk(2)

    assert caught.value.is_block
    assert attempts(fake, "close") == 1


# -- exhausted retries ----------------------------------------------------------------


async def test_exhausted_5xx_raises_server_error_with_the_last_status(
    kommo: KommoClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    fake.script("close", 503, 500, 504, 503, 502)

    with pytest.raises(ServerError) as caught:
        await kommo.close_talk(4, force=True)

    error = caught.value
    assert error.status == 502
    assert error.retry_after is None
    assert error.request_method == "POST"
    assert error.request_url == f"{fake.url}/api/v4/talks/4/close"
    assert attempts(fake, "close") == POLICY.max_attempts
    assert len(fake_clock.sleeps) == POLICY.max_attempts - 1  # no sleep after the last


async def test_exhausted_429_raises_rate_limit_error(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("get", 503, 429, 429, 429, 429)

    with pytest.raises(RateLimitError) as caught:
        await kommo.get_talk(4)

    assert caught.value.status == 429
    assert caught.value.retry_after is None
    assert attempts(fake, "get") == 5


async def test_the_last_answer_decides_the_error_class(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("get", 429, 429, 429, 429, 500)

    with pytest.raises(ServerError) as caught:
        await kommo.get_talk(4)

    assert caught.value.status == 500


async def test_exhausted_drops_on_post_raise_transport_error(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.script("close", *[Fault.dropped()] * 5)

    with pytest.raises(TransportError) as caught:
        await kommo.close_talk(6, force=True)

    error = caught.value
    assert (error.request_method, error.request_url) == ("POST", f"{fake.url}/api/v4/talks/6/close")
    assert isinstance(error.__cause__, RedactedError)  # aiohttp's error, without the request
    assert error.__cause__.original.startswith("aiohttp.client_exceptions.")
    assert "5 attempt(s)" in str(error)
    assert attempts(fake, "close") == 5  # aiohttp never re-sends a POST itself
    assert fake.is_open(6)


async def test_exhausted_drops_on_get_raise_transport_error(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=3, base_delay=0.5))
    fake.script("get", *[Fault.dropped()] * 6)

    with pytest.raises(TransportError):
        await client.get_talk(6)

    # Three SDK attempts; aiohttp may re-send a GET once per attempt on a stale connection.
    assert 3 <= attempts(fake, "get") <= 6


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [(503, ServerError), (429, RateLimitError), (Fault.dropped(), TransportError)],
)
async def test_max_attempts_one_sends_exactly_one_request(
    make_client: MakeClient,
    fake: FakeKommo,
    fake_clock: FakeClock,
    fault: Fault | int,
    error_class: type[Exception],
) -> None:
    client = make_client(retry=RetryPolicy(max_attempts=1))
    fake.script("close", fault)

    with pytest.raises(error_class):
        await client.close_talk(5)

    assert attempts(fake, "close") == 1
    assert fake_clock.sleeps == []


# -- dropped connections and timeouts -----------------------------------------------------


async def test_dropped_post_is_retried_once_per_attempt(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.script("close", Fault.dropped(), Fault.dropped())

    assert await kommo.close_talk(9, force=True) is None

    assert attempts(fake, "close") == 3
    assert not fake.is_open(9)


async def test_dropped_get_is_retried(kommo: KommoClient, fake: FakeKommo) -> None:
    await kommo.get_talk(1)  # a pooled keep-alive connection, as in real use
    fake.script("get", Fault.dropped(), Fault.dropped())

    assert (await kommo.get_talk(9)).talk_id == 9

    # Both drops were served (by SDK retries or aiohttp's own re-send), then the answer.
    assert attempts(fake, "get") == 1 + 3
    assert fake.faults.pending("get") == 0


async def test_timeout_is_retried(make_client: MakeClient, fake: FakeKommo) -> None:
    client = make_client(timeout=0.05)
    fake.script("get", Fault.slow(0.25))

    assert (await client.get_talk(5)).talk_id == 5
    assert attempts(fake, "get") == 2


async def test_exhausted_timeouts_raise_transport_error(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client(timeout=0.05, retry=RetryPolicy(max_attempts=2, base_delay=0.5))
    fake.script("close", Fault.slow(0.25), Fault.slow(0.25))

    with pytest.raises(TransportError) as caught:
        await client.close_talk(5, force=True)

    assert isinstance(caught.value.__cause__, TimeoutError)
    assert "2 attempt(s)" in str(caught.value)
    assert attempts(fake, "close") == 2


# -- the ambiguous close ---------------------------------------------------------------


async def test_close_then_503_then_422_means_closed(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("close", Fault.then_error(503))

    assert await kommo.close_talk(11, force=True) is None

    assert not fake.is_open(11)
    assert attempts(fake, "close") == 2  # the retry got the 422


async def test_close_then_drop_then_422_means_closed(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("close", Fault.dropped(after_effect=True))

    assert await kommo.close_talk(11, force=True) is None

    assert not fake.is_open(11)
    assert attempts(fake, "close") == 2


async def test_ambiguity_survives_later_non_ambiguous_failures(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.script("close", Fault.then_error(500), 429, 503)

    assert await kommo.close_talk(11, force=True) is None
    assert attempts(fake, "close") == 4


async def test_422_on_the_first_attempt_raises_already_closed(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.talks[12]["is_in_work"] = False

    with pytest.raises(TalkAlreadyClosedError) as caught:
        await kommo.close_talk(12, force=True)

    assert caught.value.status == 422
    assert attempts(fake, "close") == 1


async def test_a_429_before_the_422_is_not_ambiguous(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.talks[12]["is_in_work"] = False
    fake.script("close", 429)

    with pytest.raises(TalkAlreadyClosedError):
        await kommo.close_talk(12, force=True)

    assert attempts(fake, "close") == 2


async def test_ambiguity_belongs_to_one_call(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("close", Fault.then_error(503))
    await kommo.close_talk(13, force=True)

    # A new call on the now-closed talk: its own first attempt gets the 422.
    with pytest.raises(TalkAlreadyClosedError):
        await kommo.close_talk(13, force=True)


async def test_a_422_on_get_after_a_5xx_is_still_an_error(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.script("get", 503, 422)

    with pytest.raises(APIError) as caught:
        await kommo.get_talk(13)

    assert caught.value.status == 422


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


@asynccontextmanager
async def scripted_server(answers: list[web.Response]) -> AsyncIterator[str]:
    """Serve ``answers`` in order on every path; yield the base URL."""
    pending = iter(answers)

    async def handler(request: web.Request) -> web.Response:
        return next(pending)

    async with serving(answering_everything(handler)) as url:
        yield url


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
        assert await client.close_talk(1, force=True) is None

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
        assert await client.close_talk(1, force=True) is None

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
        assert await client.close_talk(1, force=True) is None

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
        assert await client.close_talk(1, force=True) is None

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
        assert await client.close_talk(1, force=True) is None


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

    assert await client.close_talk(22, force=True) is None
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
