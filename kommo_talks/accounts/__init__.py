"""Public integrations: one service, many Kommo accounts.

:class:`KommoAccounts` hands out each installed account's ``KommoClient``
(an LRU cache over one shared aiohttp session), installs accounts from
Kommo's OAuth redirect and uninstalls them from its disconnect hook.
Accounts and their tokens live in an account store:
:class:`MemoryAccountStore`, :class:`FileAccountStore`, or
:class:`RedisAccountStore` (needs the ``redis`` extra; redis-py is imported
only when it is first used). ``aiohttp.web`` is imported only by
``KommoAccounts.setup``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._limits import ChainedRateLimiter
from ._model import Account, AccountNotInstalledError
from ._registry import KommoAccounts
from ._routes import Reply, handle_disconnect, handle_redirect
from ._stores import AccountStore, FileAccountStore, MemoryAccountStore

if TYPE_CHECKING:
    from ._redis_store import RedisAccountStore

__all__ = [
    "Account",
    "AccountNotInstalledError",
    "AccountStore",
    "ChainedRateLimiter",
    "FileAccountStore",
    "KommoAccounts",
    "MemoryAccountStore",
    "RedisAccountStore",
    "Reply",
    "handle_disconnect",
    "handle_redirect",
]


def __getattr__(name: str) -> Any:
    if name == "RedisAccountStore":
        from ._redis_store import RedisAccountStore

        return RedisAccountStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
