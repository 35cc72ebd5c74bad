"""How requests are authenticated: the strategy protocol and ``LongLivedToken``.

The client asks its auth strategy for a bearer token before every attempt,
and tells it when Kommo answered 401. A strategy that can refresh (OAuth2)
uses the :class:`TokenEndpoint` the client hands it, so that token requests
pass the same rate limiter and server-given waits as every other request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .tokens import VISIBLE_ASCII_ONLY, is_token_text

__all__ = ["Auth", "LongLivedToken", "TokenEndpoint"]


class TokenEndpoint(Protocol):
    """What a client offers an auth strategy: Kommo's OAuth token endpoint."""

    async def request_tokens(self, payload: Mapping[str, str]) -> dict[str, Any]:
        """POST ``payload`` as JSON to ``{base_url}/oauth2/access_token``.

        Network failures, 429, 500, 502, 503 and 504 are retried under the
        client's ``RetryPolicy`` (same payload: the same old refresh token).
        Returns the JSON answer. Raises :class:`~kommo_talks.TokenRefreshError`
        when the endpoint refuses (400/401, with the problem's ``hint``) or
        keeps failing.
        """
        ...

    @property
    def closed(self) -> bool:
        """True once the client (or pipeline) offering the endpoint is closed."""
        ...


class Auth(Protocol):
    """An authentication strategy (``LongLivedToken`` or ``OAuth2``)."""

    async def access_token(self, endpoint: TokenEndpoint) -> str:
        """The bearer token to send now (refreshing it first if needed)."""
        ...

    async def handle_unauthorized(self, endpoint: TokenEndpoint, rejected_token: str) -> bool:
        """Kommo answered 401 to ``rejected_token``; return True if a new token is ready."""
        ...

    async def aclose(self) -> None:
        """Wait for any token refresh in flight to end (and its pair to be saved)."""
        ...


class LongLivedToken:
    """A fixed bearer token, as generated for a Kommo private integration.

    It is never refreshed: a 401 raises :class:`~kommo_talks.UnauthorizedError`.
    Its ``repr`` does not show the token.

    Raises:
        ValueError: ``token`` is not a non-empty string of visible ASCII
            characters (a space, line break, control or non-ASCII character
            anywhere, surrounding whitespace included, is refused; the
            message never shows the token).
    """

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("LongLivedToken needs a non-empty token string")
        if not is_token_text(token):
            raise ValueError(f"the token must hold {VISIBLE_ASCII_ONLY}")
        self._token = token

    def __repr__(self) -> str:
        return "LongLivedToken(<redacted>)"

    @property
    def token(self) -> str:
        """The token itself (kept out of ``repr``)."""
        return self._token

    async def access_token(self, endpoint: TokenEndpoint) -> str:
        """Return the token."""
        return self._token

    async def handle_unauthorized(self, endpoint: TokenEndpoint, rejected_token: str) -> bool:
        """A long-lived token cannot be refreshed: always False."""
        return False

    async def aclose(self) -> None:
        """Nothing to wait for."""
