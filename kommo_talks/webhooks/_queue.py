"""``RedisWebhookQueue``: webhook events kept in a Redis stream until a worker has handled them.

Needs the optional extra ``kommo-talks[redis]`` (redis-py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

try:
    import redis.exceptions
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "RedisWebhookQueue needs redis-py: install the extra, pip install 'kommo-talks[redis]'"
    ) from exc

from ..errors import DecodeError, redact_text
from ..redis import RedisUnavailableError, _redis_errors
from ._codec import decode_event, dedupe_identity, encode_event
from ._models import WebhookEvent
from ._plan import AutoclaimReply, parse_autoclaim

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DeadLetter", "QueuedEntry", "RedisWebhookQueue"]

_ERROR_TEXT_LIMIT: Final = 500

# KEYS[1]: the stream; KEYS[2..]: one dedupe key per event; ARGV[1]: seconds
# a dedupe key lives; ARGV[2..]: the encoded events. The entry is added
# before its dedupe key is set: a failure between the two can duplicate an
# event, never lose one.
_APPEND_SCRIPT: Final = """
local ids = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    ids[i - 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
    redis.call('SET', KEYS[i], '1', 'EX', ARGV[1])
  else
    ids[i - 1] = false
  end
end
return ids
"""

# Touch entries that this consumer still owns (never take one from another
# consumer): set their idle time to ARGV[3] ms, and, when given, their
# delivery count. ARGV[1]: group, ARGV[2]: consumer, then (id, count or '').
_TOUCH_SCRIPT: Final = """
local kept = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) == 1 then
    if ARGV[i + 1] == '' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    else
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3],
                 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    end
    kept[#kept + 1] = id
  end
end
return kept
"""

# XAUTOCLAIM's raw answer, untouched by the client library's parsing (whose
# shape differs between Redis 6.2 and 7.x: see parse_autoclaim).
_AUTOCLAIM_SCRIPT: Final = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class QueuedEntry:
    """One stream entry handed to a worker: its id, encoded event and delivery count."""

    id: str
    payload: bytes | str
    deliveries: int


@attrs.frozen
class DeadLetter:
    """An event given up after its runs failed, in the dead-letter stream ``<stream>:dead``.

    Attributes:
        id: its id in the dead-letter stream (what :meth:`RedisWebhookQueue.retry_dead`
            and :meth:`~RedisWebhookQueue.drop_dead` take).
        event: the event, or ``None`` if this version cannot decode it (see ``error``).
        error: the last error's type and text (cut to 500 characters).
        deliveries: how many runs were started.
        source_id: its id in the main stream when it was given up.
    """

    id: str
    event: WebhookEvent | None
    error: str
    deliveries: int
    source_id: str


def error_text(exc: BaseException) -> str:
    """``"Type: message"`` of an exception, with bearer tokens hidden, cut to 500 characters."""
    return redact_text(f"{type(exc).__name__}: {exc}", ())[:_ERROR_TEXT_LIMIT]


class RedisWebhookQueue:
    """Webhook events in a Redis stream, read by :class:`WebhookWorker` processes on any host.

    The receiver appends each delivery's events (:meth:`append`); workers read
    them through the consumer group ``group`` and acknowledge each after its
    callback returned; an acknowledged entry is deleted at once (``XACK`` and
    ``XDEL`` in one transaction), so the stream holds only what is not done,
    and nothing unacknowledged is ever trimmed. The stream belongs to this
    queue: do not attach other consumer groups to it (they would miss the
    deleted entries).

    Events, not raw bodies, are stored: a compact, versioned JSON of the
    event's fields, its account included. An event already appended within
    ``dedupe_seconds`` is not appended again (Kommo retries deliveries it
    thinks failed): a message is the same by its account and ``message_id``,
    a talk event by (``account_id``, ``talk_id``, ``action``, ``updated_at``,
    ``is_in_work``, ``is_read``). The check and the append are one Lua script,
    so two receivers racing on one retry store it once.

    Durability is Redis's: run it with ``appendonly yes`` and ``appendfsync
    always``. With the default ``everysec``, Redis may acknowledge an append
    up to a second before it is on disk, and a crash of Redis loses it.

    Args:
        redis: a ``redis.asyncio.Redis`` client (not closed by this class).
        stream: the stream's key; the dead-letter stream is ``<stream>:dead``
            and dedupe keys are ``<stream>:seen:<digest>``. On Redis Cluster,
            put a hash tag in it (``"{kommo}:webhooks"``).
        group: the consumer group that the workers share.
        dedupe_seconds: how long an appended event is remembered (>= 1).

    Raises:
        ValueError: ``dedupe_seconds`` is not a positive integer, or a name is empty.
    """

    def __init__(
        self,
        redis: Redis,
        stream: str = "kommo:webhooks",
        group: str = "kommo-bots",
        *,
        dedupe_seconds: int = 3600,
    ) -> None:
        if not stream or not group:
            raise ValueError("stream and group must be non-empty")
        if (
            isinstance(dedupe_seconds, bool)
            or not isinstance(dedupe_seconds, int)
            or dedupe_seconds < 1
        ):
            raise ValueError(f"dedupe_seconds must be an int >= 1, got {dedupe_seconds!r}")
        self._redis = redis
        self.stream = stream
        """The main stream's key."""
        self.group = group
        """The consumer group's name."""
        self.dead_stream = f"{stream}:dead"
        """The dead-letter stream's key."""
        self.dedupe_seconds = dedupe_seconds
        """Seconds an appended event is remembered for deduplication."""
        self._append_script = redis.register_script(_APPEND_SCRIPT)
        self._touch_script = redis.register_script(_TOUCH_SCRIPT)
        self._autoclaim_script = redis.register_script(_AUTOCLAIM_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisWebhookQueue(stream={self.stream!r}, group={self.group!r})"

    # A timeout of our own: past it the caller gets RedisUnavailableError (its 503), not
    # a bare TimeoutError from whatever else it awaits.
    async def append(
        self,
        events: Iterable[WebhookEvent],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[str | None]:
        """Store every event of one delivery, in one round trip; return their entry ids.

        An event already stored within ``dedupe_seconds`` is skipped (its id is
        ``None``). When this returns, Redis has acknowledged the append of
        every event: the receiver may answer ``200``.

        Raises:
            RedisUnavailableError: Redis cannot be reached, refused, or did not
                answer within ``timeout`` seconds (then the events may or may
                not be stored: answer ``503``, and Kommo's retry is deduplicated).
            TypeError, ValueError: an event cannot be encoded (nothing stored).
        """
        batch = list(events)
        if not batch:
            return []
        args: list[Any] = [self.dedupe_seconds, *(encode_event(event) for event in batch)]
        keys = [self.stream, *(self._seen_key(event) for event in batch)]
        try:
            with _redis_errors("append webhook events", self.stream):
                async with asyncio.timeout(timeout):
                    ids = await self._append_script(keys=keys, args=args)
        except TimeoutError as exc:
            raise RedisUnavailableError(
                f"Redis did not store the webhook events within {timeout} s "
                f"(stream {self.stream!r})",
                operation="append webhook events",
                key=self.stream,
            ) from exc
        return [None if i is None else _text(i) for i in ids]

    def _seen_key(self, event: WebhookEvent) -> str:
        return f"{self.stream}:seen:{dedupe_identity(event).decode()}"

    # -- what workers use ---------------------------------------------------------

    async def _ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing, reading from the start."""
        with _redis_errors("create the consumer group", self.stream):
            try:
                await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _longest_read_wait(self) -> float:
        """Seconds a blocking read may wait: half the client's socket timeout, if it has one."""
        kwargs = getattr(getattr(self._redis, "connection_pool", None), "connection_kwargs", {})
        timeout = kwargs.get("socket_timeout")
        return timeout / 2 if isinstance(timeout, int | float) and timeout > 0 else math.inf

    async def _read(self, consumer: str, count: int, block_ms: int) -> list[QueuedEntry]:
        """New entries for ``consumer`` (each delivered for the first time)."""
        with _redis_errors("read webhook events", self.stream):
            reply = await self._redis.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        return [QueuedEntry(i, f.get("e", b""), 1) for i, f in _read_entries(reply)]

    async def _claim(
        self, consumer: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[QueuedEntry]]:
        """Take over entries idle for ``min_idle_ms``; return the next start and the entries."""
        with _redis_errors("claim idle webhook events", self.stream):
            raw = await self._autoclaim_script(
                keys=[self.stream], args=[self.group, consumer, min_idle_ms, start, count]
            )
            reply: AutoclaimReply = parse_autoclaim(raw)
            if reply.deleted:  # gone from the stream (not by us): nothing left to run
                await self._redis.xack(self.stream, self.group, *reply.deleted)
            counts = await self._deliveries(consumer, [i for i, _ in reply.entries])
        entries = [
            QueuedEntry(i, f.get("e", b""), counts[i]) for i, f in reply.entries if i in counts
        ]
        return reply.next_start, entries

    async def _deliveries(self, consumer: str, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1, consumer)
        found: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                found[_text(row["message_id"])] = int(row["times_delivered"])
        return found

    async def _touch(
        self, consumer: str, entries: Sequence[tuple[str, int | None]], idle_ms: int = 0
    ) -> set[str]:
        """Reset the idle time of the entries ``consumer`` still owns; return those ids."""
        if not entries:
            return set()
        args: list[Any] = [self.group, consumer, idle_ms]
        for entry_id, deliveries in entries:
            args += [entry_id, "" if deliveries is None else deliveries]
        with _redis_errors("keep webhook events claimed", self.stream):
            kept = await self._touch_script(keys=[self.stream], args=args)
        return {_text(i) for i in kept}

    async def _ack(self, entry_id: str) -> None:
        """Acknowledge a handled entry and delete it from the stream (one transaction)."""
        with _redis_errors("acknowledge a webhook event", self.stream):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _bury(self, entry: QueuedEntry, error: str) -> None:
        """Move an entry to the dead-letter stream and acknowledge it (one transaction)."""
        fields = {
            "e": entry.payload,
            "error": error[:_ERROR_TEXT_LIMIT],
            "deliveries": entry.deliveries,
            "source_id": entry.id,
        }
        with _redis_errors("dead-letter a webhook event", self.stream):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(self.dead_stream, fields)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry.id)
            pipe.xdel(self.stream, entry.id)
            await pipe.execute()

    # -- dead letters, for operators ----------------------------------------------

    async def dead_letters(self, count: int = 100, *, after: str | None = None) -> list[DeadLetter]:
        """The oldest ``count`` dead letters (after the id ``after``, to page on).

        Raises:
            RedisUnavailableError: Redis cannot be reached or refused.
        """
        start = f"({after}" if after else "-"
        with _redis_errors("list dead webhook events", self.stream):
            rows = await self._redis.xrange(self.dead_stream, start, "+", count=count)
        return [_dead_letter(_text(i), fields or {}) for i, fields in rows or ()]

    async def retry_dead(self, ids: Iterable[str]) -> int:
        """Append these dead letters to the main stream again (no dedupe), then delete them.

        Returns how many were moved (ids not found are skipped). Each is moved
        in one transaction: never lost, never in both streams.

        Raises:
            RedisUnavailableError: Redis cannot be reached or refused.
        """
        moved = 0
        for dead_id in ids:
            with _redis_errors("retry a dead webhook event", self.stream):
                rows = await self._redis.xrange(self.dead_stream, dead_id, dead_id)
                if not rows:
                    continue
                fields = {_text(k): v for k, v in (rows[0][1] or {}).items()}
                pipe = self._redis.pipeline(transaction=True)
                pipe.xadd(self.stream, {"e": fields.get("e", b"")})
                pipe.xdel(self.dead_stream, dead_id)
                await pipe.execute()
            moved += 1
        return moved

    async def drop_dead(self, ids: Iterable[str]) -> int:
        """Delete these dead letters for good; return how many existed.

        Raises:
            RedisUnavailableError: Redis cannot be reached or refused.
        """
        wanted = list(ids)
        if not wanted:
            return 0
        with _redis_errors("drop dead webhook events", self.stream):
            return int(await self._redis.xdel(self.dead_stream, *wanted))


def _read_entries(reply: Any) -> list[tuple[str, dict[str, Any]]]:
    """The ``(id, fields)`` of an ``XREADGROUP`` reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    found: list[tuple[str, dict[str, Any]]] = []
    for entries in streams:
        for item in entries:
            # RESP3 nests the entries one level deeper ([[entries]]).
            if item and isinstance(item, list) and item and isinstance(item[0], list | tuple):
                found += [(_text(i), {_text(k): v for k, v in f.items()}) for i, f in item]
            else:
                found.append((_text(item[0]), {_text(k): v for k, v in item[1].items()}))
    return found


def _dead_letter(dead_id: str, raw: dict[Any, Any]) -> DeadLetter:
    fields = {_text(k): v for k, v in raw.items()}
    error = _text(fields.get("error", b""))
    event: WebhookEvent | None
    try:
        event = decode_event(fields.get("e", b""))
    except DecodeError as exc:
        event = None
        error = f"{error} (not decodable here: {exc})"
    return DeadLetter(
        id=dead_id,
        event=event,
        error=error,
        deliveries=int(fields.get("deliveries", 0)),
        source_id=_text(fields.get("source_id", b"")),
    )
