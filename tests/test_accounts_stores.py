"""Account stores (memory, file, Redis): records and token pairs keyed by account."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio

from kommo_talks import OAuth2
from kommo_talks.accounts import (
    Account,
    AccountStore,
    FileAccountStore,
    MemoryAccountStore,
    RedisAccountStore,
)
from kommo_talks.errors import TokenStoreError
from kommo_talks.redis import TokenConflictError
from kommo_talks.stores import FileTokenStore, TokenStore
from kommo_talks.tokens import TokenSet

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ONE = Account(1, "one", "https://one.kommo.com", NOW)
TWO = Account(2, "two", "https://two.amocrm.ru", NOW)
PAIR_1 = TokenSet("ACCESS-one-0123456789", "REFRESH-one-0123456789", NOW + timedelta(days=1))
PAIR_2 = TokenSet("ACCESS-two-0123456789", "REFRESH-two-0123456789", NOW + timedelta(days=1))
NEWER = TokenSet("ACCESS-new-0123456789", "REFRESH-new-0123456789", NOW + timedelta(days=2))


@pytest.fixture(params=["memory", "file", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, r: redis.asyncio.Redis
) -> AsyncIterator[AccountStore]:
    if request.param == "memory":
        yield MemoryAccountStore()
    elif request.param == "file":
        yield FileAccountStore(tmp_path / "accounts")
    else:
        yield RedisAccountStore(r, prefix="test:")


async def test_each_account_has_its_own_record_and_pair(store: AccountStore) -> None:
    await store.install(ONE, PAIR_1)
    await store.install(TWO, PAIR_2)

    assert await store.get(1) == ONE
    assert await store.get(2) == TWO
    assert await store.tokens(1).load() == PAIR_1
    assert await store.tokens(2).load() == PAIR_2
    assert await store.installed() == [1, 2]


async def test_a_refreshed_pair_is_saved_for_its_account_only(store: AccountStore) -> None:
    await store.install(ONE, PAIR_1)
    await store.install(TWO, PAIR_2)
    tokens = store.tokens(1)
    await tokens.load()

    await tokens.save(NEWER)

    assert await store.tokens(1).load() == NEWER
    assert await store.tokens(2).load() == PAIR_2
    assert await store.get(1) == ONE  # the record survives a token save


async def test_installing_again_replaces_record_and_pair(store: AccountStore) -> None:
    await store.install(ONE, PAIR_1)
    again = Account(1, "renamed", "https://renamed.kommo.com", NOW + timedelta(hours=1))

    await store.install(again, NEWER)

    assert await store.get(1) == again
    assert await store.tokens(1).load() == NEWER
    assert await store.installed() == [1]


async def test_remove_forgets_the_account_and_its_tokens(store: AccountStore) -> None:
    await store.install(ONE, PAIR_1)
    await store.install(TWO, PAIR_2)

    assert await store.remove(1) is True
    assert await store.remove(1) is False

    assert await store.get(1) is None
    assert await store.tokens(1).load() is None
    assert await store.installed() == [2]


async def test_unknown_accounts_have_no_record(store: AccountStore) -> None:
    assert await store.get(99) is None
    assert await store.installed() == []


@pytest.mark.parametrize("bad", [0, -1, True, "1", 1.0])
def test_account_ids_must_be_positive_ints(store: AccountStore, bad: object) -> None:
    with pytest.raises(ValueError, match="account_id"):
        store.tokens(bad)  # type: ignore[arg-type]


async def test_the_token_view_is_a_token_store(store: AccountStore) -> None:
    assert isinstance(store.tokens(1), TokenStore)


# -- file store ---------------------------------------------------------------------


async def test_file_store_keeps_one_private_file_per_account(tmp_path: Path) -> None:
    folder = tmp_path / "accounts"
    store = FileAccountStore(folder)
    await store.install(ONE, PAIR_1)
    await store.install(TWO, PAIR_2)

    files = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))
    assert files == ["account-1.json", "account-2.json"]
    for name in files:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    document = json.loads((folder / "account-1.json").read_text())
    assert document["account"]["subdomain"] == "one"


async def test_file_store_tokens_are_a_file_token_store_with_its_lock(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    tokens = store.tokens(7)
    assert isinstance(tokens, FileTokenStore)
    assert tokens.lock_path == tmp_path / "account-7.json.lock"
    # A plain FileTokenStore reads the account file's pair as it is.
    await store.install(Account(7, "s", "https://s.kommo.com", NOW), PAIR_1)
    assert await FileTokenStore(tmp_path / "account-7.json").load() == PAIR_1


async def test_a_refresh_after_an_uninstall_does_not_bring_the_file_back(
    tmp_path: Path,
) -> None:
    store = FileAccountStore(tmp_path)
    await store.install(ONE, PAIR_1)
    tokens = store.tokens(1)
    await store.remove(1)

    with pytest.raises(TokenStoreError, match="uninstalled"):
        await tokens.save(NEWER)
    assert await store.installed() == []
    assert not (tmp_path / "account-1.json").exists()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_refresh_after_an_uninstall_stores_nothing(
    kind: str, r: redis.asyncio.Redis
) -> None:
    store: AccountStore = MemoryAccountStore() if kind == "memory" else RedisAccountStore(r)
    await store.install(ONE, PAIR_1)
    tokens = store.tokens(1)
    await store.remove(1)

    with pytest.raises(TokenStoreError, match="uninstalled"):
        await tokens.save(NEWER)
    assert await store.tokens(1).load() is None
    assert await store.installed() == []


async def test_a_corrupt_account_file_is_reported_without_its_content(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    (tmp_path / "account-1.json").write_text('{"access_token": "SECRET-abcdefgh"')

    with pytest.raises(TokenStoreError) as caught:
        await store.get(1)
    assert "SECRET" not in str(caught.value)
    assert "account-1.json" in str(caught.value)


async def test_file_store_lists_only_account_files(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    await store.install(TWO, PAIR_2)
    for name in ("notes.txt", "account-x.json", "account-01.json", ".account-3.json.tmp"):
        (tmp_path / name).write_text("{}")

    assert await store.installed() == [2]
    assert await FileAccountStore(tmp_path / "missing").installed() == []


async def test_file_store_install_waits_for_a_refresh_in_progress(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    await store.install(ONE, PAIR_1)
    holder = store.tokens(1)
    async with holder.refresh_lock():
        install = asyncio.create_task(store.install(ONE, NEWER))
        await asyncio.sleep(0.1)
        assert not install.done()
    await install
    assert await store.tokens(1).load() == NEWER


# -- Redis store --------------------------------------------------------------------


async def test_redis_store_uses_a_key_per_account_and_a_set(r: redis.asyncio.Redis) -> None:
    store = RedisAccountStore(r, prefix="app:")
    await store.install(ONE, PAIR_1)

    record, pair = await r.get("app:account:1"), await r.get("app:account:1:tokens")
    assert record is not None
    assert pair is not None
    assert json.loads(record)["subdomain"] == "one"
    assert json.loads(pair)["refresh_token"] == PAIR_1.refresh_token
    assert await r.smembers("app:accounts") == {b"1"}
    assert store.tokens(1).lock_key == "app:account:1:tokens:lock"


async def test_redis_token_saves_keep_the_compare_and_set_rule(r: redis.asyncio.Redis) -> None:
    store = RedisAccountStore(r)
    await store.install(ONE, PAIR_1)
    stale = store.tokens(1)
    await stale.load()
    await store.install(ONE, PAIR_2)  # another process re-installed meanwhile

    with pytest.raises(TokenConflictError):
        await stale.save(NEWER)
    assert await store.tokens(1).load() == PAIR_2


async def test_redis_store_reports_a_corrupt_record(r: redis.asyncio.Redis) -> None:
    store = RedisAccountStore(r)
    await r.set("kommo:account:5", b"{not json")
    with pytest.raises(TokenStoreError, match="kommo:account:5"):
        await store.get(5)


async def test_redis_store_skips_set_members_that_are_not_ids(r: redis.asyncio.Redis) -> None:
    store = RedisAccountStore(r)
    await store.install(TWO, PAIR_2)
    await r.sadd("kommo:accounts", "junk", "-3")
    assert await store.installed() == [2]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_redis_store_checks_its_lock_timeout(r: redis.asyncio.Redis, bad: float) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        RedisAccountStore(r, lock_timeout=bad)


async def test_an_account_token_store_drives_oauth2_unchanged(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    await store.install(ONE, PAIR_1)
    auth = OAuth2("client", "secret-0123456789", "https://example.test/cb", store.tokens(1))
    assert auth.store.__class__.__name__ == "_AccountFile"
    assert await auth.store.load() == PAIR_1
