"""Many worker processes, one Kommo integration: a shared rate limit and token store in Redis.

Needs the optional extra ``kommo-talks[redis]`` (redis-py); ``import
kommo_talks`` never imports this module. Pass a ``redis.asyncio.Redis``
client you own (and close)::

    import redis.asyncio
    from kommo_talks import KommoClient, OAuth2
    from kommo_talks.redis import RedisRateLimiter, RedisTokenStore

    r = redis.asyncio.Redis(host="redis.internal")
    store = RedisTokenStore(r, "kommo:example:tokens")
    limiter = RedisRateLimiter(r, "kommo:example:rate", 7)
    auth = OAuth2(client_id, client_secret, redirect_uri, store)
    async with KommoClient(base_url, auth=auth, rate_limit=limiter) as client:
        ...

Every process (on any host) that uses the same keys shares one limit and one
token pair. When Redis cannot be reached, :class:`RedisUnavailableError` is
raised: there is never a silent fall back to a per-process limit, which
would multiply the rate by the number of processes and get the account
blocked.

Why our own Lua script for the limit: the Redis-backed limiters on PyPI
(``limits``' moving window, ``pyrate-limiter``'s buckets,
``redis-rate-limiters``' token bucket) answer "allowed or not" (or refill a
bucket, which lets 2R through a rolling window), so waiters poll, and most
take their timestamps from the client's clock. What Kommo needs is the
in-process limiter's guarantee (no rolling second ever holds more than ⌊R⌋
requests, with the same safety margin) decided on the server's clock, with a
reserved turn for each caller, so that callers sleep exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Final

try:
    import redis.exceptions
    from redis.asyncio.lock import Lock
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "kommo_talks.redis needs redis-py: install the extra, pip install 'kommo-talks[redis]'"
    ) from exc

from ._loops import LoopLock
from .errors import CoordinationError, TokenStoreError
from .ratelimit import DEFAULT_MARGIN, window_for_rate
from .stores import parse_token_record
from .tokens import TokenSet

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "RedisRateLimiter",
    "RedisTokenStore",
    "RedisUnavailableError",
    "TokenConflictError",
]

logger = logging.getLogger(__name__)


class RedisUnavailableError(CoordinationError):
    """Redis could not be reached, timed out, or refused a command.

    Raised by :class:`RedisRateLimiter` and :class:`RedisTokenStore` instead of
    working without Redis: no request is sent on a per-process guess of the
    limit, and no token pair is dropped (``OAuth2`` keeps a pair it could not
    save, and saves it again before using it). The redis-py exception is
    chained as ``__cause__``.

    Attributes:
        operation: what was being done, e.g. ``"reserve a request slot"``.
        key: the Redis key involved.
    """

    # Defaults only so that pickling (which calls cls(message)) works.
    def __init__(self, message: str, *, operation: str = "", key: str = "") -> None:
        self.operation = operation
        self.key = key
        super().__init__(message)


class TokenConflictError(TokenStoreError):
    """:meth:`RedisTokenStore.save` refused: the stored pair is no longer the one this store read.

    Another process saved a newer pair since this store last loaded (or
    saved) it, typically because this process held the refresh lock past its
    timeout. Nothing was written. Load the store again and use what it holds.
    """


@contextlib.contextmanager
def _redis_errors(operation: str, key: str) -> Iterator[None]:
    """Turn redis-py's errors into :class:`RedisUnavailableError`."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise RedisUnavailableError(
            f"Redis is unavailable, cannot {operation} (key {key!r}): {exc}",
            operation=operation,
            key=key,
        ) from exc
    except redis.exceptions.RedisError as exc:
        raise RedisUnavailableError(
            f"Redis refused to {operation} (key {key!r}): {type(exc).__name__}: {exc}",
            operation=operation,
            key=key,
        ) from exc


# -- the rate limiter ---------------------------------------------------------------

# GCRA with no burst: KEYS[1] holds the next free turn, in microseconds of the
# Redis server's clock. A caller's turn is that time or now, whichever is
# later, and the next free turn moves one interval past it. The interval is
# (window + margin) / ⌊R⌋, so any ⌊R⌋ + 1 consecutive turns span at least the
# window plus the margin: no rolling window holds more than ⌊R⌋ of them. The
# turn is recorded at once, so the next caller queues behind it: everybody
# sleeps exactly once, nobody polls, callers are served in the order they
# reached Redis.
_RESERVE_SCRIPT: Final = """
-- KEYS[1]: the next free turn (microseconds of the server's clock)
-- ARGV[1]: the interval between two turns, in microseconds
-- Returns the microseconds the caller must wait before sending (0: send now).

-- TIME is not deterministic: Redis < 5 must replicate effects, not the script.
if redis.replicate_commands then redis.replicate_commands() end

local interval = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local turn = tonumber(redis.call('GET', KEYS[1]) or '0')
if turn < now then
  turn = now  -- idle: the caller goes at once
end
local following = turn + interval

-- '%.0f': Lua turns large numbers into strings as '1.7e+15', losing digits.
-- Once the next free turn has passed, the key says nothing: let it expire then.
redis.call('SET', KEYS[1], string.format('%.0f', following),
           'PX', math.ceil((following - now) / 1000) + 1)
return turn - now
"""


# A caller that wakes up later than this share of the margin after its turn gives
# the turn up and takes a new one, at most this many times per request (each
# turn given up is capacity lost for every process: a busy event loop must not
# waste many).
_LATE_SHARE_OF_MARGIN = 0.5
_MAX_TURNS_GIVEN_UP = 1


class RedisRateLimiter:
    """At most ``rate`` requests in any rolling window, across every process using ``key``.

    The same guarantee and margin as :class:`~kommo_talks.SlidingWindowRateLimiter`
    (a rate R ≥ 1 allows ⌊R⌋ requests per rolling second, R < 1 one request
    every 1/R s; request *n* + ⌊R⌋ goes at least a window + ``margin`` after
    request *n*), decided atomically by a Lua script on the Redis server with
    the server's clock (``TIME``), so client clocks do not matter. Each
    :meth:`acquire` is one round trip that reserves the caller's turn and
    returns how long to sleep until it: no polling, first come first served.
    The key expires as soon as the limiter is idle.

    Turns are evenly paced, (window + margin) / ⌊R⌋ apart (7/s: one every
    146 ms), where the in-process limiter lets the first ⌊R⌋ requests after a
    pause go at once. The steady rate is the same; the reason is lateness:
    a burst of ⌊R⌋ sends from several processes at one instant queues (in
    the clients, on the network, at the server), and the last of the burst
    can then reach Kommo more than the margin later than its turn, less than
    a window before the next burst. Measured with 4 processes against a fake
    enforcing an exact 1 s window: 17-37 429s in 300 sends at 50/s with
    bursts, none (at most a stray one) with paced turns.

    Args:
        redis: a ``redis.asyncio.Redis`` client (not closed by this class).
        key: the Redis key of the limit; every process sharing one Kommo
            integration must use the same key and rate.
        rate: requests per second (Kommo: 7).
        margin: seconds added to the window, as in the in-process limiter.

    A task cancelled while it sleeps leaves its turn unused: the limit is
    then not reached, never exceeded. The server's clock is a wall clock: if
    it steps back, waits grow by the step until the key expires.

    Raises:
        TypeError, ValueError: ``rate`` is not a positive number, or
            ``margin`` is negative.
    """

    def __init__(
        self,
        redis: Redis,
        key: str,
        rate: float,
        *,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        size, window = window_for_rate(rate)
        if not math.isfinite(margin) or margin < 0:
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        self.key = key
        """The Redis key of the shared limit."""
        self.rate = float(rate)
        """Requests per second."""
        self._redis = redis
        # Rounded up: ⌊R⌋ intervals must never add up to less than the padded window.
        self._interval_us = -(-round((window + margin) * 1_000_000) // size)
        self._script = redis.register_script(_RESERVE_SCRIPT)
        self._late_limit = margin * _LATE_SHARE_OF_MARGIN if margin > 0 else math.inf
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.turns_given_up = 0
        """Turns this limiter's callers woke up too late to use (see :meth:`acquire`)."""

    def __repr__(self) -> str:
        return f"RedisRateLimiter(key={self.key!r}, rate={self.rate:g})"

    def _reserving(self) -> asyncio.Lock:
        # One reservation in flight per limiter and event loop: callers of this
        # process reach Redis in order, over one connection, instead of opening
        # a connection each when a batch starts.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    @property
    def interval(self) -> float:
        """Seconds between two turns: (window + margin) / ⌊R⌋."""
        return self._interval_us / 1_000_000

    async def acquire(self) -> None:
        """Wait for this caller's turn in the shared limit.

        A caller that wakes up more than half the margin after its turn (its
        process was not scheduled, or its event loop was busy) does not send
        late, which could put its request less than a window before the turn
        ⌊R⌋ ahead: it gives the turn up (unused, so the limit is only
        undershot) and queues again, once; it uses the second turn it takes.
        The in-process limiter gets the same effect by counting a waiter from
        the time it actually woke up; a reserved turn cannot move once later
        ones are handed out. With ``margin=0`` turns are never given up.

        Raises:
            RedisUnavailableError: Redis could not be asked (nothing may be sent).
        """
        loop = asyncio.get_running_loop()
        for attempt in range(_MAX_TURNS_GIVEN_UP + 1):
            delay = await self.reserve()
            if delay <= 0:
                return
            due = loop.time() + delay
            await asyncio.sleep(delay)
            if loop.time() - due <= self._late_limit or attempt == _MAX_TURNS_GIVEN_UP:
                return
            # Woke too late to use the turn safely: give it up, queue again.
            self.turns_given_up += 1

    async def reserve(self) -> float:
        """Take the next turn; return the seconds until it.

        The turn is taken whether or not the caller waits for it: use
        :meth:`acquire` unless you schedule the send yourself.

        Raises:
            RedisUnavailableError: Redis could not be asked.
        """
        async with self._reserving():
            with _redis_errors("reserve a request slot", self.key):
                wait_us = await self._script(keys=[self.key], args=[self._interval_us])
        return max(0, int(wait_us)) / 1_000_000


# -- the token store ----------------------------------------------------------------

# Compare-and-set of the stored pair: replace it only if it still holds what
# the caller last read.
_SAVE_SCRIPT: Final = """
-- KEYS[1]: the token pair (JSON, TokenSet.to_json)
-- ARGV[1]: the new pair (JSON)
-- ARGV[2]: what the key must hold: 'any', 'empty', or 'token' (a pair with
--          the refresh token ARGV[3])
-- Returns 1 when stored, 0 when the key holds something else (nothing written).
local current = redis.call('GET', KEYS[1])
if current and ARGV[2] ~= 'any' then
  if ARGV[2] == 'empty' then
    return 0
  end
  local ok, stored = pcall(cjson.decode, current)
  if not ok or type(stored) ~= 'table' or stored['refresh_token'] ~= ARGV[3] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class _Seen(enum.Enum):
    UNKNOWN = "unknown"


# The store has not read its key yet (or read something corrupt): see RedisTokenStore.save.
_UNKNOWN: Final = _Seen.UNKNOWN

# Seconds between two tries of a refresh lock that another process holds.
# Refreshes are rare (about once a day per account): 50 ms costs nothing.
_LOCK_POLL_INTERVAL = 0.05


class RedisTokenStore:
    """A :class:`~kommo_talks.TokenStore` in Redis, shared by every process on every host.

    The pair is kept under ``key`` as the JSON object of
    :meth:`TokenSet.to_json <kommo_talks.TokenSet.to_json>` (so it can be
    seeded with ``redis-cli SET``). ``OAuth2`` serialises refreshes across
    processes with :meth:`refresh_lock`, a Redis lock at ``<key>:lock``.

    :meth:`save` is a compare-and-set run on the server: it replaces the
    stored pair only if the key still holds the pair this store last loaded
    or saved. ``OAuth2`` loads under :meth:`refresh_lock` before it refreshes,
    so that pair is the one whose refresh token was just exchanged, and a
    process whose lock expired while its refresh was in flight can never
    overwrite the newer pair of the process that took the lock over: its save
    raises :class:`TokenConflictError`, and its next call re-loads. A save
    into an empty key always succeeds. A save with no load before it (ever,
    or since the refresh lock was taken) replaces whatever the key holds:
    that is ``OAuth2.exchange_code``, which saves the first pair under the
    lock without reading, and is how a revoked or corrupt pair is replaced.

    Args:
        redis: a ``redis.asyncio.Redis`` client (not closed by this class).
        key: the Redis key of the pair.
        lock_timeout: seconds the refresh lock lives unless renewed. The
            holder renews it every ``lock_timeout / 3`` s while it holds it,
            so it only expires if the holder stalls (a frozen or cut-off
            process). Set it above the token endpoint's timeout times its
            attempts, plus the waits between them: with the client's default
            ``timeout`` and ``RetryPolicy``, about 160-270 s (the default 60
            is below that).

    Remaining risk: a holder that stalls longer than ``lock_timeout`` with its
    refresh request already sent lets a second process exchange the same
    refresh token. Only one resulting pair is ever stored (the compare-and-set),
    but whether Kommo accepts the second exchange, and keeps the first
    pair's tokens alive, is Kommo's rule: under strict rotation one of the two
    processes gets a ``TokenRefreshError``.

    Raises (every method):
        RedisUnavailableError: Redis could not be reached or refused a command.
    """

    def __init__(self, redis: Redis, key: str, *, lock_timeout: float = 60.0) -> None:
        if not math.isfinite(lock_timeout) or lock_timeout <= 0:
            raise ValueError(
                f"lock_timeout must be a positive number of seconds, got {lock_timeout!r}"
            )
        self.key = key
        """The Redis key of the pair."""
        self.lock_key = f"{key}:lock"
        """The Redis key of the refresh lock."""
        self.lock_timeout = float(lock_timeout)
        """Seconds the refresh lock lives unless renewed."""
        self._redis = redis
        self._save_script = redis.register_script(_SAVE_SCRIPT)
        # The refresh token of the pair last read or written, None for an empty
        # key, _UNKNOWN when there is nothing to compare with: before the first
        # read, after a corrupt one, and from the moment the refresh lock is taken.
        self._seen: str | _Seen | None = _UNKNOWN
        self._task_lock = LoopLock()  # a store may outlive an asyncio.run()

    def __repr__(self) -> str:
        return f"RedisTokenStore(key={self.key!r})"

    async def load(self) -> TokenSet | None:
        """Return the stored pair, or ``None`` if the key holds none.

        Raises:
            TokenStoreError: the key holds something that is not a token pair
                (whatever it holds); neither the message nor an exception
                chained to it holds the value.
            RedisUnavailableError: Redis could not be reached.
        """
        raw = await self._get()
        if raw is None:
            self._seen = None
            return None
        self._seen = _UNKNOWN  # until the value proves to be a pair
        tokens = parse_token_record(raw, self._corrupt)
        self._seen = tokens.refresh_token
        return tokens

    async def _get(self) -> bytes | str | None:
        try:
            with _redis_errors("load the token pair", self.key):
                raw: bytes | str | None = await self._redis.get(self.key)
        except UnicodeDecodeError as exc:
            # A client with decode_responses=True decodes the value itself, and its
            # error holds the bytes (tokens included): raised outside, unchained.
            problem = f"not valid JSON (not UTF-8 text: byte {exc.start} is wrong)"
        else:
            return raw
        self._seen = _UNKNOWN
        raise self._corrupt(problem)

    async def save(self, tokens: TokenSet) -> None:
        """Store ``tokens`` if the key still holds the pair this store last read or wrote.

        With nothing read since the refresh lock was taken (or ever), it
        replaces whatever the key holds (see the class docstring).

        Raises:
            TokenConflictError: another process stored a different pair since;
                nothing was written. Load again.
            RedisUnavailableError: Redis could not be reached; nothing is known
                to be written.
        """
        seen = self._seen
        if seen is _UNKNOWN:
            expect, token = "any", ""
        elif seen is None:
            expect, token = "empty", ""
        else:
            expect, token = "token", seen
        document = json.dumps(tokens.to_json(), separators=(",", ":"))
        with _redis_errors("save the token pair", self.key):
            stored = await self._save_script(keys=[self.key], args=[document, expect, token])
        if not stored:
            raise TokenConflictError(
                f"token pair in Redis key {self.key!r} was replaced by another process "
                "since this one read it; nothing was saved: load it again"
            )
        self._seen = tokens.refresh_token

    @contextlib.asynccontextmanager
    async def refresh_lock(self) -> AsyncIterator[None]:
        """Hold the refresh lock that every process using this key respects.

        Tasks of this process queue on an ``asyncio.Lock`` first, so only one
        of them at a time waits for the Redis lock (``<key>:lock``, redis-py's
        :class:`~redis.asyncio.lock.Lock`, tried every 50 ms). While held, a
        background task renews it every ``lock_timeout / 3`` seconds; leaving
        the block (by any exception or cancellation too) releases it. If the
        lock expired meanwhile, that is logged as a warning on the
        ``kommo_talks.redis`` logger, and :meth:`save` protects the pair.
        Load before you save under it (see :meth:`save`). Not reentrant.

        Raises:
            RedisUnavailableError: Redis could not be reached to take the lock.
        """
        task_lock = self._task_lock.get()
        async with task_lock:
            lock = Lock(
                self._redis,
                self.lock_key,
                timeout=self.lock_timeout,
                sleep=_LOCK_POLL_INTERVAL,
                thread_local=False,
            )
            token = uuid.uuid4().hex
            try:
                with _redis_errors("take the refresh lock", self.lock_key):
                    await lock.acquire(token=token)
            except asyncio.CancelledError:
                # The SET may have reached Redis before the cancellation: give it back
                # rather than leave every process waiting for the timeout.
                with contextlib.suppress(redis.exceptions.RedisError):
                    await lock.do_release(token.encode())
                raise
            # What a holder saves is compared with what it loads under this hold
            # (OAuth2's refresh), or with nothing if it saves unread (exchange_code).
            self._seen = _UNKNOWN
            renewer = asyncio.create_task(self._keep_renewing(lock))
            try:
                yield
            finally:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
                await self._release(lock)

    async def _keep_renewing(self, lock: Lock) -> None:
        interval = self.lock_timeout / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await lock.reacquire()
            except redis.exceptions.LockNotOwnedError:
                logger.warning(
                    "refresh lock %r expired before it was renewed (this process stalled "
                    "for over %g s?); another process may refresh too: the "
                    "compare-and-set save keeps the newer pair",
                    self.lock_key,
                    self.lock_timeout,
                )
                return
            except redis.exceptions.RedisError as exc:
                # Keep trying: Redis may be back before the lock expires.
                logger.warning("cannot renew refresh lock %r: %s", self.lock_key, exc)

    async def _release(self, lock: Lock) -> None:
        try:
            await lock.release()
        except redis.exceptions.LockNotOwnedError:
            logger.warning("refresh lock %r had expired before it was released", self.lock_key)
        except redis.exceptions.RedisError as exc:
            # Not raised: the pair is saved (or not) already, and the lock frees
            # itself after lock_timeout.
            logger.warning(
                "cannot release refresh lock %r (it expires in at most %g s): %s",
                self.lock_key,
                self.lock_timeout,
                exc,
            )

    def _corrupt(self, problem: str) -> TokenStoreError:
        return TokenStoreError(
            f"Redis key {self.key!r} does not hold a token pair: {problem}. Fix or delete "
            "it, or authorize again (OAuth2.exchange_code replaces it)"
        )
