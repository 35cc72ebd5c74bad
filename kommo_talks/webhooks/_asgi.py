"""The ASGI adapter of :class:`WebhookReceiver`: a plain ASGI callable, no framework needed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias
from urllib.parse import parse_qsl

from ._intake import Answer, BodyTooLarge, WebhookIntake

__all__ = ["ASGIApp", "AsgiWebhookApp"]

# The shapes of the ASGI spec, spelled as Starlette spells them, so that an
# ``AsgiWebhookApp`` type-checks wherever Starlette or FastAPI take an app.
Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

METHOD_NOT_ALLOWED = Answer(405, "method not allowed")


class _Disconnected(Exception):
    """The client went away before its body was complete: there is no one to answer."""


class AsgiWebhookApp:
    """Serves a :class:`WebhookReceiver` as an ASGI 3 application.

    It answers ``POST`` on whatever path reaches it (routing is the host's:
    mount it where the webhook lives) and ``405`` to other methods. A body
    over ``max_body_size`` bytes is answered ``413``. The ``lifespan``
    scope, which a server sends to the app it runs directly, is answered:
    shutting down drains the receiver. Starlette and FastAPI do not send it
    to a mounted app, so their own lifespan must ``await receiver.close()``.
    """

    def __init__(
        self,
        intake: WebhookIntake,
        close: Callable[[], Awaitable[None]],
        *,
        max_body_size: int,
    ) -> None:
        self._intake = intake
        self._close = close
        self._max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _respond(send, METHOD_NOT_ALLOWED, ((b"allow", b"POST"),))
            return

        async def read_body() -> bytes:
            return await _read_body(receive, self._max_body_size)

        try:
            answer = await self._intake.receive(_query_secret(scope), read_body)
        except _Disconnected:
            return
        await _respond(send, answer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _query_secret(scope: Scope) -> str | None:
    """The first ``secret`` parameter of the request's query string, or ``None``."""
    query: bytes = scope.get("query_string", b"")
    if b"secret" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "secret":
            return value
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; ``BodyTooLarge`` past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, answer: Answer, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = answer.text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
