"""WebhookWorker against a real redis-server: acks, claims, dead letters, order, stop, outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
import redis.asyncio
from conftest import wait_until
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_server import RedisServer

from kommo_talks.webhooks import (
    MessageEvent,
    RedisWebhookQueue,
    TalkEvent,
    WebhookEvent,
    WebhookWorker,
)

# The worker does its own backoff: redis-py's retries would only slow the test down.
NO_RETRY = Retry(NoBackoff(), 0)

Callback = Callable[[WebhookEvent], Awaitable[object]]


def message(n: int, talk_id: int | None = None, account_id: int = 1) -> MessageEvent:
    return MessageEvent(
        message_id=f"m-{n}", direction="incoming", talk_id=talk_id, account_id=account_id
    )


async def fast_sleep(seconds: float) -> None:
    await asyncio.sleep(min(seconds, 0.01))


def worker(queue: RedisWebhookQueue, callback: Callback, **options: object) -> WebhookWorker:
    settings: dict[str, object] = {"claim_idle": 0.1, "sleep": fast_sleep} | options
    return WebhookWorker(queue, callback, **settings)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*workers: WebhookWorker) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield tasks
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        await asyncio.gather(*tasks)


async def pending(r: redis.asyncio.Redis, queue: RedisWebhookQueue) -> int:
    return int((await r.xpending(queue.stream, queue.group))["pending"])


async def settled(r: redis.asyncio.Redis, queue: RedisWebhookQueue) -> bool:
    """Nothing left: every entry acknowledged and deleted."""
    return await r.xlen(queue.stream) == 0 and await pending(r, queue) == 0


async def until(check: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110 - a condition in Redis, no event to wait on
            await asyncio.sleep(0.005)


class Gate:
    """A callback that records each event after waiting for :attr:`release`."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: list[WebhookEvent] = []

    async def __call__(self, event: WebhookEvent) -> None:
        self.started.set()
        await self.release.wait()
        self.seen.append(event)


async def test_an_event_is_acknowledged_only_after_its_callback_returned(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    gate = Gate()
    await queue.append([message(1)])
    async with running(worker(queue, gate)):
        await gate.started.wait()
        await asyncio.sleep(0.3)  # three claim_idle periods: still held, not acknowledged
        assert await pending(r, queue) == 1
        assert await r.xlen(queue.stream) == 1
        gate.release.set()
        await until(lambda: settled(r, queue))
    assert gate.seen == [message(1)]


async def test_events_appended_before_any_worker_existed_are_run(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    seen: list[WebhookEvent] = []

    async def callback(event: WebhookEvent) -> None:
        seen.append(event)

    await queue.append([message(n) for n in range(20)])
    async with running(worker(queue, callback)):
        await until(lambda: settled(r, queue))
    assert seen == [message(n) for n in range(20)]


async def test_a_dead_consumers_events_are_claimed_after_claim_idle(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    await queue.append([message(n) for n in range(5)])
    await queue._ensure_group()
    taken = await queue._read("dead-one", 5, 1)  # read, then its process "died"
    assert len(taken) == 5
    seen: list[WebhookEvent] = []

    async def callback(event: WebhookEvent) -> None:
        seen.append(event)

    async with running(worker(queue, callback, claim_idle=0.05, consumer="survivor")):
        await until(lambda: settled(r, queue))
    assert sorted(e.message_id for e in seen if isinstance(e, MessageEvent)) == [
        f"m-{n}" for n in range(5)
    ]


async def test_a_callback_longer_than_claim_idle_is_not_run_twice(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    runs: defaultdict[str, int] = defaultdict(int)

    async def slow(event: WebhookEvent) -> None:
        assert isinstance(event, MessageEvent)
        runs[event.message_id] += 1
        await asyncio.sleep(0.8)  # four times claim_idle

    await queue.append([message(n) for n in range(6)])
    workers = [worker(queue, slow, claim_idle=0.2, concurrency=3) for _ in range(3)]
    async with running(*workers):
        await until(lambda: settled(r, queue))
    assert runs == {f"m-{n}": 1 for n in range(6)}


async def test_a_failed_event_runs_again_and_is_then_acknowledged(
    r: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    queue = RedisWebhookQueue(r)
    runs: list[WebhookEvent] = []

    async def flaky(event: WebhookEvent) -> None:
        runs.append(event)
        if len(runs) == 1:
            raise RuntimeError("Kommo said 502")

    await queue.append([message(1)])
    with caplog.at_level(logging.ERROR, "kommo_talks.webhooks"):
        async with running(worker(queue, flaky, claim_idle=0.1)):
            await until(lambda: settled(r, queue))
    assert runs == [message(1), message(1)]
    assert "run 1 of 5" in caplog.text
    assert "Kommo said 502" in caplog.text
    assert await queue.dead_letters() == []


async def test_an_event_failing_max_deliveries_times_is_dead_lettered(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    runs: list[WebhookEvent] = []

    async def broken(event: WebhookEvent) -> None:
        runs.append(event)
        raise ValueError(f"bad talk (run {len(runs)}) Authorization: Bearer s3cr3t-t0k3n")

    await queue.append([message(1), message(2, talk_id=5)])
    runs_of_2: list[int] = []

    async def only_1_breaks(event: WebhookEvent) -> None:
        if event == message(1):
            await broken(event)
        runs_of_2.append(1)

    async with running(worker(queue, only_1_breaks, claim_idle=0.1, max_deliveries=3)):
        await until(lambda: settled(r, queue))
    assert runs == [message(1)] * 3
    assert runs_of_2 == [1]
    [dead] = await queue.dead_letters()
    assert dead.event == message(1)
    assert dead.deliveries == 3
    assert dead.error.startswith("ValueError: bad talk (run 3)")
    assert "s3cr3t" not in dead.error


async def test_dead_letters_can_be_retried_or_dropped(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    healthy = asyncio.Event()
    seen: list[WebhookEvent] = []

    async def callback(event: WebhookEvent) -> None:
        if not healthy.is_set():
            raise RuntimeError("down")
        seen.append(event)

    await queue.append([message(1), message(2), message(3)])
    async with running(worker(queue, callback, claim_idle=0.1, max_deliveries=1)):
        await until(lambda: settled(r, queue))
        dead = await queue.dead_letters()
        ids = [d.event.message_id for d in dead if isinstance(d.event, MessageEvent)]
        assert sorted(ids) == ["m-1", "m-2", "m-3"]
        assert await queue.dead_letters(1, after=dead[0].id) == [dead[1]]
        by_id = {d.event: d.id for d in dead}
        healthy.set()
        assert await queue.retry_dead([by_id[message(1)], by_id[message(2)], "1-1"]) == 2
        assert await queue.drop_dead([by_id[message(3)]]) == 1
        await until(lambda: settled(r, queue))
    assert sorted(seen, key=str) == [message(1), message(2)]
    assert await queue.dead_letters() == []


async def test_an_entry_that_cannot_be_decoded_is_dead_lettered_at_once(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    await r.xadd(queue.stream, {"e": b'{"v": 99, "k": "talk"}'})
    called: list[WebhookEvent] = []

    async def callback(event: WebhookEvent) -> None:
        called.append(event)

    async with running(worker(queue, callback)):
        await until(lambda: settled(r, queue))
    [dead] = await queue.dead_letters()
    assert dead.event is None
    assert "format version 99" in dead.error
    assert called == []


async def test_events_of_one_talk_run_in_order_within_a_worker(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    events: list[WebhookEvent] = []
    for n in range(60):
        talk = n % 4
        if n % 5 == 0:
            events.append(
                TalkEvent(
                    action="update",
                    talk_id=talk + 1,
                    is_in_work=bool(n % 2),
                    is_read=True,
                    account_id=1,
                    updated_at=datetime.fromtimestamp(1_700_000_000 + n, UTC),
                )
            )
        else:
            events.append(message(n, talk_id=talk + 1))
    in_flight: dict[int | None, int] = defaultdict(int)
    most_at_once = 0
    order: defaultdict[int | None, list[WebhookEvent]] = defaultdict(list)

    async def callback(event: WebhookEvent) -> None:
        nonlocal most_at_once
        in_flight[event.talk_id] += 1
        most_at_once = max(most_at_once, sum(in_flight.values()))
        assert in_flight[event.talk_id] == 1  # one at a time per talk
        await asyncio.sleep(0.001 * (hash(event) % 5))
        order[event.talk_id].append(event)
        in_flight[event.talk_id] -= 1

    for start in range(0, 60, 7):
        await queue.append(events[start : start + 7])
    async with running(worker(queue, callback, concurrency=10)):
        await until(lambda: settled(r, queue))
    for talk_key, got in order.items():
        assert got == [e for e in events if e.talk_id == talk_key]
    assert 1 < most_at_once <= 4


async def test_at_most_concurrency_callbacks_run_at_once(r: redis.asyncio.Redis) -> None:
    queue = RedisWebhookQueue(r)
    running_now = most = done = 0

    async def callback(event: WebhookEvent) -> None:
        nonlocal running_now, most, done
        running_now += 1
        most = max(most, running_now)
        await asyncio.sleep(0.005)
        running_now -= 1
        done += 1

    await queue.append([message(n) for n in range(40)])
    async with running(worker(queue, callback, concurrency=7)):
        await until(lambda: settled(r, queue))
    assert done == 40
    assert most == 7


async def test_stop_finishes_running_callbacks_and_leaves_the_rest_to_others(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    gate = Gate()

    # One talk: one event runs, four wait their turn in the worker.
    await queue.append([message(n, talk_id=9) for n in range(5)])
    first = worker(queue, gate, claim_idle=60.0, concurrency=5)
    task = asyncio.create_task(first.run())
    await gate.started.wait()
    stopping = asyncio.create_task(first.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waits for the running callback
    gate.release.set()
    await stopping
    await task
    assert gate.seen == [message(0, talk_id=9)]
    assert await pending(r, queue) == 4

    later_runs: list[WebhookEvent] = []

    async def record(event: WebhookEvent) -> None:
        later_runs.append(event)

    # Another worker with the same claim_idle takes them at once, as never run before.
    async with running(worker(queue, record, claim_idle=60.0, max_deliveries=1)):
        await until(lambda: settled(r, queue), limit=5.0)
    assert later_runs == [message(n, talk_id=9) for n in range(1, 5)]


async def test_cancelling_run_cancels_callbacks_and_acknowledges_nothing(
    r: redis.asyncio.Redis,
) -> None:
    queue = RedisWebhookQueue(r)
    started = asyncio.Event()
    cancelled: list[WebhookEvent] = []

    async def endless(event: WebhookEvent) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(event)
            raise

    await queue.append([message(1)])
    task = asyncio.create_task(worker(queue, endless).run())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == [message(1)]
    assert await pending(r, queue) == 1


async def test_a_worker_cannot_run_twice_at_once(r: redis.asyncio.Redis) -> None:
    async def callback(event: WebhookEvent) -> None:
        pass

    one = worker(RedisWebhookQueue(r), callback)
    async with running(one):
        await asyncio.sleep(0.01)  # the first run() has started
        with pytest.raises(RuntimeError, match="already running"):
            await asyncio.wait_for(one.run(), 1.0)


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 2.0}, "concurrency"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"claim_idle": 0}, "claim_idle"),
        ({"claim_idle": float("inf")}, "claim_idle"),
        ({"claim_idle": "60"}, "claim_idle"),
    ],
)
def test_bad_worker_settings_are_refused(options: dict[str, object], complaint: str) -> None:
    queue = RedisWebhookQueue(redis.asyncio.Redis())

    async def callback(event: WebhookEvent) -> None:
        pass

    with pytest.raises(ValueError, match=complaint):
        WebhookWorker(queue, callback, **options)  # type: ignore[arg-type]


# -- Redis down -------------------------------------------------------------------------


async def test_the_worker_resumes_after_redis_stalls_and_acks_only_what_returned(
    durable_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(port=durable_redis_server.port, socket_timeout=0.2, retry=NO_RETRY)
    queue = RedisWebhookQueue(client)
    started, release = asyncio.Event(), asyncio.Event()
    runs: defaultdict[str, int] = defaultdict(int)
    sleeps: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0.01)

    async def callback(event: WebhookEvent) -> None:
        assert isinstance(event, MessageEvent)
        runs[event.message_id] += 1
        if event.message_id == "m-0":
            started.set()
            await release.wait()
        if event.message_id == "m-1":
            raise RuntimeError("not now")

    await queue.append([message(0), message(1)])
    assert durable_redis_server.process is not None
    one = worker(queue, callback, claim_idle=0.3, max_deliveries=2, sleep=recording_sleep)
    async with running(one):
        await started.wait()
        await wait_until(lambda: runs["m-1"] >= 1)
        os.kill(durable_redis_server.process.pid, signal.SIGSTOP)
        release.set()  # m-0 returns while Redis cannot take its ack
        await wait_until(lambda: len(sleeps) >= 3, limit=10)
        os.kill(durable_redis_server.process.pid, signal.SIGCONT)
        await queue.append([message(2)])
        await until(lambda: settled(client, queue), limit=10)
    assert runs == {"m-0": 1, "m-1": 2, "m-2": 1}
    [dead] = await queue.dead_letters()
    assert dead.event == message(1)
    assert {0.1, 0.2} <= set(sleeps)  # backing off
    await client.aclose()


async def test_the_worker_resumes_after_redis_restarts_on_its_log(
    durable_redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(port=durable_redis_server.port, socket_timeout=1.0, retry=NO_RETRY)
    queue = RedisWebhookQueue(client)
    started, release = asyncio.Event(), asyncio.Event()
    runs: defaultdict[str, int] = defaultdict(int)

    async def callback(event: WebhookEvent) -> None:
        assert isinstance(event, MessageEvent)
        runs[event.message_id] += 1
        if event.message_id == "m-0":
            started.set()
            await release.wait()

    await queue.append([message(0)])
    async with running(worker(queue, callback, claim_idle=5.0)):
        await started.wait()
        durable_redis_server.kill()
        await asyncio.sleep(0.05)
        durable_redis_server.start()  # the entry, still pending, comes back from the AOF
        assert int((await client.xpending(queue.stream, queue.group))["pending"]) == 1
        release.set()
        await queue.append([message(1)])
        await until(lambda: settled(client, queue), limit=10)
    assert runs == {"m-0": 1, "m-1": 1}
    await client.aclose()
