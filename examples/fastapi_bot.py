"""A FastAPI bot that closes a talk when ``#done`` is written in it.

The same bot as ``close_on_done_bot.py``, in FastAPI: the webhook receiver
is mounted as a plain ASGI app, and FastAPI's lifespan opens the one
``KommoClient`` the bot shares and drains the receiver before closing it
(FastAPI does not run a mounted app's own lifespan).

Run it (``pip install fastapi uvicorn``)::

    KOMMO_BASE_URL=https://<subdomain>.kommo.com KOMMO_TOKEN=<long-lived token> \\
    BOT_SECRET=<a long random string> uvicorn fastapi_bot:app --no-access-log

and add a webhook in Kommo pointing at
``https://<your host>/kommo/hook/?secret=<BOT_SECRET>``. uvicorn's access
log prints each request line, and with it the secret: keep it off, or
filter it.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from kommo_talks import KommoClient, LongLivedToken, TalkAlreadyClosedError
from kommo_talks.webhooks import MessageEvent, WebhookEvent, WebhookReceiver

DONE_TAG = re.compile(r"(?<![\w#])#done\b", re.IGNORECASE)


async def on_event(event: WebhookEvent) -> None:
    """Runs after Kommo has its ``200``; errors are logged by the receiver."""
    if isinstance(event, MessageEvent) and event.talk_id and DONE_TAG.search(event.text):
        client: KommoClient = app.state.kommo
        with suppress(TalkAlreadyClosedError):  # closed meanwhile: fine
            await client.close_talk(event.talk_id, force=True)


receiver = WebhookReceiver(on_event, secret=os.environ["BOT_SECRET"])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    token = LongLivedToken(os.environ["KOMMO_TOKEN"])
    async with KommoClient(os.environ["KOMMO_BASE_URL"], auth=token) as client:
        app.state.kommo = client
        try:
            yield
        finally:
            await receiver.close()  # callbacks finish while the client is still open


app = FastAPI(lifespan=lifespan)
hook = receiver.asgi_app()
app.mount("/kommo/hook", hook)  # serves /kommo/hook/
app.add_route("/kommo/hook", hook, methods=["POST"])  # and /kommo/hook, without a redirect


@app.get("/health")
async def health() -> dict[str, int]:
    """Accepted webhook events not handled yet."""
    return {"pending_events": receiver.pending}
