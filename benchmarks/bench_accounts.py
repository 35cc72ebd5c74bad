"""Benchmark: KommoAccounts with 1,000 installed accounts.

1. Memory per cached client: ``tracemalloc`` growth while 1,000 clients (one
   per account, each having sent one request, so its ``OAuth2``, limiter and
   pause state exist) fill the cache, divided by 1,000. The shared session and
   its pool are made before the baseline. Target: <= 16 KiB per client, so a
   cache of 1,000 clients stays under 16 MB.
2. Routing: 10,000 events to random accounts through ``client_for`` with
   ``max_clients=100`` (so most events build a client), each sending one
   ``GET``; events per second, printed for reference (loopback, one process,
   the fakes in the same event loop).

Four ``FakeKommoAccount`` servers hold 250 accounts each. Run:
``python benchmarks/bench_accounts.py`` (a few seconds; loopback only).
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kommo_talks.accounts import Account, KommoAccounts, MemoryAccountStore
from kommo_talks.testing import FakeKommoAccount

ACCOUNTS = 1000
EVENTS = 10_000
FAKES = 4
TARGET_KIB = 16


async def installed(fakes: list[FakeKommoAccount]) -> MemoryAccountStore:
    store = MemoryAccountStore()
    now = datetime.now(UTC)
    for account_id in range(1, ACCOUNTS + 1):
        fake = fakes[account_id % FAKES]
        tokens = fake.oauth.issue_tokens()
        await store.install(Account(account_id, f"a{account_id}", fake.url, now), tokens)
    return store


def make(store: MemoryAccountStore, max_clients: int) -> KommoAccounts:
    return KommoAccounts(
        "bench-client",
        "bench-secret-0123456789",
        "https://bench.example/cb",
        store=store,
        rate_limit=None,
        max_clients=max_clients,
        allow_loopback=True,
    )


async def memory_per_client(store: MemoryAccountStore) -> float:
    async with make(store, ACCOUNTS) as accounts:
        await (await accounts.client(1)).get_talk(1)  # the session, pool and code paths warm
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for account_id in range(2, ACCOUNTS + 1):
            await (await accounts.client(account_id)).get_talk(1)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert accounts.live_clients == ACCOUNTS
    return grown / (ACCOUNTS - 1)


async def routing(store: MemoryAccountStore) -> float:
    rng = random.Random(16)
    targets = [rng.randint(1, ACCOUNTS) for _ in range(EVENTS)]
    async with make(store, 100) as accounts:

        async def one(account_id: int) -> None:
            await (await accounts.client(account_id)).get_talk(1)

        started = time.perf_counter()
        for start in range(0, EVENTS, 200):
            await asyncio.gather(*(one(a) for a in targets[start : start + 200]))
        return EVENTS / (time.perf_counter() - started)


async def main() -> None:
    fakes = [FakeKommoAccount(subdomain=f"f{n}", record=False) for n in range(FAKES)]
    for fake in fakes:
        await fake.start()
    try:
        store = await installed(fakes)
        per_client = await memory_per_client(store)
        rate = await routing(store)
    finally:
        for fake in fakes:
            await fake.close()
    verdict = "ok" if per_client <= TARGET_KIB * 1024 else "OVER TARGET"
    print(
        f"memory per cached client: {per_client / 1024:.1f} KiB (target <= {TARGET_KIB}) {verdict}"
    )
    print(f"routing: {rate:,.0f} events/s over {EVENTS:,} events, max_clients=100 (reference)")


if __name__ == "__main__":
    asyncio.run(main())
