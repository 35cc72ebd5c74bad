"""The click commands of ``kommo-talks``."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NoReturn, TypeVar

import click
from rich.console import Console

from .._version import __version__
from ..auth import LongLivedToken
from ..batch import close_run
from ..client import KommoClient
from ..converter import converter
from ..errors import (
    ForbiddenError,
    KommoError,
    NotFoundError,
    TokenStoreError,
    TransportError,
    UnauthorizedError,
)
from ..models import CloseOutcome
from ..ratelimit import DEFAULT_MARGIN, RateLimiter
from ._input import InputError, collect_ids, parse_talk_id, source_name
from ._output import BatchReport, ProgressReporter, one_line, render_summary, talk_table
from ._shared_limit import KOMMO_RATE, SharedWindowRateLimiter, cache_folder, limit_file
from ._text import json_line, printable, printable_lines

__all__ = ["cli"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error to print as one line (``error: ...``) before exiting with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int) -> NoReturn:
    # The message may quote Kommo's answer or an input file: controls are escaped.
    click.echo(f"error: {printable(one_line(message))}", err=True)
    sys.exit(code)


def run(coroutine: Coroutine[Any, Any, int]) -> NoReturn:
    """Run a command's coroutine and exit with its status; errors become one line."""
    try:
        code = asyncio.run(coroutine)
    except CLIError as exc:
        _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


def cli_error(doing: str, exc: KommoError) -> CLIError:
    """The one-line error for an SDK error, with a hint a person can act on."""
    if isinstance(exc, TransportError):
        return CLIError(f"{doing}: cannot reach Kommo ({exc}); check KOMMO_BASE_URL")
    if isinstance(exc, UnauthorizedError):
        return CLIError(
            f"{doing}: {exc}; check KOMMO_TOKEN, or run `kommo-talks auth` for --token-file"
        )
    if isinstance(exc, ForbiddenError) and exc.is_block:
        return CLIError(f"{doing}: Kommo blocks this IP or account ({exc})")
    if isinstance(exc, TokenStoreError):  # a credential the user must mend
        return CLIError(
            f"{doing}: {exc}; `kommo-talks auth CODE --token-file PATH` writes a new one",
            EXIT_USAGE,
        )
    return CLIError(f"{doing}: {exc}")


@contextmanager
def api_errors(doing: str) -> Iterator[None]:
    """Turn the SDK's errors raised inside into a :class:`CLIError` (see :func:`cli_error`)."""
    try:
        yield
    except KommoError as exc:
        raise cli_error(doing, exc) from None


# -- credentials ---------------------------------------------------------------------------


def _env(name: str, what: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise CLIError(f"{name} is not set ({what})", EXIT_USAGE)
    return value


def _base_url() -> str:
    _env("KOMMO_BASE_URL", "the account's address, e.g. https://example.kommo.com")
    # Not stripped: a space anywhere in it is refused (exit 2), like the library does.
    return os.environ["KOMMO_BASE_URL"]


def _rate_limit(base_url: str, shared: bool) -> RateLimiter | float:
    """The limiter of a command: the account's shared window (see ``_shared_limit``), or 7/s."""
    if not shared:
        return KOMMO_RATE
    try:
        path = limit_file(base_url, cache_folder())
    except ValueError as exc:
        raise CLIError(f"KOMMO_BASE_URL: {exc}", EXIT_USAGE) from None
    return SharedWindowRateLimiter(
        path, KOMMO_RATE, warn=lambda message: click.echo(f"warning: {message}", err=True)
    )


def make_client(token_file: str | None, *, shared_limit: bool = True) -> KommoClient:
    """A client of the account named by the environment (see ``docs/cli.md``).

    ``--token-file`` (OAuth2 with a ``FileTokenStore`` and the
    ``KOMMO_CLIENT_*`` variables) wins over ``KOMMO_TOKEN`` (a long-lived token).
    With ``shared_limit`` (the default), the rate limit is shared with every
    other ``kommo-talks`` process of the account on this host.
    """
    base_url = _base_url()
    rate_limit = _rate_limit(base_url, shared_limit)
    auth: Any
    if token_file is not None:
        from ..oauth import OAuth2
        from ..stores import FileTokenStore

        if not os.path.isfile(token_file):
            raise CLIError(
                f"--token-file {token_file}: no such file; create it with "
                f"`kommo-talks auth CODE --token-file {token_file}`",
                EXIT_USAGE,
            )
        client_id, client_secret, redirect_uri = _oauth_settings()
        auth = OAuth2(client_id, client_secret, redirect_uri, FileTokenStore(token_file))
    else:
        token = os.environ.get("KOMMO_TOKEN", "").strip()
        if not token:
            raise CLIError(
                "no credentials: set KOMMO_TOKEN (a long-lived token) or pass --token-file PATH",
                EXIT_USAGE,
            )
        try:
            auth = LongLivedToken(token)
        except ValueError as exc:
            raise CLIError(f"KOMMO_TOKEN: {exc}", EXIT_USAGE) from None
    try:
        return KommoClient(base_url, auth=auth, retry=_retry_policy(), rate_limit=rate_limit)
    except ValueError as exc:
        raise CLIError(f"KOMMO_BASE_URL: {exc}", EXIT_USAGE) from None


def _oauth_settings() -> tuple[str, str, str]:
    return (
        _env("KOMMO_CLIENT_ID", "the integration ID"),
        _env("KOMMO_CLIENT_SECRET", "the integration's secret key"),
        _env("KOMMO_REDIRECT_URI", "the integration's redirect URI"),
    )


def _retry_policy() -> Any:
    """The default policy; ``KOMMO_TALKS_RETRY_BASE_DELAY`` (seconds) shortens its backoff.

    That variable exists for tests of the command line (an unreachable host
    should not cost seconds of backoff there); it is documented as such.
    """
    from ..retry import RetryPolicy

    raw = os.environ.get("KOMMO_TALKS_RETRY_BASE_DELAY")
    if raw is None:
        return RetryPolicy()
    try:
        return RetryPolicy(base_delay=float(raw))
    except ValueError:
        raise CLIError(
            f"KOMMO_TALKS_RETRY_BASE_DELAY: expected seconds, got {raw!r}", EXIT_USAGE
        ) from None


def token_file_option(function: F) -> F:
    """The ``--token-file PATH`` option of every command that talks to Kommo."""
    return click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="OAuth2 token file written by `kommo-talks auth` (overrides KOMMO_TOKEN; "
        "needs KOMMO_CLIENT_ID, KOMMO_CLIENT_SECRET, KOMMO_REDIRECT_URI).",
    )(function)


def shared_limit_option(function: F) -> F:
    """The ``--no-shared-limit`` option of every command that talks to Kommo."""
    return click.option(
        "--no-shared-limit",
        "no_shared_limit",
        is_flag=True,
        help="Keep the rate limit in this process only, not shared with other kommo-talks "
        "commands of the account on this host (through a file in ~/.cache/kommo-talks).",
    )(function)


class PrintableFormatter(logging.Formatter):
    """Log lines of ``--verbose`` with control characters escaped (a URL path may be Kommo's)."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record, each line through ``printable``."""
        return printable_lines(super().format(record))


# -- the commands ----------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kommo-talks")
@click.option("-v", "--verbose", is_flag=True, help="Log every request (to stderr).")
def cli(verbose: bool) -> None:
    """Kommo Talks from the terminal: get, list and close talks.

    Credentials come from the environment: KOMMO_BASE_URL and KOMMO_TOKEN (a
    long-lived token), or --token-file PATH (OAuth2). `kommo-talks demo`
    needs none. Exit status: 0 ok, 1 a talk failed or Kommo answered an
    error, 2 usage error, 130 interrupted (Ctrl-C).
    """
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrintableFormatter("%(asctime)s %(name)s %(message)s"))
        logger = logging.getLogger("kommo_talks")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


@cli.command()
@click.argument("talk_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the talk as Kommo's JSON.")
@token_file_option
@shared_limit_option
def get(talk_id: str, as_json: bool, token_file: str | None, no_shared_limit: bool) -> NoReturn:
    """Show one talk."""
    try:
        parsed = parse_talk_id(talk_id, "ID")
    except InputError as exc:
        _fail(str(exc), EXIT_USAGE)
    run(_get(parsed, as_json, token_file, shared_limit=not no_shared_limit))


async def _get(talk_id: int, as_json: bool, token_file: str | None, *, shared_limit: bool) -> int:
    async with make_client(token_file, shared_limit=shared_limit) as client:
        with api_errors(f"talk {talk_id}"):
            talk = await client.get_talk(talk_id)
    if as_json:
        sys.stdout.write(json_line(converter.unstructure(talk)))
    else:
        Console().print(talk_table(talk))
    return EXIT_OK


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option(
    "--from",
    "source",
    type=click.File("r", encoding="utf-8"),
    default=None,
    metavar="FILE|-",
    help="Read IDs from FILE (or stdin with -), one per line; blank and # lines are skipped.",
)
@click.option("--force", is_flag=True, help="Close at once, without Kommo's NPS bot.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Requests in flight at most (the rate limit, 7/s, still applies).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per talk.")
@token_file_option
@shared_limit_option
def close(
    ids: Sequence[str],
    source: IO[str] | None,
    force: bool,
    concurrency: int,
    as_json: bool,
    token_file: str | None,
    no_shared_limit: bool,
) -> NoReturn:
    """Close talks given as arguments and/or read with --from.

    The whole input is read and checked before anything is sent: a bad ID
    is named by its argument or line number (from 1) and nothing is closed.
    Exit status 0 only if every talk ended closed or already closed.
    """
    try:
        talk_ids = collect_ids(ids, source)
    except InputError as exc:
        _fail(f"{exc}; nothing was closed", EXIT_USAGE)
    if not talk_ids:
        if source is None:
            _fail("no talk IDs given (pass IDs or --from FILE|-)", EXIT_USAGE)
        # `list ... | close --from -` with nothing listed: nothing to do, not an error.
        click.echo(f"no talk IDs in {source_name(source)}: nothing to close", err=True)
        sys.exit(EXIT_OK)
    # After a pipe from `kommo-talks list`, whose last requests count in the same
    # rate window as this one's first: wait it out, unless the shared limit knows them.
    piped = source is not None and _is_pipe(source)
    pause = PIPE_PAUSE if piped and no_shared_limit else 0.0
    run(
        _close(
            talk_ids,
            force=force,
            concurrency=concurrency,
            as_json=as_json,
            token_file=token_file,
            pause=pause,
            shared_limit=not no_shared_limit,
        )
    )


PIPE_PAUSE = 1.0 + DEFAULT_MARGIN
"""Seconds ``close --no-shared-limit`` waits before its first request when its input is a pipe."""


def _is_pipe(source: IO[str]) -> bool:
    try:
        mode = os.fstat(source.fileno()).st_mode
        return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


async def _close(
    talk_ids: list[int],
    *,
    force: bool,
    concurrency: int,
    as_json: bool,
    token_file: str | None,
    pause: float = 0.0,
    shared_limit: bool = True,
) -> int:
    if pause:
        await asyncio.sleep(pause)
    async with make_client(token_file, shared_limit=shared_limit) as client:
        report = await _close_all(client, talk_ids, force=force, concurrency=concurrency)
    if as_json:
        write = sys.stdout.write
        for record in report.records():
            write(json_line(record))
        sys.stdout.flush()
    render_summary(Console(stderr=as_json, highlight=False), report)
    if report.interrupted:
        raise asyncio.CancelledError  # asyncio.run turns it back into KeyboardInterrupt
    return EXIT_OK if report.ok else EXIT_FAILED


async def _close_all(
    client: KommoClient, talk_ids: list[int], *, force: bool, concurrency: int
) -> BatchReport:
    """Close the first talk alone, then the rest (distinct already) with a progress bar."""
    first, rest = talk_ids[0], talk_ids[1:]
    # Wrong credentials or host fail once, not once per talk: the first talk
    # is closed alone, and the rest only if that did not fail for them all.
    (first_outcome,) = await close_run(client, [first], force=force, concurrency=1).collect()
    if first_outcome.error is not None and fails_every_talk(first_outcome.error):
        raise cli_error("the first close failed, so nothing else was sent", first_outcome.error)
    batch = close_run(client, rest, force=force, concurrency=concurrency)
    outcomes: dict[int, CloseOutcome] = {first: first_outcome}
    interrupted = False
    with ProgressReporter(Console(stderr=True, highlight=False), len(talk_ids), "closing") as bar:
        bar.advance(first_outcome)

        def progress(outcome: CloseOutcome) -> None:
            outcomes[outcome.talk_id] = outcome
            bar.advance(outcome)

        try:
            await batch.collect(progress)
        except asyncio.CancelledError:
            interrupted = True
    return BatchReport(
        talk_ids,
        outcomes,
        unsent=batch.unsent,
        stop_error=batch.stop_error,
        interrupted=interrupted,
    )


def fails_every_talk(error: KommoError) -> bool:
    """True if a failed close says the others would fail alike (credentials, host, account).

    A missing talk or a permission error on one talk says nothing of the others.
    """
    if isinstance(error, NotFoundError):
        return False
    if isinstance(error, ForbiddenError):
        return error.is_block
    return True


@cli.command(name="list")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="A Kommo filter, sent as filter[KEY]=VALUE; repeat a KEY for several values. "
    "only_in_work=0 (or false) sends no key: the flag is on by presence.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per talk and line instead."
)
@token_file_option
@shared_limit_option
def list_(
    filters: Sequence[str], as_json: bool, token_file: str | None, no_shared_limit: bool
) -> NoReturn:
    """Print the ID of every talk (that matches the filters), one per line.

    Pipe it into `close --from -`. With --json, each line is the talk as a
    JSON object instead (as `get --json` prints it, plus the list's status).
    Every page is fetched, as the output is written.
    """
    try:
        parsed = parse_filters(filters)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    run(_list(parsed, as_json, token_file, shared_limit=not no_shared_limit))


# Kommo's only_in_work works by presence: these values mean "leave it out" (False).
_OFF = frozenset({"0", "false"})


def parse_filters(filters: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts as ``iter_talks``' ``filter``: a repeated key gives a list.

    ``only_in_work=0`` (or ``false``) becomes ``False``, which sends no key.

    Raises:
        ValueError: a text without ``=`` or with an empty key.
    """
    parsed: dict[str, list[str]] = {}
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--filter {text!r}: expected KEY=VALUE")
        parsed.setdefault(key.strip(), []).append(value)
    flat: dict[str, Any] = {k: v[0] if len(v) == 1 else v for k, v in parsed.items()}
    if isinstance(flat.get("only_in_work"), str) and flat["only_in_work"].lower() in _OFF:
        flat["only_in_work"] = False
    return flat


async def _list(
    filters: dict[str, Any], as_json: bool, token_file: str | None, *, shared_limit: bool
) -> int:
    out = sys.stdout
    async with make_client(token_file, shared_limit=shared_limit) as client:
        try:
            talks = client.iter_talks(filter=filters or None)
        except ValueError as exc:
            raise CLIError(f"--filter: {exc}", EXIT_USAGE) from None
        with api_errors("listing talks"):
            try:
                async for talk in talks:
                    if as_json:
                        out.write(json_line(converter.unstructure(talk)))
                    else:
                        out.write(f"{talk.talk_id}\n")
                out.flush()
            except BrokenPipeError:
                # The reader went away (e.g. `| head`): stop quietly, like other tools.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, out.fileno())
                return EXIT_OK
    return EXIT_OK


@cli.command()
@click.option(
    "--talks",
    type=click.IntRange(1, 100_000),
    default=300,
    show_default=True,
    help="Talks the embedded fake holds.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Requests per second, enforced by the fake and kept by the client.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Closes in flight at most.",
)
@click.option(
    "--fault-rate",
    type=click.FloatRange(0, 0.5),
    default=0.08,
    show_default=True,
    help="Share of close requests that get an injected fault.",
)
def demo(talks: int, rate: float, concurrency: int, fault_rate: float) -> NoReturn:
    """Run the SDK end to end against an embedded FakeKommo (no account needed)."""
    from ._demo import run_demo

    run(run_demo(talks=talks, rate=rate, concurrency=concurrency, fault_rate=fault_rate))


@cli.command()
@click.argument("code")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    required=True,
    help="Where to write the tokens (JSON, mode 0600).",
)
def auth(code: str, token_file: str) -> NoReturn:
    """Exchange an OAuth2 authorization CODE for tokens and save them to --token-file.

    Uses KOMMO_BASE_URL, KOMMO_CLIENT_ID, KOMMO_CLIENT_SECRET and
    KOMMO_REDIRECT_URI. Prints nothing secret.
    """
    folder = os.path.dirname(os.path.abspath(token_file))
    if not os.path.isdir(folder):
        _fail(f"--token-file {token_file}: folder {folder} does not exist", EXIT_USAGE)
    run(_auth(code, token_file))


async def _auth(code: str, token_file: str) -> int:
    from ..oauth import OAuth2
    from ..stores import FileTokenStore

    base_url = _base_url()
    client_id, client_secret, redirect_uri = _oauth_settings()
    try:
        with api_errors("authorization failed"):
            tokens = await OAuth2.exchange_code(
                base_url,
                code.strip(),
                client_id=client_id,
                client_secret=client_secret,
                redirect_uri=redirect_uri,
                store=FileTokenStore(token_file),
                retry=_retry_policy(),
            )
    except ValueError as exc:
        raise CLIError(f"authorization failed: {exc}", EXIT_USAGE) from None
    expires = tokens.expires_at.isoformat(timespec="seconds")
    click.echo(f"Authorized: tokens saved to {token_file} (access token valid until {expires}).")
    click.echo(f"Use them with: kommo-talks <command> --token-file {token_file}")
    return EXIT_OK
