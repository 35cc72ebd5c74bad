"""``parse_webhook``: one Kommo account-webhook body into a :class:`Webhook` (pure, no I/O).

Kommo posts account webhooks as ``application/x-www-form-urlencoded`` bodies
with bracketed keys and string values (``talk[update][0][is_in_work]=0``).
The values of the sections this SDK models go through a converter of their
own (strict about integers, flags and IDs; never the one used for API JSON),
built once at import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_plus

import attrs
import cattrs
from attrs import AttrsInstance
from cattrs.errors import AttributeValidationNote
from cattrs.gen import make_dict_structure_fn, override

from ..errors import DecodeError
from ._models import Attachment, InvalidEvent, MessageEvent, TalkEvent, Webhook, WebhookEvent

__all__ = ["parse_webhook"]

T = TypeVar("T")
A = TypeVar("A", bound=AttrsInstance)

MAX_ID = 2**63 - 1
"""The largest ID Kommo can hold (a signed 64-bit integer); IDs start at 1."""

# ------------------------------------------------------------------ the converter

_converter = cattrs.Converter(detailed_validation=True)
"""Converts a webhook's string values; never the converter used for API JSON."""


class _Undecodable(str):
    """A value whose percent-encoded bytes are not UTF-8 (kept raw, refused by every hook)."""


def _not_a_string(value: Any) -> Exception:
    if isinstance(value, _Undecodable):
        return ValueError("percent-encoded bytes are not UTF-8")
    return TypeError(f"expected a string, got {type(value).__name__}")


def _structure_int(value: Any, _: Any = None) -> int:
    # int() alone would also take " 7", "+7", "1_000" and non-ASCII digits.
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    if type(value) is not str:
        raise _not_a_string(value)
    if value[:1] == "-" and value[1:].isdigit() and value[1:].isascii():
        return int(value)
    raise ValueError(f"expected an integer, got {_show(value)}")


def _structure_id(value: Any, _: Any = None) -> int:
    """An ID: an integer from 1 to 2**63-1 (what Kommo and the client accept)."""
    if type(value) is str and value.isdigit() and value.isascii() and len(value) <= 19:
        number = int(value)
        if 0 < number <= MAX_ID:
            return number
    _structure_int(value)  # names what is not a string, or not a number at all
    raise ValueError(f"expected an ID from 1 to 2**63-1, got {_show(value)}")


def _structure_flag(value: Any, _: Any) -> bool:
    if value == "1" and type(value) is str:
        return True
    if value == "0" and type(value) is str:
        return False
    if type(value) is not str:
        raise _not_a_string(value)
    raise ValueError(f"expected 0 or 1, got {_show(value)}")


def _structure_unix_seconds(value: Any, _: Any) -> datetime:
    seconds = _structure_int(value)
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"Unix seconds out of range: {_show(value)}") from None


def _structure_str(value: Any, _: Any) -> str:
    if type(value) is not str:
        raise _not_a_string(value)
    return value


def _structure_attachment(value: Any, _: Any) -> Attachment:
    """The ``attachment[...]`` values the parser gathered into a dict."""
    return Attachment(**{name: _structure_str(text, None) for name, text in value.items()})


def _passthrough(value: T, _: Any) -> T:
    """For the fields that the parser fills in itself, already typed."""
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_HOOKS: dict[Any, Callable[[Any, Any], Any]] = {
    int: _structure_int,
    bool: _structure_flag,
    datetime: _structure_unix_seconds,
    str: _structure_str,
    Attachment: _structure_attachment,
}


def _hook(name: str, base: Any) -> Callable[[Any, Any], Any]:
    return _structure_id if base is int and name.endswith("_id") else _HOOKS[base]


def _make_structure(cls: type[A], *given: str) -> Callable[[dict[str, Any], Any], A]:
    """Generate ``cls``'s structure function once, a strict hook per field.

    Optional fields get their plain hook: the parser drops empty values
    instead of passing ``None``. Integer fields named ``*_id`` are IDs.
    ``given`` names the fields the parser fills in itself (the action and
    the account), passed through unchanged.
    """
    overrides: dict[str, Any] = {}
    for field in attrs.fields(attrs.resolve_types(cls)):
        if field.name in given:
            overrides[field.name] = override(struct_hook=_passthrough)
        else:
            # `int | None` -> int: the first member of an optional field's union.
            base = getattr(field.type, "__args__", (field.type,))[0]
            overrides[field.name] = override(struct_hook=_hook(field.name, base))
    structure = make_dict_structure_fn(cls, _converter, **overrides)
    _converter.register_structure_hook(cls, structure)
    return structure


_structure_talk = _make_structure(TalkEvent, "action", "account_id", "subdomain")
_structure_message = _make_structure(MessageEvent, "account_id", "subdomain")

# ------------------------------------------------------------------- the sections

# Wire field (with the closing bracket, as the key splits) -> attribute name.
_TALK_FIELDS = {
    f"{name}]": name
    for name in (
        "talk_id",
        "contact_id",
        "chat_id",
        "entity_id",
        "entity_type",
        "is_in_work",
        "is_read",
        "rate",
        "origin",
        "created_at",
        "updated_at",
    )
}
_ATTACHMENT = {
    "attachment_type": "type",
    "attachment_link": "link",
    "attachment_file_name": "file_name",
}
_MESSAGE_FIELDS = {
    "id]": "message_id",
    "talk_id]": "talk_id",
    "chat_id]": "chat_id",
    "contact_id]": "contact_id",
    "entity_id]": "entity_id",
    "entity_type]": "entity_type",
    "type]": "direction",
    "text]": "text",
    "created_at]": "created_at",
    "origin]": "origin",
    "message_type]": "message_type",
    "source_id]": "source_id",
    "author][id]": "author_id",
    "author][type]": "author_type",
    "author][user_id]": "author_user_id",
    "author][name]": "author_name",
    "recipient][id]": "recipient_id",
    "recipient][type]": "recipient_type",
    **{f"attachment][{field}]": name for name, field in _ATTACHMENT.items()},
}


@attrs.frozen
class _Section:
    """A section of events this SDK models, and how its events are built."""

    name: str  # "talk[add]"
    fields: dict[str, str]  # wire field -> attribute
    structure: Callable[[dict[str, Any], Any], WebhookEvent]
    cls: type[WebhookEvent]
    fixed: dict[str, str]  # attribute -> value the parser sets (a talk event's action)
    defaults: dict[str, str]  # attribute -> value when a message has none
    # attribute -> wire field (with its closing bracket), for the keys errors name
    wire: dict[str, str] = attrs.field(init=False)
    messages: bool = attrs.field(init=False)  # a section of messages

    @wire.default
    def _wire(self) -> dict[str, str]:
        return {name: wire for wire, name in self.fields.items()} | {"attachment": "attachment]"}

    @messages.default
    def _messages(self) -> bool:
        return self.cls is MessageEvent


# In the order their events are delivered: talk[add], talk[update],
# message[add], outgoing_message[add].
_SECTIONS = (
    _Section("talk[add]", _TALK_FIELDS, _structure_talk, TalkEvent, {"action": "add"}, {}),
    _Section("talk[update]", _TALK_FIELDS, _structure_talk, TalkEvent, {"action": "update"}, {}),
    _Section("message[add]", _MESSAGE_FIELDS, _structure_message, MessageEvent, {}, {}),
    _Section(
        "outgoing_message[add]",
        _MESSAGE_FIELDS,
        _structure_message,
        MessageEvent,
        {},
        {"direction": "outgoing"},
    ),
)
_PREFIXES = tuple((f"{section.name}[", section.fields) for section in _SECTIONS)
_ACCOUNT = len(_SECTIONS)
_MALFORMED = _ACCOUNT + 1
_ACCOUNT_KEYS = frozenset(("account[id]", "account[subdomain]"))

# --------------------------------------------------------------------- the parser


def parse_webhook(
    body: bytes | bytearray | memoryview | str | Mapping[str, str],
    *,
    max_fields: int = 10_000,
    strict: bool = True,
) -> Webhook:
    """Parse one Kommo account-webhook body into a :class:`Webhook`.

    ``body`` is the raw form-urlencoded body (``bytes`` or ``str``; ``+`` and
    percent-encoded UTF-8 are decoded, bracket keys may be encoded or not) or
    a mapping of form keys to string values, such as a ``dict`` or the
    ``MultiDictProxy`` of ``await request.post()``. When a key repeats, its
    last value wins. An empty value counts as absent; unknown sections and
    fields are ignored.

    An event fails its checks when a required field is missing
    (``talk_id``, ``is_in_work``, ``is_read``; a message's ``id``, and
    ``type`` in ``message[add]``), an integer field is not an integer, an ID
    is not from 1 to 2**63-1, a flag is not ``0``/``1``, or a value's
    percent-encoded bytes are not UTF-8. So does a key of a modelled section
    whose index is not a number below 10**9 or that does not end in
    ``[field]``, and a bad ``account[id]``. With ``strict=True`` the first
    such failure raises; with ``strict=False`` each one is kept in
    :attr:`Webhook.invalid` as an :class:`InvalidEvent` and the good events
    are returned.

    Raises:
        DecodeError: with ``path`` set to the offending form key (e.g.
            ``"talk[update][0][talk_id]"``) for a failed event when
            ``strict``. Whatever ``strict`` says, for a body that is not a
            form: not UTF-8, or with more than ``max_fields`` fields
            (counted by their ``&`` separators, before anything else is
            done), or a mapping whose keys are not strings (``path``
            ``None``), or whose values of modelled fields are not (``path``
            names the key).
        TypeError: ``body`` is none of the types above.
    """
    source, groups = _read(body, max_fields)
    return _build(groups, source, strict)


def _read(body: object, max_fields: int) -> tuple[str | Mapping[str, Any], _Groups]:
    """The body as text or a mapping (to read an invalid event's fields again), grouped."""
    if isinstance(body, str):
        if body.count("&") >= max_fields:
            raise _too_many(max_fields)
        return body, _group_text(body)
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        if raw.count(b"&") >= max_fields:
            raise _too_many(max_fields)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("webhook body is not UTF-8") from None
        return text, _group_text(text)
    if isinstance(body, Mapping):
        if len(body) > max_fields:
            raise _too_many(max_fields)
        return body, _group_items(body.items())
    raise TypeError(f"expected bytes, str or a mapping, got {type(body).__name__}")


def _too_many(max_fields: int) -> DecodeError:
    return DecodeError(f"webhook body has more than {max_fields} fields; refused")


# index -> {attribute name: value}; values are str until the builder adds the account.
_Events = dict[str, dict[str, Any]]
# The event sections in order, then the account's {form key: value} at index "",
# then the malformed keys of modelled sections: {decoded key: {reason: value}}
# ({} for an empty value: the reason is worked out again, see _reason).
_Groups = list[_Events]
# What a form key holds: (section number, event index, attribute, the decoded
# key, for error messages); for a malformed key (_MALFORMED, decoded key,
# reason, decoded key); the empty tuple for a key to ignore.
_Spec = tuple[int, str, str, str] | tuple[()]

_BAD_KEY = "malformed webhook key (expected section[N][field])"
_BAD_INDEX = "event index is not a number below 10**9"
_NOT_UTF8 = "percent-encoded bytes are not UTF-8"


def _classify(key: str) -> _Spec:
    """What a decoded form key holds (see ``_Spec``); parsers look it up in a ``_KeyTable``.

    The account's keys give ``(_ACCOUNT, "", key, key)``.
    """
    if key in _ACCOUNT_KEYS:
        return _ACCOUNT, "", key, key
    for number, (prefix, fields) in enumerate(_PREFIXES):
        if key.startswith(prefix):
            index, _, wire = key[len(prefix) :].partition("][")
            if not wire.endswith("]"):
                return _MALFORMED, key, _BAD_KEY, key
            name = fields.get(wire)
            if name is None:
                return ()
            # At most 9 digits: sorting by int() stays cheap and can never fail.
            if not (index.isascii() and index.isdigit() and len(index) <= 9):
                return _MALFORMED, key, _BAD_INDEX, key
            return number, index, name, key
    return ()


class _KeyTable(dict[str, _Spec]):
    """Form key -> :func:`_classify`'s answer, learnt on first sight.

    Kommo sends the same few dozen keys in every delivery, so that parsing a
    body costs one dict look-up per field. With ``encoded`` the keys are as
    they come on the wire (``talk%5Bupdate%5D...`` or ``talk[update]...``)
    and are percent-decoded before they are classified (a key whose bytes
    are not UTF-8 is malformed). Only keys of at most 64 characters are
    kept, and the table is emptied when it holds 4096: a sender that makes
    keys up costs time, not memory.
    """

    def __init__(self, *, encoded: bool) -> None:
        super().__init__()
        self._encoded = encoded

    def __missing__(self, key: str) -> _Spec:
        spec: _Spec
        if self._encoded and ("%" in key or "+" in key):
            try:
                spec = _classify(unquote_plus(key, errors="strict"))
            except UnicodeDecodeError:
                spec = _MALFORMED, key, _NOT_UTF8, key
        else:
            spec = _classify(key)
        if len(key) <= 64:
            if len(self) >= 4096:
                self.clear()
            self[key] = spec
        return spec


_WIRE_KEYS = _KeyTable(encoded=True)
_DECODED_KEYS = _KeyTable(encoded=False)


def _group_text(text: str) -> _Groups:
    """Split a form body into the sections we model, keeping only known fields.

    This is the hot path: one ``split``, one look-up per key in a table of
    keys as they come on the wire, ``unquote_plus`` only for values holding
    ``%`` or ``+``, and values of ignored fields are never decoded.
    """
    groups: _Groups = [{}, {}, {}, {}, {}, {}]
    specs = _WIRE_KEYS
    for pair in text.split("&"):
        key, _, value = pair.partition("=")
        spec = specs[key]
        if not spec:
            continue
        number, index, name, _ = spec
        if not value:  # absent; the event still exists, to be checked for its required fields
            groups[number].setdefault(index, {})
            continue
        if "%" in value or "+" in value:
            try:
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                value = _Undecodable(value)
        section = groups[number]
        event = section.get(index)
        if event is None:
            section[index] = {name: value}
        else:
            event[name] = value
    return groups


def _group_items(items: Iterable[tuple[Any, Any]]) -> _Groups:
    """:func:`_group_text` for keys and values that are already decoded."""
    groups: _Groups = [{}, {}, {}, {}, {}, {}]
    specs = _DECODED_KEYS
    for key, value in items:
        if type(key) is not str:
            raise DecodeError(f"webhook form key is not a string: {_show(key)}")
        spec = specs[key]
        if not spec:
            continue
        if not isinstance(value, str):
            raise DecodeError(
                f"{key}: expected a string value, got {type(value).__name__}", path=key
            )
        number, index, name, _ = spec
        event = groups[number].setdefault(index, {})
        if value:  # an empty value counts as absent
            event[name] = value
    return groups


# What a failed check needs: the body (to read an invalid event's fields
# again), strict (raise at once), and the invalid events found so far.
_Context = tuple[str | Mapping[str, Any], bool, list[InvalidEvent]]


def _build(groups: _Groups, source: str | Mapping[str, Any], strict: bool) -> Webhook:
    """A :class:`Webhook` from grouped values: the checked events, and what failed.

    With ``strict`` the first failure raises; otherwise each one becomes an
    :class:`InvalidEvent` whose raw fields are read again from ``source``
    (only then: the hot path keeps the known fields only).
    """
    invalid: list[InvalidEvent] = []
    context = (source, strict, invalid)
    for key, entry in groups[_MALFORMED].items():
        reason, value = next(iter(entry.items())) if entry else (_reason(key), "")
        _refuse_key(context, key, reason, value)
    account = groups[_ACCOUNT]
    account_id, subdomain = _account(context, account[""]) if account else (None, None)
    events: list[WebhookEvent] = []
    for number, section in enumerate(_SECTIONS):
        events_by_index = groups[number]
        if not events_by_index:
            continue
        for index in _in_order(events_by_index):
            values = events_by_index[index]
            values.update(section.fixed)  # never from the wire: a talk event's action
            values["account_id"] = account_id
            values["subdomain"] = subdomain
            if section.messages:
                _complete_message(section, values)
            try:
                events.append(section.structure(values, section.cls))
            except cattrs.ClassValidationError as exc:
                error = _field_error(exc, f"{section.name}[{index}]", section.wire)
                _refuse(context, section.name, int(index), error)
    return Webhook(
        account_id=account_id, subdomain=subdomain, events=tuple(events), invalid=tuple(invalid)
    )


def _account(context: _Context, values: dict[str, Any]) -> tuple[int | None, str | None]:
    """The delivery's ``account[id]`` and ``account[subdomain]``; ``None`` for a bad one."""
    account_id = None
    raw_id = values.get("account[id]")
    if raw_id is not None:
        try:
            account_id = _structure_id(raw_id)
        except (TypeError, ValueError) as exc:
            error = DecodeError(f"account[id]: {exc}", path="account[id]")
            _refuse(context, "account", None, error)
    subdomain = values.get("account[subdomain]")
    if isinstance(subdomain, _Undecodable):
        path = "account[subdomain]"
        _refuse(context, "account", None, DecodeError(f"{path}: {_NOT_UTF8}", path=path))
        subdomain = None
    return account_id, subdomain


def _refuse_key(context: _Context, key: str, reason: str, value: str) -> None:
    """A malformed key: raise, or an :class:`InvalidEvent` if it names a modelled section."""
    _, strict, invalid = context
    error = DecodeError(f"{key}: {reason}", path=key)
    if strict:
        raise error
    # A key that is not even UTF-8 counts only if it names a modelled section.
    readable = unquote_plus(key) if reason is _NOT_UTF8 else key
    for prefix, _ in _PREFIXES:
        if readable.startswith(prefix):
            # The value went through the strict decoding of modelled values.
            fields = {key: str.__str__(value)}
            invalid.append(
                InvalidEvent(section=prefix[:-1], index=None, error=error, fields=fields)
            )
            return


def _refuse(context: _Context, section: str, index: int | None, error: DecodeError) -> None:
    """A failed event (or account): raise, or an :class:`InvalidEvent` with its raw fields."""
    source, strict, invalid = context
    if strict:
        raise error
    prefix = "account[" if index is None else f"{section}[{index}]["
    fields = _event_fields(source, prefix)
    invalid.append(InvalidEvent(section=section, index=index, error=error, fields=fields))


def _complete_message(section: _Section, values: dict[str, Any]) -> None:
    """A message's ``direction`` when it has none, and its ``attachment[...]`` gathered."""
    for name, default in section.defaults.items():
        values.setdefault(name, default)
    if not values.keys().isdisjoint(_ATTACHMENT):
        values["attachment"] = {
            field: values.pop(name) for name, field in _ATTACHMENT.items() if name in values
        }


def _reason(key: str) -> str:
    """Why a key is malformed (its reason stays in the groups only beside a value)."""
    spec = _classify(key)
    return spec[2] if spec and spec[0] == _MALFORMED else _NOT_UTF8


def _event_fields(source: str | Mapping[str, Any], prefix: str) -> dict[str, str]:
    """The raw values of the keys under ``prefix``, keyed by their own field names.

    ``talk[add][0][talk_id]`` gives ``talk_id``, ``message[add][0][author][type]``
    gives ``author[type]``. Values are percent-decoded (bytes that are not
    UTF-8 become U+FFFD); empty values are kept.
    """
    items: Iterable[tuple[Any, Any]]
    items = parse_qsl(source, keep_blank_values=True) if isinstance(source, str) else source.items()
    fields = {}
    for key, value in items:
        if type(key) is str and key.startswith(prefix) and type(value) is str:
            fields[key[len(prefix) :].replace("]", "", 1)] = value
    return fields


def _in_order(events: _Events) -> list[str]:
    """The section's indexes (checked numbers) in numeric order."""
    return sorted(events, key=int) if len(events) > 1 else list(events)


def _field_error(
    exc: cattrs.ClassValidationError, event_key: str, wire: dict[str, str]
) -> DecodeError:
    """Name each failed field by its form key; ``path`` is the first one."""
    parts = []
    first = None
    for error in exc.exceptions:
        notes = [
            n for n in getattr(error, "__notes__", ()) if isinstance(n, AttributeValidationNote)
        ]
        key = f"{event_key}[{wire.get(notes[0].name, notes[0].name + ']')}" if notes else event_key
        first = first or key
        reason = "required field missing" if isinstance(error, KeyError) else str(error)
        parts.append(f"{key}: {reason}")
    return DecodeError("; ".join(parts), path=first)
