"""Corrupt token records, in a file or in Redis: always TokenStoreError, never the content.

Whatever a token file or a Redis value holds (broken JSON, bytes that are not
UTF-8, JSON nested a hundred thousand deep, a number of thousands of digits, a
date UTC cannot hold, megabytes of it), loading it raises TokenStoreError,
and neither that error nor any exception chained to it (``__cause__``,
``__context__``) holds the content: the parser's own errors keep all of it
(``JSONDecodeError.doc``, ``UnicodeDecodeError.object``), tokens included.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
from redis_server import RedisServer

from kommo_talks.errors import KommoError, TokenRefreshError, TokenStoreError
from kommo_talks.redis import RedisTokenStore
from kommo_talks.stores import MAX_TOKEN_RECORD_BYTES, FileTokenStore, parse_token_record

ACCESS = "access-SECRET-4f1c9a"
REFRESH = "refresh-SECRET-9a2b7e"
SECRETS = (ACCESS, REFRESH, "SECRET")
EXPIRES = "2026-11-28T10:00:00+00:00"
RECORD = json.dumps({"access_token": ACCESS, "refresh_token": REFRESH, "expires_at": EXPIRES})
DEEP = 100_000


def _record(**changes: object) -> bytes:
    record = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_at": EXPIRES}
    return json.dumps({**record, **changes}).encode()


# (content, what the message says is wrong)
CORRUPT: dict[str, tuple[bytes, str]] = {
    "truncated": (RECORD[:-1].encode(), "not valid JSON (Expecting ',' delimiter: line 1 column"),
    "extra data": (RECORD.encode() + b" " + ACCESS.encode(), "not valid JSON (Extra data"),
    "not utf-8": (RECORD.encode()[:-2] + b'\xff"}', "not UTF-8 text"),
    "nested arrays": (
        b"[" * DEEP + json.dumps([ACCESS, REFRESH]).encode() + b"]" * DEEP,
        "nested too deeply",
    ),
    "nested objects": (
        b'{"access_token": "' + ACCESS.encode() + b'", "x": ' + b'{"a": ' * DEEP,
        "nested too deeply",
    ),
    "a number of 5000 digits": (
        RECORD[:-1].encode() + b', "n": ' + b"7" * 5000 + b"}",
        "a number too long to read",
    ),
    "expires_at before year 1 in UTC": (
        _record(expires_at="0001-01-01T00:00:00+14:00"),
        "'expires_at' is out of range",
    ),
    "expires_at after year 9999 in UTC": (
        _record(expires_at="9999-12-31T23:59:59-14:00"),
        "'expires_at' is out of range",
    ),
    "expires_at not a date": (_record(expires_at=f"soon {ACCESS}"), "'expires_at'"),
    "a token not a string": (_record(refresh_token=[REFRESH]), "'refresh_token'"),
    "an array": (json.dumps([ACCESS, REFRESH, EXPIRES]).encode(), "not a JSON object"),
    "empty": (b"", "not valid JSON (Expecting value: line 1 column 1"),
    "null": (b"null", "not a JSON object"),
    "a token null": (_record(refresh_token=None), "'refresh_token'"),
    "expires_at a number": (_record(expires_at=1764324000), "'expires_at'"),
    "no expires_at": (
        json.dumps({"access_token": ACCESS, "refresh_token": REFRESH}).encode(),
        "'expires_at'",
    ),
    "too large": (
        RECORD.encode() + b" " * MAX_TOKEN_RECORD_BYTES,
        f"larger than {MAX_TOKEN_RECORD_BYTES // 1024} KiB",
    ),
}


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception reachable through ``__cause__`` and ``__context__``."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        yield current
        todo += [current.__cause__, current.__context__]


def _texts(error: BaseException) -> Iterator[str]:
    """What an error tracker could record of the chain: str, repr, args, every attribute."""
    for exc in _chain(error):
        yield str(exc)
        yield repr(exc)
        yield repr(exc.args)
        yield repr(vars(exc))
        for name in dir(exc):  # C-level attributes too: .object, .doc, .msg
            if not name.startswith("__"):
                yield repr(getattr(exc, name, None))


def assert_holds_no_content(error: BaseException) -> None:
    for text in _texts(error):
        for secret in SECRETS:
            assert secret not in text


def assert_corrupt(error: BaseException, problem: str) -> None:
    assert isinstance(error, TokenStoreError)
    # Kept from before: a corrupt store stops a refresh like a refused one.
    assert isinstance(error, TokenRefreshError)
    assert isinstance(error, KommoError)
    assert problem in str(error)
    assert_holds_no_content(error)


# -- the pure reading --------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), CORRUPT.values(), ids=CORRUPT.keys())
def test_any_corrupt_record_raises_the_given_error_holding_no_content(
    content: bytes, problem: str
) -> None:
    with pytest.raises(TokenStoreError) as caught:
        parse_token_record(content, TokenStoreError)

    assert_corrupt(caught.value, problem)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_a_record_is_read_from_bytes_or_text() -> None:
    for data in (RECORD, RECORD.encode(), b"\xef\xbb\xbf" + RECORD.encode()):
        tokens = parse_token_record(data, TokenStoreError)
        assert (tokens.access_token, tokens.refresh_token) == (ACCESS, REFRESH)


# -- the file store ----------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), CORRUPT.values(), ids=CORRUPT.keys())
async def test_a_corrupt_token_file_raises_token_store_error_holding_no_content(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(content)

    with pytest.raises(TokenStoreError) as caught:
        await FileTokenStore(path).load()

    assert_corrupt(caught.value, problem)
    assert f"token file {str(path)!r} is corrupt" in str(caught.value)
    assert path.read_bytes() == content  # left as it was


async def test_a_broken_json_file_is_named_by_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(f'{{\n  "access_token": "{ACCESS}",\n  "refresh_token": {REFRESH}\n}}\n')

    with pytest.raises(TokenStoreError, match=r": line 3 column 20\)") as caught:
        await FileTokenStore(path).load()

    assert_holds_no_content(caught.value)


# -- the Redis store ---------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), CORRUPT.values(), ids=CORRUPT.keys())
async def test_a_corrupt_redis_value_raises_token_store_error_holding_no_content(
    r: redis.asyncio.Redis, content: bytes, problem: str
) -> None:
    await r.set("tokens", content)

    with pytest.raises(TokenStoreError) as caught:
        await RedisTokenStore(r, "tokens").load()

    assert_corrupt(caught.value, problem)
    assert "'tokens'" in str(caught.value)
    assert await r.get("tokens") == content


async def test_a_value_that_is_not_utf8_is_corrupt_for_a_decoding_client(
    r: redis.asyncio.Redis, redis_server: RedisServer
) -> None:
    # With decode_responses=True, redis-py decodes the value before the store sees it.
    content = CORRUPT["not utf-8"][0]
    await r.set("tokens", content)
    decoding = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    try:
        store = RedisTokenStore(decoding, "tokens")
        with pytest.raises(TokenStoreError) as caught:
            await store.load()

        assert_corrupt(caught.value, "not UTF-8 text")
        # The connection is still good: a pair saved in its place loads.
        await r.set("tokens", RECORD)
        loaded = await store.load()
        assert loaded is not None
        assert loaded.refresh_token == REFRESH
    finally:
        await decoding.aclose()
