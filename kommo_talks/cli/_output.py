"""What the command line shows: one-line error reasons, progress, the summary of a batch."""

from __future__ import annotations

import http
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..errors import (
    APIError,
    ForbiddenError,
    KommoError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ..models import CloseOutcome, CloseStatus, Talk

__all__ = [
    "BatchReport",
    "ProgressReporter",
    "one_line",
    "reason",
    "render_summary",
    "talk_table",
]

NOT_ATTEMPTED = "not_attempted"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def reason(error: BaseException) -> str:
    """A short reason for a failed talk, without the request URL (which names the talk)."""
    if isinstance(error, ForbiddenError) and error.is_block:
        return "403 IP/account block (an HTML page instead of JSON)"
    if isinstance(error, APIError):
        text = str(error.status)
        title = error.title or _phrase(error.status)
        if title:
            text += f" {title}"
        # A detail naming the request's URL would make each talk's reason unique.
        if (
            error.problem
            and error.detail
            and error.detail != error.title
            and "://" not in error.detail
        ):
            detail = one_line(error.detail)
            text += f": {detail[:120]}..." if len(detail) > 120 else f": {detail}"
        if isinstance(error, RateLimitError | ServerError) and error.retry_after is not None:
            text += f" (retry after {error.retry_after:.0f} s)"
        return text
    if isinstance(error, TransportError):
        cause = error.__cause__
        if cause is not None:
            detail = str(cause) or ("timed out" if isinstance(cause, TimeoutError) else "")
            name = type(cause).__name__
            return one_line(f"connection failed: {name}: {detail}" if detail else name)
        return one_line(str(error))
    return one_line(f"{type(error).__name__}: {error}")


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


# -- progress ----------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """Talks per second, over the whole run so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if task.completed and elapsed > 0:
            return Text(f"{task.completed / elapsed:5.1f} talks/s", style="progress.data.speed")
        return Text("    - talks/s", style="progress.data.speed")


class ProgressReporter:
    """A progress bar with rate and ETA on a terminal; otherwise a plain line per 10 %.

    Call :meth:`advance` once per outcome (it is the batch's ``progress``
    callback). Use it as a context manager.
    """

    def __init__(self, console: Console, total: int, label: str) -> None:
        self._console = console
        self._total = total
        self._label = label
        self._done = 0
        self._failed = 0
        self._started = time.monotonic()
        self._next_line = 0
        self._progress: Progress | None = None
        self._task_id: Any = None

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                _RateColumn(),
                TextColumn("[red]{task.fields[failed]} failed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._progress.start()
            self._task_id = self._progress.add_task(self._label, total=self._total, failed=0)
        else:
            self._next_line = self._step()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _step(self) -> int:
        return max(1, self._total // 10)

    def advance(self, outcome: CloseOutcome | Talk | KommoError) -> None:
        """Count one outcome."""
        self._done += 1
        failed = isinstance(outcome, KommoError) or (
            isinstance(outcome, CloseOutcome) and outcome.status is CloseStatus.FAILED
        )
        self._failed += failed
        if self._progress is not None:
            self._progress.update(self._task_id, advance=1, failed=self._failed)
        elif self._done >= self._next_line or self._done == self._total:
            self._next_line = self._done + self._step()
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self._started
        # Under half a second, a rate says more about the first burst than the pace.
        rate = self._done / elapsed if elapsed >= 0.5 else 0.0
        percent = 100 * self._done // self._total if self._total else 100
        text = f"{self._label}: {self._done}/{self._total} ({percent}%)"
        if rate > 0:
            text += f", {rate:.1f} talks/s"
        if self._failed:
            text += f", {self._failed} failed"
        if rate > 0 and self._done < self._total:
            text += f", ETA {(self._total - self._done) / rate:.0f} s"
        click.echo(text, err=True)


# -- the summary of a batch close -------------------------------------------------------------


class BatchReport:
    """What happened to every talk of a ``close``: outcomes, and the talks never attempted."""

    def __init__(
        self,
        ids: Sequence[int],
        outcomes: dict[int, CloseOutcome],
        *,
        unsent: Sequence[int] = (),
        stop_error: KommoError | None = None,
        interrupted: bool = False,
    ) -> None:
        self.ids = ids
        self.outcomes = outcomes
        self.stop_error = stop_error
        self.interrupted = interrupted
        unsent_set = set(unsent)
        #: talks with no request sent: never read, or read after the batch stopped
        self.not_attempted = [i for i in ids if i not in outcomes or i in unsent_set]
        skipped = set(self.not_attempted)
        self.closed = [i for i in ids if i not in skipped and self._is(i, CloseStatus.CLOSED)]
        self.already_closed = [
            i for i in ids if i not in skipped and self._is(i, CloseStatus.ALREADY_CLOSED)
        ]
        self.failed = [i for i in ids if i not in skipped and self._is(i, CloseStatus.FAILED)]

    def _is(self, talk_id: int, status: CloseStatus) -> bool:
        outcome = self.outcomes.get(talk_id)
        return outcome is not None and outcome.status is status

    @property
    def ok(self) -> bool:
        """True if every talk ended closed or already closed."""
        return not self.failed and not self.not_attempted

    def why_not_attempted(self) -> str:
        """Why some talks were never attempted."""
        if self.stop_error is not None:
            return f"the batch stopped: {reason(self.stop_error)}"
        if self.interrupted:
            return "interrupted; those in flight at that moment may have been closed"
        return "the batch ended early"

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per talk, in input order (``close --json``)."""
        skipped = set(self.not_attempted)
        records: list[dict[str, Any]] = []
        for talk_id in self.ids:
            outcome = self.outcomes.get(talk_id)
            if talk_id in skipped or outcome is None:
                record: dict[str, Any] = {"talk_id": talk_id, "status": NOT_ATTEMPTED}
                record["reason"] = self.why_not_attempted()
            else:
                record = {"talk_id": talk_id, "status": outcome.status.value}
                if outcome.error is not None:
                    record["error"] = reason(outcome.error)
                    record["error_type"] = type(outcome.error).__name__
                    status = getattr(outcome.error, "status", None)
                    if isinstance(status, int):
                        record["http_status"] = status
            records.append(record)
        return records


def _id_list(ids: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more (--json lists all)" if len(ids) > limit else "")


def render_summary(console: Console, report: BatchReport) -> None:
    """Print the summary table, then the reasons of failures and the talks not attempted."""
    table = Table(title="Summary", box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    table.add_column("outcome")
    table.add_column("talks", justify="right")
    table.add_row("[green]closed[/]", str(len(report.closed)))
    table.add_row("already closed", str(len(report.already_closed)))
    table.add_row("[red]failed[/]" if report.failed else "failed", str(len(report.failed)))
    table.add_row(
        "[yellow]not attempted[/]" if report.not_attempted else "not attempted",
        str(len(report.not_attempted)),
    )
    console.print(table)

    if report.failed:
        by_reason: dict[str, list[int]] = {}
        for talk_id in report.failed:
            error = report.outcomes[talk_id].error
            key = reason(error) if error is not None else "unknown"
            by_reason.setdefault(key, []).append(talk_id)
        failures = Table(
            title="Failed", box=box.SIMPLE_HEAD, title_justify="left", show_lines=False
        )
        failures.add_column("reason", overflow="fold")
        failures.add_column("talks", justify="right")
        failures.add_column("IDs", overflow="fold")
        for text, ids in sorted(by_reason.items(), key=lambda item: -len(item[1])):
            failures.add_row(text, str(len(ids)), _id_list(ids))
        console.print(failures)

    if report.not_attempted:
        console.print(
            f"[yellow]Not attempted[/] ({report.why_not_attempted()}): "
            f"{_id_list(report.not_attempted, 20)}",
            highlight=False,
            soft_wrap=True,
        )


def talk_table(talk: Talk) -> Table:
    """A two-column table of one talk's fields."""
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    entity = f"{talk.entity_type} {talk.entity_id}" if talk.entity_id is not None else "-"
    rows = [
        ("talk_id", str(talk.talk_id)),
        ("state", "open (in work)" if talk.is_in_work else "closed"),
        ("is_read", "yes" if talk.is_read else "no"),
        ("created_at", talk.created_at.isoformat()),
        ("updated_at", talk.updated_at.isoformat()),
        ("missed_at", talk.missed_at.isoformat() if talk.missed_at else "-"),
        ("origin", talk.origin),
        ("chat_id", talk.chat_id or "-"),
        ("contact_id", str(talk.contact_id)),
        ("entity", entity),
        ("rate", str(talk.rate)),
        ("account_id", str(talk.account_id)),
        ("url", talk.self_url or "-"),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    return table
