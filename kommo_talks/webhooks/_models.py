"""The typed values a webhook delivery is parsed into (data only, no behaviour)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypeAlias

import attrs

from ..errors import DecodeError

__all__ = [
    "Attachment",
    "InvalidEvent",
    "MessageEvent",
    "TalkEvent",
    "Webhook",
    "WebhookEvent",
]


@attrs.frozen(kw_only=True)
class TalkEvent:
    """A talk added or edited (``talk[add][N]`` / ``talk[update][N]``).

    ``action`` is ``"add"`` or ``"update"``; closing a talk is an ``"update"``
    whose ``is_in_work`` is false (see :attr:`closed`), marking it answered is
    an ``"update"`` whose ``is_read`` is true. Optional fields are ``None``
    when Kommo sent them empty or not at all. Timestamps are UTC datetimes.
    ``talk_id`` is from 1 to 2**63-1 (anything else is refused when parsing).
    ``account_id`` and ``subdomain`` are the delivery's account, so that one
    callback can serve many accounts.
    """

    action: str
    talk_id: int
    contact_id: int | None = None
    chat_id: str | None = None
    entity_id: int | None = None
    entity_type: str | None = None
    is_in_work: bool
    is_read: bool
    rate: int | None = None
    origin: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    account_id: int | None = None
    subdomain: str | None = None

    @property
    def closed(self) -> bool:
        """True if this event reports the talk closed (an update, not in work)."""
        return self.action == "update" and not self.is_in_work


@attrs.frozen
class Attachment:
    """A file attached to a chat message (``attachment[type|link|file_name]``).

    Each field is ``None`` when Kommo sent it empty or not at all. ``link`` is
    where Kommo serves the file; ``type`` is Kommo's kind of attachment
    (``"picture"``, ``"file"``, ... : the list of values is not documented).
    """

    type: str | None = None
    link: str | None = None
    file_name: str | None = None


@attrs.frozen(kw_only=True)
class MessageEvent:
    """A chat message, received (``message[add][N]``) or sent (``outgoing_message[add][N]``).

    ``message_id`` comes from ``id``; ``direction`` (``"incoming"`` or
    ``"outgoing"``) from ``type``, and is ``"outgoing"`` for an
    ``outgoing_message[add]`` event without one; ``text`` is ``""`` when
    absent (an attachment-only message: see ``attachment``). The
    ``author[...]`` and ``recipient[...]`` keys give ``author_id``,
    ``author_type`` (``"external"`` for the customer, ``"internal"`` for a
    manager), ``author_user_id`` (the manager's Kommo user ID),
    ``author_name``, ``recipient_id`` and ``recipient_type``. Optional
    fields are ``None`` when Kommo sent them empty or not at all; a
    ``talk_id`` is from 1 to 2**63-1. ``account_id`` and ``subdomain`` are
    the delivery's account.

    The ``outgoing_message[add]`` section (Kommo's ``add_outgoing_message``
    event) is read as other clients and logged deliveries show it; no
    official Kommo page we could read documents its body (unconfirmed).
    """

    message_id: str
    talk_id: int | None = None
    chat_id: str | None = None
    contact_id: int | None = None
    entity_id: int | None = None
    entity_type: str | None = None
    direction: str
    text: str = ""
    created_at: datetime | None = None
    author_name: str | None = None
    origin: str | None = None
    account_id: int | None = None
    subdomain: str | None = None
    message_type: str | None = None
    source_id: int | None = None
    author_id: str | None = None
    author_type: str | None = None
    author_user_id: int | None = None
    recipient_id: str | None = None
    recipient_type: str | None = None
    attachment: Attachment | None = None


WebhookEvent: TypeAlias = TalkEvent | MessageEvent
"""One event of a delivery: a :class:`TalkEvent` or a :class:`MessageEvent`."""


def _copy_fields(fields: Mapping[str, str]) -> dict[str, str]:
    return dict(fields)


@attrs.frozen(kw_only=True)
class InvalidEvent:
    """An event of a delivery that failed a check (``parse_webhook(..., strict=False)``).

    Attributes:
        section: where it was: ``"talk[add]"``, ``"talk[update]"``,
            ``"message[add]"``, ``"outgoing_message[add]"``, or ``"account"``
            (a bad ``account[id]``).
        index: the event's index in its section, or ``None`` when no event
            index applies (a malformed key, the account).
        error: why it was refused; ``error.path`` is the offending form key.
        fields: the event's raw form values, keyed by its own field names
            (``"talk_id"``, ``"author[type]"``); for a malformed key, the
            whole key. A copy of its own: keep it (or pickle the event) to
            look into it or replay the event by hand.
    """

    section: str
    index: int | None
    error: DecodeError
    fields: Mapping[str, str] = attrs.field(converter=_copy_fields, factory=dict)


@attrs.frozen(kw_only=True)
class Webhook:
    """One webhook delivery: its account, its events in Kommo's order, and what was refused.

    ``events`` holds the ``talk[add]`` events, then ``talk[update]``, then
    ``message[add]``, then ``outgoing_message[add]``, each section by
    numeric index (``[10]`` after ``[9]``). It is empty for a delivery of
    sections this SDK does not model (leads, contacts, ...), which are
    ignored. ``invalid`` is filled only by ``parse_webhook(..., strict=False)``.
    """

    account_id: int | None = None
    subdomain: str | None = None
    events: tuple[WebhookEvent, ...] = ()
    invalid: tuple[InvalidEvent, ...] = ()
