"""KommoAccounts at scale: 1,000 accounts, 10,000 events, an LRU of 100 clients.

Four FakeKommoAccount servers hold 250 accounts each (a fake's token
endpoint issues each account its own pair, and answers for any pair it
issued), so every request's bearer token tells which account it was sent for.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

from conftest import FAST_RETRY
from test_accounts import CLIENT_ID, REDIRECT, SECRET

from kommo_talks.accounts import Account, KommoAccounts, MemoryAccountStore
from kommo_talks.testing import FakeKommoAccount
from kommo_talks.webhooks import TalkEvent

ACCOUNTS = 1000
EVENTS = 10_000
FAKES = 4
MAX_CLIENTS = 100


def event(account_id: int) -> TalkEvent:
    return TalkEvent(
        action="update", talk_id=account_id, is_in_work=True, is_read=False, account_id=account_id
    )


async def test_ten_thousand_events_each_reach_their_account_with_its_token() -> None:
    now = datetime.now(UTC)
    store = MemoryAccountStore()
    fakes = [
        FakeKommoAccount(talks=range(1, ACCOUNTS + 1), subdomain=f"f{n}") for n in range(FAKES)
    ]
    for fake in fakes:
        await fake.start()
    token_of: dict[str, int] = {}
    for account_id in range(1, ACCOUNTS + 1):
        fake = fakes[account_id % FAKES]
        tokens = fake.oauth.issue_tokens()
        token_of[tokens.access_token] = account_id
        await store.install(Account(account_id, f"a{account_id}", fake.url, now), tokens)
    rng = random.Random(16)
    routed = [rng.randint(1, ACCOUNTS) for _ in range(EVENTS)]
    sessions = set()
    accounts = KommoAccounts(
        CLIENT_ID,
        SECRET,
        REDIRECT,
        store=store,
        rate_limit=None,
        max_clients=MAX_CLIENTS,
        retry=FAST_RETRY,
        allow_loopback=True,
    )
    async with accounts:

        async def handle(account_id: int) -> None:
            client = await accounts.client_for(event(account_id))
            assert accounts.live_clients <= MAX_CLIENTS
            sessions.add(id(client._pipeline._session.current()))
            talk = await client.get_talk(account_id)
            assert talk.talk_id == account_id

        for start in range(0, EVENTS, 200):
            await asyncio.gather(*(handle(a) for a in routed[start : start + 200]))
        assert accounts.live_clients == MAX_CLIENTS
        assert sessions == {id(accounts.session)}  # one session, one connector
    for fake in fakes:
        await fake.close()

    seen = 0
    for index, fake in enumerate(fakes):
        for request in fake.requests:
            account_id = token_of[request.headers["Authorization"].removeprefix("Bearer ")]
            assert request.path == f"/api/v4/talks/{account_id}"
            assert account_id % FAKES == index  # never another account's fake or token
            seen += 1
    assert seen == EVENTS
