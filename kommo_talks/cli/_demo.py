"""``kommo-talks demo``: the SDK end to end against an embedded FakeKommo.

Why these defaults: real Kommo admits 7 requests per second, so 300 closes
would take about 45 s there. The demo's fake enforces 30 requests per
rolling second instead (the client keeps the same pace), so the run takes
about 12 s: long enough to watch the progress bar and its ETA, short enough
to sit through. The code path is the one a real account gets.
"""

from __future__ import annotations

import collections
import http
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
from rich import box
from rich.console import Console
from rich.table import Table

from ..auth import LongLivedToken
from ..batch import close_run
from ..client import KommoClient
from ..errors import KommoError
from ..models import CloseOutcome, CloseStatus, Talk
from ..ratelimit import SlidingWindowRateLimiter
from ..retry import RetryPolicy
from ..testing import FakeKommo, Fault
from ._output import ProgressReporter, reason
from ._text import plain

__all__ = ["run_demo"]

KOMMO_RATE = 7
SAMPLE_SIZE = 10
#: Slack added to the client's rolling window: the fake shares the event loop, so a
#: request may reach it a few milliseconds after its turn.
RATE_MARGIN = 0.05
FAULT_SEED = 7
# What the fake injects into closes: errors, drops, proxy pages, a close that fails late.
_FAULTS = (Fault.error(503), Fault.dropped(), Fault.error(502, html=True), Fault.then_error(503))


class _AttemptLog(logging.Handler):
    """Counts the client's attempts from its DEBUG lines: retries, and what went wrong."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.attempts = 0
        self.retries = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.ambiguous_closes = 0

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return
        _method, _path, status, _ms, attempt = args
        self.attempts += 1
        if isinstance(attempt, int) and attempt > 1:
            self.retries += 1
        if isinstance(status, str):
            self.faults["dropped connection"] += 1
        elif isinstance(status, int) and (status >= 500 or status == 429):
            self.faults[f"{status} {_phrase(status)}"] += 1
        elif status == 422 and isinstance(attempt, int) and attempt > 1:
            self.ambiguous_closes += 1


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


@attrs.frozen
class _Settings:
    talks: int
    rate: float
    concurrency: int
    fault_rate: float


@attrs.frozen
class _Result:
    outcomes: list[CloseOutcome]
    elapsed: float
    closed_on_server: int
    requests: dict[str, int]
    throttled: int


async def run_demo(*, talks: int, rate: float, concurrency: int, fault_rate: float) -> int:
    """Run the demo; return the exit status (0 when every talk ended closed)."""
    settings = _Settings(talks, rate, concurrency, fault_rate)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    with _attempt_log() as attempts:
        result = await _run(settings, out, err)
    failed = [o for o in result.outcomes if o.status is CloseStatus.FAILED]
    _summary(
        out,
        talks=talks,
        counts=collections.Counter(o.status for o in result.outcomes),
        failed=failed,
        requests=result.requests,
        attempts=attempts,
        throttled=result.throttled,
        elapsed=result.elapsed,
        close_requests=result.requests.get("close", 0),
    )
    return _verdict(out, settings, result, failed)


@contextmanager
def _attempt_log() -> Iterator[_AttemptLog]:
    """Count the client's attempts from its DEBUG log lines while the demo runs."""
    attempts = _AttemptLog()
    logger = logging.getLogger("kommo_talks")
    old_level = logger.level
    logger.addHandler(attempts)
    logger.setLevel(logging.DEBUG)
    try:
        yield attempts
    finally:
        logger.removeHandler(attempts)
        logger.setLevel(old_level)


async def _run(settings: _Settings, out: Console, err: Console) -> _Result:
    """Serve the fake with its faults, fetch a sample, close every talk."""
    ids = range(1, settings.talks + 1)
    async with FakeKommo(
        talks=ids, rate_limit=settings.rate, rate_window=1.0, record=False
    ) as fake:
        # Random faults on closes; the sample's GETs get two scripted ones. (No dropped
        # GETs: aiohttp silently re-sends an idempotent request on a dropped
        # keep-alive connection, a request the client's rate limiter never sees.)
        fake.random_faults(settings.fault_rate, _FAULTS, routes=("close",), seed=FAULT_SEED)
        fake.script("get", 503, Fault.error(502, html=True))
        limiter = SlidingWindowRateLimiter(settings.rate, margin=RATE_MARGIN)
        _header(out, fake, settings)
        async with KommoClient(
            fake.url,
            auth=LongLivedToken(fake.token),
            rate_limit=limiter,
            retry=RetryPolicy(max_attempts=8),
        ) as client:
            sample_ids = range(1, min(SAMPLE_SIZE, settings.talks) + 1)
            out.print(f"[bold]1.[/] get_talks: a sample of {len(sample_ids)} talks")
            sample = await client.get_talks(sample_ids, concurrency=settings.concurrency)
            out.print(_sample_table(sample))

            out.print(f"[bold]2.[/] close_talks(force=True): all {settings.talks} talks")
            started = time.monotonic()
            with ProgressReporter(err, settings.talks, "closing") as reporter:
                run = close_run(client, ids, force=True, concurrency=settings.concurrency)
                outcomes = await run.collect(reporter.advance)
            elapsed = time.monotonic() - started
        return _Result(
            outcomes=outcomes,
            elapsed=elapsed,
            closed_on_server=len(fake.closed_talks()),
            requests=dict(fake.stats.by_route),
            throttled=fake.stats.throttled,
        )


def _verdict(out: Console, settings: _Settings, result: _Result, failed: list[CloseOutcome]) -> int:
    """Print how long real Kommo would take and whether every talk closed; the exit status."""
    talks, closed_on_server = settings.talks, result.closed_on_server
    sent = result.requests.get("get", 0) + result.requests.get("close", 0)
    out.print(
        f"Real Kommo allows {KOMMO_RATE} requests/s: the same {sent} requests would take "
        f"about {sent / KOMMO_RATE:.0f} s there (the demo's fake allows {settings.rate:g}/s).",
        soft_wrap=True,
    )
    if not failed and closed_on_server == talks:
        out.print(f"[bold green]OK[/]: all {talks} talks closed, {result.throttled} answers 429.")
        return 0
    out.print(
        f"[bold red]FAILED[/]: {closed_on_server} of {talks} talks closed on the server, "
        f"{len(failed)} failed."
    )
    return 1


def _header(out: Console, fake: FakeKommo, settings: _Settings) -> None:
    talks, rate = settings.talks, settings.rate
    concurrency, fault_rate = settings.concurrency, settings.fault_rate
    lines = [
        "[bold]kommo-talks demo[/]: the SDK end to end, no account needed",
        f"  FakeKommo on {fake.url} with {talks} open talks",
        f"  rate limit enforced by the fake: {rate:g} requests per rolling second "
        f"(real Kommo: {KOMMO_RATE}/s; the demo runs faster to stay short)",
        f"  injected faults on {fault_rate:.0%} of closes: 503, dropped connection, "
        "HTML 502 page, 503 after closing",
        f"  client: KommoClient(rate_limit={rate:g}, retry=RetryPolicy(max_attempts=8)), "
        f"concurrency {concurrency}",
        "",
    ]
    for line in lines:
        out.print(line, soft_wrap=True)


def _sample_table(sample: list[Talk | KommoError]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("talk_id", "state", "origin", "entity", "contact", "created"):
        table.add_column(column)
    for item in sample:
        if isinstance(item, KommoError):
            table.add_row("?", plain(reason(item), style="red"), "", "", "", "")
            continue
        entity = f"{item.entity_type} {item.entity_id}" if item.entity_id is not None else "-"
        table.add_row(
            str(item.talk_id),
            "open" if item.is_in_work else "closed",
            plain(item.origin),
            plain(entity),
            str(item.contact_id),
            item.created_at.strftime("%Y-%m-%d"),
        )
    return table


def _summary(
    out: Console,
    *,
    talks: int,
    counts: collections.Counter[CloseStatus],
    failed: list[CloseOutcome],
    requests: dict[str, int],
    attempts: _AttemptLog,
    throttled: int,
    elapsed: float,
    close_requests: int,
) -> None:
    table = Table(title="Summary", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("[green]closed[/]", str(counts[CloseStatus.CLOSED]), f"of {talks}")
    table.add_row("already closed", str(counts[CloseStatus.ALREADY_CLOSED]), "")
    table.add_row(
        "[red]failed[/]" if failed else "failed",
        str(len(failed)),
        plain("; ".join(sorted({reason(o.error) for o in failed if o.error is not None}))[:80]),
    )
    table.add_row(
        "requests sent",
        str(sum(requests.get(r, 0) for r in ("get", "close"))),
        f"get {requests.get('get', 0)}, close {requests.get('close', 0)}",
    )
    table.add_row("retries ridden out", str(attempts.retries), "")
    for what, number in attempts.faults.most_common():
        table.add_row(f"  {what}", str(number), "")
    if attempts.ambiguous_closes:
        table.add_row(
            "  422 after an ambiguous attempt",
            str(attempts.ambiguous_closes),
            "the failed attempt had closed it: counted closed",
        )
    table.add_row(
        "[green]429 answers[/]" if throttled == 0 else "[red]429 answers[/]",
        str(throttled),
        "the client keeps the rate limit",
    )
    rate = close_requests / elapsed if elapsed > 0 else 0.0
    table.add_row("close phase", f"{elapsed:.1f} s", f"{rate:.1f} close requests/s")
    out.print()
    out.print(table)
