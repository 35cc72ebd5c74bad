"""KommoClient against FakeKommo over real loopback HTTP: operations, errors, lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import (
    APIError,
    ClientClosedError,
    CloseStatus,
    DecodeError,
    ForbiddenError,
    KommoClient,
    KommoError,
    LongLivedToken,
    NotFoundError,
    PaymentRequiredError,
    RetryPolicy,
    Talk,
    TalkAlreadyClosedError,
    TokenRefreshError,
    UnauthorizedError,
    converter,
)
from kommo_talks.testing import FakeKommo, Fault

BAD_TALK_IDS = [0, -1, True, False, 1.0, "1", None, 2**0.5, 2**63]


# -- operations -----------------------------------------------------------------


async def test_get_talk_returns_the_typed_talk(client: KommoClient, fake: FakeKommo) -> None:
    talk = await client.get_talk(42)

    assert isinstance(talk, Talk)
    assert talk.talk_id == 42
    assert talk.created_at == datetime(2021, 9, 7, 12, 38, 11, tzinfo=UTC)
    assert talk.is_in_work is True
    assert talk.embedded.contacts[0].id == 3372695
    assert talk.self_url == f"{fake.url}/api/v4/talks/42"
    assert converter.unstructure(talk) == fake.payload(42)


async def test_get_talk_sends_the_documented_request(client: KommoClient, fake: FakeKommo) -> None:
    await client.get_talk(7)

    (request,) = fake.requests
    assert (request.method, request.path) == ("GET", "/api/v4/talks/7")
    assert request.headers["Authorization"] == f"Bearer {fake.token}"
    assert request.headers["User-Agent"].startswith("kommo-talks/")
    assert request.body == b""


@pytest.mark.parametrize(("force", "body"), [(True, {"force_close": True}), (False, {})])
async def test_close_talk_posts_force_close(
    client: KommoClient, fake: FakeKommo, force: bool, body: dict[str, bool]
) -> None:
    await client.close_talk(3, force=force)  # returns None on success, raises otherwise

    (request,) = fake.requests
    assert (request.method, request.path) == ("POST", "/api/v4/talks/3/close")
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == body
    assert not fake.is_open(3)


async def test_closing_a_closed_talk_raises_already_closed(
    client: KommoClient, fake: FakeKommo
) -> None:
    await client.close_talk(3, force=True)

    with pytest.raises(TalkAlreadyClosedError) as caught:
        await client.close_talk(3, force=True)

    assert caught.value.status == 422
    assert caught.value.request_method == "POST"
    assert caught.value.request_url == f"{fake.url}/api/v4/talks/3/close"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("talk_id", BAD_TALK_IDS)
async def test_invalid_talk_id_raises_before_any_request(
    client: KommoClient, fake: FakeKommo, talk_id: Any
) -> None:
    with pytest.raises(ValueError, match="talk_id must be a positive int"):
        await client.get_talk(talk_id)
    with pytest.raises(ValueError, match="talk_id must be a positive int"):
        await client.close_talk(talk_id, force=True)

    assert fake.stats.requests == 0


async def test_non_bool_force_is_rejected_before_any_request(
    client: KommoClient, fake: FakeKommo
) -> None:
    with pytest.raises(ValueError, match="force must be a bool"):
        await client.close_talk(1, force="yes")  # type: ignore[arg-type]
    assert fake.stats.requests == 0


# -- error answers ------------------------------------------------------------------


async def test_unknown_talk_raises_not_found_with_request_facts(
    client: KommoClient, fake: FakeKommo
) -> None:
    with pytest.raises(NotFoundError) as caught:
        await client.get_talk(999)

    error = caught.value
    assert error.status == 404
    assert error.title == "Not Found"
    assert error.type == "https://httpstatus.es/404"
    assert error.problem["status"] == 404
    assert error.request_id  # the X-Request-Id header
    assert error.request_id in str(error)
    assert "GET" in str(error)
    assert "/api/v4/talks/999" in str(error)


async def test_bad_token_raises_unauthorized_without_the_token(fake: FakeKommo) -> None:
    secret = "not-the-right-token-0123456789"
    async with KommoClient(fake.url, LongLivedToken(secret), rate_limit=None) as client:
        with pytest.raises(UnauthorizedError) as caught:
            await client.get_talk(1)

    assert caught.value.status == 401
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert fake.stats.requests == 1  # a long-lived token is never retried


@pytest.mark.parametrize(("status", "cls"), [(402, PaymentRequiredError), (403, ForbiddenError)])
async def test_denied_account_gives_the_status_class(
    client: KommoClient, fake: FakeKommo, status: int, cls: type[APIError]
) -> None:
    fake.deny(status)

    with pytest.raises(cls) as caught:
        await client.close_talk(1, force=True)

    assert caught.value.status == status
    assert fake.is_open(1)
    if isinstance(caught.value, ForbiddenError):
        assert not caught.value.is_block  # problem+json: a permission error


async def test_denied_single_talk_leaves_others_working(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.deny(403, talk_id=5)

    with pytest.raises(ForbiddenError):
        await client.get_talk(5)
    assert (await client.get_talk(6)).talk_id == 6


async def test_html_block_page_gives_forbidden_with_truncated_detail(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.block()

    with pytest.raises(ForbiddenError) as caught:
        await client.get_talk(1)

    error = caught.value
    assert error.is_block
    assert error.problem == {}
    assert error.detail is not None
    assert "403 Forbidden" in error.detail
    assert len(error.detail) <= 500
    assert fake.stats.requests == 1  # a 403 is never retried


async def test_html_error_detail_is_cut_to_500_characters(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.script("get", Fault.error(404, html=True))

    with pytest.raises(NotFoundError) as caught:
        await client.get_talk(1)
    assert caught.value.detail is not None
    assert caught.value.detail.startswith("<html>")


# -- responses that do not fit ----------------------------------------------------------


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[web.Response], str]]:
    """A loopback server answering every request with the response given to it."""
    answers: list[web.Response] = []

    async def handler(request: web.Request) -> web.Response:
        return answers[-1]

    async with serving(answering_everything(handler)) as url:

        def serve(response: web.Response) -> str:
            answers.append(response)
            return url

        yield serve


@asynccontextmanager
async def echo_server() -> AsyncIterator[str]:
    """A loopback server that answers 403 (HTML) or 400 (token endpoint) echoing the request."""

    async def echo(request: web.Request) -> web.Response:
        if request.path == "/oauth2/access_token":
            problem = {"title": "Bad request", "hint": f"You sent {await request.text()}"}
            return web.json_response(problem, status=400, content_type="application/problem+json")
        page = f"<html>Denied. You sent {request.headers.get('Authorization')}</html>"
        return web.Response(status=403, text=page, content_type="text/html")

    async with serving(answering_everything(echo)) as url:
        yield url


async def test_an_error_page_echoing_the_token_does_not_leak_it() -> None:
    token = "SECRET-long-lived-token-123"
    async with echo_server() as url, KommoClient(url, LongLivedToken(token)) as client:
        with pytest.raises(ForbiddenError) as caught:
            await client.get_talk(1)

    error = caught.value
    assert "Denied" in str(error)
    assert token not in str(error)
    assert token not in repr(error)
    assert token not in (error.detail or "")


async def test_a_token_endpoint_error_echoing_the_secrets_does_not_leak_them() -> None:
    secrets = {"client_secret": "CLIENT-SECRET-42", "refresh_token": "REFRESH-TOKEN-42"}
    payload = {"client_id": "c1", "grant_type": "refresh_token", "redirect_uri": "https://x/cb"}
    async with echo_server() as url, KommoClient(url, LongLivedToken("t")) as client:
        with pytest.raises(TokenRefreshError) as caught:
            await client._pipeline.request_tokens({**payload, **secrets})

    text = f"{caught.value} {caught.value!r} {caught.value.hint}"
    assert caught.value.status == 400
    assert "You sent" in text
    for secret in secrets.values():
        assert secret not in text


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (lambda: web.Response(body=b"", content_type="application/hal+json"), "empty body"),
        (lambda: web.Response(text="<html>oops</html>", content_type="text/html"), "not JSON"),
        (lambda: web.Response(text="[1, 2]", content_type="application/hal+json"), "JSON list"),
    ],
)
async def test_unreadable_success_body_raises_decode_error(
    raw_server: Callable[[web.Response], str], response: Callable[[], web.Response], message: str
) -> None:
    url = raw_server(response())
    async with KommoClient(url, LongLivedToken("t"), rate_limit=None) as client:
        with pytest.raises(DecodeError, match=message) as caught:
            await client.get_talk(1)

    assert caught.value.status == 200
    assert "200" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda talk: talk.pop("talk_id"), "talk_id"),
        (lambda talk: talk.update(talk_id="5"), "talk_id"),
        (lambda talk: talk.update(is_in_work="false"), "is_in_work"),
        (lambda talk: talk.update(chat_id=5), "chat_id"),
        (lambda talk: talk.update(created_at="yesterday"), "created_at"),
        (lambda talk: talk.update(rate=True), "rate"),
    ],
)
async def test_body_that_does_not_fit_names_the_field(
    client: KommoClient, fake: FakeKommo, change: Callable[[dict[str, Any]], object], path: str
) -> None:
    change(fake.talks[9])

    with pytest.raises(DecodeError) as caught:
        await client.get_talk(9)

    assert caught.value.path == path
    assert path in str(caught.value)
    assert caught.value.status == 200


async def test_unknown_fields_are_ignored(client: KommoClient, fake: FakeKommo) -> None:
    fake.talks[9]["brand_new_field"] = {"anything": [1, 2]}

    assert (await client.get_talk(9)).talk_id == 9


async def test_redirects_are_not_followed(raw_server: Callable[[web.Response], str]) -> None:
    url = raw_server(web.Response(status=302, headers={"Location": "https://elsewhere.example/"}))
    async with KommoClient(url, LongLivedToken("t"), rate_limit=None) as client:
        with pytest.raises(APIError) as caught:
            await client.get_talk(1)
    assert caught.value.status == 302


# -- base URL ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "http://example.kommo.com",
        "ftp://example.kommo.com",
        "https://example.kommo.com/api/v4",
        "https://example.kommo.com/?x=1",
        "https://user:pass@example.kommo.com",
        "https://example.kommo.com/#top",
        "example.kommo.com",
        "",
        "http://10.0.0.1",
        "http://127.0.0.2",  # loopback, but not one of the three named hosts
        "http://localhost.example.com",
    ],
)
def test_bad_base_url_is_rejected(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        KommoClient(base_url, LongLivedToken("t"))


@pytest.mark.parametrize(
    ("base_url", "normalized"),
    [
        ("https://example.kommo.com", "https://example.kommo.com"),
        ("https://example.kommo.com/", "https://example.kommo.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://localhost", "http://localhost"),
        ("http://[::1]:9000/", "http://[::1]:9000"),
        ("http://LOCALHOST:8000", "http://localhost:8000"),
    ],
)
def test_good_base_url_is_accepted(base_url: str, normalized: str) -> None:
    assert KommoClient(base_url, LongLivedToken("t")).base_url == normalized


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"max_connections": 0},
        {"rate_limit": 0},
        {"rate_limit": "fast"},
        {"retry": "never"},
    ],
)
def test_bad_options_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        KommoClient("https://example.kommo.com", LongLivedToken("t"), **kwargs)


def test_bad_long_lived_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="token"):
        LongLivedToken("")
    with pytest.raises(ValueError, match="line breaks"):
        LongLivedToken("abc\r\nX-Evil: 1")


# -- lifecycle ------------------------------------------------------------------------------


def test_client_can_be_built_outside_a_loop_and_used_inside(fake_url_runner: Any) -> None:
    fake_url_runner()


@pytest.fixture
def fake_url_runner() -> Callable[[], None]:
    def run() -> None:
        async def main() -> int:
            async with FakeKommo() as fake:
                client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None)
                async with client:
                    return (await client.get_talk(1)).talk_id

        assert asyncio.run(main()) == 1

    return run


async def test_closed_client_raises_and_close_is_idempotent(fake: FakeKommo) -> None:
    client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None)
    await client.get_talk(1)
    await client.close()
    await client.close()

    assert client.closed
    with pytest.raises(KommoError, match="closed"):
        await client.get_talk(1)
    assert fake.stats.requests == 1


async def test_batches_on_a_closed_client_raise_before_reading_anything(
    fake: FakeKommo,
) -> None:
    client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None)
    await client.get_talk(1)
    await client.close()
    read: list[int] = []

    def ids() -> Iterator[int]:
        for talk_id in range(1, 100_001):
            read.append(talk_id)
            yield talk_id

    with pytest.raises(ClientClosedError):
        await client.close_talks(ids())
    with pytest.raises(ClientClosedError):
        await client.get_talks(ids())
    with pytest.raises(ClientClosedError):
        client.iter_close_talks(ids())

    assert issubclass(ClientClosedError, KommoError)
    assert read == []
    assert fake.stats.requests == 1


class GatedSleep:
    """A sleep function that blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.entered.set()
        await self.gate.wait()


async def test_closing_the_client_during_a_backoff_fails_the_call_with_nothing_sent(
    fake: FakeKommo,
) -> None:
    sleep = GatedSleep()
    client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None, sleep=sleep)
    fake.script("get", 503)
    call = asyncio.create_task(client.get_talk(1))
    async with asyncio.timeout(5):
        await sleep.entered.wait()  # the 503 came back; the call waits to retry
    await client.close()
    sleep.gate.set()

    with pytest.raises(ClientClosedError):
        await call
    assert fake.stats.requests == 1


async def test_closing_the_client_during_a_batch_stops_it(fake: FakeKommo) -> None:
    client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None)
    read = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal read
        for talk_id in itertools.count(1):
            read += 1
            if read == 30:
                await client.close()
            yield talk_id

    async with asyncio.timeout(5):
        outcomes = await client.close_talks(endless(), force=True, concurrency=4)

    assert read < 40  # it stopped reading soon after the close
    assert outcomes[0].status is CloseStatus.CLOSED
    assert isinstance(outcomes[-1].error, ClientClosedError)


async def test_a_closed_borrowed_session_is_a_kommo_error(fake: FakeKommo) -> None:
    session = aiohttp.ClientSession()
    client = KommoClient(fake.url, LongLivedToken(fake.token), session=session, rate_limit=None)
    await client.get_talk(1)
    await session.close()

    with pytest.raises(ClientClosedError, match="session"):
        await client.get_talk(2)
    assert fake.stats.requests == 1


async def test_never_used_client_closes_cleanly() -> None:
    client = KommoClient("https://example.kommo.com", LongLivedToken("t"))
    await client.close()
    with pytest.raises(KommoError):
        await client.close_talk(1)


async def test_borrowed_session_is_used_and_left_open(fake: FakeKommo) -> None:
    async with aiohttp.ClientSession() as session:
        async with KommoClient(
            fake.url, LongLivedToken(fake.token), session=session, rate_limit=None
        ) as client:
            await client.get_talk(1)
        assert not session.closed
        async with session.get(f"{fake.url}/api/v4/talks/1") as response:
            assert response.status == 401  # still usable, without the client's token


async def test_one_client_serves_many_concurrent_tasks(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.script("get", *[Fault.slow(0.02)] * 50)  # each answer takes a while: they overlap

    talks = await asyncio.gather(*(client.get_talk(i) for i in range(1, 51)))

    assert [t.talk_id for t in talks] == list(range(1, 51))
    assert fake.stats.max_in_flight > 1


# -- secrets and logs --------------------------------------------------------------------


def test_reprs_hide_the_token() -> None:
    token = LongLivedToken("super-secret-token")
    client = KommoClient("https://example.kommo.com", token)

    assert "super-secret-token" not in repr(token)
    assert "super-secret-token" not in repr(client)


async def test_one_debug_line_per_attempt_without_secrets(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    fake.script("get", 503)
    caplog.set_level(logging.DEBUG, logger="kommo_talks")
    async with KommoClient(
        fake.url,
        LongLivedToken(fake.token),
        rate_limit=None,
        retry=RetryPolicy(base_delay=0.001),
    ) as client:
        await client.get_talk(4)

    lines = [r.getMessage() for r in caplog.records if r.name == "kommo_talks"]
    assert len(lines) == 2
    assert "GET /api/v4/talks/4 -> 503" in lines[0]
    assert "attempt 1" in lines[0]
    assert "GET /api/v4/talks/4 -> 200" in lines[1]
    assert "attempt 2" in lines[1]
    assert fake.token not in caplog.text
