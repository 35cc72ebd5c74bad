"""One client across several event loops (``asyncio.run()`` twice), without closing it between.

The fake runs in a thread with its own loop, so that it outlives each of the
client's loops, as Kommo would.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from kommo_talks import (
    ClientClosedError,
    KommoClient,
    KommoError,
    LongLivedToken,
    MemoryTokenStore,
    OAuth2,
    TokenSet,
)
from kommo_talks.testing import FakeKommo

# The old session's pooled keep-alive socket: its loop is closed, so it cannot be
# closed through aiohttp's public API; Python reports it once it is dropped.
POOLED_SOCKET_DROPPED = [
    "ignore:unclosed transport <_SelectorSocketTransport:ResourceWarning",
    "ignore:unclosed <socket.socket:ResourceWarning",
]


@contextmanager
def fake_in_a_thread(**options: Any) -> Iterator[FakeKommo]:
    """A FakeKommo serving from its own thread and loop until the block ends."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        async with FakeKommo(**options) as fake:
            box["fake"] = fake
            started.set()
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the fake did not start"
    try:
        yield box["fake"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


@pytest.mark.filterwarnings(*POOLED_SOCKET_DROPPED)
def test_a_client_left_open_works_again_in_a_new_event_loop() -> None:
    with fake_in_a_thread() as fake:
        client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=7.0)

        async def first() -> int:
            return (await client.get_talk(1)).talk_id  # not closed: the loop ends under it

        async def second() -> list[int]:
            try:
                talk = await client.get_talk(2)
                outcomes = await client.close_talks([3, 4], force=True)
                return [talk.talk_id, *(outcome.talk_id for outcome in outcomes)]
            finally:
                await client.close()

        assert asyncio.run(first()) == 1
        assert asyncio.run(second()) == [2, 3, 4]
        assert fake.stats.requests == 4
        assert client.closed
    gc.collect()  # the dropped socket may sit in a cycle: report it here, under the filter


@pytest.mark.filterwarnings(*POOLED_SOCKET_DROPPED)
def test_an_oauth_client_left_open_refreshes_and_works_in_a_new_event_loop() -> None:
    with fake_in_a_thread() as fake:
        tokens = fake.oauth.issue_tokens()
        expired = TokenSet(
            tokens.access_token, tokens.refresh_token, datetime.now(UTC) - timedelta(hours=1)
        )
        store = MemoryTokenStore(expired)
        oauth = fake.oauth
        auth = OAuth2(oauth.client_id, oauth.client_secret, oauth.redirect_uri, store)
        client = KommoClient(fake.url, auth, rate_limit=7.0)

        async def use(talk_id: int) -> int:
            return (await client.get_talk(talk_id)).talk_id

        assert asyncio.run(use(1)) == 1  # refreshes first: the pair had expired
        assert asyncio.run(use(2)) == 2
        asyncio.run(client.close())
        assert fake.oauth.refreshes == 1
    gc.collect()  # the dropped socket may sit in a cycle: report it here, under the filter


def test_a_lent_session_of_a_finished_loop_raises_client_closed_error_saying_why() -> None:
    with fake_in_a_thread() as fake:
        box: dict[str, Any] = {}

        async def first() -> None:
            # force_close: no pooled socket outlives this loop
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            client = KommoClient(fake.url, LongLivedToken(fake.token), session=session)
            await client.get_talk(1)
            box.update(session=session, client=client)

        async def second() -> None:
            try:
                with pytest.raises(ClientClosedError, match="another event loop") as caught:
                    await box["client"].get_talk(2)
                box["error"] = caught.value
            finally:
                await box["session"].close()

        asyncio.run(first())
        asyncio.run(second())
        assert isinstance(box["error"], KommoError)
        assert fake.stats.requests == 1  # nothing was sent from the second loop


def test_a_client_whose_loop_is_still_open_is_not_used_from_another() -> None:
    with fake_in_a_thread() as fake:
        client = KommoClient(fake.url, LongLivedToken(fake.token), rate_limit=None)
        first_loop = asyncio.new_event_loop()
        try:
            assert first_loop.run_until_complete(client.get_talk(1)).talk_id == 1

            async def elsewhere() -> None:
                with pytest.raises(ClientClosedError, match="still open"):
                    await client.get_talk(2)

            asyncio.run(elsewhere())
            first_loop.run_until_complete(client.close())  # closed where it lives
            first_loop.run_until_complete(asyncio.sleep(0.01))  # the transport's last callbacks
        finally:
            first_loop.close()
        assert fake.stats.requests == 1
