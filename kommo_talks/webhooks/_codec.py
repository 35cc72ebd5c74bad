"""How a queued webhook event is written to Redis, and what makes two events the same.

Pure functions, no I/O. An event is stored as one compact JSON object: a
format version ``"v"``, its kind ``"k"`` (``"talk"`` or ``"message"``) and
its fields by name, leaving out every field that holds its default (most
optional fields are ``None``). Timestamps are Unix seconds (UTC). Decoding
gives back an event equal to the one encoded.

The version changes only when an older reader would misread an entry; a
field added to the models later is simply unknown to older readers, which
ignore it (as the parser ignores what Kommo adds).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import orjson

from ..errors import DecodeError
from ._models import Attachment, MessageEvent, TalkEvent, WebhookEvent

__all__ = [
    "FORMAT_VERSION",
    "decode_event",
    "dedupe_identity",
    "encode_event",
    "order_key",
]

FORMAT_VERSION: Final = 1
"""The version written in every encoded event (``"v"``)."""

_KINDS: Final[dict[str, type[TalkEvent] | type[MessageEvent]]] = {
    "talk": TalkEvent,
    "message": MessageEvent,
}


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("cannot queue a naive datetime: webhook timestamps are UTC")
        stamp = value.timestamp()
        return int(stamp) if stamp.is_integer() else stamp
    if isinstance(value, Attachment):
        return {k: v for k, v in attrs.asdict(value).items() if v is not None}
    return value


def encode_event(event: WebhookEvent) -> bytes:
    """The compact, versioned JSON of ``event`` (what the queue stores).

    Raises:
        TypeError: ``event`` is not a :class:`TalkEvent` or :class:`MessageEvent`.
        ValueError: a timestamp is a naive datetime.
    """
    if isinstance(event, TalkEvent):
        kind = "talk"
    elif isinstance(event, MessageEvent):
        kind = "message"
    else:
        raise TypeError(f"expected a TalkEvent or MessageEvent, got {type(event).__name__}")
    record: dict[str, object] = {"v": FORMAT_VERSION, "k": kind}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        if field.default is attrs.NOTHING or value != field.default:
            record[field.name] = _plain(value)
    return orjson.dumps(record)


def _field_value(name: str, value: Any) -> Any:
    if name in ("created_at", "updated_at") and value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(f"queued event: {name} is not Unix seconds", path=name)
        return datetime.fromtimestamp(value, UTC)
    if name == "attachment" and value is not None:
        if not isinstance(value, dict):
            raise DecodeError("queued event: attachment is not an object", path=name)
        return Attachment(**{k: value.get(k) for k in ("type", "link", "file_name")})
    return value


def decode_event(payload: bytes | str) -> WebhookEvent:
    """The event that :func:`encode_event` wrote (unknown fields are ignored).

    Raises:
        DecodeError: the payload is not JSON, has another format version, an
            unknown kind, or lacks a required field.
    """
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"queued event is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise DecodeError("queued event is not a JSON object")
    if record.get("v") != FORMAT_VERSION:
        raise DecodeError(
            f"queued event has format version {record.get('v')!r}; "
            f"this kommo-talks reads version {FORMAT_VERSION}",
            path="v",
        )
    cls = _KINDS.get(record.get("k"))  # type: ignore[arg-type]
    if cls is None:
        raise DecodeError(f"queued event has an unknown kind {record.get('k')!r}", path="k")
    names = {field.name for field in attrs.fields(cls)}
    values = {k: _field_value(k, v) for k, v in record.items() if k in names}
    try:
        return cls(**values)
    except TypeError as exc:
        raise DecodeError(f"queued {record['k']} event is incomplete: {exc}") from None


def dedupe_identity(event: WebhookEvent) -> bytes:
    """What makes two events the same delivery of one thing (a digest, 32 hex digits).

    A message is identified by its account and ``message_id``; a talk event by
    (``account_id``, ``talk_id``, ``action``, ``updated_at``, ``is_in_work``,
    ``is_read``): Kommo's retry of a delivery repeats them exactly, while a
    real change of the talk moves ``updated_at`` or a flag. Two updates of one
    talk within the same second that leave both flags alike are the same
    event by this rule (they carry nothing that tells them apart).
    """
    parts: list[object]
    if isinstance(event, MessageEvent):
        parts = ["message", event.account_id, event.message_id]
    else:
        updated = event.updated_at.timestamp() if event.updated_at is not None else None
        parts = [
            "talk",
            event.account_id,
            event.talk_id,
            event.action,
            updated,
            event.is_in_work,
            event.is_read,
        ]
    digest = hashlib.blake2b(orjson.dumps(parts), digest_size=16).hexdigest()
    return digest.encode()


def order_key(event: WebhookEvent) -> tuple[object, ...] | None:
    """The key under which a worker runs events one at a time, in order (``None``: no order).

    Events of one talk (its account and ``talk_id``) share a key; so do the
    messages of one chat that carry no ``talk_id``. Anything else has none.
    """
    if event.talk_id is not None:
        return ("talk", event.account_id, event.talk_id)
    if event.chat_id is not None:
        return ("chat", event.account_id, event.chat_id)
    return None
