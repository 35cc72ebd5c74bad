"""Benchmark: ``iter_talks`` over 10,000 talks (40 pages of 250) on loopback.

The server (a ``FakeKommo`` holding 10,000 talks) runs in another process.
Two figures, each with its target:

1. Throughput of ``client.iter_talks()`` (every page through the client's
   pipeline, every talk decoded into a ``Talk``) against a raw aiohttp
   paging loop with ``json`` decoding (no models), in the same run, the
   order rotated each round. Target: >= 0.9x (median of the per-round
   ratios). Client CPU per talk is printed too (steadier than wall time on a
   shared machine), with the cost of decoding a page into ``Talk`` models
   through the public ``converter.structure`` without I/O, and a control
   loop (raw aiohttp, ``orjson``, ``converter.structure``): a user decoding
   pages by hand would pay that.
2. Peak RSS growth while iterating all 10,000 talks, measured in a fresh
   process (one page is held at a time). Target: < 5 MB. For scale, the
   growth when the same talks are collected into a list is printed too.

Run: ``python benchmarks/bench_listing.py`` (bounded: a few seconds).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _server import (
    PAGE_SIZE,
    ListingServer,
    current_rss_kib,
    measured,
    peak_rss_kib,
    raw_pages,
)

TALKS = 10_000
ROUNDS = 7
THROUGHPUT_TARGET = 0.9
RSS_TARGET_MB = 5.0


# --------------------------------------------------------------------------- clients


def decode_talks(talks: list[Any]) -> tuple[Any, ...]:
    """Decode a page's talks into ``Talk`` with the public converter (cattrs' generic path).

    The SDK has a faster path of its own for well-formed talks; it is not
    public, so the control uses what a user would call.
    """
    from kommo_talks import Talk, converter

    return converter.structure(talks, tuple[Talk, ...])


async def raw_models_loop(session: aiohttp.ClientSession, base: str, token: str) -> int:
    """A control: the raw loop with orjson, decoding each page's talks into ``Talk``."""
    return await raw_pages(session, base, token, loads=orjson.loads, decode=decode_talks)


async def sdk_loop(client: Any) -> int:
    count = 0
    async for _talk in client.iter_talks(page_size=PAGE_SIZE):
        count += 1
    return count


async def throughput(base: str, token: str) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per full listing of each side, and of the wall ratios.

    Sides: ``raw`` (aiohttp + json), ``sdk`` (``iter_talks``), ``control``
    (raw + orjson + ``Talk``). Each round runs all three, the order rotated.
    """
    from kommo_talks import KommoClient, LongLivedToken

    times: dict[str, list[tuple[float, float]]] = {"raw": [], "sdk": [], "control": []}
    ratios: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        KommoClient(base, auth=LongLivedToken(token), rate_limit=None) as client,
    ):
        sides = {
            "raw": lambda: raw_pages(session, base, token),
            "sdk": lambda: sdk_loop(client),
            "control": lambda: raw_models_loop(session, base, token),
        }
        for round_number in range(ROUNDS + 1):  # round 0 warms up
            order = list(sides)[round_number % 3 :] + list(sides)[: round_number % 3]
            walls: dict[str, float] = {}
            for side in order:
                with measured() as took:
                    assert await sides[side]() == TALKS
                walls[side] = took["wall"]
                if round_number:
                    times[side].append((took["wall"], took["cpu"]))
            if round_number:
                ratios.append(walls["raw"] / walls["sdk"])
    medians = {
        side: (statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs))
        for side, pairs in times.items()
    }
    medians["ratio"] = (statistics.median(ratios), 0.0)
    return medians


# --------------------------------------------------------------------------- memory


def _measure_rss(conn: Connection, base: str, token: str, collect: bool) -> None:
    conn.send(asyncio.run(_measure_rss_async(base, token, collect)))


async def _measure_rss_async(base: str, token: str, collect: bool) -> int:
    """Growth in KiB: the larger of peak-RSS growth and the sampled current-RSS growth.

    The peak alone can hide growth below the high-water mark left by imports,
    so the current RSS is also sampled after every talk.
    """
    from kommo_talks import KommoClient, LongLivedToken

    async with KommoClient(base, auth=LongLivedToken(token), rate_limit=None) as client:
        peak_before, now_before = peak_rss_kib(), current_rss_kib()
        highest = now_before
        kept = []
        async for talk in client.iter_talks(page_size=PAGE_SIZE):
            if collect:
                kept.append(talk)
            highest = max(highest, current_rss_kib())
        peak_after = peak_rss_kib()
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
    from kommo_talks.testing._fake import example_talk, talk_payload

    talks = [talk_payload(base, i, example_talk(i)) for i in range(1, PAGE_SIZE + 1)]
    body = json.dumps({"_embedded": {"talks": talks}}).encode()
    rounds = 20
    decode_talks(orjson.loads(body)["_embedded"]["talks"])  # hooks are generated on first use
    started = time.perf_counter()
    for _ in range(rounds):
        decode_talks(orjson.loads(body)["_embedded"]["talks"])
    return (time.perf_counter() - started) / rounds


# --------------------------------------------------------------------------- main


def main() -> int:
    """Run the benchmark and print the figures; exit status 0."""
    context = multiprocessing.get_context("spawn")
    with ListingServer(TALKS) as server:
        base, token = server.url, server.token
        medians = asyncio.run(throughput(base, token))
        decode = decode_cost(base)
        streamed = rss_growth_mb(context, base, token, collect=False)
        collected = rss_growth_mb(context, base, token, collect=True)
    pages = TALKS // PAGE_SIZE
    print(
        f"iter_talks: {TALKS:,} talks in {pages} pages of {PAGE_SIZE}, server in another "
        f"process; medians of {ROUNDS} rounds (order rotated)"
    )
    labels = {
        "raw": "raw aiohttp + json loop",
        "sdk": "client.iter_talks()",
        "control": "control: raw + converter",
    }
    for side, label in labels.items():
        wall, cpu = medians[side]
        print(
            f"  {label:<29}: {wall * 1000:7.1f} ms  ({TALKS / wall:,.0f} talks/s, "
            f"client CPU {cpu / TALKS * 1e6:.1f} us/talk)"
        )
    ratio = medians["ratio"][0]
    cpu_ratio = medians["raw"][1] / medians["sdk"][1]
    verdict = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
    print(
        f"  throughput ratio (raw time / SDK time): {ratio:.2f}x  "
        f"(target >= {THROUGHPUT_TARGET}x: {verdict}); client CPU ratio {cpu_ratio:.2f}x"
    )
    print(
        f"  Talk decoding alone     : {decode * 1000:7.2f} ms/page "
        f"({decode / PAGE_SIZE * 1e6:.1f} us/talk: orjson + converter.structure, no I/O)"
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
