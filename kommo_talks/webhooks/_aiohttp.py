"""The aiohttp adapter of :class:`WebhookReceiver`: a request handler and its routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ._intake import WebhookIntake

__all__ = ["add_routes", "handle"]


async def handle(intake: WebhookIntake, request: web.Request) -> web.Response:
    """Answer one aiohttp request with ``intake``'s answer.

    Over the application's ``client_max_size``, ``request.read()`` raises
    aiohttp's own ``413``, which aiohttp answers.
    """
    answer = await intake.receive(
        request.query.get("secret"), request.read, body_complete=request.content.is_eof()
    )
    return web.Response(status=answer.status, text=answer.text or None)


def add_routes(
    app: web.Application,
    path: str,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    drain: Callable[[], Awaitable[None]],
) -> None:
    """``POST`` routes at ``path`` and ``path + "/"`` and an ``on_shutdown`` hook that drains."""
    app.router.add_post(path, handler)
    other = path[:-1] if path.endswith("/") else path + "/"
    if other:
        app.router.add_post(other, handler)

    async def on_shutdown(app: web.Application) -> None:
        await drain()

    app.on_shutdown.append(on_shutdown)
