"""Client-side rate limiting: the sliding window, its fairness, and how the client uses it.

The limiter is driven by fake clocks: nothing here really waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from kommo_talks import KommoClient, LongLivedToken, RateLimiter, RetryPolicy
from kommo_talks.ratelimit import DEFAULT_MARGIN, SlidingWindowRateLimiter, window_for_rate
from kommo_talks.testing import FakeKommo, Fault, busiest_window

if TYPE_CHECKING:
    from conftest import FakeClock


class ManualClock:
    """A clock that moves only when the test calls :meth:`advance`.

    ``sleep`` really blocks its caller until the clock has been advanced past
    its deadline, so tests can look at waiters mid-wait and cancel them.
    """

    def __init__(self) -> None:
        self.time = 0.0
        self.sleeps: list[float] = []
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (self.time + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        self.time += seconds
        while self._waiters and self._waiters[0][0] <= self.time:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
        await settle()


async def settle() -> None:
    """Let every runnable task run until it blocks again."""
    for _ in range(20):
        await asyncio.sleep(0)


def yielding(clock: FakeClock) -> Callable[[float], Awaitable[None]]:
    """The fake clock's sleep, plus a turn of the loop so other tasks interleave."""

    async def sleep(seconds: float) -> None:
        await clock.sleep(seconds)
        await asyncio.sleep(0)

    return sleep


async def acquire_concurrently(limiter: RateLimiter, n: int, clock: Any) -> list[float]:
    """Start ``n`` tasks that each take one slot; return the clock time of each take."""
    taken: list[float] = []

    async def take() -> None:
        await limiter.acquire()
        taken.append(clock.now())

    await asyncio.gather(*(take() for _ in range(n)))
    return taken


def most_in_any_window(times: list[float], window: float) -> int:
    """The most acquisitions that any half-open window ``[t, t + window)`` holds."""
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        inside = sum(1 for t in ordered[i:] if t < start + window)
        best = max(best, inside)
    return best


# -- window_for_rate ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (7, (7, 1.0)),
        (7.0, (7, 1.0)),
        (7.9, (7, 1.0)),
        (1, (1, 1.0)),
        (1.5, (1, 1.0)),
        (50, (50, 1.0)),
        (0.5, (1, 2.0)),
        (0.25, (1, 4.0)),
    ],
)
def test_window_for_rate(rate: float, expected: tuple[int, float]) -> None:
    assert window_for_rate(rate) == expected


def test_window_for_a_rate_below_one_is_one_request_per_period() -> None:
    size, window = window_for_rate(1 / 3)

    assert size == 1
    assert window == pytest.approx(3.0)


@pytest.mark.parametrize("rate", [0, -1, -0.5, float("nan"), float("inf")])
def test_window_for_rate_rejects_non_positive_or_non_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        window_for_rate(rate)


@pytest.mark.parametrize("rate", [True, "7", None])
def test_window_for_rate_rejects_non_numbers(rate: Any) -> None:
    with pytest.raises(TypeError, match="rate"):
        window_for_rate(rate)


@pytest.mark.parametrize("margin", [-0.001, float("nan"), float("inf")])
def test_limiter_rejects_a_bad_margin(margin: float) -> None:
    with pytest.raises(ValueError, match="margin"):
        SlidingWindowRateLimiter(7, margin=margin)


# -- the sliding window -------------------------------------------------------------


@pytest.mark.parametrize(("rate", "allowed"), [(7, 7), (7.9, 7), (20, 20), (2.5, 2), (1, 1)])
async def test_no_rolling_second_ever_holds_more_than_floor_rate(
    fake_clock: FakeClock, rate: float, allowed: int
) -> None:
    limiter = SlidingWindowRateLimiter(rate, clock=fake_clock.now, sleep=yielding(fake_clock))

    taken = await acquire_concurrently(limiter, 5 * allowed + 3, fake_clock)

    assert most_in_any_window(taken, 1.0) == allowed


async def test_rate_below_one_spaces_single_requests(fake_clock: FakeClock) -> None:
    limiter = SlidingWindowRateLimiter(0.5, margin=0, clock=fake_clock.now, sleep=fake_clock.sleep)
    start = fake_clock.now()

    taken = await acquire_concurrently(limiter, 4, fake_clock)

    assert [t - start for t in taken] == [0.0, 2.0, 4.0, 6.0]


async def test_no_start_up_burst_beyond_the_rate(fake_clock: FakeClock) -> None:
    limiter = SlidingWindowRateLimiter(7, clock=fake_clock.now, sleep=fake_clock.sleep)
    start = fake_clock.now()

    taken = await acquire_concurrently(limiter, 8, fake_clock)

    assert taken[:7] == [start] * 7  # a fresh limiter lets the first R go at once ...
    assert taken[7] >= start + 1.0  # ... and not one more within the first second


async def test_limiter_is_as_fast_as_the_window_allows(fake_clock: FakeClock) -> None:
    limiter = SlidingWindowRateLimiter(7, margin=0, clock=fake_clock.now, sleep=fake_clock.sleep)
    start = fake_clock.now()

    taken = await acquire_concurrently(limiter, 21, fake_clock)

    # Three full windows: 7 at once, 7 a second later, 7 two seconds later.
    assert [t - start for t in taken] == [0.0] * 7 + [1.0] * 7 + [2.0] * 7


async def test_default_margin_pads_each_window(fake_clock: FakeClock) -> None:
    limiter = SlidingWindowRateLimiter(7, clock=fake_clock.now, sleep=fake_clock.sleep)
    start = fake_clock.now()

    taken = await acquire_concurrently(limiter, 8, fake_clock)

    assert taken[7] - start == pytest.approx(1.0 + DEFAULT_MARGIN)
    assert DEFAULT_MARGIN < 0.05  # slack, not a slowdown: 70 requests at 7/s stay under 10.1 s


async def test_a_slot_frees_one_window_after_it_was_taken(fake_clock: FakeClock) -> None:
    limiter = SlidingWindowRateLimiter(2, margin=0, clock=fake_clock.now, sleep=fake_clock.sleep)
    start = fake_clock.now()
    await limiter.acquire()
    fake_clock.time += 0.6
    await limiter.acquire()
    fake_clock.time += 0.1

    await limiter.acquire()

    # The third waits for the first to leave the window (at 1.0), not for a whole new second.
    assert fake_clock.now() - start == pytest.approx(1.0)
    assert fake_clock.sleeps == [pytest.approx(0.3)]


async def test_waiters_are_served_in_arrival_order() -> None:
    clock = ManualClock()
    limiter = SlidingWindowRateLimiter(2, margin=0, clock=clock.now, sleep=clock.sleep)
    served: list[int] = []

    async def take(n: int) -> None:
        await limiter.acquire()
        served.append(n)

    tasks = [asyncio.create_task(take(n)) for n in range(6)]
    await settle()
    assert served == [0, 1]  # the rest are waiting for the next window
    late = asyncio.create_task(take(6))  # arrives while the others wait
    await settle()

    for _ in range(4):
        await clock.advance(1.0)
    await asyncio.gather(*tasks, late)

    assert served == [0, 1, 2, 3, 4, 5, 6]


async def test_a_cancelled_sleeping_waiter_takes_no_slot() -> None:
    clock = ManualClock()
    limiter = SlidingWindowRateLimiter(1, margin=0, clock=clock.now, sleep=clock.sleep)
    await limiter.acquire()  # t = 0
    sleeper = asyncio.create_task(limiter.acquire())  # waits for t = 1
    queued = asyncio.create_task(limiter.acquire())
    await settle()

    sleeper.cancel()
    await settle()
    await clock.advance(1.0)

    assert sleeper.cancelled()
    assert queued.done()  # served at t = 1, the slot the cancelled one would have had
    follower = asyncio.create_task(limiter.acquire())
    await settle()
    assert not follower.done()
    await clock.advance(1.0)
    assert follower.done()


async def test_a_cancelled_queued_waiter_takes_no_slot() -> None:
    clock = ManualClock()
    limiter = SlidingWindowRateLimiter(1, margin=0, clock=clock.now, sleep=clock.sleep)
    served: list[tuple[str, float]] = []

    async def take(name: str) -> None:
        await limiter.acquire()
        served.append((name, clock.now()))

    await take("a")
    b = asyncio.create_task(take("b"))
    c = asyncio.create_task(take("c"))
    d = asyncio.create_task(take("d"))
    await settle()
    c.cancel()
    for _ in range(2):
        await clock.advance(1.0)
    await asyncio.gather(b, d)

    assert c.cancelled()
    assert served == [("a", 0.0), ("b", 1.0), ("d", 2.0)]


# -- the client and its limiter -----------------------------------------------------


def clocked_client(fake: FakeKommo, clock: FakeClock, **kwargs: Any) -> KommoClient:
    kwargs.setdefault("retry", RetryPolicy(base_delay=0.001, max_delay=1.0))
    return KommoClient(
        fake.url,
        LongLivedToken(fake.token),
        sleep=clock.sleep,
        clock=clock.now,
        **kwargs,
    )


async def test_default_client_limit_is_seven_per_second(
    fake: FakeKommo, fake_clock: FakeClock
) -> None:
    start = fake_clock.now()
    async with clocked_client(fake, fake_clock) as client:
        await asyncio.gather(*(client.get_talk(n) for n in range(1, 16)))

    # 15 requests at 7/s: 7 now, 7 after one window, the 15th after two.
    assert fake.stats.requests == 15
    assert fake_clock.now() - start == pytest.approx(2 * (1.0 + DEFAULT_MARGIN))


async def test_client_rate_limit_spaces_requests(fake: FakeKommo, fake_clock: FakeClock) -> None:
    start = fake_clock.now()
    async with clocked_client(fake, fake_clock, rate_limit=10) as client:
        await asyncio.gather(*(client.get_talk(n) for n in range(1, 26)))

    assert fake.stats.requests == 25
    assert fake_clock.now() - start == pytest.approx(2 * (1.0 + DEFAULT_MARGIN))


async def test_rate_limit_none_disables_limiting(fake: FakeKommo, fake_clock: FakeClock) -> None:
    async with clocked_client(fake, fake_clock, rate_limit=None) as client:
        await asyncio.gather(*(client.get_talk(n) for n in range(1, 31)))

    assert fake.stats.requests == 30
    assert fake_clock.sleeps == []


class CountingLimiter:
    """A user's RateLimiter: records how many requests the fake had seen at each acquire."""

    def __init__(self, fake: FakeKommo) -> None:
        self.fake = fake
        self.seen_at_acquire: list[int] = []

    async def acquire(self) -> None:
        self.seen_at_acquire.append(self.fake.stats.requests)


def test_a_user_limiter_satisfies_the_protocol(fake: FakeKommo) -> None:
    assert isinstance(CountingLimiter(fake), RateLimiter)
    assert isinstance(SlidingWindowRateLimiter(7), RateLimiter)


async def test_custom_limiter_is_awaited_before_every_attempt(
    fake: FakeKommo, fake_clock: FakeClock
) -> None:
    limiter = CountingLimiter(fake)
    fake.script("close", 503, Fault.dropped(), 429)
    async with clocked_client(fake, fake_clock, rate_limit=limiter) as client:
        await client.close_talk(3, force=True)

    # One acquire before each of the four attempts, each before its request arrived.
    assert fake.stats.by_route["close"] == 4
    assert limiter.seen_at_acquire == [0, 1, 2, 3]
    assert not fake.is_open(3)


async def test_custom_limiter_replaces_the_default_one(
    fake: FakeKommo, fake_clock: FakeClock
) -> None:
    limiter = CountingLimiter(fake)
    async with clocked_client(fake, fake_clock, rate_limit=limiter) as client:
        await asyncio.gather(*(client.get_talk(n) for n in range(1, 21)))

    assert len(limiter.seen_at_acquire) == 20
    assert fake_clock.sleeps == []  # no built-in 7/s limiter behind it


@pytest.mark.parametrize("rate_limit", [0, -1, float("nan"), float("inf"), True, "7", object()])
def test_client_rejects_a_bad_rate_limit(rate_limit: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        KommoClient("https://example.kommo.com", LongLivedToken("t"), rate_limit=rate_limit)


def test_one_limiter_serves_one_event_loop_after_another() -> None:
    now = [0.0]
    sent: list[float] = []

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)  # let the other waiters queue on the limiter's lock
        now[0] += seconds

    limiter = SlidingWindowRateLimiter(2, margin=0.0, clock=lambda: now[0], sleep=sleep)

    async def send() -> None:
        await limiter.acquire()
        sent.append(now[0])

    async def four_at_once() -> None:
        await asyncio.gather(*(send() for _ in range(4)))

    asyncio.run(four_at_once())  # the fourth waits on the lock while the third sleeps
    asyncio.run(four_at_once())  # a new loop: no "bound to a different event loop"

    assert len(sent) == 8
    assert busiest_window(sent, 1.0) == 2  # the window holds across both runs


async def test_requests_queued_for_a_small_pool_still_keep_the_limit() -> None:
    # One pooled connection and a slow first answer: the other requests must not
    # take rate-limit slots while they wait for the connection, then go out together.
    async with FakeKommo(rate_limit=5, rate_window=0.95) as fake:
        fake.script("close", Fault.slow(0.6))
        async with KommoClient(
            fake.url, LongLivedToken(fake.token), rate_limit=5, max_connections=1
        ) as client:
            outcomes = await client.close_talks(range(1, 11), force=True, concurrency=5)

    assert [o.status.value for o in outcomes] == ["closed"] * 10
    assert fake.stats.throttled == 0
