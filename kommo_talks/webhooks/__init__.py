"""Kommo account webhooks for bots: parse deliveries and hand events to a callback.

Kommo posts account webhooks as ``application/x-www-form-urlencoded`` bodies
with bracketed keys and string values (``talk[update][0][is_in_work]=0``).
:func:`parse_webhook` turns one body into a :class:`Webhook` of typed
:class:`TalkEvent` and :class:`MessageEvent` values (and, with
``strict=False``, the :class:`InvalidEvent` values that failed a check);
:class:`WebhookReceiver` serves such deliveries inside an ``aiohttp.web``
application or, through ``receiver.asgi_app()``, in FastAPI, Starlette or any
ASGI server; it answers Kommo at once and runs ``await callback(event)`` in
the background; :func:`verify_disconnect_signature` checks Kommo's "integration
disconnected" hook.

Closing a talk shows up as a ``talk[update]`` whose ``is_in_work`` is ``"0"``:
``event.closed`` tells you so. A manager's message arrives in its own
``outgoing_message[add]`` section, as a :class:`MessageEvent` whose
``direction`` is ``"outgoing"`` (that section's shape comes from other
clients and logged deliveries; it is unconfirmed by an official Kommo page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._models import Attachment, InvalidEvent, MessageEvent, TalkEvent, Webhook, WebhookEvent
from ._parse import parse_webhook
from ._receiver import WebhookCallback, WebhookReceiver
from ._signature import verify_disconnect_signature

__all__ = [
    "Attachment",
    "InvalidEvent",
    "MessageEvent",
    "TalkEvent",
    "Webhook",
    "WebhookCallback",
    "WebhookEvent",
    "WebhookReceiver",
    "parse_webhook",
    "verify_disconnect_signature",
]

# The Redis pieces need the `redis` extra: imported on first use, never by `import kommo_talks`.
if TYPE_CHECKING:
    from ._queue import DeadLetter, RedisWebhookQueue
    from ._worker import WebhookWorker
_LAZY = {"RedisWebhookQueue": "._queue", "DeadLetter": "._queue", "WebhookWorker": "._worker"}
__all__ += ["DeadLetter", "RedisWebhookQueue", "WebhookWorker"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
