"""The fake OAuth token endpoint of FakeKommo (stub: completed by the OAuth2 work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ._fake import FakeKommo

__all__ = ["FakeOAuth"]


class FakeOAuth:
    """Kommo's ``/oauth2/access_token`` with refresh-token rotation."""

    def __init__(self, fake: FakeKommo, *, strict_rotation: bool = False) -> None:
        self._fake = fake
        self.strict_rotation = strict_rotation

    def accepts(self, token: str) -> bool:
        """True if ``token`` is a live access token issued by this endpoint."""
        return False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer a token request."""
        from ._fake import problem_response

        return problem_response(404, "not implemented yet")
