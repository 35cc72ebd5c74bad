"""GET /api/v4/talks of FakeKommo (stub: completed by the listing work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ._fake import FakeKommo

__all__ = ["list_talks"]


async def list_talks(fake: FakeKommo, request: web.Request) -> web.StreamResponse:
    """Answer a talks list request."""
    return web.Response(status=204)
