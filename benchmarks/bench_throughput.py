"""Benchmark: requests per second through ``KommoClient`` versus a raw aiohttp loop.

The server (``_server.py``: aiohttp's low-level server answering like Kommo)
runs in another process; client and server are pinned to different CPUs when
the machine has two. In the same run, rounds alternated, at concurrency 1, 10
and 50:

- ``get``: ``client.get_talk(id)`` (request, orjson, cattrs into ``Talk``)
  versus ``session.get`` + ``json.loads`` of the body;
- ``close``: ``client.close_talk(id, force=True)`` versus ``session.post`` of
  the same body;
- ``close_talks``: the batch (``client.close_talks(ids, concurrency=C)``)
  versus the same raw close loop.

Both sides are driven by the same pool of C coroutines over a shared iterator
of IDs (the batch drives itself). Each round runs raw and SDK back to back
(order alternated), so a machine that gets busier or quieter affects both
sides of a pair alike. Reported per case: requests/s (median of the rounds),
the ratio SDK / raw (median of the per-round ratios), client CPU µs per request
(``time.process_time``), and how busy the server was (if it is near 100 %, the
server, not the client, set the pace and the ratio says little).

Target: SDK >= 0.95 x raw aiohttp.
Run: ``python benchmarks/bench_throughput.py`` (bounded: about a minute; loopback only).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _server import Raw, ServerProcess, measured, pin_to_cpu

CONCURRENCIES = (1, 10, 50)
REQUESTS = {1: 800, 10: 1500, 50: 1500}
ROUNDS = 8
TARGET = 0.95
CLIENT_CPU, SERVER_CPU = 0, 1


async def drive(one: Callable[[int], Awaitable[object]], ids: range, concurrency: int) -> None:
    """Run ``one(id)`` for every ID with ``concurrency`` coroutines sharing one iterator."""
    shared: Iterator[int] = iter(ids)

    async def worker() -> None:
        for talk_id in shared:
            await one(talk_id)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_case(
    name: str,
    concurrency: int,
    sdk: Callable[[range], Awaitable[object]],
    raw: Callable[[range], Awaitable[object]],
    server: ServerProcess,
) -> dict[str, Any]:
    """Alternate short raw and SDK rounds; compare each pair (drift cancels out)."""
    count = REQUESTS[concurrency]
    samples: dict[str, list[tuple[float, float]]] = {"sdk": [], "raw": []}
    ratios: list[float] = []
    server_busy: list[float] = []
    next_id = 1
    for round_number in range(ROUNDS + 1):  # round 0 warms up
        order = [("raw", raw), ("sdk", sdk)]
        if round_number % 2:
            order.reverse()
        walls: dict[str, float] = {}
        for side, run in order:
            ids = range(next_id, next_id + count)
            next_id += count
            server_before, _ = server.cpu_seconds()
            with measured() as took:
                await run(ids)
            server_after, _ = server.cpu_seconds()
            walls[side] = took["wall"]
            if round_number:
                samples[side].append((took["wall"], took["cpu"]))
                server_busy.append((server_after - server_before) / took["wall"])
        if round_number:
            ratios.append(walls["raw"] / walls["sdk"])
    summary: dict[str, Any] = {"case": name, "concurrency": concurrency}
    for side, pairs in samples.items():
        summary[f"{side}_rps"] = count / statistics.median(w for w, _ in pairs)
        summary[f"{side}_cpu_us"] = 1e6 * statistics.median(c for _, c in pairs) / count
    summary["ratio"] = statistics.median(ratios)
    summary["cpu_ratio"] = summary["raw_cpu_us"] / summary["sdk_cpu_us"]
    summary["server_busy"] = statistics.median(server_busy)
    return summary


async def bench(server: ServerProcess) -> list[dict[str, Any]]:
    from kommo_talks import KommoClient, LongLivedToken

    rows: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session,
        KommoClient(
            server.url, auth=LongLivedToken(server.token), rate_limit=None, max_connections=100
        ) as client,
    ):
        raw = Raw(session, server.url, server.token)

        async def close_one(talk_id: int) -> None:
            await client.close_talk(talk_id, force=True)

        for concurrency in CONCURRENCIES:

            async def sdk_get(ids: range, c: int = concurrency) -> None:
                await drive(client.get_talk, ids, c)

            async def raw_get(ids: range, c: int = concurrency) -> None:
                await drive(raw.get, ids, c)

            async def sdk_close(ids: range, c: int = concurrency) -> None:
                await drive(close_one, ids, c)

            async def raw_close(ids: range, c: int = concurrency) -> None:
                await drive(raw.close, ids, c)

            async def sdk_batch(ids: range, c: int = concurrency) -> None:
                outcomes = await client.close_talks(ids, force=True, concurrency=c)
                if any(o.error is not None for o in outcomes):
                    raise RuntimeError("a close failed")

            rows.append(await run_case("get_talk", concurrency, sdk_get, raw_get, server))
            rows.append(await run_case("close_talk", concurrency, sdk_close, raw_close, server))
            rows.append(await run_case("close_talks", concurrency, sdk_batch, raw_close, server))
    return rows


def report(rows: list[dict[str, Any]], client_pin: str, server_pin: str) -> None:
    print(
        f"client {client_pin}; server {server_pin}; "
        f"medians of {ROUNDS} paired rounds (raw and SDK back to back, order alternated)"
    )
    header = (
        f"{'case':<12} {'conc':>4} {'raw req/s':>10} {'SDK req/s':>10} {'ratio':>6} "
        f"{'raw µs CPU':>10} {'SDK µs CPU':>10} {'CPU ratio':>9} {'server busy':>11}  target"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        verdict = "ok" if row["ratio"] >= TARGET else "BELOW"
        print(
            f"{row['case']:<12} {row['concurrency']:>4} {row['raw_rps']:>10,.0f} "
            f"{row['sdk_rps']:>10,.0f} {row['ratio']:>6.3f} {row['raw_cpu_us']:>10.1f} "
            f"{row['sdk_cpu_us']:>10.1f} {row['cpu_ratio']:>9.3f} {row['server_busy']:>10.0%}"
            f"  >= {TARGET} {verdict}"
        )
    print(
        "ratio = median over rounds of (raw time / SDK time) = SDK req/s / raw req/s; "
        "µs CPU = client CPU time per request; CPU ratio = raw µs / SDK µs (the ratio a "
        "CPU-bound client would see: steadier on a busy machine); server busy near 100% "
        "means the server set the pace."
    )


def main() -> None:
    """Run the benchmark and print the table."""
    with ServerProcess(cpu=SERVER_CPU) as server:
        client_pin = pin_to_cpu(CLIENT_CPU)
        rows = asyncio.run(bench(server))
        report(rows, client_pin, server.pinned)


if __name__ == "__main__":
    main()
