"""Batch operations over real loopback HTTP against FakeKommo: close_talks, iter_close_talks,
get_talks and the BatchRun engine behind them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import attrs
import pytest
from conftest import FAST_RETRY, FakeClock, wait_until

from kommo_talks import (
    CloseOutcome,
    CloseStatus,
    CoordinationError,
    ForbiddenError,
    KommoClient,
    KommoError,
    LongLivedToken,
    MemoryTokenStore,
    NotFoundError,
    OAuth2,
    RateLimitError,
    ServerError,
    Talk,
    TokenRefreshError,
)
from kommo_talks.batch import close_run
from kommo_talks.testing import FakeKommo, Fault

WORKER_PREFIX = "kommo-talks batch worker"


def workers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(WORKER_PREFIX)]


def client_side_tasks() -> list[asyncio.Task[object]]:
    """Live tasks, without those of the fake's server (it shares the test's loop)."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.get_coro().__qualname__.startswith("RequestHandler")  # type: ignore[union-attr]
    ]


def close_requests(fake: FakeKommo) -> list[int]:
    """Talk IDs of the close requests the fake received, in arrival order."""
    return [int(r.path.split("/")[-2]) for r in fake.requests if r.route == "close"]


class CountingIterator:
    """An iterator over ``items`` that records how many were taken."""

    def __init__(self, items: list[Any]) -> None:
        self._items = iter(items)
        self.taken = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self._items)
        self.taken += 1
        return item


# -- order, duplicates, outcomes ---------------------------------------------------------


async def test_outcomes_come_in_first_appearance_order_and_each_id_is_closed_once(
    fake: FakeKommo, client: KommoClient
) -> None:
    ids = [5, 3, 5, 1, 3, 2, 1, 5]

    outcomes = await client.close_talks(ids, force=True, concurrency=3)

    assert [o.talk_id for o in outcomes] == [5, 3, 1, 2]
    assert all(o.status is CloseStatus.CLOSED and o.error is None for o in outcomes)
    assert sorted(close_requests(fake)) == [1, 2, 3, 5]
    assert all(r.json() == {"force_close": True} for r in fake.requests if r.route == "close")


async def test_mixed_outcomes_closed_already_closed_not_found_forbidden_and_exhausted_5xx(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.talks[2]["is_in_work"] = False
    fake.deny(403, talk_id=4)  # a problem+json 403: a permission error, not a block
    fake.script("close", 503, 503, 503, 503, 503)  # all five attempts of the first close

    outcomes = await client.close_talks([3, 1, 2, 999, 4, 5], force=True, concurrency=1)

    by_id = {o.talk_id: o for o in outcomes}
    assert [o.talk_id for o in outcomes] == [3, 1, 2, 999, 4, 5]
    assert isinstance(by_id[3].error, ServerError)
    assert by_id[3].error.status == 503
    assert by_id[3].status is CloseStatus.FAILED
    assert by_id[1] == CloseOutcome(1, CloseStatus.CLOSED)
    assert by_id[2] == CloseOutcome(2, CloseStatus.ALREADY_CLOSED)
    assert by_id[999].status is CloseStatus.FAILED
    assert isinstance(by_id[999].error, NotFoundError)
    assert isinstance(by_id[4].error, ForbiddenError)
    assert not by_id[4].error.is_block
    assert by_id[5] == CloseOutcome(5, CloseStatus.CLOSED)  # one failure never stops the rest
    assert fake.closed_talks() == [1, 2, 5]


async def test_async_iterable_input_is_read_lazily_with_duplicates_dropped(
    fake: FakeKommo, client: KommoClient
) -> None:
    async def ids() -> AsyncIterator[int]:
        for talk_id in (7, 8, 7, 9, 8, 10):
            await asyncio.sleep(0)
            yield talk_id

    outcomes = await client.close_talks(ids(), force=True, concurrency=2)

    assert [o.talk_id for o in outcomes] == [7, 8, 9, 10]
    assert sorted(close_requests(fake)) == [7, 8, 9, 10]


async def test_progress_is_called_once_per_outcome(client: KommoClient) -> None:
    seen: list[CloseOutcome] = []

    outcomes = await client.close_talks(
        [1, 2, 2, 3, 404, 1], force=True, concurrency=2, progress=seen.append
    )

    assert len(seen) == 4
    assert sorted(o.talk_id for o in seen) == [1, 2, 3, 404]
    assert set(seen) == set(outcomes)


async def test_get_talks_returns_talks_and_errors_in_first_appearance_order(
    client: KommoClient,
) -> None:
    results = await client.get_talks([2, 999, 1, 2], concurrency=3)

    assert len(results) == 3
    assert isinstance(results[0], Talk)
    assert results[0].talk_id == 2
    assert isinstance(results[1], NotFoundError)
    assert isinstance(results[2], Talk)
    assert results[2].talk_id == 1


# -- bounds: in-flight requests and live tasks --------------------------------------------


async def test_requests_in_flight_never_exceed_concurrency(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.random_faults(1.0, [Fault.slow(0.002)], routes=["close"])

    outcomes = await client.close_talks(range(1, 61), force=True, concurrency=7)

    assert all(o.status is CloseStatus.CLOSED for o in outcomes)
    assert 1 < fake.stats.max_in_flight <= 7


async def test_many_ids_keep_live_tasks_bounded_by_concurrency() -> None:
    concurrency = 5
    async with (
        FakeKommo(talks=range(1, 2001), record=False) as fake,
        KommoClient(
            fake.url, auth=LongLivedToken(fake.token), retry=FAST_RETRY, rate_limit=None
        ) as client,
    ):
        baseline = len(client_side_tasks())
        peak = 0

        def sample(outcome: CloseOutcome) -> None:
            nonlocal peak
            peak = max(peak, len(client_side_tasks()))

        outcomes = await client.close_talks(
            range(1, 2001), force=True, concurrency=concurrency, progress=sample
        )

    assert len(outcomes) == 2000
    assert all(o.status is CloseStatus.CLOSED for o in outcomes)
    # The workers, plus at most one aiohttp body-writing task per request in flight.
    assert peak <= baseline + 2 * concurrency


# -- cancellation ----------------------------------------------------------------------------


async def test_cancelling_close_talks_cancels_requests_leaves_no_task_and_client_usable(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.random_faults(1.0, [Fault.slow(0.3)], routes=["close"])
    before = asyncio.all_tasks()
    batch = asyncio.create_task(client.close_talks(range(1, 51), force=True, concurrency=4))
    await wait_until(lambda: fake.stats.in_flight == 4)

    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch

    assert set(client_side_tasks()) <= before
    assert fake.stats.by_route["close"] == 4  # nothing more was sent
    fake.faults.clear()
    await client.close_talk(60, force=True)
    assert fake.is_open(60) is False


async def test_cancelling_a_consumer_of_iter_close_talks_leaves_no_task(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.random_faults(1.0, [Fault.slow(0.3)], routes=["close"])
    started = asyncio.Event()

    async def consume() -> None:
        started.set()
        async for _ in client.iter_close_talks(range(1, 51), force=True, concurrency=3):
            pass

    consumer = asyncio.create_task(consume())
    await started.wait()
    await wait_until(lambda: fake.stats.in_flight == 3)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    assert workers() == []
    assert fake.stats.by_route["close"] == 3


# -- stops: a block, a long server-given wait ----------------------------------------------


async def test_a_block_stops_the_batch_in_flight_requests_keep_their_outcome(
    fake: FakeKommo, client: KommoClient
) -> None:
    # The first close to arrive gets Kommo's HTML block page; the other two in flight
    # are slow but fine.
    fake.script("close", Fault.error(403, html=True), Fault.slow(0.05), Fault.slow(0.05))
    source = CountingIterator(list(range(1, 31)))

    run = close_run(client, source, force=True, concurrency=3)
    outcomes = await run.collect()

    assert len(outcomes) == 3
    assert source.taken == 3  # IDs never read get no outcome
    failed = [o for o in outcomes if o.status is CloseStatus.FAILED]
    assert len(failed) == 1
    assert isinstance(failed[0].error, ForbiddenError)
    assert failed[0].error.is_block
    assert run.stop_error is failed[0].error
    assert sum(o.status is CloseStatus.CLOSED for o in outcomes) == 2
    assert run.unsent == []
    assert fake.stats.by_route["close"] == 3  # no new request after the block


class LimiterThatGoesDown:
    """A shared limiter whose coordinator stops answering after ``allowed`` slots."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.calls = 0

    async def acquire(self) -> None:
        self.calls += 1
        if self.calls > self.allowed:
            raise CoordinationError("the shared limiter is unreachable")


async def test_a_coordination_failure_stops_the_batch(fake: FakeKommo) -> None:
    source = CountingIterator(list(range(1, 31)))
    limiter = LimiterThatGoesDown(allowed=2)
    async with KommoClient(
        fake.url, auth=LongLivedToken(fake.token), retry=FAST_RETRY, rate_limit=limiter
    ) as client:
        outcomes = await client.close_talks(source, force=True, concurrency=1)

    assert [o.status for o in outcomes] == [
        CloseStatus.CLOSED,
        CloseStatus.CLOSED,
        CloseStatus.FAILED,
    ]
    assert isinstance(outcomes[2].error, CoordinationError)
    assert source.taken == 3  # nothing more is read, nothing more is sent
    assert fake.stats.by_route["close"] == 2


async def test_ids_read_but_not_sent_at_a_block_fail_with_the_stopping_error(
    fake: FakeKommo, fake_clock: FakeClock
) -> None:
    # A rate limit of 1/s: the first close goes out, the next two wait in the limiter
    # (on a sleep the test releases once the block has been seen).
    fake.block()
    release = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await release.wait()
        await fake_clock.sleep(seconds)

    def progress(outcome: CloseOutcome) -> None:
        release.set()

    source = CountingIterator(list(range(1, 11)))
    async with KommoClient(
        fake.url,
        auth=LongLivedToken(fake.token),
        retry=FAST_RETRY,
        rate_limit=1,
        clock=fake_clock.now,
        sleep=sleep,
    ) as client:
        run = close_run(client, source, force=True, concurrency=3)
        outcomes = await run.collect(progress)

    assert [o.talk_id for o in outcomes] == [1, 2, 3]
    assert all(o.status is CloseStatus.FAILED for o in outcomes)
    block = outcomes[0].error
    assert isinstance(block, ForbiddenError)
    assert block.is_block
    assert outcomes[1].error is block
    assert outcomes[2].error is block
    assert run.stop_error is block
    assert run.unsent == [2, 3]
    assert source.taken == 3
    assert fake.stats.by_route["close"] == 1


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        (Fault.error(429, retry_after=300), RateLimitError),
        (Fault.error(503, retry_after=120, retry_after_header=True), ServerError),
    ],
)
async def test_a_server_wait_longer_than_max_delay_stops_the_batch(
    fake: FakeKommo, client: KommoClient, fault: Fault, error_class: type[KommoError]
) -> None:
    fake.script("close", fault)
    source = CountingIterator(list(range(1, 21)))

    run = close_run(client, source, force=True, concurrency=1)
    outcomes = await run.collect()

    assert len(outcomes) == 1
    assert outcomes[0].status is CloseStatus.FAILED
    error = outcomes[0].error
    assert isinstance(error, error_class)
    assert run.stop_error is error
    assert source.taken == 1
    assert fake.stats.by_route["close"] == 1


async def test_a_stop_does_not_wait_for_a_slow_async_input(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.block()
    never = asyncio.Event()

    async def ids() -> AsyncIterator[int]:
        yield 1
        await never.wait()  # the next ID never comes
        yield 2

    outcomes = await client.close_talks(ids(), force=True, concurrency=2)

    assert [o.talk_id for o in outcomes] == [1]
    assert isinstance(outcomes[0].error, ForbiddenError)
    assert workers() == []


async def test_get_talks_stops_on_a_block_too(fake: FakeKommo, client: KommoClient) -> None:
    fake.block()
    source = CountingIterator(list(range(1, 21)))

    results = await client.get_talks(source, concurrency=1)

    assert len(results) == 1
    assert isinstance(results[0], ForbiddenError)
    assert results[0].is_block
    assert source.taken == 1


# -- invalid input ----------------------------------------------------------------------------


async def test_an_invalid_item_raises_after_requests_in_flight_finish(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.random_faults(1.0, [Fault.slow(0.02)], routes=["close"])
    source = CountingIterator([1, 2, "3", 4, 5])

    with pytest.raises(ValueError, match=r"item 2 of ids .* got '3'"):
        await client.close_talks(source, force=True, concurrency=2)

    assert fake.closed_talks() == [1, 2]  # in flight: finished, effects stand
    assert source.taken == 3  # nothing read after the bad item
    assert fake.stats.by_route["close"] == 2
    assert fake.stats.in_flight == 0


async def test_items_are_validated_before_de_duplication(
    fake: FakeKommo, client: KommoClient
) -> None:
    with pytest.raises(ValueError, match="True"):
        await client.close_talks([1, True], force=True, concurrency=1)


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2", None])
async def test_invalid_concurrency_is_refused_before_anything(
    fake: FakeKommo, client: KommoClient, bad: object
) -> None:
    source = CountingIterator([1, 2])

    with pytest.raises(ValueError, match="concurrency"):
        await client.close_talks(source, concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency"):
        client.iter_close_talks(source, concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency"):
        await client.get_talks(source, concurrency=bad)  # type: ignore[arg-type]

    assert source.taken == 0
    assert fake.stats.requests == 0


async def test_a_progress_callback_that_raises_ends_the_batch_with_its_error(
    fake: FakeKommo, client: KommoClient
) -> None:
    def progress(outcome: CloseOutcome) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await client.close_talks(range(1, 50), force=True, concurrency=2, progress=progress)

    assert fake.stats.by_route["close"] <= 2
    assert workers() == []


# -- iter_close_talks -------------------------------------------------------------------------


async def test_iter_close_talks_yields_in_completion_order(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.script("close", Fault.slow(0.1))  # the first close to arrive answers last

    order = [o.talk_id async for o in client.iter_close_talks([1, 2, 3], force=True)]

    slow = close_requests(fake)[0]
    assert sorted(order) == [1, 2, 3]
    assert order[-1] == slow


async def test_iter_close_talks_starts_at_most_concurrency_beyond_what_was_taken(
    fake: FakeKommo, client: KommoClient
) -> None:
    async with contextlib.aclosing(
        client.iter_close_talks(range(1, 51), force=True, concurrency=4)
    ) as outcomes:
        await anext(outcomes)
        await wait_until(lambda: fake.stats.by_route["close"] == 5)
        for _ in range(50):  # let the workers run as far as they are allowed
            await asyncio.sleep(0)
        assert fake.stats.by_route["close"] == 5
        await anext(outcomes)
        await wait_until(lambda: fake.stats.by_route["close"] == 6)


async def test_closing_iter_close_talks_early_cancels_and_sends_nothing_more(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.random_faults(1.0, [Fault.slow(0.05)], routes=["close"])
    async with contextlib.aclosing(
        client.iter_close_talks(range(1, 51), force=True, concurrency=3)
    ) as outcomes:
        first = await anext(outcomes)
    sent = fake.stats.by_route["close"]

    assert first.status is CloseStatus.CLOSED
    assert workers() == []
    assert sent <= 1 + 3
    for _ in range(20):
        await asyncio.sleep(0.001)
    assert fake.stats.by_route["close"] == sent


async def test_an_abandoned_iter_close_talks_is_cleaned_up_by_garbage_collection(
    fake: FakeKommo,
) -> None:
    # Counted where requests start, in the client: a request already written when the
    # iterator is collected may reach the fake's counters a moment later.
    started: list[str] = []

    async def on_request_start(*_: object) -> None:
        started.append("close")

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with (
        aiohttp.ClientSession(trace_configs=[trace]) as session,
        KommoClient(
            fake.url,
            auth=LongLivedToken(fake.token),
            session=session,
            retry=FAST_RETRY,
            rate_limit=None,
        ) as client,
    ):
        outcomes = client.iter_close_talks(range(1, 51), force=True, concurrency=3)
        await anext(outcomes)
        del outcomes
        gc.collect()

        await wait_until(lambda: workers() == [])
        sent = len(started)
        assert sent <= 1 + 3
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert len(started) == sent
        assert fake.stats.by_route["close"] <= sent


async def test_iter_close_talks_raises_an_invalid_item_after_the_outcomes_in_flight(
    client: KommoClient,
) -> None:
    taken: list[int] = []

    async def consume() -> None:
        async for outcome in client.iter_close_talks([1, 2, -3, 4], force=True, concurrency=2):
            taken.append(outcome.talk_id)

    with pytest.raises(ValueError, match="item 2"):
        await consume()

    assert sorted(taken) == [1, 2]


# -- rate limit --------------------------------------------------------------------------------


async def test_many_concurrent_closes_under_the_client_rate_limit_draw_no_429() -> None:
    rate = 20
    async with (
        FakeKommo(talks=range(1, 46), rate_limit=rate, rate_window=0.95) as fake,
        KommoClient(
            fake.url, auth=LongLivedToken(fake.token), retry=FAST_RETRY, rate_limit=rate
        ) as client,
    ):
        outcomes = await client.close_talks(range(1, 46), force=True, concurrency=45)

    assert fake.stats.throttled == 0
    assert all(o.status is CloseStatus.CLOSED for o in outcomes)
    assert fake.closed_talks() == list(range(1, 46))


async def test_a_block_met_by_the_token_refresh_stops_the_batch(fake: FakeKommo) -> None:
    stale = attrs.evolve(fake.oauth.issue_tokens(), expires_at=datetime.now(UTC))
    auth = OAuth2(
        fake.oauth.client_id,
        fake.oauth.client_secret,
        fake.oauth.redirect_uri,
        MemoryTokenStore(stale),
    )
    fake.block()
    source = CountingIterator(list(range(1, 1001)))
    async with KommoClient(fake.url, auth=auth, retry=FAST_RETRY, rate_limit=None) as client:
        run = close_run(client, source, force=True, concurrency=5)
        outcomes = await run.collect()

    assert isinstance(run.stop_error, TokenRefreshError)
    assert run.stop_error.is_block
    assert "blocks this IP" in str(run.stop_error)
    assert source.taken <= 5  # no more input read after the block
    assert len(outcomes) == source.taken
    assert fake.stats.by_route["token"] == 1  # one refresh for all, and no more after it
    assert fake.stats.by_route.get("close", 0) == 0


def test_an_infinite_timeout_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="finite"):
        KommoClient("https://example.kommo.com", LongLivedToken("t"), timeout=float("inf"))


async def test_tasks_started_by_progress_are_not_bound_by_the_batch(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.script("close", Fault(), Fault.error(403, html=True))  # the second close: a block
    spawned: list[asyncio.Task[Talk]] = []

    def progress(outcome: CloseOutcome) -> None:
        spawned.append(asyncio.create_task(client.get_talk(outcome.talk_id)))

    run = close_run(client, range(1, 31), force=True, concurrency=1)
    await run.collect(progress)
    talks = await asyncio.gather(*spawned)

    assert run.stop_error is not None  # the batch stopped ...
    assert [talk.talk_id for talk in talks] == [1, 2]  # ... its callback's own calls did not
