"""RedisWebhookQueue against a real redis-server: dedupe, encoding, durability, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio
from redis_server import RedisServer

from kommo_talks.redis import RedisUnavailableError
from kommo_talks.webhooks import (
    MessageEvent,
    RedisWebhookQueue,
    TalkEvent,
    WebhookEvent,
    parse_webhook,
)
from kommo_talks.webhooks._codec import decode_event

DELIVERY = (
    b"talk[add][0][talk_id]=5&talk[add][0][is_in_work]=1&talk[add][0][is_read]=0"
    b"&talk[update][0][talk_id]=5&talk[update][0][is_in_work]=0&talk[update][0][is_read]=1"
    b"&talk[update][0][updated_at]=1700000009&message[add][0][id]=m-1"
    b"&message[add][0][type]=incoming&message[add][0][talk_id]=5&message[add][0][text]=hi"
    b"&account[id]=29785537&account[subdomain]=example"
)


async def stored_events(
    r: redis.asyncio.Redis, stream: str = "kommo:webhooks"
) -> list[WebhookEvent]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await r.xrange(stream))
    return [decode_event(fields[b"e"]) for _, fields in entries]


async def test_the_same_delivery_appended_three_times_is_stored_once_per_event(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    events = parse_webhook(DELIVERY).events
    first = await queue.append(events)
    again = [await queue.append(events) for _ in range(2)]
    assert len(first) == 3
    assert None not in first
    assert again == [[None, None, None]] * 2
    assert await stored_events(r) == list(events)


async def test_receivers_racing_on_one_retry_store_it_once(r: redis.asyncio.Redis) -> None:
    queues = [RedisWebhookQueue(r) for _ in range(5)]
    events = parse_webhook(DELIVERY).events
    results = await asyncio.gather(*(q.append(events) for q in queues for _ in range(4)))
    assert sum(i is not None for ids in results for i in ids) == 3
    assert await stored_events(r) == list(events)


async def test_an_event_changed_since_is_stored_again(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    closed = TalkEvent(action="update", talk_id=5, is_in_work=False, is_read=True, account_id=1)
    reopened = TalkEvent(action="update", talk_id=5, is_in_work=True, is_read=True, account_id=1)
    other_account = MessageEvent(message_id="m", direction="incoming", account_id=2)
    message = MessageEvent(message_id="m", direction="incoming", account_id=1)
    await queue.append([closed, message])
    ids = await queue.append([closed, reopened, message, other_account])
    assert [i is not None for i in ids] == [False, True, False, True]


async def test_an_appended_event_is_remembered_for_dedupe_seconds(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r, "bot:hooks", dedupe_seconds=90)
    await queue.append(parse_webhook(DELIVERY).events)
    keys = [key async for key in r.scan_iter("bot:hooks:seen:*")]
    assert len(keys) == 3
    assert all(0 < ttl <= 90 for ttl in [await r.ttl(key) for key in keys])


async def test_events_are_stored_with_their_account_and_decode_back(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r, "acme:hooks")
    events = parse_webhook(DELIVERY).events
    await queue.append(events)
    stored = await stored_events(r, "acme:hooks")
    assert stored == list(events)
    assert {(e.account_id, e.subdomain) for e in stored} == {(29785537, "example")}


async def test_an_empty_delivery_stores_nothing(r: redis.asyncio.Redis) -> None:
    assert await RedisWebhookQueue(r).append(()) == []
    assert not await r.exists("kommo:webhooks")


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"dedupe_seconds": 0}, "dedupe_seconds"),
        ({"dedupe_seconds": 1.5}, "dedupe_seconds"),
        ({"dedupe_seconds": True}, "dedupe_seconds"),
        ({"stream": ""}, "non-empty"),
        ({"group": ""}, "non-empty"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], complaint: str) -> None:
    client = redis.asyncio.Redis()
    with pytest.raises(ValueError, match=complaint):
        RedisWebhookQueue(client, **kwargs)  # type: ignore[arg-type]


async def test_an_event_that_cannot_be_encoded_stores_nothing_of_its_delivery(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    good = parse_webhook(DELIVERY).events
    with pytest.raises(TypeError, match="TalkEvent or MessageEvent"):
        await queue.append([*good, "talk 5 closed"])  # type: ignore[list-item]
    assert not await r.exists("kommo:webhooks")


# -- Redis down -------------------------------------------------------------------------


@pytest.fixture
async def durable_r(durable_redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis(port=durable_redis_server.port, socket_timeout=2.0)
    yield client
    await client.aclose()


async def test_append_raises_when_redis_stalls_past_the_deadline(
    durable_redis_server: RedisServer, durable_r: redis.asyncio.Redis
) -> None:
    queue = RedisWebhookQueue(durable_r)
    await queue.append([])  # nothing sent
    await durable_r.ping()
    assert durable_redis_server.process is not None
    os.kill(durable_redis_server.process.pid, signal.SIGSTOP)
    with pytest.raises(RedisUnavailableError, match=r"within 0\.2 s"):
        await queue.append(parse_webhook(DELIVERY).events, timeout=0.2)
    os.kill(durable_redis_server.process.pid, signal.SIGCONT)
    # Kommo's retry after the 503: stored once, whether or not the first got through.
    await queue.append(parse_webhook(DELIVERY).events, timeout=2.0)
    assert await stored_events(durable_r) == list(parse_webhook(DELIVERY).events)


async def test_append_raises_when_redis_is_down(
    durable_redis_server: RedisServer, durable_r: redis.asyncio.Redis
) -> None:
    queue = RedisWebhookQueue(durable_r)
    durable_redis_server.kill()
    # Refused connections (the client library may retry them) or the deadline: either way.
    with pytest.raises(RedisUnavailableError) as caught:
        await queue.append(parse_webhook(DELIVERY).events, timeout=1.0)
    assert caught.value.operation == "append webhook events"
    assert caught.value.key == "kommo:webhooks"


async def test_appended_events_survive_a_kill_9_of_redis(
    durable_redis_server: RedisServer, durable_r: redis.asyncio.Redis
) -> None:
    queue = RedisWebhookQueue(durable_r)
    events = parse_webhook(DELIVERY).events
    await queue.append(events)
    durable_redis_server.kill()
    durable_redis_server.start()
    assert await stored_events(durable_r) == list(events)
    assert await queue.append(events) == [None, None, None]


def test_the_webhooks_package_imports_redis_only_for_the_queue() -> None:
    code = (
        "import sys, kommo_talks.webhooks as w; "
        "assert 'redis' not in sys.modules, 'imported with the package'; "
        "from kommo_talks.webhooks import DeadLetter, RedisWebhookQueue, WebhookWorker; "
        "assert 'redis' in sys.modules; "
        "assert {'DeadLetter', 'RedisWebhookQueue', 'WebhookWorker'} <= set(w.__all__)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
