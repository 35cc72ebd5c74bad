"""OAuth2 authentication with Kommo's rotating refresh tokens: :class:`OAuth2`.

Kommo's access tokens live 24 hours; every refresh returns a new refresh
token, and the old one dies once the new pair is used. Losing a rotated pair
(a crash between refresh and save, two tasks or processes refreshing at once)
locks the integration out until a person authorizes it again. So:

- one refresh at a time (single flight), under the store's ``refresh_lock()``
  when it has one, else an in-process lock shared by every ``OAuth2`` of that
  store; whoever holds the lock re-loads the store first and skips the
  refresh when another holder already did it;
- a new pair is saved **before** its first use; when the save fails the pair
  is kept in memory, unused, and saved again before it is ever sent.

The decisions (must this pair be refreshed? which pair wins after a re-load?)
are the pure functions :func:`is_stale` and :func:`plan_refresh`;
:class:`OAuth2` only sequences them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._loops import LoopLock
from ._pipeline import token_pipeline
from .errors import ClientClosedError, TokenRefreshError
from .stores import LockingTokenStore, TokenStore
from .tokens import TokenSet

if TYPE_CHECKING:
    import aiohttp

    from .auth import TokenEndpoint
    from .retry import RetryPolicy

__all__ = ["REFRESH_MARGIN", "OAuth2", "Plan", "Step", "is_stale", "plan_refresh"]

logger = logging.getLogger("kommo_talks")

REFRESH_MARGIN: Final = 60.0
"""Seconds before expiry at which an access token is refreshed before use."""


# -- the decisions (pure) -------------------------------------------------------


def is_stale(
    tokens: TokenSet,
    now: datetime,
    *,
    margin: float = REFRESH_MARGIN,
    rejected: str | None = None,
) -> bool:
    """True if ``tokens`` must be refreshed before use.

    That is when its access token expires within ``margin`` seconds of
    ``now`` (timezone-aware), or is ``rejected``: the access token Kommo
    answered 401 to.
    """
    return tokens.access_token == rejected or tokens.expires_within(margin, now)


class Step(enum.Enum):
    """What a holder of the refresh lock does next (see :func:`plan_refresh`)."""

    USE = "use"
    """Use the stored pair as it is (maybe another holder just refreshed it)."""
    SAVE_KEPT = "save_kept"
    """Save the pair kept in memory after a failed save, then use it."""
    REFRESH = "refresh"
    """Exchange the stored pair's refresh token for a new pair."""
    MISSING = "missing"
    """The store holds no pair: the integration must be authorized first."""


@attrs.frozen
class Plan:
    """The outcome of :func:`plan_refresh`.

    Attributes:
        step: what to do.
        tokens: the pair to use (``USE``), save (``SAVE_KEPT``) or refresh
            (``REFRESH``); ``None`` for ``MISSING``.
        drop_kept: forget the kept pair: the store no longer holds the refresh
            token it was obtained with, so another holder has refreshed since.
    """

    step: Step
    tokens: TokenSet | None
    drop_kept: bool = False


def plan_refresh(
    stored: TokenSet | None,
    *,
    kept: TokenSet | None,
    exchanged: str | None,
    now: datetime,
    margin: float = REFRESH_MARGIN,
    rejected: str | None = None,
) -> Plan:
    """Decide, under the refresh lock and just after re-loading the store, which pair wins.

    Args:
        stored: what the store holds now.
        kept: a pair obtained by an earlier refresh whose save failed, or ``None``.
        exchanged: the refresh token that ``kept`` was obtained with.
        now: the current time (timezone-aware).
        margin: see :func:`is_stale`.
        rejected: the access token Kommo answered 401 to, if any.

    The kept pair is saved only if the store still holds the refresh token
    it was obtained with; otherwise another holder refreshed since, and the
    kept pair is dropped. A stored pair that is not stale is used as is,
    whether it is the one we had or a newer one saved by another holder:
    only a stale one is refreshed.
    """
    drop_kept = False
    if kept is not None:
        if stored is not None and stored.refresh_token == exchanged:
            return Plan(Step.SAVE_KEPT, kept)
        drop_kept = True
    if stored is None:
        return Plan(Step.MISSING, None, drop_kept)
    if is_stale(stored, now, margin=margin, rejected=rejected):
        return Plan(Step.REFRESH, stored, drop_kept)
    return Plan(Step.USE, stored, drop_kept)


# -- in-process locks for stores without refresh_lock() ----------------------------

# One asyncio.Lock per store object (and event loop), so that every OAuth2 of
# one store in this process takes turns, not only the tasks of one OAuth2.
# Keyed by identity, not by hash: a store need not be hashable (a dataclass is
# not), and two equal store objects are still two stores. An entry goes when
# its store is garbage collected.
_store_locks: dict[int, tuple[weakref.ref[Any], LoopLock]] = {}


def _in_process_lock(store: object, fallback: LoopLock) -> asyncio.Lock:
    key = id(store)
    entry = _store_locks.get(key)
    if entry is None or entry[0]() is not store:
        try:
            ref = weakref.ref(store, lambda _, key=key: _store_locks.pop(key, None))  # type: ignore[misc]
        except TypeError:  # a store that cannot be weakly referenced: one lock per OAuth2
            return fallback.get()
        entry = _store_locks[key] = (ref, LoopLock())
    # A lock is bound to the loop it waited in; a store may outlive an asyncio.run().
    return entry[1].get()


def _refresh_lock(store: object, fallback: LoopLock) -> AbstractAsyncContextManager[Any]:
    """The store's ``refresh_lock()`` if it has one, else the in-process lock of the store."""
    if isinstance(store, LockingTokenStore):
        return store.refresh_lock()
    return _in_process_lock(store, fallback)


def _no_tokens_error(store: object) -> TokenRefreshError:
    return TokenRefreshError(
        f"no OAuth2 tokens in the {type(store).__name__}: authorize the integration first "
        "with `await OAuth2.exchange_code(...)` or `kommo-talks auth CODE --token-file PATH`"
    )


def _check_text(name: str, value: object) -> str:
    # Never quote `value`: it may be a secret.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value.strip()


def _check_store(store: object) -> None:
    for method in ("load", "save"):
        if not callable(getattr(store, method, None)):
            raise ValueError(
                f"store must be a TokenStore (with async load() and save()), "
                f"got {type(store).__name__}"
            )


async def _save_first_pair(store: TokenStore, tokens: TokenSet) -> None:
    async with _refresh_lock(store, LoopLock()):
        await store.save(tokens)
    logger.info(
        "OAuth2: authorization code exchanged; tokens saved to the %s "
        "(access token valid until %s)",
        type(store).__name__,
        tokens.expires_at.isoformat(),
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _code_payload(
    code: str, client_id: str, client_secret: str, redirect_uri: str
) -> dict[str, str]:
    """The ``authorization_code`` grant's payload (raises ValueError for an empty argument)."""
    return {
        "client_id": _check_text("client_id", client_id),
        "client_secret": _check_text("client_secret", client_secret),
        "grant_type": "authorization_code",
        "code": _check_text("code", code),
        "redirect_uri": _check_text("redirect_uri", redirect_uri),
    }


# -- OAuth2 ----------------------------------------------------------------------


class OAuth2:
    """OAuth2 authentication for a Kommo integration, with rotating refresh tokens.

    Pass it as ``auth=`` to :class:`~kommo_talks.KommoClient`; one instance may
    serve several clients and any number of tasks. The first pair comes from
    :meth:`exchange_code` (or ``kommo-talks auth CODE --token-file PATH``),
    which saves it to ``store``; ``OAuth2`` loads it from there on first use.

    - **Proactive refresh**: an access token that expires within 60 s is
      refreshed before it is sent.
    - **Reactive refresh**: a 401 to an access token not yet known to be bad
      triggers one refresh and one replay of the request (spent from the
      call's attempt budget). If another task already refreshed since, the
      replay uses its pair and nothing more is requested.
    - **Single flight**: however many tasks need a refresh at once, one
      request is made; they all wait for it and all see its failure.
    - **Locking**: the refresh runs under the store's ``refresh_lock()`` if it
      has one (a file lock, a Redis lock), else under an in-process lock per
      store. The holder re-loads the store first and skips the refresh when
      the stored pair is no longer stale (another holder refreshed).
    - **Save before use**: the new pair is saved before any request uses it.
      If the save fails, the error propagates and the pair is kept in memory,
      unused; the next call saves it again (under the lock, after a re-load)
      before using it, or drops it if the store no longer holds the refresh
      token it came from.

    Errors: :class:`~kommo_talks.TokenRefreshError` when the store holds no
    pair, or when the token endpoint refuses (400/401, e.g. ``hint`` "Token
    has been revoked": authorize again) or keeps failing; the store's errors
    (:class:`~kommo_talks.TokenStoreError`) as they are.

    ``repr`` shows the client ID and the store's type, never the client
    secret or a token; log lines (logger ``kommo_talks``) never hold one either.

    Args:
        client_id: the integration ID.
        client_secret: the integration's secret key.
        redirect_uri: the redirect URI registered with the integration.
        store: a :class:`~kommo_talks.TokenStore`.

    Raises:
        ValueError: an empty string, or a ``store`` without ``load``/``save``.
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        store: TokenStore,
    ) -> None:
        self.client_id = _check_text("client_id", client_id)
        """The integration ID."""
        self._client_secret = _check_text("client_secret", client_secret)
        self.redirect_uri = _check_text("redirect_uri", redirect_uri)
        """The redirect URI registered with the integration."""
        _check_store(store)
        self.store = store
        """Where the token pair is loaded from and saved to."""
        self._current: TokenSet | None = None  # saved (or loaded), safe to use
        self._kept: TokenSet | None = None  # obtained, but its save failed: never used
        self._exchanged: str | None = None  # the refresh token `_kept` came from
        self._rejected: str | None = None  # an access token Kommo answered 401 to
        self._flight: asyncio.Future[None] | None = None
        self._flight_endpoint: TokenEndpoint | None = None  # the client the refresh runs on
        # A refresh token Kommo refused (400/401), and its error: not sent again.
        self._refused: tuple[str, TokenRefreshError] | None = None
        self._fallback_lock = LoopLock()

    def __repr__(self) -> str:
        return (
            f"OAuth2(client_id={self.client_id!r}, redirect_uri={self.redirect_uri!r}, "
            f"store=<{type(self.store).__name__}>)"
        )

    # -- the Auth protocol -------------------------------------------------------

    async def access_token(self, endpoint: TokenEndpoint) -> str:
        """The access token to send now, loading, saving or refreshing first if needed.

        Raises:
            TokenRefreshError: no pair in the store, or the refresh failed.
            TokenStoreError: the store could not be read or written.
        """
        current = self._current
        if (
            current is None
            or self._kept is not None
            or is_stale(current, _utcnow(), rejected=self._rejected)
        ):
            await self._single_flight(endpoint)
            current = self._current
            assert current is not None
        return current.access_token

    async def handle_unauthorized(self, endpoint: TokenEndpoint, rejected_token: str) -> bool:
        """Kommo answered 401 to ``rejected_token``: have a new pair ready; True if it is.

        If a newer pair than ``rejected_token``'s is already at hand (another
        task refreshed since it was issued), nothing is requested.

        Raises:
            TokenRefreshError, TokenStoreError: as :meth:`access_token`.
        """
        current = self._current
        if current is None:
            return False
        if current.access_token != rejected_token:
            return True
        self._rejected = rejected_token
        logger.debug("OAuth2: Kommo rejected the access token; refreshing")
        # A flight that is already running may have decided before this report;
        # then a second one refreshes.
        for _ in range(2):
            await self._single_flight(endpoint)
            current = self._current
            if current is not None and current.access_token != rejected_token:
                break
        return True

    # -- the first pair -----------------------------------------------------------

    @classmethod
    async def exchange_code(
        cls,
        base_url: str,
        code: str,
        *,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        store: TokenStore,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
    ) -> TokenSet:
        """Exchange an authorization code for the first pair, save it to ``store``, return it.

        Performs the ``authorization_code`` grant on ``{base_url}/oauth2/access_token``
        through a temporary request pipeline (a client's base URL rules,
        ``User-Agent``, retries, rate limit and 30 s timeout; closed afterwards).
        The save replaces whatever the store holds, a corrupt file or a
        revoked pair included: this is how a locked-out integration recovers.
        A code is valid for 20 minutes and only once.

        Args:
            base_url: the account's address, e.g. ``https://example.kommo.com``.
            code: the ``code`` Kommo sent to the redirect URI.
            client_id: the integration's ID.
            client_secret: the integration's secret key.
            redirect_uri: the integration's redirect URI.
            store: where to save the pair.
            session: an aiohttp session for the temporary client to borrow.
            retry: the temporary client's retry policy.

        Raises:
            ValueError: a bad ``base_url`` or an empty argument (nothing sent).
            TokenRefreshError: the code was refused (``hint`` says why, e.g.
                "Authorization code has expired") or the endpoint kept failing.
            TokenStoreError: the pair could not be saved.
        """
        payload = _code_payload(code, client_id, client_secret, redirect_uri)
        _check_store(store)
        pipeline = token_pipeline(base_url, session=session, retry=retry)
        try:
            sent_at = _utcnow()
            body = await pipeline.request_tokens(payload)
        finally:
            await pipeline.close()
        tokens = TokenSet.from_token_response(body, now=sent_at, status=200)
        await _save_first_pair(store, tokens)
        return tokens

    # -- the refresh ----------------------------------------------------------------

    async def _single_flight(self, endpoint: TokenEndpoint) -> None:
        """Join the running refresh, or start one; wait for its outcome."""
        while True:
            flight = self._flight
            if flight is None or flight.done():
                flight = self._start_flight(endpoint)
            flown_by = self._flight_endpoint
            try:
                # Shielded: a cancelled waiter does not cancel a refresh that others
                # wait for, nor lose a rotated pair between request and save.
                await asyncio.shield(flight)
                return
            except ClientClosedError:
                # That refresh ran on another client, closed before it sent
                # anything (a client waits for a refresh on the wire before it
                # closes): this caller's own client, if open, flies (or joins) anew.
                if flown_by is endpoint or endpoint.closed:
                    raise

    def _start_flight(self, endpoint: TokenEndpoint) -> asyncio.Future[None]:
        flight = self._flight = asyncio.ensure_future(self._fly(endpoint))
        self._flight_endpoint = endpoint
        flight.add_done_callback(_retrieve)
        return flight

    async def aclose(self) -> None:
        """Wait until a refresh in flight has ended (and saved its pair), whatever its outcome.

        :meth:`KommoClient.close` calls it, so that closing a client never cuts
        a refresh between Kommo's rotation and the save.
        """
        flight = self._flight
        if flight is not None and not flight.done():
            await asyncio.wait([flight])

    async def _fly(self, endpoint: TokenEndpoint) -> None:
        store = self.store
        async with _refresh_lock(store, self._fallback_lock):
            stored = await store.load()
            while True:
                plan = plan_refresh(
                    stored,
                    kept=self._kept,
                    exchanged=self._exchanged,
                    now=_utcnow(),
                    rejected=self._rejected,
                )
                if plan.drop_kept:
                    logger.warning(
                        "OAuth2: dropping the unsaved token pair: the %s no longer holds "
                        "the refresh token it came from (another holder refreshed)",
                        type(store).__name__,
                    )
                    self._kept = self._exchanged = None
                if plan.step is Step.MISSING:
                    raise _no_tokens_error(store)
                tokens = plan.tokens
                assert tokens is not None
                if plan.step is Step.USE:
                    if self._current is not None and tokens != self._current:
                        logger.debug("OAuth2: using the newer pair found in the store")
                    self._current = tokens
                    return
                if plan.step is Step.SAVE_KEPT:
                    await store.save(tokens)
                    logger.info("OAuth2: saved the token pair whose earlier save failed")
                    self._current, self._kept, self._exchanged = tokens, None, None
                    stored = tokens  # a kept pair may itself be stale by now: plan again
                    continue
                refused = self._refused
                if refused is not None and refused[0] == tokens.refresh_token:
                    # Re-authorization is needed; asking again with the same token
                    # would only send Kommo one refused request per call.
                    raise _refused_again(refused[1])
                try:
                    self._current = await self._refresh(endpoint, tokens)
                except TokenRefreshError as exc:
                    if exc.status in (400, 401):
                        self._refused = (tokens.refresh_token, exc)
                    raise
                return

    async def _refresh(self, endpoint: TokenEndpoint, old: TokenSet) -> TokenSet:
        """Exchange ``old``'s refresh token; save the new pair (keep it if that fails)."""
        logger.debug("OAuth2: refreshing the access token (valid until %s)", old.expires_at)
        payload = {
            "client_id": self.client_id,
            "client_secret": self._client_secret,
            "grant_type": "refresh_token",
            "refresh_token": old.refresh_token,
            "redirect_uri": self.redirect_uri,
        }
        sent_at = _utcnow()
        body = await endpoint.request_tokens(payload)
        new = TokenSet.from_token_response(body, now=sent_at, status=200)
        try:
            await self.store.save(new)
        except BaseException as exc:
            # Kommo may already have revoked `old` once `new` is used: never lose `new`.
            self._kept, self._exchanged = new, old.refresh_token
            logger.warning(
                "OAuth2: saving the refreshed tokens failed (%s); the new pair is kept in "
                "memory, unused, and will be saved again before its first use",
                type(exc).__name__,
            )
            raise
        logger.info(
            "OAuth2: refreshed the tokens and saved them to the %s (access token valid until %s)",
            type(self.store).__name__,
            new.expires_at.isoformat(),
        )
        return new


def _refused_again(refusal: TokenRefreshError) -> TokenRefreshError:
    return TokenRefreshError(
        f"{refusal} (not asked again until the store holds another token pair)",
        status=refusal.status,
        hint=refusal.hint,
        problem=refusal.problem,
    )


def _retrieve(flight: asyncio.Future[None]) -> None:
    # Every waiter sees the outcome; this only keeps asyncio from reporting an
    # exception "never retrieved" when all waiters were cancelled.
    if not flight.cancelled():
        flight.exception()
