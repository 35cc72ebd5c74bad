"""The ``#done`` bot as a public integration: one service for every account that installs it.

Each Kommo account installs the integration through OAuth (Kommo redirects
to ``/kommo/installed``), its webhooks arrive at the one ``/kommo/webhook``
URL, and uninstalling calls ``/kommo/disconnected``. The bot closes a talk
on ``#done`` (the rule of ``close_on_done_bot.py``) with the client of the
account the message came from.

Run it::

    KOMMO_CLIENT_ID=... KOMMO_CLIENT_SECRET=... \\
    KOMMO_REDIRECT_URI=https://<your host>/kommo/installed \\
    BOT_SECRET=<a long random string> ACCOUNTS_DIR=./accounts PORT=8080 \\
    python examples/multi_account_bot.py

and register ``https://<your host>/kommo/disconnected`` as the
integration's disconnect hook, and ``https://<your host>/kommo/webhook/?secret=<BOT_SECRET>``
as each account's webhook.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from close_on_done_bot import ACCESS_LOG_FORMAT, close, wants_close

from kommo_talks import FileAccountStore, KommoAccounts
from kommo_talks.webhooks import MessageEvent, WebhookEvent, WebhookReceiver

log = logging.getLogger("multi_account_bot")

ACCOUNTS = web.AppKey("accounts", KommoAccounts)


def make_app(
    accounts: KommoAccounts,
    *,
    secret: str | None,
    on_event: Callable[[WebhookEvent], object] | None = None,
) -> web.Application:
    """The bot's app: install and disconnect routes, and the webhook of every account.

    ``accounts`` is closed at cleanup, after the webhook receiver has drained.
    """
    app = web.Application()
    app[ACCOUNTS] = accounts

    async def close_accounts(app: web.Application) -> AsyncIterator[None]:
        yield
        await accounts.close()

    async def handle(event: WebhookEvent) -> None:
        try:
            if (
                isinstance(event, MessageEvent)
                and event.talk_id is not None
                and wants_close(event, accept_incoming=True)
            ):
                client = await accounts.client_for(event)  # this account's client
                await close(client, event.talk_id, event.direction)
        finally:
            if on_event is not None:
                on_event(event)

    app.cleanup_ctx.append(close_accounts)
    accounts.setup(app, redirect_path="/kommo/installed", disconnect_path="/kommo/disconnected")
    WebhookReceiver(handle, secret=secret).setup(app, "/kommo/webhook")
    return app


def main() -> None:
    """Run the bot until interrupted (settings from the environment, see above)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = ("KOMMO_CLIENT_ID", "KOMMO_CLIENT_SECRET", "KOMMO_REDIRECT_URI", "BOT_SECRET")
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise SystemExit(f"multi_account_bot: set {', '.join(missing)}")
    accounts = KommoAccounts(
        os.environ["KOMMO_CLIENT_ID"],
        os.environ["KOMMO_CLIENT_SECRET"],
        os.environ["KOMMO_REDIRECT_URI"],
        store=FileAccountStore(os.environ.get("ACCOUNTS_DIR", "accounts")),
    )
    app = make_app(accounts, secret=os.environ["BOT_SECRET"])
    port = int(os.environ.get("PORT", "8080"))
    web.run_app(app, port=port, print=None, access_log_format=ACCESS_LOG_FORMAT)


if __name__ == "__main__":
    main()
