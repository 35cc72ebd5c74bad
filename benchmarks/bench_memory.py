"""Benchmark: memory and live tasks of a batch over 100,000 talk IDs.

The server (``_server.py``, every close answered 202) runs in another process.
Each measurement runs in a fresh client process, so that one run's
high-water mark cannot hide another's:

1. ``iter_close_talks`` over 100,000 IDs (the bounded-memory claim): peak RSS
   growth during the run, minus the de-duplication set every batch must hold
   (its size is measured with ``tracemalloc`` and printed). Target: growth
   beyond the set < 5 MB.
2. ``close_talks`` over the same IDs, which must also return 100,000
   outcomes: growth beyond the set and the result list (both sizes printed).
3. Peak live tasks in both runs, sampled with ``asyncio.all_tasks()`` at every
   outcome, split into the batch's workers, aiohttp's per-request body writers
   (a short-lived task per POST on Python < 3.12; eager, so usually gone at
   once, on 3.12+) and the rest. Target: tasks <= concurrency + 5.
4. ``close_talks`` over 100,000 IDs that all fail, once with Kommo's plain
   404 problem+json and once with a 400 carrying a 64 KB HTML error page
   (neither is retried nor stops the batch): the bytes each ``FAILED``
   outcome keeps (everything reachable from it, by a ``gc.get_referents``
   walk; types, modules and functions are shared and not counted) and the
   peak RSS growth of the run. Target: <= 2 KiB per failed outcome, so
   100,000 failures stay under 200 MB (an error keeps its message, its
   500-character ``detail`` and its problem body; no traceback frames,
   which would keep the whole answer alive).

Baseline RSS is taken after a warm-up batch of the same shape (connections
open, code paths and allocator arenas warm), then ``gc.collect()``.
Run: ``python benchmarks/bench_memory.py`` (bounded: about three minutes; loopback only).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import multiprocessing
import sys
import time
import tracemalloc
import types
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _server import CloseAnswer, ServerProcess, current_rss_kib, peak_rss_kib, pin_to_cpu

IDS = 100_000
WARM_UP = 3_000
CONCURRENCY = 10
RSS_SAMPLE_EVERY = 500
RSS_TARGET_MB = 5.0
CLIENT_CPU, SERVER_CPU = 0, 1
FAILED_TARGET_BYTES = 2048
FAILURES: dict[str, CloseAnswer] = {
    "404 problem+json": (
        404,
        "application/problem+json",
        b'{"title":"Not Found","type":"https://httpstatus.es/404","status":404,'
        b'"detail":"Cannot POST https://subdomain.kommo.com/api/v4/talks/1/close"}',
    ),
    "400 with a 64 KB HTML page": (
        400,
        "text/html",
        b"<html><body><h1>400 Bad Request</h1>" + b"<p>proxy error</p>" * 3600 + b"</body></html>",
    ),
}
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def task_kinds() -> collections.Counter[str]:
    """Live tasks by kind: batch workers, aiohttp body writers, other."""
    kinds: collections.Counter[str] = collections.Counter()
    for task in asyncio.all_tasks():
        name = getattr(task.get_coro(), "__qualname__", "")
        if name == "BatchRun._work":
            kinds["workers"] += 1
        elif name.endswith("write_bytes"):
            kinds["aiohttp writers"] += 1
        else:
            kinds["other"] += 1
    return kinds


class Sampler:
    """Peak RSS and peak live tasks, sampled as outcomes arrive."""

    def __init__(self) -> None:
        self.count = 0
        self.peak_rss = current_rss_kib()
        self.peak_tasks = 0
        self.peak_kinds: collections.Counter[str] = collections.Counter()

    def __call__(self, outcome: Any) -> None:
        self.count += 1
        kinds = task_kinds()
        total = sum(kinds.values())
        if total > self.peak_tasks:
            self.peak_tasks, self.peak_kinds = total, kinds
        if self.count % RSS_SAMPLE_EVERY == 0:
            self.peak_rss = max(self.peak_rss, current_rss_kib())


async def _measure(url: str, token: str, mode: str) -> dict[str, Any]:
    from kommo_talks import CloseStatus, KommoClient, LongLivedToken

    async with KommoClient(url, auth=LongLivedToken(token), rate_limit=None) as client:
        # Warm up with a batch of the same shape, on IDs outside the measured range.
        warm = range(IDS + 1, IDS + 1 + WARM_UP)
        async for _ in client.iter_close_talks(warm, force=True, concurrency=CONCURRENCY):
            pass
        await client.close_talks(warm, force=True, concurrency=CONCURRENCY)
        gc.collect()
        baseline = current_rss_kib()
        peak_before = peak_rss_kib()
        sampler = Sampler()
        started = time.perf_counter()
        closed = 0
        if mode == "iter":
            async for outcome in client.iter_close_talks(
                range(1, IDS + 1), force=True, concurrency=CONCURRENCY
            ):
                sampler(outcome)
                closed += outcome.status is CloseStatus.CLOSED
        else:
            outcomes = await client.close_talks(
                range(1, IDS + 1), force=True, concurrency=CONCURRENCY, progress=sampler
            )
            closed = sum(o.status is CloseStatus.CLOSED for o in outcomes)
        elapsed = time.perf_counter() - started
        sampler.peak_rss = max(sampler.peak_rss, current_rss_kib())
        peak_growth = max(sampler.peak_rss, peak_rss_kib() if peak_rss_kib() > peak_before else 0)
        return {
            "mode": mode,
            "closed": closed,
            "elapsed": elapsed,
            "growth_kib": peak_growth - baseline,
            "peak_tasks": sampler.peak_tasks,
            "peak_kinds": dict(sampler.peak_kinds),
        }


def retained_bytes(root: object) -> int:
    """Bytes of every object reachable from ``root``, each counted once (types etc. excluded)."""
    seen: set[int] = set()
    pending = [root]
    total = 0
    while pending:
        obj = pending.pop()
        if id(obj) in seen or isinstance(obj, _SHARED):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        pending.extend(gc.get_referents(obj))
    return total


async def _measure_failures(url: str, token: str) -> dict[str, Any]:
    from kommo_talks import CloseStatus, KommoClient, LongLivedToken

    async with KommoClient(url, auth=LongLivedToken(token), rate_limit=None) as client:
        warm = range(IDS + 1, IDS + 1 + WARM_UP)
        await client.close_talks(warm, force=True, concurrency=CONCURRENCY)
        gc.collect()
        baseline = current_rss_kib()
        sampler = Sampler()
        started = time.perf_counter()
        outcomes = await client.close_talks(
            range(1, IDS + 1), force=True, concurrency=CONCURRENCY, progress=sampler
        )
        elapsed = time.perf_counter() - started
        sampler.peak_rss = max(sampler.peak_rss, current_rss_kib())
        failed = sum(o.status is CloseStatus.FAILED for o in outcomes)
        kinds = collections.Counter(type(o.error).__name__ for o in outcomes)
        return {
            "failed": failed,
            "errors": dict(kinds),
            "elapsed": elapsed,
            "growth_kib": sampler.peak_rss - baseline,
            # The list's own array is close_talks' result list, not the outcomes.
            "retained": retained_bytes(outcomes) - sys.getsizeof(outcomes),
        }


def _child(conn: Connection, url: str, token: str, mode: str) -> None:
    pin_to_cpu(CLIENT_CPU)
    if mode == "failures":
        conn.send(asyncio.run(_measure_failures(url, token)))
    else:
        conn.send(asyncio.run(_measure(url, token, mode)))


def measure_in_child(url: str, token: str, mode: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(child, url, token, mode))
    process.start()
    result: dict[str, Any] = parent.recv()
    process.join()
    return result


def structure_sizes() -> tuple[int, int]:
    """Bytes held by the de-duplication set of 100,000 IDs, and by close_talks' result list."""
    from kommo_talks import CloseOutcome, CloseStatus

    tracemalloc.start()
    seen = set(range(1, IDS + 1))  # the IDs themselves live as long as the set
    set_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ids = sorted(seen)
    tracemalloc.start()
    results = [CloseOutcome(talk_id, CloseStatus.CLOSED) for talk_id in ids]
    list_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del results
    return set_bytes, list_bytes


def measure_failures() -> None:
    """Measure and print what 100,000 failed outcomes keep, for each kind of failure."""
    mib = 1024 * 1024
    print()
    for name, answer in FAILURES.items():
        with ServerProcess(cpu=SERVER_CPU, close_answer=answer) as server:
            row = measure_in_child(server.url, server.token, "failures")
        per_outcome = row["retained"] / IDS
        verdict = "ok" if per_outcome <= FAILED_TARGET_BYTES else "MISSED"
        print(
            f"close_talks, every close answered {name} ({len(answer[2]):,}-byte body): "
            f"{row['failed']:,} failed ({row['errors']}) in {row['elapsed']:.1f} s"
        )
        print(
            f"  kept per failed outcome {per_outcome:,.0f} bytes, "
            f"{row['retained'] / mib:.1f} MB for {IDS:,}; "
            f"peak RSS growth {row['growth_kib'] / 1024:.1f} MB"
        )
        print(f"    target <= {FAILED_TARGET_BYTES:,} bytes per failed outcome: {verdict}")


def main() -> None:
    """Run the measurements and print the figures with their targets."""
    set_bytes, list_bytes = structure_sizes()
    with ServerProcess(cpu=SERVER_CPU) as server:
        rows = [measure_in_child(server.url, server.token, mode) for mode in ("iter", "list")]

    mib = 1024 * 1024
    print(
        f"{IDS:,} IDs, concurrency {CONCURRENCY}; server {server.pinned}, "
        f"client pinned to CPU {CLIENT_CPU} when possible"
    )
    print(f"de-duplication set of {IDS:,} IDs: {set_bytes / mib:.1f} MB (tracemalloc)")
    print(f"close_talks' result list of {IDS:,} outcomes: {list_bytes / mib:.1f} MB (tracemalloc)")
    print()
    for row in rows:
        growth = row["growth_kib"] * 1024
        if row["mode"] == "iter":
            name, beyond = "iter_close_talks", growth - set_bytes
            what = "beyond the set"
        else:
            name, beyond = "close_talks", growth - set_bytes - list_bytes
            what = "beyond the set and the list"
        task_limit = CONCURRENCY + 5
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["peak_kinds"].items()))
        print(
            f"{name}: {row['closed']:,} closed in {row['elapsed']:.1f} s "
            f"({row['closed'] / row['elapsed']:,.0f}/s)"
        )
        print(f"  peak RSS growth {growth / mib:.1f} MB; {what}: {beyond / mib:.1f} MB")
        print(
            f"    target < {RSS_TARGET_MB} MB: {'ok' if beyond / mib < RSS_TARGET_MB else 'MISSED'}"
        )
        print(f"  peak live tasks {row['peak_tasks']} ({kinds})")
        workers_and_rest = row["peak_tasks"] - row["peak_kinds"].get("aiohttp writers", 0)
        print(
            f"    target <= {task_limit}: all tasks "
            f"{'ok' if row['peak_tasks'] <= task_limit else 'MISSED'}; "
            f"without aiohttp's transient body writers {workers_and_rest} "
            f"{'ok' if workers_and_rest <= task_limit else 'MISSED'}"
        )
    measure_failures()


if __name__ == "__main__":
    main()
