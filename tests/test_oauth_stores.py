"""OAuth2 and its stores: save before use, FileTokenStore.

Over loopback HTTP against FakeKommo; the autouse ``leak_check`` fixture checks
that no token, code or client secret reaches the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
from oauth_support import (
    FlakyStore,
    api_bearers,
    client_for,
    exchange,
    expired,
    leak_check,  # noqa: F401 - an autouse fixture
    oauth_for,
    pair,
)

from kommo_talks import (
    FileTokenStore,
    MemoryTokenStore,
    TokenStoreError,
)
from kommo_talks.testing import FakeKommo

# -- save before use -----------------------------------------------------------


async def test_failed_save_propagates_and_new_token_is_never_sent(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    old = fake.oauth.issue_tokens()
    store = FlakyStore(expired(old))
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError, match="disk full"):
            await client.get_talk(1)
        new = fake.oauth.issued[-1]
        assert fake.oauth.refreshes == 1
        assert api_bearers(fake) == []
        stored = await store.load()
        assert stored is not None
        assert stored.refresh_token == old.refresh_token
        # The next call saves the kept pair first, then uses it: no second refresh.
        await client.get_talk(2)
        await client.get_talk(3)
    assert pair(await store.load()) == pair(new)
    assert store.saves == 2
    assert fake.oauth.refreshes == 1
    assert api_bearers(fake) == [new.access_token, new.access_token]
    assert "kept in memory" in caplog.text


async def test_kept_pair_is_retried_until_the_store_takes_it(fake: FakeKommo) -> None:
    store = FlakyStore(expired(fake.oauth.issue_tokens()))
    store.failures = 3
    async with client_for(fake, oauth_for(fake, store)) as client:
        for _ in range(3):
            with pytest.raises(TokenStoreError):
                await client.get_talk(1)
        assert api_bearers(fake) == []
        await client.get_talk(1)
    new = fake.oauth.issued[-1]
    assert fake.oauth.refreshes == 1
    assert pair(await store.load()) == pair(new)
    assert api_bearers(fake) == [new.access_token]


async def test_kept_pair_is_dropped_when_the_store_moved_on(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(expired(fake.oauth.issue_tokens()))
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError):
            await client.get_talk(1)
        kept = fake.oauth.issued[-1]
        # Another process refreshed (or the user re-authorized) meanwhile.
        newer = fake.oauth.issue_tokens()
        await MemoryTokenStore.save(store, newer)
        await client.get_talk(1)
    assert api_bearers(fake) == [newer.access_token]
    assert kept.access_token not in api_bearers(fake)
    assert await store.load() == newer
    assert fake.oauth.refreshes == 1
    assert "dropping the unsaved token pair" in caplog.text


async def test_failed_save_on_reactive_refresh_propagates(fake: FakeKommo) -> None:
    old = fake.oauth.issue_tokens()
    fake.oauth.expire_access_tokens()
    store = FlakyStore(old)
    store.failures = 1
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError):
            await client.get_talk(1)
        await client.get_talk(1)
    new = fake.oauth.issued[-1]
    assert api_bearers(fake) == [old.access_token, new.access_token]
    assert fake.oauth.refreshes == 1


# -- FileTokenStore ------------------------------------------------------------


async def test_file_store_round_trip_and_refresh_persists_the_rotated_pair(
    fake: FakeKommo, tmp_path: Path
) -> None:
    path = tmp_path / "kommo-tokens.json"
    first = await exchange(fake, fake.oauth.issue_code(), FileTokenStore(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await FileTokenStore(path).load() == first

    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(1)
    assert api_bearers(fake) == [first.access_token]

    fake.oauth.expire_access_tokens()
    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(2)
    rotated = fake.oauth.issued[-1]
    assert rotated != first
    assert pair(await FileTokenStore(path).load()) == pair(rotated)
    assert json.loads(path.read_text())["refresh_token"] == rotated.refresh_token
    assert fake.oauth.is_revoked(first.refresh_token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A new process starts from the file and needs no refresh.
    async with client_for(fake, oauth_for(fake, FileTokenStore(path))) as client:
        await client.get_talk(3)
    assert api_bearers(fake)[-1] == rotated.access_token
    assert fake.oauth.refreshes == 1


async def test_processes_sharing_a_token_file_refresh_once(fake: FakeKommo, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    await FileTokenStore(path).save(expired(fake.oauth.issue_tokens()))
    # Separate stores and OAuth2 objects, as in separate processes: only the file lock is shared.
    auths = [oauth_for(fake, FileTokenStore(path)) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(fake, a)) for a in auths]
        await asyncio.gather(*(c.get_talk(i) for i in range(1, 6) for c in clients))
    assert fake.oauth.refreshes == 1
    rotated = fake.oauth.issued[-1]
    assert set(api_bearers(fake)) == {rotated.access_token}
    assert pair(await FileTokenStore(path).load()) == pair(rotated)


async def test_exchange_code_replaces_a_corrupt_token_file(fake: FakeKommo, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{ this is not json")
    store = FileTokenStore(path)
    async with client_for(fake, oauth_for(fake, store)) as client:
        with pytest.raises(TokenStoreError, match="corrupt"):
            await client.get_talk(1)
    assert path.read_text() == "{ this is not json"  # never overwritten by a refresh
    tokens = await exchange(fake, fake.oauth.issue_code(), store)
    assert await FileTokenStore(path).load() == tokens
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
