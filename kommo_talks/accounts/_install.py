"""An install: the code exchanged at the account's domain, then ``GET /api/v4/account``."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import aiohttp

from ..errors import APIError, DecodeError, TransportError
from ..oauth import OAuth2
from ..retry import RetryPolicy
from ..stores import MemoryTokenStore
from ..tokens import TokenSet
from ._model import Account

__all__ = ["exchange_install_code", "read_account"]

MAX_ACCOUNT_BYTES = 1024 * 1024
"""The largest ``GET /api/v4/account`` answer read (a real one is about 1 KiB)."""


async def exchange_install_code(
    session: aiohttp.ClientSession,
    base_url: str,
    code: str,
    *,
    client_id: str,
    client_secret: str,
    redirect_uri: str,
    retry: RetryPolicy | None,
    seconds: float,
) -> tuple[Account, TokenSet]:
    """Exchange ``code`` at ``base_url`` and describe the account the new pair belongs to.

    The pair is held in memory only: the caller stores it with the record.

    Raises:
        TokenRefreshError: the code was refused, or the token endpoint kept failing.
        APIError, DecodeError, TransportError: ``GET /api/v4/account`` failed.
    """
    held = MemoryTokenStore()
    tokens = await OAuth2.exchange_code(
        base_url,
        code,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uri=redirect_uri,
        store=held,
        session=session,
        retry=retry,
    )
    account_id, subdomain = await read_account(session, base_url, tokens.access_token, seconds)
    return Account(account_id, subdomain, base_url, datetime.now(UTC)), tokens


async def read_account(
    session: aiohttp.ClientSession, base_url: str, access_token: str, seconds: float
) -> tuple[int, str]:
    """``(id, subdomain)`` from ``GET {base_url}/api/v4/account``, read with ``access_token``.

    One attempt, no redirects followed, at most ``MAX_ACCOUNT_BYTES`` read.
    """
    url = f"{base_url}/api/v4/account"
    try:
        async with asyncio.timeout(seconds):
            async with session.get(
                url,
                headers={"Authorization": f"Bearer {access_token}"},
                allow_redirects=False,
            ) as response:
                status = response.status
                body = await response.content.read(MAX_ACCOUNT_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        message = f"GET {url} failed: {type(exc).__name__}"
        raise TransportError(message, request_method="GET", request_url=url) from None
    if status != 200:
        raise APIError(status, detail="GET /api/v4/account", request_method="GET", request_url=url)
    return _account_fields(body, status)


def _account_fields(body: bytes, status: int) -> tuple[int, str]:
    path = "/api/v4/account"
    if len(body) > MAX_ACCOUNT_BYTES:
        raise DecodeError(f"{path}: answer over {MAX_ACCOUNT_BYTES // 1024} KiB", status=status)
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise DecodeError(f"{path}: answer is not JSON", status=status) from None
    if not isinstance(document, dict):
        raise DecodeError(f"{path}: answer is not a JSON object", status=status)
    account_id, subdomain = document.get("id"), document.get("subdomain")
    if type(account_id) is not int or account_id <= 0:
        raise DecodeError(f"{path}: 'id' is not a positive integer", status=status, path="id")
    if not isinstance(subdomain, str) or not subdomain:
        raise DecodeError(f"{path}: 'subdomain' is not a string", status=status, path="subdomain")
    return account_id, subdomain
