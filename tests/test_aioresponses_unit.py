"""Request shapes and retry decisions, with aiohttp mocked by aioresponses (no sockets).

aioresponses 0.7.9 needs a shim on aiohttp 3.14: see ``aioresponses_shim``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from aioresponses.core import RequestCall
from aioresponses_shim import shimmed_aioresponses
from yarl import URL

from kommo_talks import (
    APIError,
    KommoClient,
    LongLivedToken,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TalkAlreadyClosedError,
    TokenRefreshError,
    TransportError,
    __version__,
)

if TYPE_CHECKING:
    from conftest import FakeClock

BASE = "https://example.kommo.com"
TOKEN = "unit-test-token"
TALK_117: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "talk_117.json").read_text(encoding="utf-8")
)
POLICY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=10.0)


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with shimmed_aioresponses() as m:
        yield m


@pytest.fixture
async def client(fake_clock: FakeClock) -> AsyncIterator[KommoClient]:
    async with KommoClient(
        BASE,
        LongLivedToken(TOKEN),
        rate_limit=None,
        retry=POLICY,
        sleep=fake_clock.sleep,
        clock=fake_clock.now,
    ) as kommo:
        yield kommo


def calls(m: shimmed_aioresponses, method: str, url: str) -> list[RequestCall]:
    return list(m.requests.get((method, URL(url)), []))


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


# -- request shapes ------------------------------------------------------------------------


async def test_get_talk_sends_one_authorized_get(
    client: KommoClient, mocked: shimmed_aioresponses
) -> None:
    url = f"{BASE}/api/v4/talks/117"
    mocked.get(url, payload=TALK_117, content_type="application/hal+json")

    talk = await client.get_talk(117)

    assert talk.talk_id == 117
    assert list(mocked.requests) == [("GET", URL(url))]
    (call,) = calls(mocked, "GET", url)
    headers = call.kwargs["headers"]
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["User-Agent"].startswith(f"kommo-talks/{__version__} ")
    assert call.kwargs["data"] is None
    assert call.kwargs["allow_redirects"] is False


@pytest.mark.parametrize("force", [True, False])
async def test_close_talk_posts_force_close_as_json(
    client: KommoClient, mocked: shimmed_aioresponses, force: bool
) -> None:
    url = f"{BASE}/api/v4/talks/117/close"
    mocked.post(url, status=202, body=b"")

    await client.close_talk(117, force=force)  # returns None on success, raises otherwise

    assert list(mocked.requests) == [("POST", URL(url))]
    (call,) = calls(mocked, "POST", url)
    assert json.loads(call.kwargs["data"]) == ({"force_close": True} if force else {})
    headers = call.kwargs["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["User-Agent"].startswith("kommo-talks/")
    assert call.kwargs["allow_redirects"] is False


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(
    client: KommoClient, mocked: shimmed_aioresponses, status: int
) -> None:
    elsewhere = "https://elsewhere.example/collect"
    mocked.post(
        f"{BASE}/api/v4/talks/5/close", status=status, headers={"Location": elsewhere}, body=b""
    )
    mocked.get(elsewhere, status=200, payload={})
    mocked.post(elsewhere, status=200, payload={})

    with pytest.raises(APIError) as caught:
        await client.close_talk(5, force=True)

    assert caught.value.status == status
    assert caught.value.request_url == f"{BASE}/api/v4/talks/5/close"
    # The token never went to the Location.
    assert all(url.host == "example.kommo.com" for _, url in mocked.requests)
    assert len(calls(mocked, "POST", f"{BASE}/api/v4/talks/5/close")) == 1


# -- Retry-After as an HTTP date ---------------------------------------------------------------


async def test_retry_after_date_is_slept_before_the_retry(
    client: KommoClient, mocked: shimmed_aioresponses, fake_clock: FakeClock
) -> None:
    url = f"{BASE}/api/v4/talks/117"
    mocked.get(url, status=503, headers={"Retry-After": http_date(8)})
    mocked.get(url, payload=TALK_117)

    assert (await client.get_talk(117)).talk_id == 117

    (slept,) = fake_clock.sleeps
    assert 6.0 < slept <= 8.0
    assert len(calls(mocked, "GET", url)) == 2


@pytest.mark.parametrize(
    "header",
    [
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # RFC 850, obsolete but to be accepted
        "Wed Oct 21 07:28:00 2015",  # asctime
        "Wed, 21 Oct 2015 07:28:00 GMT",  # IMF-fixdate, in the past
    ],
)
async def test_retry_after_date_in_the_past_retries_without_waiting(
    client: KommoClient, mocked: shimmed_aioresponses, fake_clock: FakeClock, header: str
) -> None:
    url = f"{BASE}/api/v4/talks/3/close"
    mocked.post(url, status=429, headers={"Retry-After": header}, body=b"")
    mocked.post(url, status=202, body=b"")

    await client.close_talk(3)

    assert fake_clock.sleeps == []  # the server's wait is over: no backoff on top
    assert len(calls(mocked, "POST", url)) == 2


async def test_retry_after_date_beyond_max_delay_raises_at_once(
    client: KommoClient, mocked: shimmed_aioresponses, fake_clock: FakeClock
) -> None:
    url = f"{BASE}/api/v4/talks/3/close"
    mocked.post(url, status=503, headers={"Retry-After": http_date(90)}, body=b"", repeat=True)

    with pytest.raises(ServerError) as caught:
        await client.close_talk(3)

    assert caught.value.retry_after is not None
    assert 88.0 < caught.value.retry_after <= 90.0
    assert len(calls(mocked, "POST", url)) == 1
    assert fake_clock.sleeps == []


# -- request ids and the client-wide pause ---------------------------------------------------


async def test_exhausted_retries_report_the_last_request_id(
    client: KommoClient, mocked: shimmed_aioresponses
) -> None:
    url = f"{BASE}/api/v4/talks/9"
    for n in range(POLICY.max_attempts):
        mocked.get(url, status=503, headers={"X-Request-Id": f"req-{n}"}, body=b"")

    with pytest.raises(ServerError) as caught:
        await client.get_talk(9)

    assert caught.value.request_id == f"req-{POLICY.max_attempts - 1}"
    assert len(calls(mocked, "GET", url)) == POLICY.max_attempts


async def test_the_pause_copy_names_its_own_request_and_has_no_request_id(
    client: KommoClient, mocked: shimmed_aioresponses, fake_clock: FakeClock
) -> None:
    problem = {"title": "Too Many Requests", "status": 429, "retry_after": 300}
    mocked.get(
        f"{BASE}/api/v4/talks/1",
        status=429,
        payload=problem,
        content_type="application/problem+json",
        headers={"X-Request-Id": "req-429"},
    )
    with pytest.raises(RateLimitError) as first:
        await client.get_talk(1)
    assert first.value.request_id == "req-429"
    fake_clock.time += 100

    with pytest.raises(RateLimitError) as caught:
        await client.close_talk(2, force=True)

    error = caught.value
    assert error.request_id is None
    assert (error.request_method, error.request_url) == ("POST", f"{BASE}/api/v4/talks/2/close")
    assert error.problem == problem
    assert error.retry_after == pytest.approx(200.0)
    assert list(mocked.requests) == [("GET", URL(f"{BASE}/api/v4/talks/1"))]


# -- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
    ],
    ids=type,
)
async def test_transport_failures_are_retried(
    client: KommoClient, mocked: shimmed_aioresponses, exc: Exception
) -> None:
    url = f"{BASE}/api/v4/talks/117"
    mocked.get(url, exception=exc)
    mocked.get(url, payload=TALK_117)

    assert (await client.get_talk(117)).talk_id == 117
    assert len(calls(mocked, "GET", url)) == 2


async def test_a_certificate_failure_is_not_retried_and_is_a_transport_error(
    client: KommoClient, mocked: shimmed_aioresponses
) -> None:
    url = f"{BASE}/api/v4/talks/117"
    key = ConnectionKey("example.kommo.com", 443, True, True, None, None, None)
    failure = aiohttp.ClientConnectorCertificateError(
        key, ssl.SSLCertVerificationError("certificate verify failed")
    )
    mocked.get(url, exception=failure, repeat=True)

    with pytest.raises(TransportError) as caught:
        await client.get_talk(117)

    assert type(caught.value.__cause__).__name__ == "ClientConnectorCertificateError"
    assert "certificate verify failed" in str(caught.value.__cause__)
    assert (caught.value.request_method, caught.value.request_url) == ("GET", url)
    assert len(calls(mocked, "GET", url)) == 1


async def test_a_certificate_failure_at_the_token_endpoint_is_a_token_refresh_error(
    client: KommoClient, mocked: shimmed_aioresponses
) -> None:
    url = f"{BASE}/oauth2/access_token"
    key = ConnectionKey("example.kommo.com", 443, True, True, None, None, None)
    failure = aiohttp.ClientConnectorCertificateError(
        key, ssl.SSLCertVerificationError("certificate verify failed")
    )
    mocked.post(url, exception=failure, repeat=True)

    with pytest.raises(TokenRefreshError) as caught:
        await client._pipeline.request_tokens({"grant_type": "refresh_token", "refresh_token": "r"})

    assert type(caught.value.__cause__).__name__ == "ClientConnectorCertificateError"
    assert "certificate verify failed" in str(caught.value.__cause__)
    assert len(calls(mocked, "POST", url)) == 1


@pytest.mark.parametrize(
    ("first_failure", "ambiguous"),
    [
        (
            aiohttp.ClientConnectorError(
                ConnectionKey("example.kommo.com", 443, True, True, None, None, None),
                ConnectionRefusedError(111, "Connection refused"),
            ),
            False,
        ),
        (aiohttp.ServerDisconnectedError(), True),
        (TimeoutError(), True),
    ],
    ids=["refused", "dropped", "timeout"],
)
async def test_only_a_failure_after_connecting_makes_a_later_422_a_success(
    client: KommoClient, mocked: shimmed_aioresponses, first_failure: Exception, ambiguous: bool
) -> None:
    url = f"{BASE}/api/v4/talks/117/close"
    mocked.post(url, exception=first_failure)
    mocked.post(url, status=422, payload={"title": "Unprocessable Entity", "status": 422})

    if ambiguous:
        await client.close_talk(117, force=True)  # returns None on success, raises otherwise
    else:  # a refused connection sent nothing: the talk was closed by someone else
        with pytest.raises(TalkAlreadyClosedError):
            await client.close_talk(117, force=True)
    assert len(calls(mocked, "POST", url)) == 2
