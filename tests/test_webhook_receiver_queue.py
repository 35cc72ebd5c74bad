"""WebhookReceiver(queue=...) against a real redis-server: 200 only for stored events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from loopback import serving, serving_asgi
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_server import RedisServer

from kommo_talks.webhooks import (
    InvalidEvent,
    MessageEvent,
    RedisWebhookQueue,
    WebhookEvent,
    WebhookReceiver,
    WebhookWorker,
)

PATH = "/kommo/hook"


def delivery(*message_ids: str, talk_id: int = 7, bad_talks: int = 0) -> bytes:
    """A Kommo-format body: one incoming message per ID, then ``bad_talks`` invalid talk events."""
    pairs: list[tuple[str, str]] = []
    for index, message_id in enumerate(message_ids):
        prefix = f"message[add][{index}]"
        pairs += [
            (f"{prefix}[id]", message_id),
            (f"{prefix}[type]", "incoming"),
            (f"{prefix}[talk_id]", str(talk_id)),
            (f"{prefix}[text]", "hi"),
        ]
    for index in range(bad_talks):
        pairs += [(f"talk[update][{index}][talk_id]", "not-a-number")]
    pairs += [("account[id]", "29785537"), ("account[subdomain]", "example")]
    return urlencode(pairs).encode()


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with session.post(url + PATH, data=body, headers=headers) as response:
        return response.status


async def served_ids(queue: RedisWebhookQueue, expected: int) -> list[str]:
    """Run a worker until ``expected`` callbacks ran (plus a moment for extra ones)."""
    seen: list[str] = []
    done = asyncio.Event()

    async def callback(event: WebhookEvent) -> None:
        assert isinstance(event, MessageEvent)
        seen.append(event.message_id)
        if len(seen) >= expected:
            done.set()

    worker = WebhookWorker(queue, callback, claim_idle=1.0)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
        # Whatever else is in the stream would be read by now.
        async with asyncio.timeout(10):
            while await queue._redis.xlen(queue.stream):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await worker.stop()
        await task
    return seen


@pytest.fixture
async def receiving(r: redis.asyncio.Redis) -> AsyncIterator[tuple[str, RedisWebhookQueue]]:
    queue = RedisWebhookQueue(r)
    app = web.Application()
    WebhookReceiver(queue=queue).setup(app, PATH)
    async with serving(app) as url:
        yield url, queue


async def test_a_delivery_is_stored_before_200_and_a_worker_runs_its_callbacks(
    receiving: tuple[str, RedisWebhookQueue], r: redis.asyncio.Redis
) -> None:
    url, queue = receiving
    async with aiohttp.ClientSession() as session:
        assert await post(session, url, delivery("m-1", "m-2")) == 200
    assert await r.xlen(queue.stream) == 2  # stored when answered
    assert await served_ids(queue, 2) == ["m-1", "m-2"]


async def test_the_asgi_app_stores_a_delivery_before_200(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    receiver = WebhookReceiver(queue=queue)
    async with serving_asgi(receiver.asgi_app()) as url, aiohttp.ClientSession() as session:
        assert await post(session, url, delivery("m-1")) == 200
        assert await r.xlen(queue.stream) == 1


async def test_the_same_delivery_posted_three_times_runs_one_callback_per_event(
    receiving: tuple[str, RedisWebhookQueue],
) -> None:
    url, queue = receiving
    async with aiohttp.ClientSession() as session:
        answers = [await post(session, url, delivery("m-1", "m-2", "m-3")) for _ in range(3)]
    assert answers == [200, 200, 200]
    assert sorted(await served_ids(queue, 3)) == ["m-1", "m-2", "m-3"]


async def test_invalid_events_are_reported_for_a_stored_delivery(r: redis.asyncio.Redis) -> None:
    reported: list[InvalidEvent] = []
    queue = RedisWebhookQueue(r)
    app = web.Application()
    receiver = WebhookReceiver(queue=queue, on_invalid=reported.append)
    receiver.setup(app, PATH)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        assert await post(session, url, delivery("m-1", bad_talks=1)) == 200
    assert len(reported) == 1
    assert receiver.invalid_events == 1
    assert await r.xlen(queue.stream) == 1


async def test_an_empty_delivery_is_answered_200_without_redis() -> None:
    dead = redis.asyncio.Redis(port=1, retry=Retry(NoBackoff(), 0))  # nothing listens there
    app = web.Application()
    WebhookReceiver(queue=RedisWebhookQueue(dead)).setup(app, PATH)
    async with serving(app) as url, aiohttp.ClientSession() as session:
        assert await post(session, url, b"account[id]=1") == 200
    await dead.aclose()


async def test_closing_a_queue_receiver_has_nothing_to_wait_for(r: redis.asyncio.Redis) -> None:
    receiver = WebhookReceiver(queue=RedisWebhookQueue(r))
    async with asyncio.timeout(1):
        await receiver.close()
    assert receiver.pending == 0


def test_bad_append_timeouts_are_refused(r: redis.asyncio.Redis) -> None:
    for timeout in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            WebhookReceiver(queue=RedisWebhookQueue(r), append_timeout=timeout)


# -- Redis down: 503, and nothing answered 200 that is not stored ------------------------


@pytest.fixture
async def durable_queue(
    durable_redis_server: RedisServer,
) -> AsyncIterator[RedisWebhookQueue]:
    client = redis.asyncio.Redis(
        port=durable_redis_server.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    yield RedisWebhookQueue(client)
    await client.aclose()


async def test_a_paused_redis_gets_503_and_the_retry_is_stored_once(
    durable_redis_server: RedisServer, durable_queue: RedisWebhookQueue
) -> None:
    reported: list[InvalidEvent] = []
    receiver = WebhookReceiver(queue=durable_queue, append_timeout=0.2, on_invalid=reported.append)
    app = web.Application()
    receiver.setup(app, PATH)
    body = delivery("m-1", "m-2", bad_talks=1)
    assert durable_redis_server.process is not None
    async with serving(app) as url, aiohttp.ClientSession() as session:
        assert await post(session, url, delivery("m-0")) == 200  # connected, scripts loaded
        os.kill(durable_redis_server.process.pid, signal.SIGSTOP)
        try:
            assert await post(session, url, body) == 503
            assert reported == []  # reported only once the delivery is taken
            assert receiver.pending == 0
        finally:
            os.kill(durable_redis_server.process.pid, signal.SIGCONT)
        # Kommo retries the 503: stored once, whether or not the stalled append got through.
        assert await post(session, url, body) == 200
    assert len(reported) == 1
    assert sorted(await served_ids(durable_queue, 3)) == ["m-0", "m-1", "m-2"]


async def test_a_stopped_redis_gets_503(
    durable_redis_server: RedisServer, durable_queue: RedisWebhookQueue
) -> None:
    app = web.Application()
    WebhookReceiver(queue=durable_queue, append_timeout=1.0).setup(app, PATH)
    durable_redis_server.kill()
    async with serving(app) as url, aiohttp.ClientSession() as session:
        assert await post(session, url, delivery("m-1")) == 503


# -- kill -9 of the receiver process -------------------------------------------------------


def start_receiver(server: RedisServer) -> subprocess.Popen[str]:
    child = Path(__file__).with_name("webhook_receiver_child.py")
    return subprocess.Popen(
        [sys.executable, str(child), server.url], stdout=subprocess.PIPE, text=True
    )


async def test_nothing_answered_200_is_lost_when_the_receiver_is_killed(
    durable_redis_server: RedisServer, durable_queue: RedisWebhookQueue
) -> None:
    process = start_receiver(durable_redis_server)
    try:
        assert process.stdout is not None
        ready = await asyncio.to_thread(process.stdout.readline)
        url = f"http://127.0.0.1:{ready.split()[1]}"
        answered: list[int] = []

        async def deliver(session: aiohttp.ClientSession, n: int) -> None:
            try:
                status = await post(session, url, delivery(f"m-{n}-a", f"m-{n}-b"))
            except aiohttp.ClientError:
                return  # killed before answering: Kommo would retry it
            if status == 200:
                answered.append(n)
                if len(answered) == 60:
                    process.kill()  # in the middle of the deliveries still in flight

        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(deliver(session, n) for n in range(200)))
        assert 60 <= len(answered) < 200  # killed in the middle
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    stored = await durable_queue._redis.xlen(durable_queue.stream)
    assert stored >= 2 * len(answered)
    seen = set(await served_ids(durable_queue, stored))
    assert {f"m-{n}-{x}" for n in answered for x in "ab"} <= seen
