"""No token, secret or code in an exception the SDK raises, nor in its cause chain.

aiohttp's own exceptions may hold the request (``ClientResponseError``'s repr
shows ``Authorization: Bearer ...``) or the bytes of a broken answer that
echoes it. Every path that raises after a request was built is tried here,
over real loopback TCP: a server of the tests' own writes broken HTTP.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from secrets_check import assert_no_secret, chain

from kommo_talks import (
    ClientClosedError,
    KommoClient,
    KommoError,
    LongLivedToken,
    MemoryTokenStore,
    OAuth2,
    RetryPolicy,
    TokenRefreshError,
    TokenSet,
    TransportError,
)
from kommo_talks.errors import RedactedError

TOKEN = "ACCESS-token-0123456789abcdef"
REFRESH = "REFRESH-token-0123456789abcdef"
CLIENT_SECRET = "CLIENT-secret-0123456789abcdef"
CODE = "AUTH-code-0123456789abcdef"
SECRETS = (TOKEN, REFRESH, CLIENT_SECRET, CODE)
ONCE = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=1.0)

Answer = Callable[[bytes], bytes]


def echoing_status_line(request: bytes) -> bytes:
    """A status line that is not HTTP, holding the whole request (headers and body)."""
    return b"HTTP/1.1 2x0 " + request.replace(b"\r\n", b" ") + b"\r\n\r\n"


def echoing_bad_header(request: bytes) -> bytes:
    """A valid status line, then a header line that is not one, holding the request."""
    echo = request.replace(b"\r\n", b" ")
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + echo + b"\r\n\r\n{}"


def cut_short(request: bytes) -> bytes:
    """A body shorter than its Content-Length, then the connection closes."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"


@asynccontextmanager
async def broken_http(answer: Answer | None) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 writing ``answer(request)`` (or nothing, ever, for None)."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            if answer is None:
                await asyncio.Event().wait()  # never answer
                return
            writer.write(answer(head + body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await server.wait_closed()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def oauth(url: str) -> OAuth2:
    expired = TokenSet(TOKEN, REFRESH, datetime.now(UTC) - timedelta(hours=1))
    return OAuth2("client-1", CLIENT_SECRET, "https://bot.example/cb", MemoryTokenStore(expired))


# -- API requests ------------------------------------------------------------------------


async def error_of_get_talk(
    answer: Answer | None, auth: Callable[[str], LongLivedToken | OAuth2] | None = None
) -> KommoError:
    """What ``get_talk`` raises against ``broken_http(answer)`` (50 ms timeout)."""
    async with broken_http(answer) as url:
        credentials = auth(url) if auth is not None else LongLivedToken(TOKEN)
        options: dict[str, Any] = {"retry": ONCE, "rate_limit": None, "timeout": 0.05}
        async with KommoClient(url, credentials, **options) as client:
            with pytest.raises(KommoError) as caught:
                await client.get_talk(1)
    return caught.value


@pytest.mark.parametrize(
    "answer",
    [echoing_status_line, echoing_bad_header, cut_short],
    ids=["bad-status-line", "bad-header", "body-cut-short"],
)
async def test_a_malformed_answer_leaves_no_token_in_the_error_chain(answer: Answer) -> None:
    error = await error_of_get_talk(answer)

    assert isinstance(error, TransportError)
    assert_no_secret(error, SECRETS)
    cause = error.__cause__
    assert isinstance(cause, RedactedError)
    assert cause.original.startswith("aiohttp.")
    assert type(cause).__name__ in str(error)


async def test_the_stand_in_keeps_the_class_name_and_a_redacted_message() -> None:
    cause = (await error_of_get_talk(echoing_status_line)).__cause__

    assert type(cause).__name__ == "ClientResponseError"
    assert "Bearer [redacted]" in str(cause)


async def test_a_timeout_leaves_no_token_and_is_still_a_timeout() -> None:
    error = await error_of_get_talk(None)

    assert isinstance(error, TransportError)
    assert_no_secret(error, SECRETS)
    assert isinstance(error.__cause__, TimeoutError)


async def test_a_refused_connection_leaves_no_token() -> None:
    async with KommoClient(
        closed_port(), LongLivedToken(TOKEN), retry=ONCE, rate_limit=None
    ) as client:
        with pytest.raises(TransportError) as caught:
            await client.get_talk(1)

    assert_no_secret(caught.value, SECRETS)
    assert type(caught.value.__cause__).__name__ == "ClientConnectorError"


async def test_closing_the_client_during_a_request_leaves_no_token() -> None:
    async with broken_http(None) as url:
        client = KommoClient(url, LongLivedToken(TOKEN), retry=ONCE, rate_limit=None)
        call = asyncio.create_task(client.get_talk(1))
        await asyncio.sleep(0.05)  # the request is on the wire, unanswered
        await client.close()
        with pytest.raises(ClientClosedError) as caught:
            await call

    assert_no_secret(caught.value, SECRETS)


# -- the token endpoint --------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [echoing_status_line, echoing_bad_header, cut_short, None],
    ids=["bad-status-line", "bad-header", "body-cut-short", "timeout"],
)
async def test_a_failed_code_exchange_leaves_no_secret(answer: Answer | None) -> None:
    payload = {
        "client_id": "client-1",
        "client_secret": CLIENT_SECRET,
        "grant_type": "authorization_code",
        "code": CODE,
        "redirect_uri": "https://bot.example/cb",
    }
    async with (
        broken_http(answer) as url,
        KommoClient(
            url, LongLivedToken(TOKEN), retry=ONCE, rate_limit=None, timeout=0.05
        ) as client,
    ):
        with pytest.raises(KommoError) as caught:
            await client._pipeline.request_tokens(payload)

    assert_no_secret(caught.value, SECRETS)


@pytest.mark.parametrize(
    "answer", [echoing_status_line, echoing_bad_header], ids=["bad-status-line", "bad-header"]
)
async def test_a_failed_refresh_leaves_no_secret(answer: Answer) -> None:
    error = await error_of_get_talk(answer, auth=oauth)

    assert isinstance(error, TokenRefreshError)
    assert_no_secret(error, SECRETS)
    assert any(isinstance(link, RedactedError) for link in chain(error))
