"""Several Kommo accounts in one test: :class:`FakeKommoAccount`, install codes, disconnect hooks.

Each :class:`FakeKommoAccount` is a :class:`FakeKommo` of its own (its own
token endpoint, tokens and talks; ``GET /api/v4/account`` and its webhook
deliveries name its ``account_id`` and ``subdomain``), so an integration's
tokens for one account are refused by every other; it adds what Kommo's
install redirect sends::

    async with FakeKommoAccount(account_id=1, subdomain="one") as one:
        query = one.install_query(client_id, client_secret, redirect_uri, state="s")
        # GET your redirect URI with `query`, as Kommo's redirect does
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode, urlsplit

from ._fake import FakeKommo

__all__ = ["FakeKommoAccount", "disconnect_query", "signed_disconnect_url"]


class FakeKommoAccount(FakeKommo):
    """A :class:`FakeKommo` that an integration installs into: install codes and redirect queries.

    Takes :class:`FakeKommo`'s options, ``account_id`` and ``subdomain`` among them.
    """

    @property
    def referer(self) -> str:
        """What Kommo's install redirect sends as ``referer``: this account's host."""
        return urlsplit(self.url).netloc

    def install_code(self, client_id: str, client_secret: str, redirect_uri: str) -> str:
        """An authorization code for the integration ``client_id`` (registered here first).

        The fake's token endpoint then expects this ``client_id``,
        ``client_secret`` and ``redirect_uri``, as Kommo does for a code it
        gave to that integration.
        """
        self.oauth.client_id = client_id
        self.oauth.client_secret = client_secret
        self.oauth.redirect_uri = redirect_uri
        return self.oauth.issue_code()

    def install_query(
        self,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        *,
        state: str | None = None,
        from_widget: bool = False,
    ) -> dict[str, str]:
        """The query of Kommo's install redirect to ``redirect_uri``: a fresh code included."""
        query = {
            "code": self.install_code(client_id, client_secret, redirect_uri),
            "referer": self.referer,
            "client_id": client_id,
        }
        if state is not None:
            query["state"] = state
        if from_widget:
            query["from_widget"] = "1"
        return query


def disconnect_query(client_id: str, client_secret: str, account_id: int) -> dict[str, str]:
    """The query of Kommo's disconnect hook for ``account_id``, validly signed."""
    signature = hmac.new(
        client_secret.encode(), f"{client_id}|{account_id}".encode(), hashlib.sha256
    ).hexdigest()
    return {"client_uuid": client_id, "account_id": str(account_id), "signature": signature}


def signed_disconnect_url(url: str, client_id: str, client_secret: str, account_id: int) -> str:
    """``url`` with :func:`disconnect_query` appended: GET it as Kommo's hook does."""
    query = urlencode(disconnect_query(client_id, client_secret, account_id))
    return f"{url}{'&' if '?' in url else '?'}{query}"
