"""The receiver process of ``test_webhook_receiver_queue.py``: ``python <this file> URL``.

Serves ``WebhookReceiver(queue=RedisWebhookQueue(...))`` at ``/kommo/hook`` on a
free port of 127.0.0.1 and prints ``ready <port>``; the test kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio
from aiohttp import web

from kommo_talks.webhooks import RedisWebhookQueue, WebhookReceiver


async def serve(redis_url: str) -> None:
    connection = redis.asyncio.Redis.from_url(redis_url)
    receiver = WebhookReceiver(queue=RedisWebhookQueue(connection))
    app = web.Application()
    receiver.setup(app, "/kommo/hook")
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"ready {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
