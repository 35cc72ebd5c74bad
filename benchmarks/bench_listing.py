"""Benchmark: ``iter_talks`` over 10,000 talks (40 pages of 250) on loopback.

The server (a ``FakeKommo`` holding 10,000 talks) runs in another process.
Two figures, each with its target:

1. Throughput of ``client.iter_talks()`` (every page through the client's
   pipeline, every talk decoded into a ``Talk``) against a raw aiohttp
   paging loop with ``json`` decoding (no models), in the same run, rounds
   alternated. Target: >= 0.9x. Also printed: the cost of decoding a page
   into ``Talk`` models without I/O, and a control loop (raw aiohttp,
   ``orjson``, the same converter) that shows where the gap comes from.
2. Peak RSS growth while iterating all 10,000 talks, measured in a fresh
   process (one page is held at a time). Target: < 5 MB. For scale, the
   growth when the same talks are collected into a list is printed too.

Run: ``python benchmarks/bench_listing.py`` (bounded: a few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson

TALKS = 10_000
PAGE_SIZE = 250
ROUNDS = 7
THROUGHPUT_TARGET = 0.9
RSS_TARGET_MB = 5.0


# --------------------------------------------------------------------------- server


def _serve(conn: Connection, talks: int) -> None:
    asyncio.run(_serve_async(conn, talks))


async def _serve_async(conn: Connection, talks: int) -> None:
    from kommo_talks.testing import FakeKommo

    async with FakeKommo(talks=range(1, talks + 1), record=False) as fake:
        conn.send((fake.url, fake.token))
        # Serve until the parent says stop (or goes away).
        await asyncio.get_running_loop().run_in_executor(None, _wait_for_stop, conn)


def _wait_for_stop(conn: Connection) -> None:
    with contextlib.suppress(EOFError):
        conn.recv()


# --------------------------------------------------------------------------- clients


async def raw_loop(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    *,
    loads: Callable[[bytes], Any] = json.loads,
    decode: Callable[[list[Any]], object] | None = None,
) -> int:
    """The baseline: follow ``_links.next.href`` by hand, ``json.loads`` each page.

    With ``decode`` (the control), each page's talks are also decoded into
    ``Talk`` objects as the SDK does.
    """
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    url: str | None = f"{base}/api/v4/talks?page=1&limit={PAGE_SIZE}"
    count = 0
    while url is not None:
        async with session.get(url, headers=headers) as response:
            if response.status == 204:
                break
            response.raise_for_status()
            data = loads(await response.read())
        talks = data["_embedded"]["talks"]
        if decode is not None:
            decode(talks)
        for _talk in talks:
            count += 1
        if not talks:
            break
        link = data.get("_links", {}).get("next")
        url = link["href"] if link else None
    return count


async def raw_models_loop(session: aiohttp.ClientSession, base: str, token: str) -> int:
    """A control: the raw loop with orjson, decoding each page's talks as the SDK does."""
    from kommo_talks.converter import structure_talks

    return await raw_loop(session, base, token, loads=orjson.loads, decode=structure_talks)


async def sdk_loop(client: Any) -> int:
    count = 0
    async for _talk in client.iter_talks(page_size=PAGE_SIZE):
        count += 1
    return count


async def throughput(base: str, token: str) -> tuple[float, float, float]:
    """Median seconds per full listing: (raw loop, iter_talks, raw loop with models)."""
    from kommo_talks import KommoClient, LongLivedToken

    raw_times: list[float] = []
    sdk_times: list[float] = []
    control_times: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        KommoClient(base, auth=LongLivedToken(token), rate_limit=None) as client,
    ):
        # Warm both connections and code paths once.
        assert await raw_loop(session, base, token) == TALKS
        assert await sdk_loop(client) == TALKS
        for _ in range(ROUNDS):
            started = time.perf_counter()
            assert await raw_loop(session, base, token) == TALKS
            raw_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert await sdk_loop(client) == TALKS
            sdk_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert await raw_models_loop(session, base, token) == TALKS
            control_times.append(time.perf_counter() - started)
    return (
        statistics.median(raw_times),
        statistics.median(sdk_times),
        statistics.median(control_times),
    )


# --------------------------------------------------------------------------- memory


def _peak_rss_kb() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _current_rss_kb() -> int:
    """Resident set size now (Linux; 0 elsewhere, where only the peak is used)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() // 1024
    except OSError:
        return 0


def _measure_rss(conn: Connection, base: str, token: str, collect: bool) -> None:
    conn.send(asyncio.run(_measure_rss_async(base, token, collect)))


async def _measure_rss_async(base: str, token: str, collect: bool) -> int:
    """Growth in KiB: the larger of peak-RSS growth and the sampled current-RSS growth.

    The peak alone can hide growth below the high-water mark left by imports,
    so the current RSS is also sampled after every talk.
    """
    from kommo_talks import KommoClient, LongLivedToken

    async with KommoClient(base, auth=LongLivedToken(token), rate_limit=None) as client:
        peak_before, now_before = _peak_rss_kb(), _current_rss_kb()
        highest = now_before
        kept = []
        async for talk in client.iter_talks(page_size=PAGE_SIZE):
            if collect:
                kept.append(talk)
            highest = max(highest, _current_rss_kb())
        peak_after = _peak_rss_kb()
    assert len(kept) == (TALKS if collect else 0)
    return max(peak_after - peak_before, highest - now_before)


def rss_growth_mb(context: Any, base: str, token: str, *, collect: bool) -> float:
    """Peak RSS growth (MB) of one full listing in a fresh process."""
    parent, child = context.Pipe()
    process = context.Process(target=_measure_rss, args=(child, base, token, collect))
    process.start()
    growth_kb: int = parent.recv()
    process.join(60)
    return growth_kb / 1024


def decode_cost(base: str) -> float:
    """Seconds to decode one full page of 250 talks into ``Talk`` (in-process, no I/O)."""
    from kommo_talks import KommoClient, LongLivedToken
    from kommo_talks.listing import _decode_page
    from kommo_talks.testing._fake import example_talk, talk_payload

    talks = [talk_payload(base, i, example_talk(i)) for i in range(1, PAGE_SIZE + 1)]
    body = json.dumps({"_embedded": {"talks": talks}}).encode()

    response = SimpleNamespace(
        status=200, method="GET", url=base, body=body, content_type="application/hal+json"
    )
    client = KommoClient(base, auth=LongLivedToken("unused"))
    rounds = 20
    _decode_page(client, response)  # type: ignore[arg-type]  # hooks are generated on first use
    started = time.perf_counter()
    for _ in range(rounds):
        _decode_page(client, response)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / rounds


# --------------------------------------------------------------------------- main


def main() -> int:
    """Run the benchmark and print the figures; exit status 0."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=_serve, args=(child, TALKS), daemon=True)
    server.start()
    try:
        base, token = parent.recv()
        raw, sdk, control = asyncio.run(throughput(base, token))
        decode = decode_cost(base)
        streamed = rss_growth_mb(context, base, token, collect=False)
        collected = rss_growth_mb(context, base, token, collect=True)
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()
    pages = TALKS // PAGE_SIZE
    ratio = raw / sdk
    print(f"iter_talks: {TALKS:,} talks in {pages} pages of {PAGE_SIZE}, server in another process")
    print(
        f"  raw aiohttp + json loop : {raw * 1000:7.1f} ms  ({TALKS / raw:,.0f} talks/s, "
        f"{raw / pages * 1000:.2f} ms/page)"
    )
    print(
        f"  client.iter_talks()     : {sdk * 1000:7.1f} ms  ({TALKS / sdk:,.0f} talks/s, "
        f"{sdk / pages * 1000:.2f} ms/page)"
    )
    verdict = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
    print(f"  throughput ratio        : {ratio:.2f}x  (target >= {THROUGHPUT_TARGET}x: {verdict})")
    print(
        f"  Talk decoding alone     : {decode * 1000:7.2f} ms/page "
        f"({decode / PAGE_SIZE * 1e6:.1f} us/talk: orjson + the strict converter, no I/O)"
    )
    print(
        f"  control: raw loop + orjson + Talk models: {control * 1000:7.1f} ms "
        f"(iter_talks at {control / sdk:.2f}x of it: the gap to the raw loop is model decoding)"
    )
    verdict = "met" if streamed < RSS_TARGET_MB else "NOT met"
    print(
        f"  peak RSS growth, iterating : {streamed:5.2f} MB  "
        f"(target < {RSS_TARGET_MB:g} MB: {verdict})"
    )
    print(f"  peak RSS growth, collecting all into a list (for scale): {collected:5.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
