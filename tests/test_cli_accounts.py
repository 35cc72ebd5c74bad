"""``kommo-talks accounts list|remove`` over a FileAccountStore and a RedisAccountStore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis.asyncio
from redis_server import RedisServer
from test_cli import assert_one_line_error, cli_env, kommo_talks

from kommo_talks.accounts import (
    Account,
    AccountStore,
    FileAccountStore,
    RedisAccountStore,
)
from kommo_talks.tokens import TokenSet

WHEN = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
PAIR = TokenSet("ACCESS-cli-0123456789", "REFRESH-cli-0123456789", WHEN + timedelta(days=1))


async def two_accounts(store: AccountStore) -> None:
    await store.install(Account(7, "seven", "https://seven.kommo.com", WHEN), PAIR)
    await store.install(Account(42, "answer", "https://answer.amocrm.ru", WHEN), PAIR)


async def test_list_prints_each_installed_account_and_no_token(tmp_path: Path) -> None:
    await two_accounts(FileAccountStore(tmp_path))

    result = await kommo_talks("accounts", "list", "--store", str(tmp_path), env=cli_env())

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"7\tseven\thttps://seven.kommo.com\t{WHEN.isoformat()}",
        f"42\tanswer\thttps://answer.amocrm.ru\t{WHEN.isoformat()}",
    ]
    assert "ACCESS" not in result.out


async def test_remove_deletes_one_account(tmp_path: Path) -> None:
    store = FileAccountStore(tmp_path)
    await two_accounts(store)

    result = await kommo_talks("accounts", "remove", "7", "--store", str(tmp_path), env=cli_env())

    assert result.code == 0, result.err
    assert "removed account 7" in result.out
    assert await store.installed() == [42]


async def test_removing_an_account_that_is_not_installed_fails_clearly(tmp_path: Path) -> None:
    result = await kommo_talks("accounts", "remove", "9", "--store", str(tmp_path), env=cli_env())

    assert result.code == 1
    assert_one_line_error(result, "account 9 is not installed")


async def test_the_store_must_be_named_once(tmp_path: Path) -> None:
    neither = await kommo_talks("accounts", "list", env=cli_env())
    both = await kommo_talks(
        "accounts", "list", "--store", str(tmp_path), "--redis-url", "redis://x", env=cli_env()
    )
    for result in (neither, both):
        assert result.code == 2
        assert_one_line_error(result, "exactly one of --store DIR and --redis-url URL")


async def test_list_and_remove_work_over_redis(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    store = RedisAccountStore(r)
    await two_accounts(store)
    url = redis_server.url

    removed = await kommo_talks("accounts", "remove", "42", "--redis-url", url, env=cli_env())
    listed = await kommo_talks("accounts", "list", "--redis-url", url, env=cli_env())

    assert removed.code == 0, removed.err
    assert [line.split("\t")[0] for line in listed.out.splitlines()] == ["7"]
    assert await store.installed() == [7]
