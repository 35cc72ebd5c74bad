"""The one way tests run a server of their own: an aiohttp or ASGI app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 at a free port; yield its base URL; clean it up after.

    ``runner_options`` go to ``web.AppRunner`` (e.g. ``shutdown_timeout``;
    ``access_log`` is off unless given).
    """
    options: dict[str, Any] = {"access_log": None, "handle_signals": False, **runner_options}
    runner = web.AppRunner(app, **options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def answering_everything(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.Application:
    """An app that sends every request, whatever its method and path, to ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@asynccontextmanager
async def serving_asgi(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run the ASGI ``app`` under a real uvicorn on 127.0.0.1 at a free port; yield its URL.

    The socket listens before uvicorn starts, so a request sent at once waits
    in the backlog instead of failing. Leaving the block shuts uvicorn down
    as a signal would (its lifespan shutdown included). ``config`` goes to
    ``uvicorn.Config`` (``lifespan`` is ``"off"`` unless given).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    options: dict[str, Any] = {"lifespan": "off", "log_level": "warning", **config}
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, **options))
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serve
        sock.close()
