"""``KommoAccounts``: one service, many Kommo accounts (a public integration)."""

from __future__ import annotations

import collections
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import aiohttp

from ..client import KommoClient
from ..errors import ClientClosedError
from ..oauth import OAuth2
from ..ratelimit import RateLimiter
from ..retry import RetryPolicy
from ._install import exchange_install_code
from ._limits import AccountLimits
from ._model import Account, AccountNotInstalledError, account_base_url, check_account_id
from ._stores import AccountStore

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["KommoAccounts"]

# The pool of the shared session, across every account's host.
_MAX_CONNECTIONS = 100


class _HasAccount(Protocol):
    @property
    def account_id(self) -> int | None: ...


class KommoAccounts:
    """The clients of every Kommo account that installed the integration.

    Args:
        client_id: the integration's ID.
        client_secret: the integration's secret key.
        redirect_uri: the integration's redirect URI.
        store: an account store (``MemoryAccountStore``, ``FileAccountStore``,
            ``RedisAccountStore``).
        rate_limit: requests per second per account (a limiter each); a
            callable ``account_id -> RateLimiter`` (e.g. a ``RedisRateLimiter``
            keyed per account, for many processes); or ``None``.
        max_clients: the most clients kept in the cache (least recently used
            ones are dropped first).
        session: an ``aiohttp.ClientSession`` for every client to borrow
            (never closed here); by default one is created on first use.
        retry: as for ``KommoClient``.
        timeout: as for ``KommoClient`` (also bounds reading the account at install).
        global_rate_limit: a limit over all accounts together (requests per
            second, or a ``RateLimiter``), waited for before the account's.
        allow_loopback: accept ``http://`` loopback account addresses (tests).

    Clients borrow the shared session, so dropping one from the cache closes
    nothing: a client handed out stays usable by whoever holds it. While any
    client of an account lives, a new one gets the same ``OAuth2`` (and so the
    same token store and single-flight refresh) and the same limiter.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        *,
        store: AccountStore,
        rate_limit: float | Callable[[int], RateLimiter] | None = 7,
        max_clients: int = 1000,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        global_rate_limit: float | RateLimiter | None = None,
        allow_loopback: bool = False,
    ) -> None:
        for name, value in (
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("redirect_uri", redirect_uri),
        ):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string")
        if not isinstance(store, AccountStore):
            raise TypeError("store must be an account store (e.g. MemoryAccountStore)")
        if type(max_clients) is not int or max_clients < 1:
            raise ValueError("max_clients must be an int >= 1")
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.store = store
        """Where installed accounts and their tokens are kept."""
        self.max_clients = max_clients
        self.allow_loopback = allow_loopback
        self._client_secret = client_secret
        self._limits = AccountLimits(rate_limit, global_rate_limit)
        self._retry = retry
        self._timeout = timeout
        self._session = session
        self._owns_session = session is None
        self._clients: collections.OrderedDict[int, KommoClient] = collections.OrderedDict()
        self._auths: weakref.WeakValueDictionary[int, OAuth2] = weakref.WeakValueDictionary()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<KommoAccounts client_id={self.client_id!r} store={self.store!r} "
            f"clients={len(self._clients)}/{self.max_clients}>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def live_clients(self) -> int:
        """How many clients the cache holds now (at most ``max_clients``)."""
        return len(self._clients)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The session every client borrows (created on first use, in the running loop)."""
        if self._closed:
            raise ClientClosedError("this KommoAccounts is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=_MAX_CONNECTIONS)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    async def client(self, account_id: int) -> KommoClient:
        """The account's client, from the cache or built from its stored record.

        Raises:
            ValueError: ``account_id`` is not a positive int.
            AccountNotInstalledError: the account is not installed.
            ClientClosedError: this object is closed.
        """
        check_account_id(account_id)
        if self._closed:
            raise ClientClosedError("this KommoAccounts is closed")
        cached = self._cached(account_id)
        if cached is not None:
            return cached
        account = await self.store.get(account_id)
        if account is None:
            raise AccountNotInstalledError(account_id)
        cached = self._cached(account_id)  # another task may have built it meanwhile
        if cached is not None:
            return cached
        client = KommoClient(
            account.base_url,
            auth=self._auth(account_id),
            session=self.session,
            retry=self._retry,
            rate_limit=self._limits.for_account(account_id),
            timeout=self._timeout,
        )
        self._clients[account_id] = client
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)  # only the reference: its holders keep using it
        return client

    def _cached(self, account_id: int) -> KommoClient | None:
        client = self._clients.get(account_id)
        if client is not None:
            self._clients.move_to_end(account_id)
        return client

    def _auth(self, account_id: int) -> OAuth2:
        auth = self._auths.get(account_id)
        if auth is None:
            tokens = self.store.tokens(account_id)
            auth = OAuth2(self.client_id, self._client_secret, self.redirect_uri, tokens)
            self._auths[account_id] = auth
        return auth

    async def client_for(self, event: _HasAccount) -> KommoClient:
        """The client of a webhook event's account (``event.account_id``).

        Raises:
            ValueError: the event names no account.
            AccountNotInstalledError: its account is not installed.
        """
        account_id = getattr(event, "account_id", None)
        if account_id is None:
            raise ValueError("the event names no account (account_id is None)")
        return await self.client(account_id)

    async def install(self, code: str, referer: str, state: str | None = None) -> Account:
        """Install the account Kommo redirected with ``code`` and ``referer``.

        Exchanges the code at the account's domain (``referer``), reads
        ``GET /api/v4/account`` for its ``id`` and ``subdomain`` (through a
        ``KommoClient`` of the new account on the shared session, so with its
        retries, timeout and errors), and saves the record with the pair
        before returning; if any step fails, nothing is saved. Installing an account again
        replaces its record and tokens (its cached client is dropped).
        ``state`` is not checked here (the redirect handler of :meth:`setup`
        checks it); it is accepted so that a handler can pass the query on.

        Raises:
            ValueError: ``referer`` is not a Kommo account domain (nothing sent).
            TokenRefreshError: Kommo refused the code (expired, used, another
                redirect URI) or its token endpoint kept failing.
            APIError, DecodeError, TransportError: the account could not be read.
            TokenStoreError, RedisUnavailableError: the account could not be saved.
        """
        del state
        base_url = account_base_url(referer, allow_loopback=self.allow_loopback)
        account, tokens = await exchange_install_code(
            self.session,
            base_url,
            code,
            client_id=self.client_id,
            client_secret=self._client_secret,
            redirect_uri=self.redirect_uri,
            retry=self._retry,
            rate_limit=self._limits.for_install(),
            seconds=self._timeout,
        )
        await self.store.install(account, tokens)
        self._clients.pop(account.id, None)
        self._auths.pop(account.id, None)
        return account

    async def uninstall(self, account_id: int) -> bool:
        """Close the account's cached client and delete its record and tokens.

        Returns ``True`` if the account was installed. A client of it that
        someone still holds gets ``TokenStoreError`` at its next refresh.

        Raises:
            ValueError: ``account_id`` is not a positive int.
        """
        check_account_id(account_id)
        client = self._clients.pop(account_id, None)
        self._auths.pop(account_id, None)
        if client is not None:
            await client.close()
        return await self.store.remove(account_id)

    async def installed(self) -> list[int]:
        """The IDs of the installed accounts, ascending."""
        return await self.store.installed()

    def setup(
        self,
        app: web.Application,
        *,
        redirect_path: str,
        disconnect_path: str,
        state: str | Callable[[str], Awaitable[bool]] | None = None,
        success_url: str | None = None,
    ) -> None:
        """Add the OAuth redirect and disconnect hook routes to an aiohttp app.

        See :func:`kommo_talks.accounts.handle_redirect` and
        :func:`~kommo_talks.accounts.handle_disconnect`, which these routes
        run (an ASGI app can call them itself).
        """
        from ._routes import add_routes

        add_routes(self, app, redirect_path, disconnect_path, state=state, success_url=success_url)

    async def close(self) -> None:
        """Close every cached client, and the shared session if this object made it (idempotent)."""
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.close()
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _secret(self) -> str:
        return self._client_secret
