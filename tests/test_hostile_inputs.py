"""Hostile servers and inputs: what the SDK keeps, accepts and refuses (issue 13).

- Failed batch outcomes keep their error without traceback frames, so a
  failed talk does not keep its whole answer (a 64 KB error page) alive.
- Token endpoint answers are validated before anything is saved, and tokens
  are visible ASCII wherever they enter (answers, ``TokenSet``,
  ``LongLivedToken``, the stored form).
- A ``base_url`` with a space or a control character is refused.

Servers are small aiohttp apps on loopback (``tests/loopback.py``).
"""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import (
    APIError,
    CloseStatus,
    DecodeError,
    FileTokenStore,
    KommoClient,
    KommoError,
    LongLivedToken,
    MemoryTokenStore,
    NotFoundError,
    OAuth2,
    RateLimitError,
    RetryPolicy,
    TokenRefreshError,
    TokenSet,
    TransportError,
)

ONE_YEAR = 365 * 24 * 3600  # the longest expires_in accepted
FAST = RetryPolicy(max_attempts=1, base_delay=0.001, max_delay=1.0)
TOKEN = "long-lived-token-0123456789"
ERROR_PAGE = "<html><body><h1>Bad request</h1>" + "<p>proxy says no</p>" * 3300 + "</body></html>"
# What one kept error may cost: its message, 500 characters of detail, a
# small problem body, and (after the bounded-body change) at most 4 KiB of
# body. A traceback keeps the 64 KB page and the client's frames: far more.
KEPT_LIMIT = 12 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def client_of(handler: Handler) -> AsyncIterator[KommoClient]:
    async with (
        serving(answering_everything(handler)) as url,
        KommoClient(url, auth=LongLivedToken(TOKEN), retry=FAST, rate_limit=None) as client,
    ):
        yield client


async def error_page(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(
        status=400, text=ERROR_PAGE, content_type="text/html", headers={"X-Request-Id": "req-42"}
    )


# -- 13.3: failed outcomes keep no traceback and no error page ---------------------------

_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def reachable_bytes(root: object, limit: int) -> int:
    """Bytes of the objects reachable from ``root`` (types, modules, functions left out).

    Stops counting once past ``limit``: a traceback reaches the whole program.
    """
    seen: set[int] = set()
    pending = [root]
    total = 0
    while pending and total <= limit:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, _SHARED):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        pending.extend(gc.get_referents(obj))
    return total


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception chained to it."""
    found: list[BaseException] = []
    pending = [error]
    while pending:
        exc = pending.pop()
        if any(exc is seen for seen in found):
            continue
        found.append(exc)
        pending.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return found


def assert_kept_lean(error: KommoError) -> None:
    assert [exc.__traceback__ for exc in chain(error)] == [None] * len(chain(error))
    assert reachable_bytes(error, KEPT_LIMIT) <= KEPT_LIMIT


async def _close_all(client: KommoClient, ids: range) -> list[KommoError | None]:
    return [o.error for o in await client.close_talks(ids, force=True)]


async def _iter_close_all(client: KommoClient, ids: range) -> list[KommoError | None]:
    return [o.error async for o in client.iter_close_talks(ids, force=True)]


async def _get_all(client: KommoClient, ids: range) -> list[KommoError | None]:
    return [r if isinstance(r, KommoError) else None for r in await client.get_talks(ids)]


@pytest.mark.parametrize("run", [_close_all, _iter_close_all, _get_all])
async def test_failed_outcomes_keep_their_facts_but_not_the_error_page(
    run: Callable[[KommoClient, range], Awaitable[list[KommoError | None]]],
) -> None:
    async with client_of(error_page) as client:
        errors = await run(client, range(1, 6))
    assert len(errors) == 5
    for error in errors:
        assert isinstance(error, APIError)
        assert type(error) is APIError
        assert error.status == 400
        assert error.detail is not None
        assert error.detail.startswith("<html><body><h1>Bad request</h1>")
        assert error.request_id == "req-42"
        assert error.request_method in ("GET", "POST")
        assert error.request_url is not None
        assert error.request_url.startswith("http://127.0.0.1:")
        assert_kept_lean(error)


async def test_a_stopping_error_keeps_its_wait_problem_and_request_id_without_frames() -> None:
    async def too_many(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"title": "Too Many Requests", "status": 429, "detail": "slow down"},
            status=429,
            content_type="application/problem+json",
            headers={"Retry-After": "600", "X-Request-Id": "req-429"},
        )

    async with client_of(too_many) as client:
        outcomes = await client.close_talks(range(1, 4), force=True, concurrency=1)
    error = outcomes[0].error
    assert isinstance(error, RateLimitError)
    assert (error.status, error.retry_after, error.request_id) == (429, 600.0, "req-429")
    assert error.title == "Too Many Requests"
    assert error.problem["status"] == 429
    assert error.request_method == "POST"
    assert all(o.status is CloseStatus.FAILED for o in outcomes)
    assert error.detail == "slow down"
    assert_kept_lean(error)


async def test_a_failed_connection_outcome_keeps_no_frames_in_its_cause_chain() -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=500)

    async with client_of(hang_up) as client:
        outcomes = await client.close_talks(range(1, 4), force=True)
    for outcome in outcomes:
        assert isinstance(outcome.error, TransportError)
        assert outcome.error.request_method == "POST"
        assert len(chain(outcome.error)) >= 2  # the cause of the failure is still told
        assert_kept_lean(outcome.error)


async def test_an_undecodable_talk_in_get_talks_does_not_keep_the_body() -> None:
    async def not_json(request: web.Request) -> web.Response:
        return web.Response(status=200, text=ERROR_PAGE, content_type="application/json")

    async with client_of(not_json) as client:
        results = await client.get_talks(range(1, 4))
    for result in results:
        assert isinstance(result, DecodeError)
        assert result.status == 200
        # The JSON parser's error, hidden by `raise ... from None`, held the whole body.
        assert_kept_lean(result)


async def test_a_plain_404_outcome_stays_small() -> None:
    async def not_found(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"title": "Not Found", "type": "https://httpstatus.es/404", "status": 404},
            status=404,
            content_type="application/problem+json",
        )

    async with client_of(not_found) as client:
        outcomes = await client.close_talks(range(1, 11), force=True)
    for outcome in outcomes:
        assert isinstance(outcome.error, NotFoundError)
        assert reachable_bytes(outcome, 4096) <= 2048


# -- 13.6: token endpoint answers, TokenSet and LongLivedToken ---------------------------

ACCESS = "ACCESS-0123456789-secret"
REFRESH = "REFRESH-9876543210-secret"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
BAD_TOKENS = [
    pytest.param("ACCESS-with\r\nX-Evil: 1-secret", id="CRLF"),
    pytest.param("ACCESS-with\nLF-secret", id="LF"),
    pytest.param("ACCESS-with\x00NUL-secret", id="NUL"),
    pytest.param("ACCESS with space-secret", id="space"),
    pytest.param("ACCESS-with\ttab-secret", id="TAB"),
    pytest.param("ACCESS-with\x7fDEL-secret", id="DEL"),
    pytest.param("ACCESS-with-é-secret", id="non-ASCII"),
    pytest.param(" ACCESS-padded-secret ", id="surrounding-spaces"),
]


def answer(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "expires_in": 86400,
        "access_token": ACCESS,
        "refresh_token": REFRESH,
    }
    body.update(changes)
    return body


def assert_names_field_not_value(error: BaseException, field: str, value: object) -> None:
    text = f"{error} {error!r} {error.args!r}"
    assert field in str(error)
    assert str(value) not in text
    for secret in (ACCESS, REFRESH, "secret"):
        assert secret not in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_in", 2**62),  # overflowed datetime arithmetic before
        ("expires_in", 10**10),
        ("expires_in", ONE_YEAR + 1),
        ("expires_in", True),
        *[("access_token", token.values[0]) for token in BAD_TOKENS],
        *[("refresh_token", token.values[0]) for token in BAD_TOKENS],
    ],
)
def test_token_answer_out_of_bounds_raises_token_refresh_error_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(TokenRefreshError) as info:
        TokenSet.from_token_response(answer(**{field: value}), now=NOW, status=200)
    error = info.value
    assert isinstance(error, DecodeError)  # what a malformed answer raised before
    assert (error.path, error.status) == (field, 200)
    assert_names_field_not_value(error, field, value)


def test_token_answer_of_one_year_is_accepted() -> None:
    tokens = TokenSet.from_token_response(answer(expires_in=ONE_YEAR), now=NOW)
    assert tokens.expires_at == NOW + timedelta(days=365)


@pytest.mark.parametrize("bad", BAD_TOKENS)
@pytest.mark.parametrize("field", ["access_token", "refresh_token"])
def test_token_set_refuses_a_token_that_could_not_be_sent(field: str, bad: str) -> None:
    tokens = {"access_token": ACCESS, "refresh_token": REFRESH, field: bad}
    with pytest.raises(ValueError, match="visible ASCII") as info:
        TokenSet(**tokens, expires_at=NOW)
    assert_names_field_not_value(info.value, field, bad)


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_stored_pair_with_a_token_that_could_not_be_sent_is_corrupt(bad: str) -> None:
    record = {"access_token": bad, "refresh_token": REFRESH, "expires_at": NOW.isoformat()}
    with pytest.raises(ValueError, match="visible ASCII") as info:
        TokenSet.from_json(record)
    assert_names_field_not_value(info.value, "access_token", bad)


@pytest.mark.parametrize("bad", BAD_TOKENS)
def test_long_lived_token_refuses_what_a_header_cannot_carry(bad: str) -> None:
    with pytest.raises(ValueError, match="visible ASCII") as info:
        LongLivedToken(bad)
    assert "secret" not in str(info.value)


class TokenServer:
    """A token endpoint answering ``body`` with 200, and an API counting what it gets."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.token_requests = 0
        self.api_requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/oauth2/access_token":
            self.token_requests += 1
            return web.json_response(self.body)
        self.api_requests += 1
        return web.json_response({"title": "Unauthorized", "status": 401}, status=401)


BAD_ANSWERS = [
    pytest.param("access_token", answer(access_token="NEW-access\r\nX-Evil: 1"), id="CRLF"),
    pytest.param("refresh_token", answer(refresh_token="NEW-refresh\x00"), id="NUL"),
    pytest.param("expires_in", answer(expires_in=2**62), id="huge-expires_in"),
]
CLIENT_ID, CLIENT_SECRET = "client-1", "client-secret-0123456789"
REDIRECT = "https://integration.example/oauth"


@pytest.mark.parametrize(("field", "body"), BAD_ANSWERS)
async def test_refresh_with_a_bad_answer_saves_nothing_and_sends_nothing(
    field: str, body: dict[str, Any]
) -> None:
    server = TokenServer(body)
    stale = TokenSet(ACCESS, REFRESH, datetime.now(UTC) - timedelta(minutes=5))
    store = MemoryTokenStore(stale)
    auth = OAuth2(CLIENT_ID, CLIENT_SECRET, REDIRECT, store)
    async with (
        serving(answering_everything(server.handle)) as url,
        KommoClient(url, auth=auth, retry=FAST, rate_limit=None) as client,
    ):
        with pytest.raises(TokenRefreshError) as info:
            await client.get_talk(1)
    assert info.value.path == field  # type: ignore[attr-defined]
    assert field in str(info.value)
    assert "NEW-" not in f"{info.value} {info.value!r}"
    assert await store.load() == stale
    assert (server.token_requests, server.api_requests) == (1, 0)


@pytest.mark.parametrize(("field", "body"), BAD_ANSWERS)
async def test_code_exchange_with_a_bad_answer_writes_no_token_file(
    tmp_path: Path, field: str, body: dict[str, Any]
) -> None:
    server = TokenServer(body)
    path = tmp_path / "tokens.json"
    async with serving(answering_everything(server.handle)) as url:
        with pytest.raises(TokenRefreshError, match=field):
            await OAuth2.exchange_code(
                url,
                "code-0123456789",
                redirect_uri=REDIRECT,
                store=FileTokenStore(path),
                client_id=CLIENT_ID,
                client_secret=CLIENT_SECRET,
            )
    assert files_in(tmp_path) == []  # neither the token file nor a temporary one


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- 13.13: base_url ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "base_url",
    [
        "https://example.kommo.com\r\n",
        "https://exam\nple.kommo.com",
        "https://exam\tple.kommo.com",
        "https://exa mple.kommo.com",
        " https://example.kommo.com",
        "https://example.kommo.com\x00",
        "https://example.kommo.com\x7f",
        "https://exa\x85mple.kommo.com",
        "https://exa\u00a0mple.kommo.com",  # no-break space
        "https://exa\u00admple.kommo.com",  # soft hyphen, which IDNA would drop
        "https://exa\u200bmple.kommo.com",  # zero-width space
    ],
)
def test_base_url_with_a_space_or_control_character_is_refused(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url must not contain spaces or control"):
        KommoClient(base_url, LongLivedToken("t"))


@pytest.mark.parametrize(
    "base_url",
    [
        "https://user:hunter2-secret@example.kommo.com\n",
        "https://user:hunter2-secret@[example",
        "user:hunter2-secret@example.kommo.com",
        "https://user:hunter2-secret@example.kommo.com",
    ],
)
def test_base_url_errors_never_quote_the_url(base_url: str) -> None:
    with pytest.raises(ValueError, match="base_url") as info:
        KommoClient(base_url, LongLivedToken("t"))
    for exc in chain(info.value):
        assert "hunter2" not in f"{exc} {exc!r}"
