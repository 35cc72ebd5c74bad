"""The fake OAuth token endpoint of :class:`~kommo_talks.testing.FakeKommo`.

It follows Kommo's documented rules: ``POST /oauth2/access_token`` with the
``authorization_code`` or ``refresh_token`` grant (JSON or form-encoded), a
new refresh token on every refresh, and Kommo's OAuth problem bodies
(``"hint": "Token has been revoked"``) when a refresh token is dead.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
from aiohttp import web

from ..tokens import TokenSet
from ._wire import PROBLEM_JSON, Route

__all__ = ["OAUTH_PROBLEM_TYPE", "FakeOAuth"]

OAUTH_PROBLEM_TYPE = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
"""The ``type`` of Kommo's token-endpoint problem bodies."""

REVOKED = "Token has been revoked"

_FIELDS = ("client_id", "client_secret", "grant_type", "redirect_uri", "code", "refresh_token")


@attrs.define(eq=False)
class _Pair:
    """One issued token pair and where it stands in its rotation lineage."""

    access_token: str
    refresh_token: str
    expires_at: float  # on FakeOAuth.clock
    parent: _Pair | None
    children: list[_Pair] = attrs.Factory(list)
    used: bool = False  # its access token was accepted or its refresh token exchanged
    refresh_dead: bool = False
    access_dead: bool = False


@attrs.define(eq=False)
class _Code:
    expires_at: float
    spent: bool = False


class FakeOAuth:
    """Kommo's ``POST /oauth2/access_token``, served by :class:`FakeKommo` as ``fake.oauth``.

    One client registration (:attr:`client_id`, :attr:`client_secret`,
    :attr:`redirect_uri`; change them before use if you like). Get tokens
    with :meth:`issue_tokens` (as if the integration had been authorized) or
    an authorization code with :meth:`issue_code` for ``OAuth2.exchange_code``::

        async with FakeKommo() as fake:
            store = MemoryTokenStore(fake.oauth.issue_tokens())
            auth = OAuth2(fake.oauth.client_id, fake.oauth.client_secret,
                          fake.oauth.redirect_uri, store)

    Rotation: every refresh issues a new pair. By default (Kommo's documented
    rule) the old refresh token keeps working until the new pair is *used*
    (its access token accepted by the API, or its refresh token exchanged);
    after that it is answered 401 ``"hint": "Token has been revoked"``. With
    ``strict_rotation=True`` it dies as soon as it is exchanged, as some
    integrators report. The API answers 401 to access tokens that expired
    (:attr:`access_token_ttl`, :meth:`expire_access_tokens`) or were revoked
    (:meth:`revoke_all`).

    Refusals use Kommo's OAuth problem body (``hint``, ``title``, ``type``
    :data:`OAUTH_PROBLEM_TYPE`, ``status``, ``detail``): 401 for bad client
    credentials or a revoked refresh token, 400 for a bad, spent or expired
    code, a wrong redirect URI, an unknown refresh token or a missing field.

    Attributes:
        client_id, client_secret, redirect_uri: the registration.
        strict_rotation: see above.
        access_token_ttl: ``expires_in`` of issued access tokens, in seconds
            (Kommo: 86400).
        code_ttl: lifetime of authorization codes, in seconds (Kommo: 1200).
        latency: seconds every token request waits before it is answered.
        gate: if set, every token request waits for this event first (to hold
            a refresh in flight as long as a test needs).
        at_gate: set as soon as a token request waits at :attr:`gate`.
        clock: the wall clock (seconds) used for expiry; tests may replace it.
        refreshes: ``refresh_token`` grants that issued a new pair.
        exchanges: ``authorization_code`` grants that issued a pair.
        refused: token requests answered 400 or 401.
        issued: every pair issued, oldest first.
    """

    def __init__(
        self,
        fake: object = None,
        *,
        strict_rotation: bool = False,
        client_id: str | None = None,
        client_secret: str | None = None,
        redirect_uri: str = "https://integration.example/oauth/callback",
        access_token_ttl: int = 86400,
        code_ttl: int = 1200,
        latency: float = 0.0,
    ) -> None:
        del fake  # accepted for callers that pass their FakeKommo; not needed
        self.strict_rotation = strict_rotation
        self.client_id: str = client_id or f"fake-client-{secrets.token_hex(8)}"
        self.client_secret: str = client_secret or f"fake-secret-{secrets.token_urlsafe(24)}"
        self.redirect_uri = redirect_uri
        self.access_token_ttl = access_token_ttl
        self.code_ttl = code_ttl
        self.latency = latency
        self.gate: asyncio.Event | None = None
        self.at_gate = asyncio.Event()
        self.clock: Callable[[], float] = time.time
        self.refreshes = 0
        self.exchanges = 0
        self.refused = 0
        self.issued: list[TokenSet] = []
        self._by_access: dict[str, _Pair] = {}
        self._by_refresh: dict[str, _Pair] = {}
        self._codes: dict[str, _Code] = {}

    def __repr__(self) -> str:
        return (
            f"<FakeOAuth client_id={self.client_id!r} strict_rotation={self.strict_rotation} "
            f"issued={len(self.issued)} refreshes={self.refreshes}>"
        )

    # -- test controls ----------------------------------------------------------------

    def issue_tokens(self, *, expires_in: int | None = None) -> TokenSet:
        """Issue a fresh pair, as if the integration had just been authorized.

        ``expires_in`` defaults to :attr:`access_token_ttl`.
        """
        return self._issue(None, self.access_token_ttl if expires_in is None else expires_in)[1]

    def issue_code(self) -> str:
        """Issue an authorization code, valid once for :attr:`code_ttl` seconds."""
        code = f"fake-code-{secrets.token_urlsafe(24)}"
        self._codes[code] = _Code(expires_at=self.clock() + self.code_ttl)
        return code

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired: the API answers them 401."""
        now = self.clock()
        for pair in self._by_access.values():
            pair.expires_at = min(pair.expires_at, now)

    def revoke_all(self) -> None:
        """Revoke every pair (as deactivating the integration does): 401 everywhere."""
        for pair in self._by_refresh.values():
            pair.refresh_dead = pair.access_dead = True

    def secret_values(self) -> frozenset[str]:
        """Every secret this endpoint knows: client secret, codes, access and refresh tokens.

        For tests that check nothing secret leaks into logs or messages.
        """
        values = {self.client_secret, *self._codes}
        for pair in self._by_refresh.values():
            values.update((pair.access_token, pair.refresh_token))
        return frozenset(values)

    def accepts(self, token: str) -> bool:
        """True if ``token`` is a live access token issued here; marks its pair used.

        Called by :meth:`FakeKommo.valid_token` for every API request. Using a
        pair revokes the refresh token it was obtained with (see the class
        docstring).
        """
        pair = self._by_access.get(token)
        if pair is None or pair.access_dead or self.clock() >= pair.expires_at:
            return False
        self._use(pair)
        return True

    def is_revoked(self, refresh_token: str) -> bool:
        """True if ``refresh_token`` was issued here and would be refused as revoked."""
        pair = self._by_refresh.get(refresh_token)
        return pair is not None and pair.refresh_dead

    # -- the endpoint ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer ``POST /oauth2/access_token``."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        params = await _read_params(request)
        if params is None:
            return self._refuse(400, "Request body must be a JSON object or form data")
        client_id = params.get("client_id")
        if not client_id:
            return self._refuse(400, "Check the `client_id` parameter")
        if not secrets.compare_digest(client_id, self.client_id) or not secrets.compare_digest(
            params.get("client_secret", ""), self.client_secret
        ):
            return self._refuse(
                401, None, title="Invalid client", detail="Client authentication failed"
            )
        if params.get("redirect_uri") != self.redirect_uri:
            return self._refuse(400, "Redirect URI is not associated with client")
        grant = params.get("grant_type")
        if grant == "authorization_code":
            return self._grant_code(params.get("code", ""))
        if grant == "refresh_token":
            return self._grant_refresh(params.get("refresh_token", ""))
        return self._refuse(400, "Check the `grant_type` parameter")

    def _grant_code(self, code: str) -> web.Response:
        if not code:
            return self._refuse(400, "Check the `code` parameter")
        entry = self._codes.get(code)
        if entry is None:
            return self._refuse(400, "Cannot decrypt the authorization code")
        if entry.spent:
            return self._refuse(400, "Authorization code has been revoked")
        if self.clock() >= entry.expires_at:
            return self._refuse(400, "Authorization code has expired")
        entry.spent = True
        self.exchanges += 1
        return self._token_answer(self._issue(None, self.access_token_ttl)[0])

    def _grant_refresh(self, refresh_token: str) -> web.Response:
        if not refresh_token:
            return self._refuse(400, "Check the `refresh_token` parameter")
        old = self._by_refresh.get(refresh_token)
        if old is None:
            return self._refuse(400, "Cannot decrypt the refresh token")
        if old.refresh_dead:
            return self._refuse(401, REVOKED)
        # Exchanging a refresh token uses its pair: that revokes the pair it came from.
        self._use(old)
        if self.strict_rotation:
            old.refresh_dead = True
        new, _ = self._issue(old, self.access_token_ttl)
        self.refreshes += 1
        return self._token_answer(new)

    # -- rotation -------------------------------------------------------------------

    def _issue(self, parent: _Pair | None, expires_in: int) -> tuple[_Pair, TokenSet]:
        now = self.clock()
        pair = _Pair(
            access_token=f"fake-access-{secrets.token_urlsafe(24)}",
            refresh_token=f"fake-refresh-{secrets.token_urlsafe(24)}",
            expires_at=now + expires_in,
            parent=parent,
        )
        if parent is not None:
            parent.children.append(pair)
        self._by_access[pair.access_token] = pair
        self._by_refresh[pair.refresh_token] = pair
        tokens = TokenSet(
            pair.access_token,
            pair.refresh_token,
            datetime.fromtimestamp(pair.expires_at, UTC),
        )
        self.issued.append(tokens)
        return pair, tokens

    def _use(self, pair: _Pair) -> None:
        """The first use of ``pair`` ends its parent, and any other pair issued from it."""
        if pair.used:
            return
        pair.used = True
        parent = pair.parent
        if parent is None:
            return
        parent.refresh_dead = True
        for sibling in parent.children:
            if sibling is not pair:
                sibling.refresh_dead = sibling.access_dead = True

    # -- answers --------------------------------------------------------------------

    def _token_answer(self, pair: _Pair) -> web.Response:
        body = {
            "token_type": "Bearer",
            "expires_in": max(0, round(pair.expires_at - self.clock())),
            "access_token": pair.access_token,
            "refresh_token": pair.refresh_token,
            "server_time": int(self.clock()),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _refuse(
        self,
        status: int,
        hint: str | None,
        *,
        title: str = "Invalid request",
        detail: str = "Some parameters are missing or invalid",
    ) -> web.Response:
        self.refused += 1
        body: dict[str, Any] = {}
        if hint is not None:
            body["hint"] = hint
        body.update(title=title, type=OAUTH_PROBLEM_TYPE, status=status, detail=detail)
        return web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM_JSON)


class TokenEndpoint:
    """Serves a :class:`FakeOAuth` as the fake's ``"token"`` route (no bearer token needed)."""

    def __init__(self, oauth: FakeOAuth) -> None:
        self._oauth = oauth

    def routes(self) -> Iterable[Route]:
        """``POST /oauth2/access_token``."""
        return (Route("POST", "/oauth2/access_token", "token", self._oauth.handle, False),)


async def _read_params(request: web.Request) -> dict[str, str] | None:
    """The request's fields, from a JSON object or form data; ``None`` if neither."""
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        return {k: v for k in _FIELDS if isinstance(v := form.get(k), str)}
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    # A field that is not a string is as good as missing.
    return {k: v for k in _FIELDS if isinstance(v := data.get(k), str)}
