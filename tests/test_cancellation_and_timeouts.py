"""What the resilience guide says about timeouts, cancellation and a lent session.

Cancelling a single call, a listing, or a call whose close is on the wire;
the per-attempt timeout and how many attempts it gets; and which of the
client's settings still apply to a session the user lends it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from conftest import wait_until

from kommo_talks import KommoClient, LongLivedToken, RetryPolicy, TransportError
from kommo_talks.testing import FakeKommo, Fault


async def test_cancelling_get_talk_raises_cancelled_error_and_the_client_goes_on(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.script("get", Fault.slow(0.5))
    call = asyncio.create_task(client.get_talk(1))
    await wait_until(lambda: fake.stats.in_flight == 1)

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert fake.stats.by_route["get"] == 1  # not retried
    assert (await client.get_talk(2)).talk_id == 2


async def test_a_close_cancelled_on_the_wire_may_still_close_the_talk(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.script("close", Fault.slow(0.2))
    call = asyncio.create_task(client.close_talk(1, force=True))
    await wait_until(lambda: fake.stats.in_flight == 1)

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    await wait_until(lambda: not fake.is_open(1))  # Kommo went on and closed it


async def test_cancelling_a_consumer_of_iter_talks_stops_the_listing(
    fake: FakeKommo, client: KommoClient
) -> None:
    seen: list[int] = []

    async def consume() -> None:
        async for talk in client.iter_talks(page_size=10):
            seen.append(talk.talk_id)
            if len(seen) == 10:
                fake.script("list", Fault.slow(0.5))  # page 2 hangs

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: fake.stats.in_flight == 1 and len(seen) == 10)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    assert fake.stats.by_route["list"] == 2  # page 2 was not asked for again
    assert seen == list(range(1, 11))


async def test_each_attempt_has_its_own_timeout_and_a_call_makes_max_attempts(
    fake: FakeKommo,
) -> None:
    fake.script("get", *[Fault.slow(0.3)] * 3)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    retry = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=30.0)
    async with KommoClient(
        fake.url, auth=LongLivedToken(fake.token), retry=retry, timeout=0.05, sleep=sleep
    ) as client:
        with pytest.raises(TransportError, match="after 3 attempt"):
            await client.get_talk(1)

    assert fake.stats.by_route["get"] == 3
    assert len(waits) == 2  # backoff between attempts, at most 0.5 s then 1 s
    assert waits[0] <= 0.5
    assert waits[1] <= 1.0


async def test_a_lent_session_gets_the_clients_timeout_but_keeps_its_own_pool(
    fake: FakeKommo,
) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s,
        KommoClient(
            fake.url,
            auth=LongLivedToken(fake.token),
            session=s,
            timeout=0.05,
            max_connections=50,
            retry=RetryPolicy(max_attempts=1),
            rate_limit=None,
        ) as client,
    ):
        await asyncio.gather(*(client.get_talk(i) for i in range(1, 5)))
        assert fake.stats.max_in_flight == 1  # the session's pool of 1, not max_connections

        fake.script("get", Fault.slow(0.3))
        with pytest.raises(TransportError):  # the client's 0.05 s, not the session's 60 s
            await client.get_talk(1)
