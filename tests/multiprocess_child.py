"""One worker process of ``test_multiprocess.py``: ``python multiprocess_child.py JSON``.

The JSON argument says what to do (``"role"``: ``"close"`` or ``"oauth"``)
and with what. The worker builds its client, prints ``ready``, waits for a
line on stdin (so that every worker starts at once), does its work, and
prints one JSON line with what it saw. Any failure exits non-zero with the
traceback on stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import redis.asyncio

from kommo_talks import FileTokenStore, KommoClient, LongLivedToken, OAuth2, RetryPolicy
from kommo_talks.auth import Auth
from kommo_talks.redis import RedisRateLimiter, RedisTokenStore
from kommo_talks.stores import TokenStore


async def wait_for_go() -> None:
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


async def close(job: dict[str, Any]) -> dict[str, Any]:
    """Close talks through a RedisRateLimiter shared with the other workers."""
    connection = redis.asyncio.Redis.from_url(job["redis_url"])
    try:
        limiter = RedisRateLimiter(connection, job["key"], job["rate"])
        async with KommoClient(
            job["url"],
            auth=LongLivedToken(job["token"]),
            rate_limit=limiter,
            # One attempt: a 429 would show up as a failed close, not be retried away.
            retry=RetryPolicy(max_attempts=1),
        ) as client:
            await wait_for_go()
            results = await asyncio.gather(
                *(client.close_talk(talk_id, force=True) for talk_id in job["talks"]),
                return_exceptions=True,
            )
    finally:
        await connection.aclose()
    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {"closed": len(results) - len(failures), "failures": failures}


async def oauth(job: dict[str, Any]) -> dict[str, Any]:
    """Fetch talks with OAuth2 over a store shared with the other workers."""
    connection = None
    store: TokenStore
    if job["store"] == "redis":
        connection = redis.asyncio.Redis.from_url(job["redis_url"])
        store = RedisTokenStore(connection, job["key"], lock_timeout=job["lock_timeout"])
    else:
        store = FileTokenStore(job["path"])
    try:
        auth: Auth = OAuth2(job["client_id"], job["client_secret"], job["redirect_uri"], store)
        async with KommoClient(job["url"], auth=auth, rate_limit=None) as client:
            await wait_for_go()
            talks = await asyncio.gather(*(client.get_talk(t) for t in job["talks"]))
            stored = await store.load()
    finally:
        if connection is not None:
            await connection.aclose()
    return {
        "fetched": [talk.talk_id for talk in talks],
        "stored_refresh_token": stored.refresh_token if stored else None,
    }


async def accounts(job: dict[str, Any]) -> dict[str, Any]:
    """Fetch a talk of every account through KommoAccounts over a shared RedisAccountStore."""
    from kommo_talks.accounts import KommoAccounts, RedisAccountStore

    connection = redis.asyncio.Redis.from_url(job["redis_url"])
    store = RedisAccountStore(connection, lock_timeout=job["lock_timeout"])
    try:
        async with KommoAccounts(
            job["client_id"],
            job["client_secret"],
            job["redirect_uri"],
            store=store,
            rate_limit=None,
            allow_loopback=True,
        ) as kept:
            await wait_for_go()
            clients = [await kept.client(account) for account in job["accounts"]]
            talks = await asyncio.gather(*(client.get_talk(1) for client in clients))
    finally:
        await connection.aclose()
    return {"fetched": [talk.talk_id for talk in talks]}


def main() -> None:
    job = json.loads(sys.argv[1])
    work = {"close": close, "oauth": oauth, "accounts": accounts}[job["role"]]
    result = asyncio.run(work(job))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
