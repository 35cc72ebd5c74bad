"""The install redirect and the disconnect hook, as framework-free handlers plus aiohttp routes.

Each handler takes the request's query (a mapping of strings) and returns a
:class:`Reply`; :func:`add_routes` (``KommoAccounts.setup``) serves them
with ``aiohttp.web``, which is imported only there.
"""

from __future__ import annotations

import hmac
import html
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import attrs

from ..errors import KommoError, TokenRefreshError, TokenStoreError
from ._model import Account

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["Reply", "StateCheck", "add_routes", "handle_disconnect", "handle_redirect"]

logger = logging.getLogger("kommo_talks.accounts")


class Installer(Protocol):
    """What the routes use of :class:`~kommo_talks.accounts.KommoAccounts` (no import cycle)."""

    client_id: str

    def _secret(self) -> str: ...

    async def install(self, code: str, referer: str, state: str | None = None) -> Account: ...

    async def uninstall(self, account_id: int) -> bool: ...


StateCheck = str | Callable[[str], Awaitable[bool]] | None
"""The expected ``state``: a value, an async callable that judges it, or ``None`` (not checked)."""

_INSTALLED_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>Installed</title></head>"
    "<body><p>The integration is installed on {subdomain}. You can close this page.</p>"
    "</body></html>"
)


@attrs.frozen
class Reply:
    """What a handler answers: status, text body, content type, extra headers."""

    status: int
    body: str
    content_type: str = "text/plain"
    headers: Mapping[str, str] = attrs.field(factory=dict)


async def _state_ok(expected: StateCheck, query: Mapping[str, str]) -> bool:
    if expected is None or "from_widget" in query:
        return True  # marketplace and widget installs carry no state
    given = query.get("state")
    if given is None:
        return False
    if isinstance(expected, str):
        return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
    return bool(await expected(given))


async def handle_redirect(
    accounts: Installer,
    query: Mapping[str, str],
    *,
    state: StateCheck = None,
    success_url: str | None = None,
) -> Reply:
    """Kommo's OAuth redirect (``code``, ``referer``, ``state``): install the account.

    Answers 403 for a wrong or missing ``state`` (unless the install carries
    ``from_widget``), 400 for a declined install (``error``), a missing
    code, a referer that is not a Kommo account domain or a code Kommo
    refused, 502 when the account could not
    be reached or saved; else a small HTML page, or a 303 to ``success_url``.
    Nothing is installed unless every check passes.
    """
    if not await _state_ok(state, query):
        return Reply(403, "state does not match: this install was not started here\n")
    if "error" in query:  # Kommo: error=access_denied when the user declines
        return Reply(400, "the installation was declined in Kommo; nothing was installed\n")
    code, referer = query.get("code"), query.get("referer")
    if not code or not referer:
        return Reply(400, "the redirect must carry 'code' and 'referer'\n")
    try:
        account = await accounts.install(code, referer)
    except ValueError as exc:
        return Reply(400, f"{exc}\n")
    except TokenStoreError:
        logger.exception("install: the account's tokens could not be saved")
        return Reply(502, "the account could not be saved; install again later\n")
    except TokenRefreshError as exc:
        if exc.status in (400, 401):
            return Reply(
                400,
                "Kommo refused the authorization code (expired, already used, "
                "or for another redirect URI): install the integration again\n",
            )
        logger.warning("install: Kommo's token endpoint failed: %s", exc)
        return Reply(502, "Kommo's token endpoint did not answer; install again later\n")
    except KommoError as exc:
        logger.warning("install: the account could not be read: %s", exc)
        return Reply(502, "the Kommo account could not be read; install again later\n")
    if success_url is not None:
        return Reply(303, "", headers={"Location": success_url})
    page = _INSTALLED_PAGE.format(subdomain=html.escape(account.subdomain))
    return Reply(200, page, content_type="text/html")


async def handle_disconnect(accounts: Installer, query: Mapping[str, str]) -> Reply:
    """Kommo's disconnect hook (``client_uuid``, ``account_id``, ``signature``): uninstall.

    Answers 403 for a signature that does not verify (or another
    integration's ``client_uuid``), 400 for a missing or malformed
    ``account_id``, else 200 (also when the account was not installed).
    """
    from ..webhooks import verify_disconnect_signature

    account_text = query.get("account_id", "")
    if not (account_text.isascii() and account_text.isdigit()) or int(account_text) <= 0:
        return Reply(400, "the hook must carry a numeric 'account_id'\n")
    client_uuid = query.get("client_uuid", accounts.client_id)
    signed = verify_disconnect_signature(
        client_id=accounts.client_id,
        client_secret=accounts._secret(),
        account_id=account_text,
        signature=query.get("signature"),
    )
    if not signed or not hmac.compare_digest(client_uuid.encode(), accounts.client_id.encode()):
        return Reply(403, "signature does not verify\n")
    await accounts.uninstall(int(account_text))
    return Reply(200, "uninstalled\n")


def add_routes(
    accounts: Installer,
    app: web.Application,
    redirect_path: str,
    disconnect_path: str,
    *,
    state: StateCheck,
    success_url: str | None,
) -> None:
    """Serve :func:`handle_redirect` at ``GET redirect_path`` and :func:`handle_disconnect`."""
    from aiohttp import web

    def respond(reply: Reply) -> web.Response:
        return web.Response(
            status=reply.status,
            text=reply.body,
            content_type=reply.content_type,
            headers=reply.headers,
        )

    async def redirect(request: web.Request) -> web.Response:
        query = dict(request.query)
        return respond(await handle_redirect(accounts, query, state=state, success_url=success_url))

    async def disconnect(request: web.Request) -> web.Response:
        return respond(await handle_disconnect(accounts, dict(request.query)))

    app.router.add_get(redirect_path, redirect)
    app.router.add_get(disconnect_path, disconnect)
