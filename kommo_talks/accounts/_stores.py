"""Stores keyed by account: :class:`MemoryAccountStore` and :class:`FileAccountStore`.

An account store keeps, per installed account, its :class:`Account` record
and its token pair, and hands out a :class:`~kommo_talks.TokenStore` for
that pair, so ``OAuth2``'s single-flight, save-before-use and rotation rules
hold per account unchanged. ``RedisAccountStore`` (many hosts) is in
:mod:`kommo_talks.accounts._redis_store`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import TokenStoreError
from ..stores import FileTokenStore, MemoryTokenStore, TokenStore, _json_document
from ..tokens import TokenSet
from ._model import Account, check_account_id

__all__ = ["AccountStore", "FileAccountStore", "MemoryAccountStore"]

_ACCOUNT_FILE = re.compile(r"^account-([1-9][0-9]{0,18})\.json$")


@runtime_checkable
class AccountStore(Protocol):
    """Where :class:`KommoAccounts` keeps installed accounts and their tokens."""

    def tokens(self, account_id: int) -> TokenStore:
        """A ``TokenStore`` of the account's pair (a new object per call)."""
        ...

    async def get(self, account_id: int) -> Account | None:
        """The account's record, or ``None`` if it is not installed."""
        ...

    async def install(self, account: Account, tokens: TokenSet) -> None:
        """Store the record and the pair together, replacing any earlier install."""
        ...

    async def remove(self, account_id: int) -> bool:
        """Delete the record and the pair; ``True`` if the account was installed."""
        ...

    async def installed(self) -> list[int]:
        """The IDs of the installed accounts, in ascending order."""
        ...


class MemoryAccountStore:
    """An :class:`AccountStore` in this process's memory (tests, demos)."""

    def __init__(self) -> None:
        self._accounts: dict[int, Account] = {}
        self._tokens: dict[int, MemoryTokenStore] = {}

    def __repr__(self) -> str:
        return f"<MemoryAccountStore holding {len(self._accounts)} accounts>"

    def tokens(self, account_id: int) -> TokenStore:
        """The account's token store (the pair lives here; empty if not installed)."""
        return _MemoryAccountTokens(self, check_account_id(account_id))

    async def get(self, account_id: int) -> Account | None:
        """The account's record, or ``None``."""
        return self._accounts.get(check_account_id(account_id))

    async def install(self, account: Account, tokens: TokenSet) -> None:
        """Keep the record and the pair, replacing an earlier install."""
        self._accounts[account.id] = account
        self._tokens[account.id] = MemoryTokenStore(tokens)

    async def remove(self, account_id: int) -> bool:
        """Forget the account; ``True`` if it was installed."""
        self._tokens.pop(check_account_id(account_id), None)
        return self._accounts.pop(account_id, None) is not None

    async def installed(self) -> list[int]:
        """The installed account IDs, ascending."""
        return sorted(self._accounts)


class _MemoryAccountTokens:
    """The ``TokenStore`` view of one account of a :class:`MemoryAccountStore`."""

    def __init__(self, store: MemoryAccountStore, account_id: int) -> None:
        self._store = store
        self._account_id = account_id

    def __repr__(self) -> str:
        return f"<token store of account {self._account_id} in memory>"

    async def load(self) -> TokenSet | None:
        held = self._store._tokens.get(self._account_id)
        return None if held is None else await held.load()

    async def save(self, tokens: TokenSet) -> None:
        held = self._store._tokens.get(self._account_id)
        if held is None:
            raise _uninstalled(self._account_id)
        await held.save(tokens)


def _uninstalled(account_id: int) -> TokenStoreError:
    return TokenStoreError(
        f"account {account_id} was uninstalled: its new token pair is not stored"
    )


class FileAccountStore:
    """An :class:`AccountStore` in a folder: one JSON file (mode 0600) per account.

    ``<directory>/account-<id>.json`` holds the token pair (the fields of
    :meth:`TokenSet.to_json`) and the record under ``"account"``. Each file
    is a :class:`~kommo_talks.FileTokenStore` of its own: written atomically,
    with its file lock (``account-<id>.json.lock``, left in place after an
    uninstall) shared by the processes of one host. Installs and uninstalls
    take that lock too, so they never interleave with a refresh. The folder
    is created (mode 0700) on the first install.

    Args:
        directory: the folder of the account files.
        lock_timeout: as for ``FileTokenStore``.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, lock_timeout: float | None = None
    ) -> None:
        self.directory = Path(directory)
        """The folder of the account files."""
        self._lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"FileAccountStore({os.fspath(self.directory)!r})"

    def tokens(self, account_id: int) -> _AccountFile:
        """The account file as a ``FileTokenStore`` (a new object per call)."""
        path = self.directory / f"account-{check_account_id(account_id)}.json"
        return _AccountFile(path, lock_timeout=self._lock_timeout)

    async def get(self, account_id: int) -> Account | None:
        """The account's record, or ``None`` if it has no file.

        Raises:
            TokenStoreError: the file cannot be read or holds no account record.
        """
        file = self.tokens(account_id)
        data = await asyncio.to_thread(file._read)
        return None if data is None else file.parse_account(data)

    async def install(self, account: Account, tokens: TokenSet) -> None:
        """Write the account's file (under its lock), replacing an earlier install."""
        file = self.tokens(account.id)
        document = _document(tokens, account.to_json())
        await asyncio.to_thread(self._make_folder)  # before the lock file is made in it
        async with file.refresh_lock():
            await asyncio.to_thread(file._write, document)

    async def remove(self, account_id: int) -> bool:
        """Delete the account's file (under its lock); ``True`` if there was one."""
        file = self.tokens(account_id)
        async with file.refresh_lock():
            return await asyncio.to_thread(file.delete)

    async def installed(self) -> list[int]:
        """The IDs of the account files in the folder, ascending."""
        return await asyncio.to_thread(self._list)

    def _make_folder(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _list(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(m[1]) for name in names if (m := _ACCOUNT_FILE.match(name)))


def _document(tokens: TokenSet, account: dict[str, Any]) -> bytes:
    return (json.dumps({**tokens.to_json(), "account": account}, indent=2) + "\n").encode()


class _AccountFile(FileTokenStore):
    """One account's file: its pair (as ``FileTokenStore`` reads it) plus the record.

    :meth:`save` keeps the record that the file holds, and refuses (nothing
    written) once the account was uninstalled, so a refresh that ends after
    an uninstall never brings the file back.
    """

    async def save(self, tokens: TokenSet) -> None:
        """Replace the pair in the file, keeping its account record."""
        await asyncio.to_thread(self._replace_tokens, tokens)

    def _replace_tokens(self, tokens: TokenSet) -> None:
        data = self._read()
        if data is None:
            raise TokenStoreError(f"account file {os.fspath(self.path)!r} is gone: {_GONE}")
        document, problem = _json_document(data)
        record = document.get("account") if isinstance(document, dict) else None
        if problem or not isinstance(record, dict):
            raise self._corrupt(problem or "it holds no account record")
        self._write(_document(tokens, record))

    def parse_account(self, data: bytes) -> Account:
        """The record of the file's content ``data``; ``TokenStoreError`` if there is none."""
        document, problem = _json_document(data)
        if not problem:
            try:
                return Account.from_json(
                    document.get("account") if isinstance(document, dict) else None
                )
            except ValueError as exc:
                problem = str(exc)
        raise self._corrupt(problem)

    def delete(self) -> bool:
        """Remove the file; ``True`` if it existed."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._write_error(exc) from exc
        return True


_GONE = "the account was uninstalled, its new token pair is not stored"
