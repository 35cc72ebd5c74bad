"""``kommo-talks webhooks dead list|retry|drop`` against a real redis-server."""

from __future__ import annotations

import json
from typing import cast

import redis.asyncio
from redis_server import RedisServer
from test_cli import assert_one_line_error, cli_env, kommo_talks

from kommo_talks.webhooks import MessageEvent, RedisWebhookQueue, TalkEvent, WebhookEvent
from kommo_talks.webhooks._codec import encode_event

STREAM = "kommo:webhooks"


async def bury(r: redis.asyncio.Redis, event: WebhookEvent, error: str) -> str:
    """Put one dead letter in place, as a worker leaves it; return its ID."""
    fields = {"e": encode_event(event), "error": error, "deliveries": 5, "source_id": "1-0"}
    return cast(bytes, await r.xadd(f"{STREAM}:dead", fields)).decode()  # type: ignore[arg-type]


MESSAGE = MessageEvent(message_id="m-1", direction="incoming", talk_id=5, account_id=7)
TALK = TalkEvent(action="update", talk_id=6, is_in_work=False, is_read=True, account_id=7)


async def test_list_prints_each_dead_letter_with_its_error(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    first = await bury(r, MESSAGE, "ValueError: boom")
    second = await bury(r, TALK, "KeyError: 'x'")

    result = await kommo_talks(
        "webhooks", "dead", "list", "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"{first}\t5\tmessage m-1 (incoming) in talk 5 of account 7\tValueError: boom",
        f"{second}\t5\ttalk[update] of talk 6 of account 7\tKeyError: 'x'",
    ]


async def test_list_escapes_control_characters_from_the_error(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    await bury(r, MESSAGE, "RuntimeError: \x1b]0;owned\x07\nsecond line")

    result = await kommo_talks(
        "webhooks", "dead", "list", "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 0, result.err
    assert "\x1b" not in result.out
    assert "\x07" not in result.out
    assert "RuntimeError: \\x1b]0;owned\\x07\\nsecond line" in result.out
    assert len(result.out.splitlines()) == 1


async def test_list_json_gives_the_event_fields(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    dead_id = await bury(r, MESSAGE, "ValueError: boom")

    result = await kommo_talks(
        "webhooks", "dead", "list", "--json", "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 0, result.err
    row = json.loads(result.out)
    assert row["id"] == dead_id
    assert row["error"] == "ValueError: boom"
    assert row["deliveries"] == 5
    assert row["event"]["kind"] == "message"
    assert row["event"]["message_id"] == "m-1"


async def test_retry_puts_a_dead_letter_back_in_the_stream(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    kept = await bury(r, TALK, "KeyError: 'x'")
    retried = await bury(r, MESSAGE, "ValueError: boom")

    result = await kommo_talks(
        "webhooks", "dead", "retry", retried, "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 0, result.err
    assert "retried 1 dead letter" in result.out
    assert [d.id for d in await RedisWebhookQueue(r).dead_letters()] == [kept]
    assert await r.xlen(STREAM) == 1


async def test_drop_all_empties_the_dead_letters(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    for n in range(150):  # more than one page
        await bury(r, MessageEvent(message_id=f"m-{n}", direction="incoming"), "boom")

    result = await kommo_talks(
        "webhooks", "dead", "drop", "--all", "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 0, result.err
    assert "dropped 150 dead letters" in result.out
    assert await r.xlen(f"{STREAM}:dead") == 0


async def test_an_unknown_id_fails_and_says_so(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    result = await kommo_talks(
        "webhooks", "dead", "drop", "1-1", "--redis-url", redis_server.url, env=cli_env()
    )

    assert result.code == 1
    assert_one_line_error(result, "1 of 1 not found")


async def test_bad_ids_are_refused_before_connecting() -> None:
    nowhere = "redis://127.0.0.1:1/0"
    bad = await kommo_talks(
        "webhooks", "dead", "retry", "not-an-id", "--redis-url", nowhere, env=cli_env()
    )
    neither = await kommo_talks("webhooks", "dead", "retry", "--redis-url", nowhere, env=cli_env())
    both = await kommo_talks(
        "webhooks", "dead", "drop", "1-1", "--all", "--redis-url", nowhere, env=cli_env()
    )

    assert bad.code == 2
    assert_one_line_error(bad, "not a stream entry ID", "not-an-id")
    for result in (neither, both):
        assert result.code == 2
        assert_one_line_error(result, "dead-letter IDs or --all")


async def test_redis_down_is_one_clear_line_without_the_password() -> None:
    result = await kommo_talks(
        "webhooks", "dead", "list", "--redis-url", "redis://:hunter2@127.0.0.1:1/0", env=cli_env()
    )

    assert result.code == 1
    assert_one_line_error(result, "cannot list the dead letters")
    assert "hunter2" not in result.err
