"""kommo_talks.redis against a real redis-server: the shared limiter and the token store.

Cross-process behaviour (OS processes sharing a limiter, one refresh among
many processes) is in ``test_multiprocess.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_server import RedisServer, running_redis_server

from kommo_talks import KommoClient, LongLivedToken, OAuth2, RetryPolicy
from kommo_talks.errors import KommoError, TokenRefreshError, TokenStoreError
from kommo_talks.ratelimit import DEFAULT_MARGIN, RateLimiter
from kommo_talks.redis import (
    RedisRateLimiter,
    RedisTokenStore,
    RedisUnavailableError,
    TokenConflictError,
)
from kommo_talks.stores import TokenStore
from kommo_talks.testing import FakeKommo, busiest_window
from kommo_talks.tokens import TokenSet

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
OLD = TokenSet("ACCESS-1-secret", "REFRESH-1-secret", NOW + timedelta(days=1))
NEW = TokenSet("ACCESS-2-secret", "REFRESH-2-secret", NOW + timedelta(days=2))
OTHER = TokenSet("ACCESS-3-secret", "REFRESH-3-secret", NOW + timedelta(days=3))
# Upper bound for waits that end as soon as the awaited thing happens.
BOUND = 10.0
# Scheduling slack of a turn measured on the client (2 shared CI cores).
SLACK = 0.05


def must(value: bytes | str | None) -> bytes | str:
    """A value read from Redis that the test stored before (``None`` fails the test)."""
    assert value is not None
    return value


@pytest.fixture
async def r2(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A second connection, as another process would have."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
    yield client
    await client.aclose()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, which it may stop or pause."""
    with running_redis_server(tmp_path) as server:
        yield server


def fast_failing_client(server: RedisServer) -> redis.asyncio.Redis:
    # redis-py retries a lost connection 10 times by default (a few seconds):
    # the tests want the error at once.
    return redis.asyncio.Redis(
        host="127.0.0.1",
        port=server.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )


# -- packaging ----------------------------------------------------------------------


def test_importing_kommo_talks_does_not_import_redis() -> None:
    code = "import sys, kommo_talks; assert 'redis' not in sys.modules, 'redis was imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_without_redis_py_the_import_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "try:\n    import kommo_talks.redis\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'kommo-talks[redis]'" in result.stdout


def test_the_redis_pieces_satisfy_the_protocols(r: redis.asyncio.Redis) -> None:
    assert isinstance(RedisRateLimiter(r, "k", 7), RateLimiter)
    assert isinstance(RedisTokenStore(r, "k"), TokenStore)
    assert issubclass(RedisUnavailableError, KommoError)
    assert issubclass(TokenConflictError, TokenStoreError)


# -- the rate limiter: turns ----------------------------------------------------------


def expected_turns(count: int, interval: float) -> list[float]:
    """The wait of each of ``count`` callers arriving at once: one ``interval`` apart."""
    return [k * interval for k in range(count)]


async def reserve_and_read_turns(
    limiter: RedisRateLimiter, r: redis.asyncio.Redis, count: int
) -> tuple[list[float], list[int]]:
    """Reserve ``count`` turns back to back.

    Returns each turn as seen by the caller (seconds from the first call: when
    the call was made plus the wait it was told), and on the server's clock (µs).
    """
    seen, turns = [], []
    started = time.monotonic()
    for _ in range(count):
        called = time.monotonic() - started
        seen.append(called + await limiter.reserve())
        following = int(must(await r.get(limiter.key)))  # the next free turn, in µs of Redis' TIME
        turns.append(following - round(limiter.interval * 1_000_000))
    return seen, turns


def check_no_window_exceeded(turns: list[int], per_window: int, window: float) -> None:
    """Any ``per_window`` + 1 consecutive turns span at least the window plus the margin."""
    for first, last in zip(turns, turns[per_window:], strict=False):
        assert last - first >= round((window + DEFAULT_MARGIN) * 1_000_000)


async def test_turns_are_paced_so_no_window_holds_more_than_the_rate(
    r: redis.asyncio.Redis,
) -> None:
    limiter = RedisRateLimiter(r, "rate", 7)
    assert limiter.interval == pytest.approx((1 + DEFAULT_MARGIN) / 7, abs=1e-6)
    seen, turns = await reserve_and_read_turns(limiter, r, 21)
    assert seen == pytest.approx(expected_turns(21, limiter.interval), abs=SLACK)
    # Callers queued back to back get turns exactly one interval apart, in order.
    assert {b - a for a, b in itertools.pairwise(turns)} == {round(limiter.interval * 1e6)}
    check_no_window_exceeded(turns, 7, 1.0)


@pytest.mark.parametrize(
    ("rate", "per_window", "window"),
    [(7.9, 7, 1.0), (1, 1, 1.0), (0.5, 1, 2.0), (2.5, 2, 1.0), (50, 50, 1.0)],
)
async def test_fractional_rates_follow_the_in_process_rule(
    r: redis.asyncio.Redis, rate: float, per_window: int, window: float
) -> None:
    limiter = RedisRateLimiter(r, "rate", rate)
    assert limiter.interval == pytest.approx((window + DEFAULT_MARGIN) / per_window, abs=1e-6)
    count = 2 * per_window + 1
    seen, turns = await reserve_and_read_turns(limiter, r, count)
    assert seen == pytest.approx(expected_turns(count, limiter.interval), abs=SLACK)
    check_no_window_exceeded(turns, per_window, window)


async def test_the_margin_is_configurable(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 2, margin=0.25)
    waits = [await limiter.reserve() for _ in range(3)]
    assert waits[2] == pytest.approx(1.25, abs=SLACK)


async def test_limiters_on_one_key_share_the_limit(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    first, second = RedisRateLimiter(r, "shared", 3), RedisRateLimiter(r2, "shared", 3)
    other = RedisRateLimiter(r2, "other", 3)
    waits = [await (first if k % 2 else second).reserve() for k in range(6)]
    assert waits == pytest.approx(expected_turns(6, first.interval), abs=SLACK)
    assert await other.reserve() == 0  # another key, another limit


async def test_callers_of_one_process_are_served_in_order(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 50)
    waits = await asyncio.gather(*(limiter.reserve() for _ in range(20)))
    assert list(waits) == sorted(waits)
    assert waits == pytest.approx(expected_turns(20, limiter.interval), abs=SLACK)


async def test_idle_key_expires_once_its_next_turn_has_passed(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 2)  # a turn every (1 s + margin) / 2
    await limiter.reserve()
    assert 0 < await r.pttl("rate") <= math.ceil((1 + DEFAULT_MARGIN) / 2 * 1000) + 1
    for _ in range(4):
        await limiter.reserve()
    # Five turns taken: the key lives until the sixth, five intervals ahead.
    interval_ms = (1 + DEFAULT_MARGIN) / 2 * 1000
    assert 5 * interval_ms - 150 < await r.pttl("rate") <= math.ceil(5 * interval_ms) + 1


async def test_turns_use_the_servers_clock_not_the_callers(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 1)
    await limiter.reserve()
    seconds, micros = await r.time()
    server_now = seconds * 1_000_000 + micros
    following = int(must(await r.get("rate")))  # the next free turn, on the server's clock
    assert 0 < following - server_now <= round((1 + DEFAULT_MARGIN) * 1_000_000)


async def test_late_waker_gives_its_turn_up_once(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 20)  # a turn every 50.5 ms
    await limiter.reserve()  # turn 0 is someone else's
    loop = asyncio.get_running_loop()
    # The event loop is blocked (say, by CPU-heavy work) across the next turn.
    loop.call_later(0.02, time.sleep, 0.06)
    started = loop.time()
    await limiter.acquire()
    assert limiter.turns_given_up == 1
    # Its own turn (~50 ms) went by while it could not run; it took the next free one.
    assert loop.time() - started >= 2 * limiter.interval - SLACK
    # Blocked again on the second turn: it goes anyway (at most one turn lost per call).
    await r.delete("rate")
    await limiter.reserve()
    loop.call_later(0.02, time.sleep, 0.06)  # over its first turn (~50 ms)
    loop.call_later(0.085, time.sleep, 0.06)  # over its second turn (~101 ms)
    await limiter.acquire()
    assert limiter.turns_given_up == 2


async def test_with_no_margin_a_late_waker_keeps_its_turn(r: redis.asyncio.Redis) -> None:
    limiter = RedisRateLimiter(r, "rate", 20, margin=0)
    await limiter.reserve()
    asyncio.get_running_loop().call_later(0.02, time.sleep, 0.06)
    await limiter.acquire()
    assert limiter.turns_given_up == 0


def test_limiter_rejects_bad_arguments(r: redis.asyncio.Redis) -> None:
    with pytest.raises(ValueError, match="positive"):
        RedisRateLimiter(r, "k", 0)
    with pytest.raises(TypeError):
        RedisRateLimiter(r, "k", True)
    with pytest.raises(ValueError, match="margin"):
        RedisRateLimiter(r, "k", 7, margin=-0.1)
    assert repr(RedisRateLimiter(r, "k", 7)) == "RedisRateLimiter(key='k', rate=7)"


# -- the rate limiter: real requests ------------------------------------------------------


async def test_many_tasks_of_many_clients_never_exceed_the_limit(
    redis_server: RedisServer,
) -> None:
    rate, per_client, clients = 7, 7, 3
    async with FakeKommo(rate_limit=rate, rate_window=0.95) as fake:
        connections = [
            redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port) for _ in range(clients)
        ]
        await connections[0].delete("kommo:rate")
        kommos = [
            KommoClient(
                fake.url,
                auth=LongLivedToken(fake.token),
                retry=RetryPolicy(max_attempts=1),
                rate_limit=RedisRateLimiter(connection, "kommo:rate", rate),
            )
            for connection in connections
        ]
        try:
            started = time.monotonic()
            async with asyncio.timeout(BOUND):
                await asyncio.gather(
                    *(
                        kommo.close_talk(c * per_client + k + 1, force=True)
                        for c, kommo in enumerate(kommos)
                        for k in range(per_client)
                    )
                )
            elapsed = time.monotonic() - started
        finally:
            for kommo in kommos:
                await kommo.close()
            for connection in connections:
                await connection.aclose()
        arrivals = [request.at for request in fake.requests]
    assert fake.stats.throttled == 0
    assert len(arrivals) == rate * clients
    # Measured at the server: no rolling window held more than the limit (0.95 s, the
    # fake's window: 50 ms of slack for scheduling on two shared CI cores).
    assert busiest_window(arrivals, 0.95) <= rate
    # ...and the limit is used, not wasted: 21 turns at 7/s, 20 intervals.
    ideal = 20 * (1 + DEFAULT_MARGIN) / 7
    assert ideal - SLACK <= elapsed <= ideal + 0.5


# -- the rate limiter: Redis down -------------------------------------------------------


async def test_limiter_raises_naming_redis_when_it_is_down(own_server: RedisServer) -> None:
    client = fast_failing_client(own_server)
    try:
        limiter = RedisRateLimiter(client, "rate", 7)
        await limiter.acquire()
        own_server.stop()
        with pytest.raises(RedisUnavailableError, match="Redis is unavailable") as caught:
            await limiter.acquire()
        assert caught.value.key == "rate"
        assert caught.value.operation == "reserve a request slot"
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        copy = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 (a process pool does this)
        assert (str(copy), copy.key, copy.operation) == (
            str(caught.value),
            "rate",
            "reserve a request slot",
        )
    finally:
        await client.aclose()


async def test_client_sends_nothing_while_redis_is_down(own_server: RedisServer) -> None:
    client = fast_failing_client(own_server)
    try:
        async with FakeKommo() as fake:
            limiter = RedisRateLimiter(client, "rate", 7)
            async with KommoClient(
                fake.url, auth=LongLivedToken(fake.token), rate_limit=limiter
            ) as kommo:
                await kommo.close_talk(1, force=True)
                own_server.stop()
                with pytest.raises(RedisUnavailableError):
                    await kommo.close_talk(2, force=True)
            assert fake.stats.requests == 1  # no fall back to an unlimited send
            assert fake.is_open(2)
    finally:
        await client.aclose()


# -- the token store -----------------------------------------------------------------------


async def test_store_round_trips_a_pair_as_readable_json(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    assert await store.load() is None
    await store.save(OLD)
    assert await store.load() == OLD
    assert await RedisTokenStore(r, "tokens").load() == OLD
    assert json.loads(must(await r.get("tokens"))) == OLD.to_json()
    assert repr(store) == "RedisTokenStore(key='tokens')"


async def test_store_reads_a_pair_seeded_by_hand(r: redis.asyncio.Redis) -> None:
    await r.set("tokens", json.dumps(OLD.to_json(), indent=2))
    assert await RedisTokenStore(r, "tokens").load() == OLD


async def test_store_works_with_decoded_responses(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    try:
        await client.delete("tokens")
        store = RedisTokenStore(client, "tokens")
        await store.save(OLD)
        assert await store.load() == OLD
        await store.save(NEW)
        async with store.refresh_lock():
            assert await store.load() == NEW
    finally:
        await client.aclose()


async def test_corrupt_value_raises_without_quoting_it(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    for value in (
        b"{not json REFRESH-1-secret",
        b"\xff\xfe",
        b'{"access_token": "ACCESS-1-secret"}',
    ):
        await r.set("tokens", value)
        with pytest.raises(TokenStoreError, match="'tokens' does not hold a token pair") as caught:
            await store.load()
        assert "secret" not in str(caught.value)
        assert caught.value.__context__ is None  # nothing chained holds the value


async def test_save_into_an_empty_key_always_succeeds(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    await store.save(OLD)  # never read
    await r.delete("tokens")
    await store.save(NEW)  # read (and written) before, now empty
    assert await store.load() == NEW


async def test_save_refuses_when_another_process_saved_since(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    mine, theirs = RedisTokenStore(r, "tokens"), RedisTokenStore(r2, "tokens")
    await mine.save(OLD)
    assert await mine.load() == OLD
    assert await theirs.load() == OLD
    await theirs.save(OTHER)  # they exchanged OLD's refresh token first
    with pytest.raises(TokenConflictError, match="replaced by another process") as caught:
        await mine.save(NEW)
    assert "secret" not in str(caught.value)
    assert await theirs.load() == OTHER  # nothing overwritten
    # Having re-loaded, this store saves on top of what it read.
    assert await mine.load() == OTHER
    await mine.save(NEW)
    assert await theirs.load() == NEW


async def test_save_after_reading_an_empty_key_refuses_a_filled_one(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    mine, theirs = RedisTokenStore(r, "tokens"), RedisTokenStore(r2, "tokens")
    assert await mine.load() is None
    await theirs.save(OTHER)
    with pytest.raises(TokenConflictError):
        await mine.save(NEW)
    assert await theirs.load() == OTHER


async def test_save_refuses_when_the_key_was_corrupted_since(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    await store.save(OLD)
    await r.set("tokens", b"garbage")
    with pytest.raises(TokenConflictError):
        await store.save(NEW)
    assert await r.get("tokens") == b"garbage"


async def test_a_store_that_has_not_read_the_key_replaces_anything(r: redis.asyncio.Redis) -> None:
    # How OAuth2.exchange_code recovers from a corrupt or revoked pair.
    await r.set("tokens", b"garbage")
    await RedisTokenStore(r, "tokens").save(NEW)
    assert await RedisTokenStore(r, "tokens").load() == NEW
    # A store that read something corrupt is back to "not read".
    store = RedisTokenStore(r, "tokens")
    await store.load()
    await r.set("tokens", b"garbage")
    with pytest.raises(TokenStoreError):
        await store.load()
    await store.save(OLD)
    assert await store.load() == OLD


async def test_save_under_the_lock_compares_with_what_was_loaded_under_it(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    mine, theirs = RedisTokenStore(r, "tokens"), RedisTokenStore(r2, "tokens")
    await mine.save(OLD)
    await theirs.save(OTHER)  # this store has not seen it
    async with mine.refresh_lock():
        assert await mine.load() == OTHER
        await mine.save(NEW)  # compared with OTHER, loaded under this hold
    assert await theirs.load() == NEW
    async with mine.refresh_lock():
        # Saved unread under the lock (as OAuth2.exchange_code does): replaces anything.
        await r.set("tokens", b"garbage")
        await mine.save(OLD)
    assert await theirs.load() == OLD


async def test_exchange_code_replaces_the_pair_whatever_the_store_saw(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    async with FakeKommo() as fake:
        store = RedisTokenStore(r, "tokens")
        await store.save(OLD)
        await RedisTokenStore(r2, "tokens").save(OTHER)  # e.g. a pair revoked since
        tokens = await OAuth2.exchange_code(
            fake.url,
            fake.oauth.issue_code(),
            client_id=fake.oauth.client_id,
            client_secret=fake.oauth.client_secret,
            redirect_uri=fake.oauth.redirect_uri,
            store=store,
        )
    assert await RedisTokenStore(r2, "tokens").load() == tokens


def test_store_rejects_a_bad_lock_timeout(r: redis.asyncio.Redis) -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lock_timeout"):
            RedisTokenStore(r, "tokens", lock_timeout=bad)


# -- the refresh lock ------------------------------------------------------------------------


async def test_refresh_lock_excludes_other_holders(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    mine, theirs = RedisTokenStore(r, "tokens"), RedisTokenStore(r2, "tokens")
    events: list[str] = []
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def hold() -> None:
        async with mine.refresh_lock():
            events.append("mine in")
            entered.set()
            await leave.wait()
            events.append("mine out")

    async def contend() -> None:
        await entered.wait()
        async with theirs.refresh_lock():
            events.append("theirs in")

    async with asyncio.timeout(BOUND):
        holder = asyncio.create_task(hold())
        contender = asyncio.create_task(contend())
        await entered.wait()
        assert await r.exists("tokens:lock")
        await asyncio.sleep(0.2)  # the contender polls meanwhile
        assert events == ["mine in"]
        leave.set()
        await asyncio.gather(holder, contender)
    assert events == ["mine in", "mine out", "theirs in"]
    assert not await r.exists("tokens:lock")


async def test_refresh_lock_serialises_tasks_of_one_process(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    inside = 0
    most = 0

    async def hold() -> None:
        nonlocal inside, most
        async with store.refresh_lock():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(hold() for _ in range(5)))
    assert most == 1


async def test_refresh_lock_is_renewed_while_held(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    lock_timeout = 0.3  # renewed every 0.1 s
    mine = RedisTokenStore(r, "tokens", lock_timeout=lock_timeout)
    theirs = RedisTokenStore(r2, "tokens", lock_timeout=lock_timeout)
    renewals = 0
    contender_in = asyncio.Event()

    async def contend() -> None:
        async with theirs.refresh_lock():
            contender_in.set()

    async with asyncio.timeout(BOUND):
        async with mine.refresh_lock():
            token = await r.get("tokens:lock")
            contender = asyncio.create_task(contend())
            # Hold for over 3 lock timeouts, measured by renewals seen, not by sleeping:
            # each renewal puts the time to live back up to lock_timeout.
            last = await r.pttl("tokens:lock")
            while renewals < 10:
                ttl = await r.pttl("tokens:lock")
                assert ttl > 0, "the lock expired while held"
                assert await r.get("tokens:lock") == token
                if ttl > last:
                    renewals += 1
                last = ttl
                await asyncio.sleep(0.005)
            assert not contender_in.is_set()
        await asyncio.wait_for(contender_in.wait(), BOUND)
        await contender


async def test_refresh_lock_is_released_on_error_and_cancellation(r: redis.asyncio.Redis) -> None:
    store = RedisTokenStore(r, "tokens")
    with pytest.raises(ZeroDivisionError):
        async with store.refresh_lock():
            1 / 0  # noqa: B018
    assert not await r.exists("tokens:lock")

    entered = asyncio.Event()

    async def hold_forever() -> None:
        async with store.refresh_lock():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold_forever())
    await asyncio.wait_for(entered.wait(), BOUND)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await r.exists("tokens:lock")
    async with asyncio.timeout(BOUND), store.refresh_lock():
        pass


async def test_cancelled_waiter_takes_no_lock(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis
) -> None:
    mine, theirs = RedisTokenStore(r, "tokens"), RedisTokenStore(r2, "tokens")
    async with mine.refresh_lock():
        waiter = asyncio.create_task(theirs.refresh_lock().__aenter__())
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert not await r.exists("tokens:lock")


async def test_holder_whose_lock_expired_cannot_overwrite_the_newer_pair(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The stalled-holder case: the lock is lost, the compare-and-set still protects."""
    lock_timeout = 0.2
    stalled = RedisTokenStore(r, "tokens", lock_timeout=lock_timeout)
    other = RedisTokenStore(r2, "tokens", lock_timeout=lock_timeout)
    await stalled.save(OLD)
    caplog.set_level(logging.WARNING, logger="kommo_talks.redis")
    async with asyncio.timeout(BOUND):
        async with stalled.refresh_lock():
            assert await stalled.load() == OLD
            await r.delete("tokens:lock")  # as if it expired during a stall
            async with other.refresh_lock():  # another process takes over
                assert await other.load() == OLD
                await other.save(OTHER)
            with pytest.raises(TokenConflictError):
                await stalled.save(NEW)  # the stalled refresh's answer arrives
    assert await other.load() == OTHER
    assert "expired before it was released" in caplog.text


# -- the token store: Redis down -----------------------------------------------------------


async def test_store_raises_naming_redis_when_it_is_down(own_server: RedisServer) -> None:
    client = fast_failing_client(own_server)
    try:
        store = RedisTokenStore(client, "tokens")
        await store.save(OLD)
        assert await store.load() == OLD
        own_server.stop()
        with pytest.raises(RedisUnavailableError, match="cannot load the token pair"):
            await store.load()
        with pytest.raises(RedisUnavailableError, match="cannot save the token pair"):
            await store.save(NEW)
        with pytest.raises(RedisUnavailableError, match="cannot take the refresh lock"):
            async with store.refresh_lock():
                pass
    finally:
        await client.aclose()


async def test_paused_redis_times_out_and_keeps_the_stored_pair(own_server: RedisServer) -> None:
    """Redis unreachable mid-run (paused): the documented error, then nothing lost."""
    assert own_server.process is not None
    client = fast_failing_client(own_server)
    try:
        store = RedisTokenStore(client, "tokens")
        await store.save(OLD)
        assert await store.load() == OLD
        os.kill(own_server.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisUnavailableError) as caught:
                await store.save(NEW)
            assert isinstance(caught.value.__cause__, redis.exceptions.TimeoutError)
        finally:
            os.kill(own_server.process.pid, signal.SIGCONT)
        # Redis is back: the pair is there, and this store may still save on top of it.
        stored = await RedisTokenStore(client, "tokens").load()
        assert stored in (OLD, NEW)  # the write timed out: it may or may not have happened
        if stored == OLD:
            await store.save(NEW)
        assert await store.load() == NEW
    finally:
        await client.aclose()


# -- OAuth2 over a RedisTokenStore ---------------------------------------------------------


def oauth_for(fake: FakeKommo, store: RedisTokenStore) -> OAuth2:
    return OAuth2(fake.oauth.client_id, fake.oauth.client_secret, fake.oauth.redirect_uri, store)


def expired(tokens: TokenSet) -> TokenSet:
    return attrs.evolve(tokens, expires_at=datetime.now(UTC) - timedelta(seconds=1))


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a counter of the fake (it has no event to wait on), at most BOUND seconds."""
    async with asyncio.timeout(BOUND):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_redis_paused_during_a_refresh_loses_no_pair(own_server: RedisServer) -> None:
    """Redis unreachable between refresh and save: the documented error, no lost rotation."""
    assert own_server.process is not None
    pid = own_server.process.pid
    client = fast_failing_client(own_server)
    try:
        async with FakeKommo() as fake:
            store = RedisTokenStore(client, "tokens", lock_timeout=1.0)
            await store.save(expired(fake.oauth.issue_tokens()))
            fake.oauth.gate = asyncio.Event()
            async with KommoClient(fake.url, auth=oauth_for(fake, store), rate_limit=None) as kommo:
                call = asyncio.create_task(kommo.get_talk(1))
                await wait_until(lambda: fake.stats.by_route["token"] == 1)
                os.kill(pid, signal.SIGSTOP)  # the refresh is in flight, under the lock
                try:
                    fake.oauth.gate.set()
                    with pytest.raises(RedisUnavailableError, match="save the token pair"):
                        await asyncio.wait_for(call, BOUND)
                finally:
                    os.kill(pid, signal.SIGCONT)
                assert fake.stats.by_route["get"] == 0  # the unsaved pair was never sent
                # Redis is back: the rotated pair is stored and used, with no new refresh.
                async with asyncio.timeout(BOUND):
                    await kommo.get_talk(1)
            new = fake.oauth.issued[-1]
            assert fake.oauth.refreshes == 1
            assert fake.requests[-1].headers["Authorization"] == f"Bearer {new.access_token}"
            stored = await RedisTokenStore(client, "tokens").load()
            assert stored is not None
            assert (stored.access_token, stored.refresh_token) == (
                new.access_token,
                new.refresh_token,
            )
    finally:
        await client.aclose()


class StallingStore(RedisTokenStore):
    """A RedisTokenStore whose saves wait for :attr:`resume`: a holder stalled after Kommo
    answered its refresh."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume = asyncio.Event()
        self.stalled = asyncio.Event()

    async def save(self, tokens: TokenSet) -> None:
        self.stalled.set()
        await self.resume.wait()
        await super().save(tokens)


@pytest.mark.parametrize("stall", ["before Kommo answers", "after Kommo answers"])
async def test_holder_stalled_past_the_lock_timeout_ends_with_the_newer_pair(
    r: redis.asyncio.Redis, r2: redis.asyncio.Redis, stall: str
) -> None:
    """The remaining risk, end to end: a second exchange of one refresh token.

    Only one pair is ever stored, and the stalled process adopts it on its next
    call. Its stalled call fails: with ``TokenConflictError`` if Kommo had
    answered it (the compare-and-set refused its pair), or with
    ``TokenRefreshError`` ("revoked") if its request reached Kommo only after the
    other process's pair was used (Kommo's rotation rule).
    """
    async with FakeKommo() as fake:
        stalled_store = StallingStore(r, "tokens", lock_timeout=5.0)
        other_store = RedisTokenStore(r2, "tokens", lock_timeout=5.0)
        await other_store.save(expired(fake.oauth.issue_tokens()))
        if stall == "before Kommo answers":
            stalled_store.resume.set()
            fake.oauth.gate = asyncio.Event()
        async with (
            KommoClient(fake.url, auth=oauth_for(fake, stalled_store), rate_limit=None) as stalled,
            KommoClient(fake.url, auth=oauth_for(fake, other_store), rate_limit=None) as other,
        ):
            call = asyncio.create_task(stalled.get_talk(1))
            async with asyncio.timeout(BOUND):
                if fake.oauth.gate is not None:
                    await wait_until(lambda: fake.stats.by_route["token"] == 1)
                else:
                    await stalled_store.stalled.wait()
                await r.delete("tokens:lock")  # as if the holder had stalled past lock_timeout
                if fake.oauth.gate is not None:
                    # Only the stalled request waits at the gate: it is already in.
                    gate, fake.oauth.gate = fake.oauth.gate, None
                    await other.get_talk(2)  # exchanges the same token, uses the new pair
                    gate.set()
                    with pytest.raises(TokenRefreshError, match="revoked"):
                        await call
                else:
                    await other.get_talk(2)  # takes the lock, exchanges the same token
                    stalled_store.resume.set()
                    with pytest.raises(TokenConflictError):
                        await call
                await stalled.get_talk(3)  # re-loads and uses the other process's pair
        stored = await other_store.load()
        assert stored is not None
        assert fake.oauth.refreshes == (1 if stall == "before Kommo answers" else 2)
        assert [request.headers["Authorization"] for request in fake.requests[-2:]] == [
            f"Bearer {stored.access_token}"
        ] * 2
