"""One worker process of ``test_webhook_worker_crash.py``: ``python webhook_worker_child.py JSON``.

Runs a :class:`WebhookWorker` whose callback records each run in a Redis
list (``"<message_id> <consumer>"``) after a short pause, so that callbacks
are always in flight. Stops gracefully on SIGTERM, as the guide's example
does; the test kills it with SIGKILL instead. It starts reading once a line
``go`` arrives on stdin, so that both workers start together.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from typing import Any

import redis.asyncio

from kommo_talks.webhooks import MessageEvent, RedisWebhookQueue, WebhookEvent, WebhookWorker


async def work(job: dict[str, Any]) -> None:
    connection = redis.asyncio.Redis.from_url(job["redis_url"])
    queue = RedisWebhookQueue(connection, job["stream"])

    async def callback(event: WebhookEvent) -> None:
        assert isinstance(event, MessageEvent)
        await asyncio.sleep(random.uniform(0.002, 0.012))
        await connection.rpush(job["runs_key"], f"{event.message_id} {job['consumer']}")

    worker = WebhookWorker(
        queue,
        callback,
        consumer=job["consumer"],
        concurrency=job["concurrency"],
        claim_idle=job["claim_idle"],
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(worker.stop()))
    print("ready", flush=True)
    # Every worker starts at once, on the test's "go".
    if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
        raise SystemExit("expected 'go'")
    try:
        await worker.run()
    finally:
        await connection.aclose()


if __name__ == "__main__":
    asyncio.run(work(json.loads(sys.argv[1])))
