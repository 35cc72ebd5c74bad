"""kill -9 of a worker process in the middle of callbacks: nothing is lost.

1,000 queued events, two worker processes (``webhook_worker_child.py``), one
of them killed with SIGKILL once a random share of the events is done. The
survivor claims what the dead one held (after ``claim_idle``) and finishes:
every event runs to the end at least once, and an event runs twice only if
the killed worker had not acknowledged it (at most ``concurrency`` of them).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio
from redis_server import RedisServer

from kommo_talks.webhooks import MessageEvent, RedisWebhookQueue

T = TypeVar("T")
CHILD = Path(__file__).with_name("webhook_worker_child.py")
EVENTS = 1000
CONCURRENCY = 10


def start_worker(server: RedisServer, consumer: str) -> subprocess.Popen[str]:
    job = {
        "redis_url": server.url,
        "stream": "crash:hooks",
        "runs_key": "crash:runs",
        "starts_key": "crash:starts",
        "consumer": consumer,
        "concurrency": CONCURRENCY,
        "claim_idle": 0.2,
    }
    process = subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", process.stderr.read()  # type: ignore[union-attr]
    return process


async def runs_so_far(r: redis.asyncio.Redis, key: str = "crash:runs") -> list[tuple[str, str]]:
    return [tuple(item.decode().split()) for item in await r.lrange(key, 0, -1)]  # type: ignore[misc]


async def poll(read: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> None:
    """Read a value from Redis every few milliseconds until ``done`` holds for it."""
    while not done(await read()):  # noqa: ASYNC110 - the state is in Redis: no event to wait on
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_killed_worker_loses_no_event(
    redis_server: RedisServer, r: redis.asyncio.Redis, seed: int
) -> None:
    queue = RedisWebhookQueue(r, "crash:hooks")
    events = [
        MessageEvent(message_id=f"m{n}", direction="incoming", talk_id=n % 50 + 1, account_id=1)
        for n in range(EVENTS)
    ]
    for start in range(0, EVENTS, 10):
        await queue.append(events[start : start + 10])
    kill_after = random.Random(seed).randrange(50, EVENTS - 200)
    victim = start_worker(redis_server, "victim")
    survivor = start_worker(redis_server, "survivor")
    for process in (victim, survivor):
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    try:
        async with asyncio.timeout(30):
            await poll(lambda: r.llen("crash:runs"), lambda done: done >= kill_after)
            victim.kill()
            victim.wait()
            await poll(lambda: runs_so_far(r), lambda runs: len({m for m, _ in runs}) == EVENTS)
            await poll(lambda: r.xlen("crash:hooks"), lambda left: left == 0)  # the last acks
    finally:
        victim.kill()
        survivor.terminate()
        _, errors = survivor.communicate(timeout=10)
        victim.communicate(timeout=10)
    assert survivor.returncode == 0, errors  # a graceful stop on SIGTERM

    runs = await runs_so_far(r)
    counts = Counter(m for m, _ in runs)
    assert set(counts) == {e.message_id for e in events}  # none lost
    twice = {m for m, n in counts.items() if n > 1}
    assert len(twice) <= CONCURRENCY
    by_victim = {m for m, consumer in runs if consumer == "victim"}
    assert twice <= by_victim  # only what the killed worker had not acknowledged
    assert max(counts.values()) <= 2
    # The kill came in the middle of callbacks, and the survivor finished them.
    started = {m for m, consumer in await runs_so_far(r, "crash:starts") if consumer == "victim"}
    interrupted = started - by_victim
    assert interrupted
    assert len(interrupted) + len(twice) <= CONCURRENCY  # all held by the victim when killed
    assert interrupted <= {m for m, consumer in runs if consumer == "survivor"}
    assert await queue.dead_letters() == []
    assert (await r.xpending("crash:hooks", queue.group))["pending"] == 0
