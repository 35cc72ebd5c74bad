"""Benchmark: rate-limit efficiency and fault ride-through of a batch close.

A ``FakeKommo`` in this process enforces R requests per rolling second with
the exact 1 s window, as Kommo does, and answers 429 beyond it. The client
runs ``close_talks(ids, force=True)`` (concurrency 10) with ``rate_limit=R``.

1. Efficiency, R = 7 (70 closes) and R = 50 (500 closes):
   - achieved rate / R, where the achieved rate is N / (wall time of the
     batch). Target >= 0.98 (70 closes at 7/s in <= 10.1 s). The limiter lets
     a full window's worth go at once, so a short batch can finish in about
     (N/R - 1) windows and score above 1;
   - 429s answered by the fake. Target 0;
   - the most requests the server saw in any rolling second (<= R).
2. Fault ride-through: 1,000 closes at R = 50 with 20 % of the closes
   answered by an injected fault (503, 500, HTML 502, dropped connection,
   and the ambiguous kinds: closed then 503, closed then dropped), with
   ``RetryPolicy(max_attempts=10)``: every talk must end closed (checked on
   the fake's side); total time relative to the same run without faults.

Run: ``python benchmarks/bench_ratelimit.py`` (bounded: about 70 s; loopback only).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kommo_talks import CloseStatus, KommoClient, LongLivedToken, RetryPolicy
from kommo_talks.testing import FakeKommo, Fault, busiest_window

EFFICIENCY_CASES = ((7, 70), (50, 500))
RATE_TARGET = 0.98
RIDE_THROUGH_CLOSES = 1_000
RIDE_THROUGH_RATE = 50
FAULT_RATE = 0.2
CONCURRENCY = 10


async def efficiency(rate: int, closes: int) -> dict[str, Any]:
    async with FakeKommo(talks=range(1, closes + 1), rate_limit=rate, rate_window=1.0) as fake:
        async with KommoClient(
            fake.url, auth=LongLivedToken(fake.token), rate_limit=rate
        ) as client:
            started = time.perf_counter()
            outcomes = await client.close_talks(
                range(1, closes + 1), force=True, concurrency=CONCURRENCY
            )
            wall = time.perf_counter() - started
        arrivals = [r.at for r in fake.requests if r.route == "close"]
        return {
            "rate": rate,
            "closes": closes,
            "wall": wall,
            "ratio": closes / wall / rate,
            "throttled": fake.stats.throttled,
            "busiest": busiest_window(arrivals),
            "closed": sum(o.status is CloseStatus.CLOSED for o in outcomes),
            "on_server": len(fake.closed_talks()),
        }


async def ride_through(fault_rate: float) -> dict[str, Any]:
    ids = range(1, RIDE_THROUGH_CLOSES + 1)
    faults = [
        Fault.error(503),
        Fault.error(500),
        Fault.error(502, html=True),
        Fault.dropped(),
        Fault.then_error(503),
        Fault.dropped(after_effect=True),
    ]
    async with FakeKommo(
        talks=ids, rate_limit=RIDE_THROUGH_RATE, rate_window=1.0, record=False
    ) as fake:
        if fault_rate:
            fake.random_faults(fault_rate, faults, routes=("close",), seed=2026)
        async with KommoClient(
            fake.url,
            auth=LongLivedToken(fake.token),
            rate_limit=RIDE_THROUGH_RATE,
            retry=RetryPolicy(max_attempts=10),
        ) as client:
            started = time.perf_counter()
            outcomes = await client.close_talks(ids, force=True, concurrency=CONCURRENCY)
            wall = time.perf_counter() - started
        failed = [o for o in outcomes if o.status is CloseStatus.FAILED]
        return {
            "wall": wall,
            "requests": fake.stats.by_route["close"],
            "throttled": fake.stats.throttled,
            "failed": len(failed),
            "reasons": sorted({str(o.error) for o in failed})[:3],
            "on_server": len(fake.closed_talks()),
        }


async def bench() -> None:
    print(f"close_talks(force=True, concurrency={CONCURRENCY}) against FakeKommo, exact 1 s window")
    print()
    print("1. Rate-limit efficiency")
    for rate, closes in EFFICIENCY_CASES:
        row = await efficiency(rate, closes)
        limit = closes / (RATE_TARGET * rate)
        print(
            f"  R = {rate:>2}/s, {closes} closes: {row['wall']:.2f} s "
            f"(target <= {limit:.1f} s), achieved/R = {row['ratio']:.3f} "
            f"(target >= {RATE_TARGET}) {'ok' if row['ratio'] >= RATE_TARGET else 'MISSED'}"
        )
        verdict = "ok" if row["throttled"] == 0 else "MISSED"
        print(
            f"    429s: {row['throttled']} (target 0) {verdict}; "
            f"busiest rolling second on the server: {row['busiest']} requests (limit {rate}); "
            f"closed {row['closed']}/{closes}, on the server {row['on_server']}"
        )
    print()
    print(
        f"2. Fault ride-through: {RIDE_THROUGH_CLOSES:,} closes at {RIDE_THROUGH_RATE}/s, "
        f"RetryPolicy(max_attempts=10)"
    )
    clean = await ride_through(0.0)
    faulty = await ride_through(FAULT_RATE)
    for name, row in (("no faults", clean), (f"{FAULT_RATE:.0%} faults", faulty)):
        print(
            f"  {name:<10}: {row['wall']:.1f} s, {row['requests']:,} close requests, "
            f"{row['on_server']:,}/{RIDE_THROUGH_CLOSES:,} closed on the server, "
            f"{row['failed']} failed, {row['throttled']} 429s"
        )
        for reason in row["reasons"]:
            print(f"      failure: {reason}")
    every = faulty["on_server"] == RIDE_THROUGH_CLOSES and faulty["failed"] == 0
    print(
        f"  with faults / without: {faulty['wall'] / clean['wall']:.2f}x time, "
        f"{faulty['requests'] / clean['requests']:.2f}x requests; "
        f"every talk closed: {'yes' if every else 'NO'} (target yes); "
        f"429s: {faulty['throttled']} (target 0) {'ok' if faulty['throttled'] == 0 else 'MISSED'}"
    )


def main() -> None:
    """Run the benchmark and print the figures with their targets."""
    asyncio.run(bench())


if __name__ == "__main__":
    main()
