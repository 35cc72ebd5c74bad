"""Answers too large to read: ``max_response_bytes``, over real loopback HTTP.

FakeKommo answers like Kommo; these hostile answers (huge pages, endless
streams, compressed bombs) come from small servers of the tests' own.
"""

from __future__ import annotations

import asyncio
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import (
    APIError,
    CloseStatus,
    DecodeError,
    ForbiddenError,
    KommoClient,
    LongLivedToken,
    RetryPolicy,
    ServerError,
)
from kommo_talks.problems import DETAIL_LIMIT, KEPT_BODY_LIMIT

MiB = 1024 * 1024
FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=1.0)
TALK = (Path(__file__).parent / "data" / "talk_117.json").read_bytes()  # talk 117


class Streamed:
    """What one streaming handler sent, and whether the client hung up on it."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent = 0
        self.cut_off = asyncio.Event()


def streaming(
    status: int, chunk: bytes, total: int, headers: dict[str, str] | None = None
) -> tuple[Streamed, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """A handler sending ``chunk`` until ``total`` bytes are sent (chunked encoding)."""
    seen = Streamed()

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.requests += 1
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        try:
            while seen.sent < total:
                await response.write(chunk)
                seen.sent += len(chunk)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            seen.cut_off.set()
        return response

    return seen, handler


@asynccontextmanager
async def client_of(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], **options: object
) -> AsyncIterator[KommoClient]:
    async with (
        serving(answering_everything(handler)) as url,
        KommoClient(url, LongLivedToken("t" * 20), rate_limit=None, retry=FAST, **options) as kommo,  # type: ignore[arg-type]
    ):
        yield kommo


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "16", None])
def test_max_response_bytes_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match="max_response_bytes"):
        KommoClient("https://example.kommo.com", LongLivedToken("t"), max_response_bytes=value)  # type: ignore[arg-type]


async def test_a_success_body_past_the_limit_raises_decode_error_and_hangs_up() -> None:
    seen, handler = streaming(200, b"x" * 65536, 64 * MiB)
    async with client_of(handler, max_response_bytes=MiB) as kommo:
        with pytest.raises(DecodeError, match="max_response_bytes") as caught:
            await kommo.get_talk(7)
        async with asyncio.timeout(5):
            await seen.cut_off.wait()  # the connection was dropped, not drained

    assert caught.value.status == 200
    assert "1048576 bytes" in str(caught.value)
    assert seen.requests == 1  # not retried: the answer will not shrink
    assert seen.sent < 64 * MiB


async def test_a_content_length_past_the_limit_is_refused_too() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b" " * (2 * MiB), content_type="application/json")

    async with client_of(handler, max_response_bytes=MiB) as kommo:
        with pytest.raises(DecodeError, match="max_response_bytes"):
            await kommo.get_talk(7)


async def test_a_body_at_the_limit_is_read_whole() -> None:
    body = TALK

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/hal+json")

    async with client_of(handler, max_response_bytes=len(body)) as kommo:
        assert (await kommo.get_talk(117)).talk_id == 117


async def test_a_compressed_answer_within_the_limit_is_decompressed() -> None:
    body = TALK
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/hal+json"}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=gzip_bytes(body), headers=headers)

    async with client_of(handler) as kommo:
        assert (await kommo.get_talk(117)).talk_id == 117


def gzip_bytes(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=31)
    return packer.compress(data) + packer.flush()


def gzip_bomb_blocks(block: int) -> tuple[bytes, bytes]:
    """The start of a gzip stream and a block that repeats ``block`` zero bytes each time.

    A full flush resets the compressor, so every further block of zeros
    compresses to the same bytes: the stream can go on for gigabytes
    without compressing them (the trailer never comes: the client hangs up first).
    """
    packer = zlib.compressobj(level=9, wbits=31)
    zeros = bytes(block)
    head = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    assert packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH) == again
    return head, again


async def test_a_gzip_bomb_costs_no_more_memory_than_the_limit() -> None:
    head, again = gzip_bomb_blocks(MiB)  # about 1 KiB on the wire per MiB inflated

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Encoding": "gzip", "Content-Type": "application/hal+json"}
        )
        await response.prepare(request)
        try:
            await response.write(head)
            for _ in range(1024):  # 1 GiB once inflated
                await response.write(again)
        except ConnectionError:
            pass  # the client hung up
        return response

    tracemalloc.start()
    try:
        async with client_of(handler, max_response_bytes=MiB) as kommo:
            with pytest.raises(DecodeError, match="max_response_bytes"):
                await kommo.get_talk(7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 32 * MiB  # read whole, it would take a GiB


async def test_a_huge_502_page_is_still_retried_and_kept_short() -> None:
    seen, handler = streaming(502, b"<html>" + b"bad gateway " * 5000, 64 * MiB)
    async with client_of(handler, max_response_bytes=MiB) as kommo:
        with pytest.raises(ServerError) as caught:
            await kommo.get_talk(7)

    assert caught.value.status == 502
    assert seen.requests == FAST.max_attempts
    assert caught.value.detail is not None
    assert caught.value.detail.startswith("<html>bad gateway")
    assert len(caught.value.detail) <= DETAIL_LIMIT
    assert seen.sent < 64 * MiB


async def test_of_an_error_answer_only_an_excerpt_is_read() -> None:
    seen, handler = streaming(502, b"<html>" + b"bad gateway " * 5000, 64 * MiB)
    async with client_of(handler) as kommo:  # the default limit, 16 MiB
        with pytest.raises(ServerError):
            await kommo.get_talk(7)
        async with asyncio.timeout(5):
            await seen.cut_off.wait()  # hung up long before 16 MiB, let alone 64

    assert seen.requests == FAST.max_attempts


async def test_a_huge_html_403_still_stops_a_batch() -> None:
    seen, handler = streaming(403, b"<html>blocked " * 5000, 64 * MiB)
    async with client_of(handler, max_response_bytes=MiB) as kommo:
        outcomes = await kommo.close_talks([1, 2, 3], concurrency=1)

    first = outcomes[0]
    assert first.status is CloseStatus.FAILED
    assert isinstance(first.error, ForbiddenError)
    assert first.error.is_block
    assert seen.requests == 1


async def test_a_large_problem_body_keeps_only_its_standard_members() -> None:
    problem = {
        "title": "Bad Request",
        "status": 400,
        "detail": "d" * 10_000,
        "validation_errors": [{"code": "x" * 100}] * 1000,
    }

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(problem, status=400, content_type="application/problem+json")

    async with client_of(handler) as kommo:
        with pytest.raises(APIError) as caught:
            await kommo.get_talk(7)

    error = caught.value
    assert error.problem == {"title": "Bad Request", "status": 400, "detail": "d" * DETAIL_LIMIT}
    assert len(orjson.dumps(error.problem)) <= KEPT_BODY_LIMIT
