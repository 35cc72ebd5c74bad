"""Several OS processes sharing one integration: one rate limit, one refresh.

Each worker is a fresh Python process (``multiprocess_child.py``) talking to a
``FakeKommo`` served by this test's event loop and to a real redis-server.
Workers print ``ready`` once set up and start together on ``go``; any worker
still running when a test ends (failed or not) is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis.asyncio
from redis_server import RedisServer

from kommo_talks import FileTokenStore
from kommo_talks.ratelimit import DEFAULT_MARGIN
from kommo_talks.redis import RedisTokenStore
from kommo_talks.stores import TokenStore
from kommo_talks.testing import FakeKommo, busiest_window
from kommo_talks.tokens import TokenSet

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().with_name("multiprocess_child.py")
WORKERS = 3
# Upper bound for anything that ends as soon as the awaited thing happens
# (a cold Python start with aiohttp and redis imported takes about a second on CI).
BOUND = 60.0


class Workers:
    """Worker processes started together; see :func:`workers`."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes

    async def go(self) -> None:
        """Let every worker start its work at once."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
        await asyncio.gather(*(p.stdin.drain() for p in self.processes if p.stdin))

    async def results(self) -> list[dict[str, Any]]:
        """Wait for every worker to finish; its JSON result, or fail with its stderr."""
        outputs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in self.processes)), BOUND
        )
        results = []
        for process, (out, err) in zip(self.processes, outputs, strict=True):
            assert process.returncode == 0, err.decode(errors="replace")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results


@contextlib.asynccontextmanager
async def workers(jobs: list[dict[str, Any]]) -> AsyncIterator[Workers]:
    """Start one worker per job; return once all are ready; kill leftovers on exit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(CHILD.parent)])}
    processes: list[asyncio.subprocess.Process] = []
    try:
        for job in jobs:
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(CHILD),
                    json.dumps(job),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                )
            )
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), BOUND)
            if line.strip() != b"ready":
                assert process.stderr is not None
                err = await asyncio.wait_for(process.stderr.read(), BOUND)
                pytest.fail(f"worker did not start: {line!r}\n{err.decode(errors='replace')}")
        yield Workers(processes)
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


# -- one rate limit for every process ------------------------------------------------


async def test_processes_sharing_a_redis_limiter_never_exceed_the_limit(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    rate, per_worker = 10, 10
    total = rate * WORKERS
    async with FakeKommo(talks=range(1, total + 1), rate_limit=rate, rate_window=0.95) as fake:
        jobs = [
            {
                "role": "close",
                "redis_url": redis_server.url,
                "key": "kommo:rate",
                "rate": rate,
                "url": fake.url,
                "token": fake.token,
                "talks": list(range(w * per_worker + 1, (w + 1) * per_worker + 1)),
            }
            for w in range(WORKERS)
        ]
        async with workers(jobs) as running:
            await running.go()
            results = await running.results()
        arrivals = [request.at for request in fake.requests]
        assert fake.closed_talks() == list(range(1, total + 1))
    assert [result["failures"] for result in results] == [[]] * WORKERS
    assert fake.stats.throttled == 0
    # Measured at the server: no rolling window held more than the limit. (0.95 s, the
    # window the fake enforces: a send can reach the server some ms after its turn, which
    # the limiter's 25 ms margin covers on an idle machine, not always on two CI cores
    # running five busy processes.)
    assert busiest_window(arrivals, 0.95) <= rate
    # The three processes together are held to one limit: 30 turns, 29 intervals apart.
    assert max(arrivals) - min(arrivals) >= (total - 1) * (1 + DEFAULT_MARGIN) / rate - 0.05


# -- one refresh for every process ----------------------------------------------------


def expired(tokens: TokenSet) -> TokenSet:
    """The same pair, as a store holds it once its expiry time has passed."""
    return attrs.evolve(tokens, expires_at=datetime.now(UTC) - timedelta(seconds=1))


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a counter of the fake (it has no event to wait on), at most BOUND seconds."""
    async with asyncio.timeout(BOUND):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def one_refresh_among_workers(
    fake: FakeKommo, store: TokenStore, job: dict[str, Any]
) -> None:
    """Three processes find the stored token expired: exactly one refresh, all use it."""
    old = fake.oauth.issue_tokens()
    await store.save(expired(old))
    fake.oauth.gate = asyncio.Event()  # the token endpoint answers when the test says
    jobs = [
        {
            **job,
            "role": "oauth",
            "url": fake.url,
            "client_id": fake.oauth.client_id,
            "client_secret": fake.oauth.client_secret,
            "redirect_uri": fake.oauth.redirect_uri,
            "talks": [w * 2 + 1, w * 2 + 2],
        }
        for w in range(WORKERS)
    ]
    async with workers(jobs) as running:
        await running.go()
        # A slow token endpoint: one refresh is in flight while the other workers
        # reach the lock (they started together, within milliseconds).
        await wait_until(lambda: fake.stats.by_route["token"] >= 1)
        await asyncio.sleep(0.5)
        fake.oauth.gate.set()
        results = await running.results()
    assert fake.oauth.refreshes == 1
    assert fake.stats.by_route["token"] == 1
    new = fake.oauth.issued[-1]
    assert new.refresh_token != old.refresh_token
    # Every process sent the new access token, and reads the new pair from the store.
    api_requests = [request for request in fake.requests if request.route == "get"]
    assert len(api_requests) == 2 * WORKERS
    assert {request.headers["Authorization"] for request in api_requests} == {
        f"Bearer {new.access_token}"
    }
    assert [result["stored_refresh_token"] for result in results] == [new.refresh_token] * WORKERS
    assert sorted(t for result in results for t in result["fetched"]) == list(
        range(1, 2 * WORKERS + 1)
    )
    stored = await store.load()
    assert stored is not None
    assert stored.refresh_token == new.refresh_token


async def test_processes_sharing_a_redis_token_store_refresh_once(
    redis_server: RedisServer, r: redis.asyncio.Redis
) -> None:
    started = time.monotonic()
    async with FakeKommo() as fake:
        await one_refresh_among_workers(
            fake,
            RedisTokenStore(r, "kommo:tokens"),
            {
                "store": "redis",
                "redis_url": redis_server.url,
                "key": "kommo:tokens",
                "lock_timeout": 10.0,
            },
        )
    assert not await r.exists("kommo:tokens:lock")
    assert time.monotonic() - started < BOUND


async def test_processes_sharing_a_token_file_refresh_once(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    async with FakeKommo() as fake:
        await one_refresh_among_workers(
            fake, FileTokenStore(path), {"store": "file", "path": str(path)}
        )
