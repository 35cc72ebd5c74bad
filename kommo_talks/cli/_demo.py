"""``kommo-talks demo``: the SDK end to end against an embedded FakeKommo.

Why these defaults: real Kommo admits 7 requests per second, so 300 closes
would take about 45 s there. The demo's fake enforces 30 requests per
rolling second instead (the client keeps the same pace), so the run takes
about 12 s: long enough to watch the progress bar and its ETA, short enough
to sit through. The code path is the one a real account gets.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Sequence

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
from ..testing._talks import varied_talk
from ._output import ProgressReporter, reason
from ._text import plain

__all__ = ["run_demo"]

KOMMO_RATE = 7
SAMPLE_SIZE = 10
#: Slack added to the client's rolling window: the fake shares the event loop, so a
#: request may reach it a few milliseconds after its turn.
RATE_MARGIN = 0.05
FAULT_SEED = 7
#: The seed of the fake's varied talks (its first ten show every origin and entity kind).
TALK_SEED = 13
# What the fake injects into closes: errors, drops, proxy pages, a close that fails late.
_CLOSE_FAULTS: tuple[tuple[str, Fault], ...] = (
    ("503 Service Unavailable", Fault.error(503)),
    ("dropped connection", Fault.dropped()),
    ("502 Bad Gateway (an HTML page)", Fault.error(502, html=True)),
    ("503 after the close went through", Fault.then_error(503)),
)
# The sample's first two GETs: a 503 and a proxy's page. (No dropped GETs: aiohttp
# silently re-sends an idempotent request on a dropped keep-alive connection, a
# request the client's rate limiter never sees.)
_GET_FAULTS = (_CLOSE_FAULTS[0], _CLOSE_FAULTS[2])
_NO_FAULT = Fault()

Script = Sequence[tuple[str, Fault] | None]


def fault_script(
    requests: int, rate: float, seed: int = FAULT_SEED
) -> list[tuple[str, Fault] | None]:
    """One entry per close request in arrival order: a ``(label, fault)`` with odds ``rate``."""
    rng = random.Random(seed)
    return [rng.choice(_CLOSE_FAULTS) if rng.random() < rate else None for _ in range(requests)]


def injected(script: Script, requests: int) -> collections.Counter[str]:
    """The faults the first ``requests`` requests met, by label (the fake serves them in order)."""
    return collections.Counter(item[0] for item in script[:requests] if item is not None)


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
    closed_at_start: frozenset[int]
    closed_on_server: int
    sample: int
    requests: dict[str, int]
    faults: dict[str, collections.Counter[str]]
    throttled: int


async def run_demo(*, talks: int, rate: float, concurrency: int, fault_rate: float) -> int:
    """Run the demo; return the exit status (0 when every talk ended closed)."""
    settings = _Settings(talks, rate, concurrency, fault_rate)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    result = await _run(settings, out, err)
    out.print()
    out.print(summary_table(result))
    return _verdict(out, settings, result)


async def _run(settings: _Settings, out: Console, err: Console) -> _Result:
    """Serve the fake with its talks and faults, fetch a sample, close every talk."""
    ids = range(1, settings.talks + 1)
    close_script = fault_script(3 * settings.talks + 20, settings.fault_rate)
    async with FakeKommo(talks=(), rate_limit=settings.rate, rate_window=1.0, record=False) as fake:
        for talk_id in ids:
            fake.talks[talk_id] = varied_talk(talk_id, seed=TALK_SEED)
        closed_at_start = frozenset(fake.closed_talks())
        fake.script("close", *(_NO_FAULT if item is None else item[1] for item in close_script))
        fake.script("get", *(fault for _, fault in _GET_FAULTS))
        _header(out, fake, settings, len(closed_at_start))
        sample_ids = range(1, min(SAMPLE_SIZE, settings.talks) + 1)
        async with KommoClient(
            fake.url,
            auth=LongLivedToken(fake.token),
            rate_limit=SlidingWindowRateLimiter(settings.rate, margin=RATE_MARGIN),
            retry=RetryPolicy(max_attempts=8),
        ) as client:
            out.print(f"[bold]1.[/] get_talks: a sample of {len(sample_ids)} talks")
            sample = await client.get_talks(sample_ids, concurrency=settings.concurrency)
            out.print(_sample_table(sample))

            out.print(f"[bold]2.[/] close_talks(force=True): all {settings.talks} talks")
            started = time.monotonic()
            with ProgressReporter(err, settings.talks, "closing") as reporter:
                run = close_run(client, ids, force=True, concurrency=settings.concurrency)
                outcomes = await run.collect(reporter.advance)
            elapsed = time.monotonic() - started
        requests = dict(fake.stats.by_route)
        return _Result(
            outcomes=outcomes,
            elapsed=elapsed,
            closed_at_start=closed_at_start,
            closed_on_server=len(fake.closed_talks()),
            sample=len(sample_ids),
            requests=requests,
            faults={
                "get": injected(_GET_FAULTS, requests.get("get", 0)),
                "close": injected(close_script, requests.get("close", 0)),
            },
            throttled=fake.stats.throttled,
        )


def _verdict(out: Console, settings: _Settings, result: _Result) -> int:
    """Print how long real Kommo would take and whether every talk closed; the exit status."""
    talks, closed_on_server = settings.talks, result.closed_on_server
    failed = sum(o.status is CloseStatus.FAILED for o in result.outcomes)
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
        f"{failed} failed."
    )
    return 1


def _header(out: Console, fake: FakeKommo, settings: _Settings, closed: int) -> None:
    talks, rate = settings.talks, settings.rate
    lines = [
        "[bold]kommo-talks demo[/]: the SDK end to end, no account needed",
        f"  FakeKommo on {fake.url} with {talks} talks ({talks - closed} open, "
        f"{closed} closed already), of many origins, leads and customers",
        f"  rate limit enforced by the fake: {rate:g} requests per rolling second "
        f"(real Kommo: {KOMMO_RATE}/s; the demo runs faster to stay short)",
        f"  injected faults: {settings.fault_rate:.0%} of close requests at random "
        "(503, dropped connection, HTML 502 page, 503 after the close went through), "
        "and the sample's first two GETs (503, HTML 502 page)",
        f"  client: KommoClient(rate_limit={rate:g}, retry=RetryPolicy(max_attempts=8)), "
        f"concurrency {settings.concurrency}",
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


def summary_table(result: _Result) -> Table:
    """The summary: every number is a sum of the rows indented under it, or says what it counts."""
    counts = collections.Counter(o.status for o in result.outcomes)
    failed = [o for o in result.outcomes if o.status is CloseStatus.FAILED]
    get, close = result.requests.get("get", 0), result.requests.get("close", 0)
    talks = len(result.outcomes)
    first = result.sample + talks
    faults = result.faults["get"] + result.faults["close"]
    table = Table(title="Summary", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    for column in ("what", "value", "note"):
        table.add_column(column, justify="right" if column == "value" else "left")
    closed = {o.talk_id for o in result.outcomes if o.status is CloseStatus.CLOSED}
    before = len(closed & result.closed_at_start)
    rows = [
        ("[green]closed[/]", len(closed), f"of {talks} talks"),
        ("  open at the start", len(closed) - before, "closed by the demo"),
        ("  closed at the start", before, _CLOSED_BEFORE),
        ("already closed", counts[CloseStatus.ALREADY_CLOSED], "422 on the first attempt"),
        ("[red]failed[/]" if failed else "failed", len(failed), _reasons(failed)),
        ("requests sent", get + close, f"get {get} + close {close}"),
        ("  first attempts", first, f"get {result.sample} (the sample) + close {talks}"),
        ("  retries", get + close - first, _RETRIES),
        ("injected faults", faults.total(), _by_route(result.faults, None)),
    ]
    rows += [(f"  {label}", n, _by_route(result.faults, label)) for label, n in faults.items()]
    rows.append(
        (
            "[green]429 answers[/]" if result.throttled == 0 else "[red]429 answers[/]",
            result.throttled,
            "the client keeps the rate limit",
        )
    )
    for what, number, note in rows:
        table.add_row(what, str(number), plain(note))
    rate = close / result.elapsed if result.elapsed > 0 else 0.0
    table.add_row("close phase", f"{result.elapsed:.1f} s", f"{rate:.1f} close requests/s")
    return table


_RETRIES = "one per injected fault and per 429 answer (a failed talk's last one is not retried)"
_CLOSED_BEFORE = (
    "a failed first attempt, then 422: the SDK takes it as that attempt's close (it may be)"
)


def _reasons(failed: list[CloseOutcome]) -> str:
    return "; ".join(sorted({reason(o.error) for o in failed if o.error is not None}))[:80]


def _by_route(faults: dict[str, collections.Counter[str]], label: str | None) -> str:
    """``"get 1 + close 7"``: the faults of ``label`` (or all) per route that met any."""
    parts = []
    for route in ("get", "close"):
        number = faults[route].total() if label is None else faults[route][label]
        if number:
            parts.append(f"{route} {number}")
    return " + ".join(parts)
