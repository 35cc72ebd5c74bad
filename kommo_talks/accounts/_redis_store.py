"""``RedisAccountStore``: installed accounts in Redis, shared by every process on every host.

Needs the ``redis`` extra; :mod:`kommo_talks.accounts` imports this module
(and redis-py) only when ``RedisAccountStore`` is first used.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from ..errors import TokenStoreError
from ..redis import RedisTokenStore, _redis_errors
from ..tokens import TokenSet
from ._model import Account, check_account_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisAccountStore"]


class RedisAccountStore:
    """An account store in Redis: a key per account and a set of installed IDs.

    Keys, for ``prefix="kommo:"`` and account 42:

    - ``kommo:account:42``: the :class:`Account` record (JSON);
    - ``kommo:account:42:tokens``: its pair, a
      :class:`~kommo_talks.redis.RedisTokenStore` (so the same refresh lock
      ``...:tokens:lock``, compare-and-set save and lock-timeout rules hold);
    - ``kommo:accounts``: the set of installed account IDs.

    Installs and uninstalls take the account's refresh lock and write all
    three in one transaction (``MULTI``), so they never interleave with a
    refresh in another process.

    Args:
        redis: a ``redis.asyncio.Redis`` client (not closed by this class).
        prefix: the prefix of every key.
        lock_timeout: as for ``RedisTokenStore``.

    Raises (every method):
        RedisUnavailableError: Redis could not be reached or refused a command.
    """

    def __init__(self, redis: Redis, prefix: str = "kommo:", *, lock_timeout: float = 60.0) -> None:
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a str")
        self.prefix = prefix
        """The prefix of every key."""
        self.set_key = f"{prefix}accounts"
        """The key of the set of installed account IDs."""
        self._redis = redis
        if not math.isfinite(lock_timeout) or lock_timeout <= 0:
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, got {lock_timeout!r}"
            )
        self._lock_timeout = float(lock_timeout)

    def __repr__(self) -> str:
        return f"RedisAccountStore(prefix={self.prefix!r})"

    def record_key(self, account_id: int) -> str:
        """The key of the account's record."""
        return f"{self.prefix}account:{check_account_id(account_id)}"

    def tokens(self, account_id: int) -> RedisTokenStore:
        """The account's ``RedisTokenStore`` (a new object per call)."""
        record_key = self.record_key(account_id)
        return _AccountTokens(
            self._redis, f"{record_key}:tokens", record_key, lock_timeout=self._lock_timeout
        )

    async def get(self, account_id: int) -> Account | None:
        """The account's record, or ``None``.

        Raises:
            TokenStoreError: the key holds something that is not a record.
        """
        key = self.record_key(account_id)
        with _redis_errors("load the account record", key):
            raw = await self._redis.get(key)
        if raw is None:
            return None
        try:
            return Account.from_json(json.loads(raw))
        except (ValueError, RecursionError) as exc:
            problem = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
        raise TokenStoreError(f"Redis key {key!r} does not hold an account record: {problem}")

    async def install(self, account: Account, tokens: TokenSet) -> None:
        """Store the record and the pair and add the ID to the set, in one transaction."""
        key = self.record_key(account.id)
        token_store = self.tokens(account.id)
        record = json.dumps(account.to_json(), separators=(",", ":"))
        pair = json.dumps(tokens.to_json(), separators=(",", ":"))
        async with token_store.refresh_lock():
            with _redis_errors("install the account", key):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.set(key, record)
                    pipe.set(token_store.key, pair)
                    pipe.sadd(self.set_key, account.id)
                    await pipe.execute()

    async def remove(self, account_id: int) -> bool:
        """Delete the record and the pair, drop the ID from the set; ``True`` if installed."""
        key = self.record_key(account_id)
        token_store = self.tokens(account_id)
        async with token_store.refresh_lock():
            with _redis_errors("uninstall the account", key):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.delete(key, token_store.key)
                    pipe.srem(self.set_key, account_id)
                    deleted, _ = await pipe.execute()
        return bool(deleted)

    async def installed(self) -> list[int]:
        """The installed account IDs, ascending (members that are not IDs are skipped)."""
        with _redis_errors("list the installed accounts", self.set_key):
            members = await self._redis.smembers(self.set_key)
        ids = []
        for member in members:
            text = member.decode("ascii", "replace") if isinstance(member, bytes) else str(member)
            if text.isdigit() and int(text) > 0:
                ids.append(int(text))
        return sorted(ids)


class _AccountTokens(RedisTokenStore):
    """An account's pair: saved only while the account's record exists.

    ``OAuth2`` saves under the refresh lock, which uninstalls take too, so a
    refresh that ends after an uninstall never writes the pair back.
    """

    def __init__(self, redis: Redis, key: str, record_key: str, *, lock_timeout: float) -> None:
        super().__init__(redis, key, lock_timeout=lock_timeout)
        self._record_key = record_key

    async def save(self, tokens: TokenSet) -> None:
        """As ``RedisTokenStore.save``; ``TokenStoreError`` once the account is uninstalled."""
        with _redis_errors("check the account record", self._record_key):
            installed = await self._redis.exists(self._record_key)
        if not installed:
            raise TokenStoreError(
                f"account record {self._record_key!r} is gone: the account was uninstalled, "
                "its new token pair is not stored"
            )
        await super().save(tokens)
