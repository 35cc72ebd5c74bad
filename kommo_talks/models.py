"""Typed models of the Talks API and of batch results.

Models hold data only; how they map to and from Kommo's JSON lives in
:mod:`kommo_talks.converter`.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .errors import KommoError

__all__ = ["CloseOutcome", "CloseStatus", "EntityRef", "Talk", "TalkEmbedded"]


@attrs.frozen
class EntityRef:
    """A reference to a contact, lead or customer embedded in a talk.

    ``href`` is the entity's API URL (``_links.self.href``), or ``None``.
    """

    id: int
    href: str | None = None


@attrs.frozen
class TalkEmbedded:
    """Entities embedded in a talk (``_embedded``); each tuple holds at most one."""

    contacts: tuple[EntityRef, ...] = ()
    leads: tuple[EntityRef, ...] = ()
    customers: tuple[EntityRef, ...] = ()


@attrs.frozen
class Talk:
    """A Kommo talk (conversation), as ``GET /api/v4/talks/{id}`` or the talks list returns it.

    Timestamps are timezone-aware UTC datetimes. ``is_in_work`` is true while
    the talk is open. ``entity_type`` is ``"lead"``, ``"customer"``, or a value
    Kommo adds later. ``self_url`` comes from ``_links.self.href``.

    The two shapes differ: list items carry ``status`` (``"in_work"``,
    ``"closed"``, ``"nps_scheduled"``, ``"nps_in_progress"``,
    ``"with_error"``, or a value Kommo adds later) and ``source_id`` but no
    ``missed_at``; a single talk has ``missed_at`` but neither of the
    others. A field its shape leaves out is ``None``.
    """

    talk_id: int
    created_at: datetime
    updated_at: datetime
    rate: int
    contact_id: int
    chat_id: str | None
    entity_id: int | None
    entity_type: str | None
    is_in_work: bool
    is_read: bool
    origin: str
    missed_at: datetime | None = attrs.field(default=None, kw_only=True)
    account_id: int
    embedded: TalkEmbedded = attrs.Factory(TalkEmbedded)
    self_url: str | None = None
    status: str | None = None
    source_id: int | None = None


class CloseStatus(enum.StrEnum):
    """What happened to one talk of a batch close."""

    CLOSED = "closed"
    ALREADY_CLOSED = "already_closed"
    FAILED = "failed"


@attrs.frozen
class CloseOutcome:
    """The result of closing one talk in a batch.

    ``error`` is set only when ``status`` is :attr:`CloseStatus.FAILED`.
    """

    talk_id: int
    status: CloseStatus
    error: KommoError | None = None
