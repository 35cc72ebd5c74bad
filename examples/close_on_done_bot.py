"""A Kommo bot that closes a talk when ``#done`` is written in it.

A manager finishes a conversation by writing ``#done``; the bot hears the
message through Kommo's account webhook (a manager's message arrives in the
``outgoing_message[add]`` section of the ``add_outgoing_message`` event,
parsed as a ``MessageEvent`` whose ``direction`` is ``"outgoing"``) and
closes the talk with ``force_close`` (no NPS bot). That section's shape is
documented by other clients, not by a Kommo page we could read, so by
default the bot also accepts an incoming ``#done`` (a customer's, from the
documented ``message[add]``): set ``BOT_ACCEPT_INCOMING=0`` to react to
managers only.

Run it::

    KOMMO_BASE_URL=https://example.kommo.com KOMMO_TOKEN=<long-lived token> \\
    BOT_SECRET=<a long random string> PORT=8080 python examples/close_on_done_bot.py

then, in Kommo, add a webhook for "incoming message received", "outgoing
message" and "talk edited" pointing at
``https://<your host>/kommo/webhook/?secret=<BOT_SECRET>`` (behind an HTTPS
reverse proxy: the secret travels in the URL; the path is served with and
without its trailing slash, which Kommo may insist on).

Tests (and your own experiments) call :func:`make_app` with a client factory
that points at ``kommo_talks.testing.FakeKommo``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping

import attrs
from aiohttp import web

from kommo_talks import KommoClient, LongLivedToken, TalkAlreadyClosedError
from kommo_talks.webhooks import MessageEvent, TalkEvent, WebhookEvent, WebhookReceiver

log = logging.getLogger("close_on_done_bot")

WEBHOOK_PATH = "/kommo/webhook"
DONE_TAG = re.compile(r"(?<![\w#])#done\b", re.IGNORECASE)
KOMMO_CLIENT = web.AppKey("kommo_client", KommoClient)


def wants_close(event: MessageEvent, *, accept_incoming: bool) -> bool:
    """True if ``event`` is a ``#done`` message that should close its talk."""
    if event.talk_id is None or not DONE_TAG.search(event.text):
        return False
    return event.direction == "outgoing" or (accept_incoming and event.direction == "incoming")


def make_app(
    client_factory: Callable[[], KommoClient],
    *,
    secret: str | None,
    accept_incoming: bool = True,
    on_event: Callable[[WebhookEvent], object] | None = None,
    path: str = WEBHOOK_PATH,
) -> web.Application:
    """Build the bot's ``aiohttp`` application.

    Args:
        client_factory: makes the one :class:`KommoClient` the bot shares;
            it is opened at start-up and closed at cleanup, after the
            webhook receiver has drained.
        secret: the ``secret`` query parameter Kommo's webhook URL carries
            (``None`` accepts any caller: for local trials only).
        accept_incoming: also close on a customer's ``#done``.
        on_event: called with every event once the bot has handled it (for
            tests and logging), whatever the outcome.
        path: where the webhook is served.
    """
    app = web.Application()

    async def kommo_client(app: web.Application) -> AsyncIterator[None]:
        async with client_factory() as client:
            app[KOMMO_CLIENT] = client
            yield

    async def handle(event: WebhookEvent) -> None:
        try:
            if isinstance(event, MessageEvent):
                if event.talk_id is not None and wants_close(
                    event, accept_incoming=accept_incoming
                ):
                    await close(app[KOMMO_CLIENT], event.talk_id, event.direction)
            elif isinstance(event, TalkEvent) and event.closed:
                log.info("Kommo reports talk %s closed", event.talk_id)
        finally:
            if on_event is not None:
                on_event(event)

    app.cleanup_ctx.append(kommo_client)
    # Errors raised by `handle` are logged by the receiver, with their traceback.
    WebhookReceiver(handle, secret=secret).setup(app, path)
    return app


async def close(client: KommoClient, talk_id: int, direction: str) -> None:
    """Close the talk without Kommo's NPS bot; an already closed talk is fine."""
    try:
        await client.close_talk(talk_id, force=True)
    except TalkAlreadyClosedError:
        log.info("talk %s was already closed", talk_id)
    else:
        log.info("closed talk %s on an %s #done", talk_id, direction)


@attrs.frozen
class Settings:
    """What the bot needs to run for real, read from the environment."""

    base_url: str
    token: str = attrs.field(repr=False)
    secret: str = attrs.field(repr=False)
    port: int = 8080
    accept_incoming: bool = True


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """Read ``KOMMO_BASE_URL``, ``KOMMO_TOKEN``, ``BOT_SECRET``, ``PORT``, ``BOT_ACCEPT_INCOMING``.

    Raises:
        SystemExit: a variable is missing or malformed (the message says which).
    """
    missing = [n for n in ("KOMMO_BASE_URL", "KOMMO_TOKEN", "BOT_SECRET") if not environ.get(n)]
    if missing:
        raise SystemExit(f"close_on_done_bot: set {', '.join(missing)} (see the module docstring)")
    raw_port = environ.get("PORT", "8080")
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise SystemExit(f"close_on_done_bot: PORT must be a port number, got {raw_port!r}")
    return Settings(
        base_url=environ["KOMMO_BASE_URL"],
        token=environ["KOMMO_TOKEN"],
        secret=environ["BOT_SECRET"],
        port=int(raw_port),
        accept_incoming=environ.get("BOT_ACCEPT_INCOMING", "1").lower() not in ("0", "false", "no"),
    )


def main() -> None:
    """Run the bot until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_env(os.environ)

    def client_factory() -> KommoClient:
        return KommoClient(settings.base_url, auth=LongLivedToken(settings.token))

    app = make_app(client_factory, secret=settings.secret, accept_incoming=settings.accept_incoming)
    log.info(
        "serving %s on port %d; register https://<this host>%s/?secret=<BOT_SECRET> in Kommo",
        WEBHOOK_PATH,
        settings.port,
        WEBHOOK_PATH,
    )
    # aiohttp's default access log line holds the request line, and with it the
    # URL's secret: log the client, time, status, size and duration only.
    web.run_app(app, port=settings.port, print=None, access_log_format=ACCESS_LOG_FORMAT)


ACCESS_LOG_FORMAT = "%a %t %s %b %Tf"
"""aiohttp's access log without ``%r`` (the request line: it holds ``?secret=``)."""


if __name__ == "__main__":
    main()
