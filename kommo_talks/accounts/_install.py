"""An install: the code exchanged at the account's domain, then ``GET /api/v4/account``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp

from ..auth import LongLivedToken
from ..client import KommoClient
from ..errors import DecodeError
from ..oauth import OAuth2
from ..ratelimit import RateLimiter
from ..retry import RetryPolicy
from ..stores import MemoryTokenStore
from ..tokens import TokenSet
from ._model import Account

__all__ = ["MAX_ACCOUNT_BYTES", "account_fields", "exchange_install_code"]

MAX_ACCOUNT_BYTES = 1024 * 1024
"""The largest ``GET /api/v4/account`` answer read (a real one is about 1 KiB)."""

_PATH = "/api/v4/account"


async def exchange_install_code(
    session: aiohttp.ClientSession,
    base_url: str,
    code: str,
    *,
    client_id: str,
    client_secret: str,
    redirect_uri: str,
    retry: RetryPolicy | None,
    rate_limit: RateLimiter | None,
    seconds: float,
) -> tuple[Account, TokenSet]:
    """Exchange ``code`` at ``base_url`` and describe the account the new pair belongs to.

    The pair is held in memory only: the caller stores it with the record.
    The account is read by a :class:`KommoClient` of the new account over
    ``session`` (redirects not followed, at most ``MAX_ACCOUNT_BYTES`` read,
    errors raised by status as for any call).

    Raises:
        TokenRefreshError: the code was refused, or the token endpoint kept failing.
        APIError, DecodeError, TransportError: ``GET /api/v4/account`` failed.
    """
    tokens = await OAuth2.exchange_code(
        base_url,
        code,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uri=redirect_uri,
        store=MemoryTokenStore(),
        session=session,
        retry=retry,
    )
    # The fresh access token is good for a day: no refresh is needed for one call.
    async with KommoClient(
        base_url,
        auth=LongLivedToken(tokens.access_token),
        session=session,
        retry=retry,
        rate_limit=rate_limit,
        timeout=seconds,
        max_response_bytes=MAX_ACCOUNT_BYTES,
    ) as client:
        document = await client.request("GET", _PATH)
    account_id, subdomain = account_fields(document)
    return Account(account_id, subdomain, base_url, datetime.now(UTC)), tokens


def account_fields(document: Any) -> tuple[int, str]:
    """``(id, subdomain)`` of a ``GET /api/v4/account`` answer (``DecodeError`` names a bad one)."""
    if not isinstance(document, dict):
        raise DecodeError(f"{_PATH}: answer is not a JSON object")
    account_id, subdomain = document.get("id"), document.get("subdomain")
    if type(account_id) is not int or account_id <= 0:
        raise DecodeError(f"{_PATH}: 'id' is not a positive integer", path="id")
    if not isinstance(subdomain, str) or not subdomain:
        raise DecodeError(f"{_PATH}: 'subdomain' is not a string", path="subdomain")
    return account_id, subdomain
