"""Two processes sharing a RedisAccountStore refresh each account once between them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import redis.asyncio
from redis_server import RedisServer
from test_accounts import CLIENT_ID, REDIRECT, SECRET
from test_multiprocess import expired, wait_until, workers

from kommo_talks.accounts import Account, RedisAccountStore
from kommo_talks.testing import FakeKommoAccount

PROCESSES = 2


async def test_processes_sharing_a_redis_account_store_refresh_each_account_once(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    store = RedisAccountStore(r)
    async with (
        FakeKommoAccount(account_id=11, subdomain="eleven") as one,
        FakeKommoAccount(account_id=22, subdomain="twenty-two") as two,
    ):
        fakes = (one, two)
        for fake in fakes:
            fake.install_code(CLIENT_ID, SECRET, REDIRECT)  # registers the integration
            account = Account(fake.account_id, fake.subdomain, fake.url, datetime.now(UTC))
            await store.install(account, expired(fake.oauth.issue_tokens()))
            fake.oauth.gate = asyncio.Event()  # hold the refresh until all wait for it
        job = {
            "role": "accounts",
            "redis_url": redis_server.url,
            "lock_timeout": 10.0,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "redirect_uri": REDIRECT,
            "accounts": [11, 22],
        }
        async with workers([job] * PROCESSES) as running:
            await running.go()
            await wait_until(lambda: all(f.stats.by_route["token"] >= 1 for f in fakes))
            await asyncio.sleep(0.5)  # the other process reaches each account's lock
            for fake in fakes:
                assert fake.oauth.gate is not None
                fake.oauth.gate.set()
            results = await running.results()

        assert [result["fetched"] for result in results] == [[1, 1]] * PROCESSES
        for fake in fakes:
            assert fake.oauth.refreshes == 1
            new = fake.oauth.issued[-1]
            stored = await store.tokens(fake.account_id).load()
            assert stored is not None
            assert stored.refresh_token == new.refresh_token
            gets = [req for req in fake.requests if req.route == "get"]
            assert {req.headers["Authorization"] for req in gets} == {f"Bearer {new.access_token}"}
