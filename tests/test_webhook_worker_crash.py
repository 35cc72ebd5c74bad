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
from typing import TypeVar, cast

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
        "consumer": consumer,
        "concurrency": CONCURRENCY,
        # Long enough that a loaded machine's event-loop lag never lets the survivor take
        # over what the live victim holds: the only re-runs are then the kill's.
        "claim_idle": 0.5,
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


async def runs_so_far(r: redis.asyncio.Redis) -> list[tuple[str, str]]:
    items = cast(list[bytes], await r.lrange("crash:runs", 0, -1))
    pairs = [item.decode().split() for item in items]
    return [(first, second) for first, second in pairs]


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
    entry_ids: list[bytes] = []
    for start in range(0, EVENTS, 10):
        entry_ids += [i.encode() for i in await queue.append(events[start : start + 10]) if i]
    kill_after = random.Random(seed).randrange(50, EVENTS - 200)
    victim = start_worker(redis_server, "victim")
    survivor = start_worker(redis_server, "survivor")
    for process in (victim, survivor):
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    try:
        async with asyncio.timeout(30):
            # Both at work (the victim may be slow to start on a busy machine), then the kill.
            await poll(
                lambda: runs_so_far(r),
                lambda runs: (
                    len(runs) >= kill_after
                    and sum(consumer == "victim" for _, consumer in runs) >= 20
                ),
            )
            victim.kill()
            victim.wait()
            # What it held when it died (nobody may claim it for claim_idle yet).
            held = await r.xpending_range("crash:hooks", queue.group, "-", "+", 100, "victim")
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
    held_ids = {row["message_id"] for row in held}
    assert 0 < len(held_ids) <= CONCURRENCY  # killed in the middle of its work
    rerun = {m for m, consumer in runs if consumer == "survivor"} & {
        e.message_id for e, i in zip(events, entry_ids, strict=True) if i in held_ids
    }
    assert len(rerun) == len(held_ids)  # the survivor finished all the victim held
    twice = {m for m, n in counts.items() if n > 1}
    assert twice <= rerun  # duplicates only among what the victim had not acknowledged
    assert max(counts.values()) <= 2
    assert await queue.dead_letters() == []
    assert (await r.xpending("crash:hooks", queue.group))["pending"] == 0
