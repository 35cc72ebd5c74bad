"""The retry loop over loopback HTTP: what is retried, and the ambiguous close.

Clients sleep on a fake clock: backoffs are recorded in ``fake_clock.sleeps``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
from retry_support import POLICY, MakeClient, attempts, backoff_caps

from kommo_talks import (
    APIError,
    ForbiddenError,
    KommoClient,
    NotFoundError,
    PaymentRequiredError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TalkAlreadyClosedError,
    TransportError,
    UnauthorizedError,
)
from kommo_talks.errors import RedactedError
from kommo_talks.testing import FakeKommo, Fault

if TYPE_CHECKING:
    from conftest import FakeClock


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

    await kommo.close_talk(8, force=True)  # returns None on success, raises otherwise

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

    await kommo.close_talk(9, force=True)  # returns None on success, raises otherwise

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

    await kommo.close_talk(11, force=True)  # returns None on success, raises otherwise

    assert not fake.is_open(11)
    assert attempts(fake, "close") == 2  # the retry got the 422


async def test_close_then_drop_then_422_means_closed(kommo: KommoClient, fake: FakeKommo) -> None:
    fake.script("close", Fault.dropped(after_effect=True))

    await kommo.close_talk(11, force=True)  # returns None on success, raises otherwise

    assert not fake.is_open(11)
    assert attempts(fake, "close") == 2


async def test_ambiguity_survives_later_non_ambiguous_failures(
    kommo: KommoClient, fake: FakeKommo
) -> None:
    fake.script("close", Fault.then_error(500), 429, 503)

    await kommo.close_talk(11, force=True)  # returns None on success, raises otherwise
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
