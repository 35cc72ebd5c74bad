"""The one way tests run a server of their own: an aiohttp app on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

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
