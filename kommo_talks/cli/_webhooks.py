"""``kommo-talks webhooks dead list|retry|drop``: the dead letters of a ``RedisWebhookQueue``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import click

from ..errors import KommoError
from ..webhooks import MessageEvent
from ._app import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, run
from ._text import json_line, printable

if TYPE_CHECKING:
    from ..webhooks import DeadLetter, RedisWebhookQueue

__all__ = ["webhooks"]

_STREAM_ID = re.compile(r"\d+-\d+")
_PAGE = 100


@contextlib.asynccontextmanager
async def _opened(redis_url: str, stream: str) -> AsyncIterator[RedisWebhookQueue]:
    try:
        import redis.asyncio
    except ImportError:
        raise CLIError(
            "webhooks needs the redis extra: pip install 'kommo-talks[redis]'", EXIT_USAGE
        ) from None
    from ..webhooks import RedisWebhookQueue

    try:
        connection = redis.asyncio.Redis.from_url(redis_url)
    except ValueError as exc:
        raise CLIError(f"--redis-url is not a Redis URL: {exc}", EXIT_USAGE) from None
    try:
        yield RedisWebhookQueue(connection, stream)
    finally:
        await connection.aclose()


async def _all_dead(queue: RedisWebhookQueue, limit: int | None = None) -> list[DeadLetter]:
    """Every dead letter (or the oldest ``limit``), page by page."""
    found: list[DeadLetter] = []
    while limit is None or len(found) < limit:
        after = found[-1].id if found else None
        page = await queue.dead_letters(_PAGE, after=after)
        found += page
        if len(page) < _PAGE:
            break
    return found if limit is None else found[:limit]


def _describe(dead: DeadLetter) -> str:
    event = dead.event
    if event is None:
        return "(not decodable)"
    where = f" of account {event.account_id}" if event.account_id is not None else ""
    if isinstance(event, MessageEvent):
        return f"message {event.message_id} ({event.direction}) in talk {event.talk_id}{where}"
    return f"talk[{event.action}] of talk {event.talk_id}{where}"


def _as_json(dead: DeadLetter) -> dict[str, Any]:
    event = None
    if dead.event is not None:
        kind = "message" if isinstance(dead.event, MessageEvent) else "talk"
        event = {"kind": kind, **attrs.asdict(dead.event)}
    return {
        "id": dead.id,
        "source_id": dead.source_id,
        "deliveries": dead.deliveries,
        "error": dead.error,
        "event": event,
    }


def _checked_ids(ids: Sequence[str], every: bool) -> list[str]:
    if every == bool(ids):
        raise CLIError("give dead-letter IDs or --all, not both", EXIT_USAGE)
    bad = [i for i in ids if not _STREAM_ID.fullmatch(i)]
    if bad:
        raise CLIError(f"not a stream entry ID (like 1700000000000-0): {bad[0]}", EXIT_USAGE)
    return list(dict.fromkeys(ids))


def _queue_options(function: click.decorators.FC) -> click.decorators.FC:
    function = click.option(
        "--stream",
        default="kommo:webhooks",
        show_default=True,
        help="The queue's stream; its dead letters are in <stream>:dead.",
    )(function)
    return click.option(
        "--redis-url", metavar="URL", required=True, help="The Redis of the RedisWebhookQueue."
    )(function)


@click.group()
def webhooks() -> None:
    """Durable webhook intake on Redis (RedisWebhookQueue)."""


@webhooks.group()
def dead() -> None:
    """Events given up after failing max_deliveries times: list, retry or drop them."""


@dead.command(name="list")
@_queue_options
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (the oldest).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_dead(redis_url: str, stream: str, limit: int | None, as_json: bool) -> NoReturn:
    """Print dead letters, oldest first: ID, runs, event, last error (tab-separated)."""

    async def listing() -> int:
        async with _opened(redis_url, stream) as queue:
            try:
                letters = await _all_dead(queue, limit)
            except KommoError as exc:
                raise CLIError(f"cannot list the dead letters: {exc}") from None
        for letter in letters:
            if as_json:
                click.echo(json_line(_as_json(letter)), nl=False)
            else:
                fields = (letter.id, str(letter.deliveries), _describe(letter), letter.error)
                click.echo("\t".join(printable(field) for field in fields))
        return EXIT_OK

    run(listing())


def _move(verb: str, ids: Sequence[str], every: bool, redis_url: str, stream: str) -> NoReturn:
    async def moving() -> int:
        wanted = _checked_ids(ids, every)  # before connecting
        async with _opened(redis_url, stream) as queue:
            try:
                chosen = [d.id for d in await _all_dead(queue)] if every else wanted
                if verb == "retried":
                    done = await queue.retry_dead(chosen)
                else:
                    done = await queue.drop_dead(chosen)
            except KommoError as exc:
                raise CLIError(f"cannot change the dead letters: {exc}") from None
        click.echo(f"{verb} {done} dead letter{'' if done == 1 else 's'}")
        if done < len(chosen):
            raise CLIError(f"{len(chosen) - done} of {len(chosen)} not found", EXIT_FAILED)
        return EXIT_OK

    run(moving())


def _ids_options(function: click.decorators.FC) -> click.decorators.FC:
    function = _queue_options(function)
    function = click.option("--all", "every", is_flag=True, help="Every dead letter.")(function)
    return click.argument("ids", nargs=-1, metavar="[ID]...")(function)


@dead.command()
@_ids_options
def retry(ids: tuple[str, ...], every: bool, redis_url: str, stream: str) -> NoReturn:
    """Put dead letters back in the stream (no dedupe): workers run them again."""
    _move("retried", ids, every, redis_url, stream)


@dead.command()
@_ids_options
def drop(ids: tuple[str, ...], every: bool, redis_url: str, stream: str) -> NoReturn:
    """Delete dead letters for good."""
    _move("dropped", ids, every, redis_url, stream)
