"""OAuth2 authentication (stub: completed by the OAuth2 work)."""

from __future__ import annotations

__all__ = ["OAuth2"]


class OAuth2:
    """OAuth2 with rotating refresh tokens (not implemented yet)."""
