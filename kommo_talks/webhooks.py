"""Kommo account webhooks for bots: parse deliveries and hand events to a callback.

Kommo posts account webhooks as ``application/x-www-form-urlencoded`` bodies
with bracketed keys and string values (``talk[update][0][is_in_work]=0``).
:func:`parse_webhook` turns one body into a :class:`Webhook` of typed
:class:`TalkEvent` and :class:`MessageEvent` values; :class:`WebhookReceiver`
serves such deliveries inside an ``aiohttp.web`` application, answers Kommo at
once and runs ``await callback(event)`` in the background;
:func:`verify_disconnect_signature` checks Kommo's "integration disconnected"
hook.

Closing a talk shows up as a ``talk[update]`` whose ``is_in_work`` is ``"0"``:
``event.closed`` tells you so.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar
from urllib.parse import unquote_plus

import attrs
import cattrs
from aiohttp import web
from attrs import AttrsInstance
from cattrs.errors import AttributeValidationNote
from cattrs.gen import make_dict_structure_fn, override

from .errors import DecodeError

__all__ = [
    "MessageEvent",
    "TalkEvent",
    "Webhook",
    "WebhookEvent",
    "WebhookReceiver",
    "parse_webhook",
    "verify_disconnect_signature",
]

logger = logging.getLogger("kommo_talks.webhooks")

T = TypeVar("T")
A = TypeVar("A", bound=AttrsInstance)


# --------------------------------------------------------------------------- models


@attrs.frozen(kw_only=True)
class TalkEvent:
    """A talk added or edited (``talk[add][N]`` / ``talk[update][N]``).

    ``action`` is ``"add"`` or ``"update"``; closing a talk is an ``"update"``
    whose ``is_in_work`` is false (see :attr:`closed`), marking it answered is
    an ``"update"`` whose ``is_read`` is true. Optional fields are ``None``
    when Kommo sent them empty or not at all. Timestamps are UTC datetimes.
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


@attrs.frozen(kw_only=True)
class MessageEvent:
    """A chat message received (``message[add][N]``).

    ``message_id`` comes from ``id``, ``direction`` (``"incoming"`` or
    ``"outgoing"``) from ``type``, ``author_name`` from ``author[name]``;
    ``text`` is ``""`` when absent. Other optional fields are ``None`` when
    Kommo sent them empty or not at all. Whether Kommo sends outgoing messages
    through this hook is not confirmed: do not rely on seeing them.
    ``account_id`` and ``subdomain`` are the delivery's account.
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


WebhookEvent: TypeAlias = TalkEvent | MessageEvent
"""One event of a delivery: a :class:`TalkEvent` or a :class:`MessageEvent`."""


@attrs.frozen(kw_only=True)
class Webhook:
    """One webhook delivery: its account and its events, in Kommo's order.

    ``events`` holds the ``talk[add]`` events, then ``talk[update]``, then
    ``message[add]``, each section by numeric index (``[10]`` after ``[9]``).
    It is empty for a delivery of sections this SDK does not model (leads,
    contacts, ...), which are ignored.
    """

    account_id: int | None = None
    subdomain: str | None = None
    events: tuple[WebhookEvent, ...] = ()


# ------------------------------------------------------------------ the converter

_converter = cattrs.Converter(detailed_validation=True)
"""Converts a webhook's string values; never the converter used for API JSON."""


def _structure_int(value: Any, _: Any = None) -> int:
    # int() alone would also take " 7", "+7", "1_000" and non-ASCII digits.
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if value[:1] == "-" and value[1:].isdigit() and value[1:].isascii():
        return int(value)
    raise ValueError(f"expected an integer, got {_show(value)}")


def _structure_flag(value: Any, _: Any) -> bool:
    if value == "1":
        return True
    if value == "0":
        return False
    raise ValueError(f"expected 0 or 1, got {_show(value)}")


def _structure_unix_seconds(value: Any, _: Any) -> datetime:
    seconds = _structure_int(value)
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"Unix seconds out of range: {_show(value)}") from None


def _structure_str(value: Any, _: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _passthrough(value: T, _: Any) -> T:
    """For the fields that the parser fills in itself, already typed."""
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(bool, _structure_flag)
_converter.register_structure_hook(datetime, _structure_unix_seconds)
_converter.register_structure_hook(str, _structure_str)

_HOOKS: dict[Any, Callable[[Any, Any], Any]] = {
    int: _structure_int,
    bool: _structure_flag,
    datetime: _structure_unix_seconds,
    str: _structure_str,
}


def _make_structure(cls: type[A], *given: str) -> Callable[[dict[str, Any], Any], A]:
    """Generate ``cls``'s structure function once, a strict hook per field.

    Optional fields get their plain hook: the parser drops empty values
    instead of passing ``None``. ``given`` names the fields the parser fills
    in itself (the action and the account), passed through unchanged.
    """
    overrides: dict[str, Any] = {}
    for field in attrs.fields(attrs.resolve_types(cls)):
        if field.name in given:
            overrides[field.name] = override(struct_hook=_passthrough)
        else:
            # `int | None` -> int: the first member of an optional field's union.
            base = getattr(field.type, "__args__", (field.type,))[0]
            overrides[field.name] = override(struct_hook=_HOOKS[base])
    structure = make_dict_structure_fn(cls, _converter, **overrides)
    _converter.register_structure_hook(cls, structure)
    return structure


_structure_talk = _make_structure(TalkEvent, "action", "account_id", "subdomain")
_structure_message = _make_structure(MessageEvent, "account_id", "subdomain")

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
    "author][name]": "author_name",
    "origin]": "origin",
}
_TALK_WIRE = {name: wire[:-1] for wire, name in _TALK_FIELDS.items()}
_MESSAGE_WIRE = {name: wire[:-1] for wire, name in _MESSAGE_FIELDS.items()}

# Key prefix -> (section number, its fields). Sections are numbered in the
# order their events are delivered: talk[add], talk[update], message[add].
_SECTIONS = (
    ("talk[add][", _TALK_FIELDS),
    ("talk[update][", _TALK_FIELDS),
    ("message[add][", _MESSAGE_FIELDS),
)
_ACCOUNT = 3
_ACCOUNT_KEYS = frozenset(("account[id]", "account[subdomain]"))

# --------------------------------------------------------------------- the parser


def parse_webhook(
    body: bytes | bytearray | memoryview | str | Mapping[str, str], *, max_fields: int = 10_000
) -> Webhook:
    """Parse one Kommo account-webhook body into a :class:`Webhook`.

    ``body`` is the raw form-urlencoded body (``bytes`` or ``str``; ``+`` and
    percent-encoded UTF-8 are decoded, bracket keys may be encoded or not) or
    a mapping of form keys to string values, such as a ``dict`` or the
    ``MultiDictProxy`` of ``await request.post()``. When a key repeats, its
    last value wins. An empty value counts as absent.

    Raises:
        DecodeError: with ``path`` set to the offending form key (e.g.
            ``"talk[update][0][talk_id]"``) when a required field is missing
            (``talk_id``, ``is_in_work``, ``is_read``; a message's ``id``,
            ``type``), an integer field or ``account[id]`` is not an integer,
            a flag is not ``0``/``1``, an event index is not a number below
            10**9, or a key of a modelled section does not end in
            ``[field]``; also (``path`` ``None``) for a body that is not UTF-8
            or that has more than ``max_fields`` fields (counted by their
            ``&`` separators, before anything else is done).
        TypeError: ``body`` is none of the types above.
    """
    if isinstance(body, str):
        if body.count("&") >= max_fields:
            raise _too_many(max_fields)
        groups = _group_text(body)
    elif isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        if raw.count(b"&") >= max_fields:
            raise _too_many(max_fields)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("webhook body is not UTF-8") from None
        groups = _group_text(text)
    elif isinstance(body, Mapping):
        if len(body) > max_fields:
            raise _too_many(max_fields)
        groups = _group_items(body.items())
    else:
        raise TypeError(f"expected bytes, str or a mapping, got {type(body).__name__}")
    return _build(*groups)


def _too_many(max_fields: int) -> DecodeError:
    return DecodeError(f"webhook body has more than {max_fields} fields; refused")


# index -> {attribute name: value}; values are str until _build adds the account.
_Section = dict[str, dict[str, Any]]
# The three event sections in order, then the account's {form key: value} at index "".
_Groups = tuple[_Section, _Section, _Section, _Section]
# What a form key holds: (section number, event index, attribute, the decoded
# key, for error messages); the empty tuple for a key to ignore.
_Spec = tuple[int, str, str, str] | tuple[()]


def _classify(key: str) -> _Spec:
    """What a decoded form key holds (see ``_Spec``); parsers look it up in a ``_KeyTable``.

    The account's keys give ``(_ACCOUNT, "", key, key)``.

    Raises:
        DecodeError: a key of a modelled section whose index is not a number,
            or that does not end in ``[field]``.
    """
    if key in _ACCOUNT_KEYS:
        return _ACCOUNT, "", key, key
    for number, (prefix, fields) in enumerate(_SECTIONS):
        if key.startswith(prefix):
            index, _, wire = key[len(prefix) :].partition("][")
            if not wire.endswith("]"):
                raise DecodeError(
                    f"{key}: malformed webhook key (expected section[N][field])", path=key
                )
            name = fields.get(wire)
            if name is None:
                return ()
            # At most 9 digits: sorting by int() stays cheap and can never fail.
            if not (index.isascii() and index.isdigit() and len(index) <= 9):
                raise DecodeError(f"{key}: event index is not a number below 10**9", path=key)
            return number, index, name, key
    return ()


class _KeyTable(dict[str, _Spec]):
    """Form key -> :func:`_classify`'s answer, learnt on first sight.

    Kommo sends the same few dozen keys in every delivery, so that parsing a
    body costs one dict look-up per field. With ``encoded`` the keys are as
    they come on the wire (``talk%5Bupdate%5D...`` or ``talk[update]...``)
    and are percent-decoded before they are classified. Only keys of at most
    64 characters are kept, and the table is emptied when it holds 4096: a
    sender that makes keys up costs time, not memory.
    """

    def __init__(self, *, encoded: bool) -> None:
        super().__init__()
        self._encoded = encoded

    def __missing__(self, key: str) -> _Spec:
        decoded = key
        if self._encoded and ("%" in key or "+" in key):
            decoded = _unquote(key, key)
        spec = _classify(decoded)
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
    groups: _Groups = ({}, {}, {}, {})
    specs = _WIRE_KEYS
    for pair in text.split("&"):
        key, _, value = pair.partition("=")
        spec = specs[key]
        if not spec:
            continue
        number, index, name, decoded_key = spec
        if not value:  # absent; the event still exists, to be checked for its required fields
            groups[number].setdefault(index, {})
            continue
        if "%" in value or "+" in value:
            value = _unquote(value, decoded_key)
        section = groups[number]
        event = section.get(index)
        if event is None:
            section[index] = {name: value}
        else:
            event[name] = value
    return groups


def _group_items(items: Iterable[tuple[Any, Any]]) -> _Groups:
    """:func:`_group_text` for keys and values that are already decoded."""
    groups: _Groups = ({}, {}, {}, {})
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


def _unquote(text: str, key: str) -> str:
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError:
        raise DecodeError(f"{key}: percent-encoded bytes are not UTF-8", path=key) from None


def _build(
    talk_add: _Section, talk_update: _Section, messages: _Section, accounts: _Section
) -> Webhook:
    account = accounts.get("", {})
    account_id = None
    subdomain = account.get("account[subdomain]")
    raw_id = account.get("account[id]")
    if raw_id is not None:
        try:
            account_id = _structure_int(raw_id)
        except ValueError as exc:
            raise DecodeError(f"account[id]: {exc}", path="account[id]") from None
    events: list[WebhookEvent] = []
    for prefix, action, section in (
        ("talk[add]", "add", talk_add),
        ("talk[update]", "update", talk_update),
    ):
        for index in _in_order(section):
            values = section[index]
            values["action"] = action
            values["account_id"] = account_id
            values["subdomain"] = subdomain
            try:
                events.append(_structure_talk(values, TalkEvent))
            except cattrs.ClassValidationError as exc:
                raise _field_error(exc, f"{prefix}[{index}]", _TALK_WIRE) from None
    for index in _in_order(messages):
        values = messages[index]
        values["account_id"] = account_id
        values["subdomain"] = subdomain
        try:
            events.append(_structure_message(values, MessageEvent))
        except cattrs.ClassValidationError as exc:
            raise _field_error(exc, f"message[add][{index}]", _MESSAGE_WIRE) from None
    return Webhook(account_id=account_id, subdomain=subdomain, events=tuple(events))


def _in_order(section: _Section) -> list[str]:
    """The section's indexes (checked numbers) in numeric order."""
    return sorted(section, key=int) if len(section) > 1 else list(section)


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
        key = f"{event_key}[{wire.get(notes[0].name, notes[0].name)}]" if notes else event_key
        first = first or key
        reason = "required field missing" if isinstance(error, KeyError) else str(error)
        parts.append(f"{key}: {reason}")
    return DecodeError("; ".join(parts), path=first)


# ------------------------------------------------------------------- the receiver

WebhookCallback: TypeAlias = Callable[[WebhookEvent], Awaitable[object]]


class WebhookReceiver:
    """Receives Kommo webhooks in an ``aiohttp.web`` app; ``await callback(event)`` each.

    Kommo waits at most 2 s for an answer and disables a hook after 100
    failed ones in 2 hours, so a valid delivery is answered ``200`` as soon
    as it is parsed, before any callback runs; callbacks run afterwards in
    background tasks that this receiver tracks. Other answers: ``403`` when
    ``secret`` is set and the ``secret`` query parameter of the request is
    missing or differs (checked in constant time, before the body is read);
    ``400`` for a body that :func:`parse_webhook` rejects (nothing is
    called); ``413`` for a body larger than the application's
    ``client_max_size`` (aiohttp's limit; nothing is called); ``503`` when
    accepting the delivery would leave more than ``max_pending`` events
    waiting or running (a delivery is always accepted when nothing is
    pending) or once draining has started. Kommo retries a delivery answered
    ``503``, and none of its events was queued.

    The events of one delivery are handed to ``callback`` one after another,
    in the delivery's order; different deliveries run concurrently, each in
    a task of its own (which runs in a copy of its request's context). Kommo
    puts related events in one delivery in a meaningful order (a talk added,
    then updated; a message, then the talk closed), and a bot that reacts to
    them concurrently could act on them out of order. A callback that needs
    more concurrency can start its own tasks.

    An exception raised by ``callback`` is logged with its traceback on the
    ``kommo_talks.webhooks`` logger, and the next event goes on. An accepted
    event lives in memory until its callback ends: a crash loses it, a
    graceful shutdown (:meth:`setup`'s hook, or :meth:`close`) does not.
    Give callbacks their own timeouts: draining waits for every one of them.
    """

    def __init__(
        self, callback: WebhookCallback, *, max_pending: int = 1000, secret: str | None = None
    ) -> None:
        """Build a receiver; ``secret``, if set, must be the URL's ``secret`` parameter.

        Raises:
            ValueError: ``max_pending`` is below 1, or ``secret`` is empty.
        """
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if secret is not None and not secret:
            raise ValueError("secret must not be empty (use None for no secret)")
        self._callback = callback
        self._max_pending = max_pending
        self._secret = None if secret is None else secret.encode("utf-8", "surrogatepass")
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def pending(self) -> int:
        """Accepted events whose callback has not finished yet."""
        return self._pending

    def setup(self, app: web.Application, path: str) -> None:
        """Add a ``POST`` route at ``path`` and an ``on_shutdown`` hook that drains.

        The hook runs before the application's cleanup, so callbacks may still
        use resources (a ``KommoClient``) that cleanup closes.
        """
        app.router.add_post(path, self.handle)
        app.on_shutdown.append(self._on_shutdown)

    async def handle(self, request: web.Request) -> web.Response:
        """The request handler, for users who add the route themselves."""
        if self._secret is not None:
            given = request.query.get("secret")
            if given is None or not hmac.compare_digest(
                given.encode("utf-8", "surrogatepass"), self._secret
            ):
                return web.Response(status=403, text="forbidden")
        if self._draining:
            return _shutting_down()
        body = await request.read()  # over client_max_size: aiohttp answers 413
        try:
            events = parse_webhook(body).events
        except DecodeError as exc:
            return web.Response(status=400, text=str(exc))
        if self._draining:
            return _shutting_down()
        if events:
            if self._pending and self._pending + len(events) > self._max_pending:
                return web.Response(status=503, text="too many pending events")
            self._pending += len(events)
            # The loop first runs this task once the request's task yields:
            # after aiohttp has written this answer (unless the socket's
            # buffer is full, when the two interleave).
            task = asyncio.create_task(self._run(events))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.Response(status=200)

    async def _run(self, events: tuple[WebhookEvent, ...]) -> None:
        left = len(events)
        try:
            for event in events:
                try:
                    await self._callback(event)
                except (Exception, asyncio.CancelledError) as exc:
                    # A CancelledError is this task's only when the task is being
                    # cancelled (the loop is closing); else the callback met it.
                    task = asyncio.current_task()
                    if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                        raise
                    logger.exception("webhook callback failed on %s", _describe(event))
                self._pending -= 1
                left -= 1
        finally:
            self._pending -= left

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting deliveries (``503``) and wait for every accepted callback.

        Idempotent; the receiver cannot be reopened.
        """
        self._draining = True
        while self._tasks:
            await asyncio.wait(list(self._tasks))


def _shutting_down() -> web.Response:
    return web.Response(status=503, text="shutting down")


def _describe(event: WebhookEvent) -> str:
    """A short label for logs: no message text, which may be personal data."""
    where = f" of account {event.account_id}" if event.account_id is not None else ""
    if isinstance(event, TalkEvent):
        return f"talk[{event.action}] event for talk {event.talk_id}{where}"
    return f"message[add] event {event.message_id!r} for talk {event.talk_id}{where}"


# -------------------------------------------------------------- disconnect hook


def verify_disconnect_signature(
    *, client_id: str, client_secret: str, account_id: int | str, signature: object
) -> bool:
    """Check the signature of Kommo's "integration disconnected" hook.

    The expected signature is the lowercase hex HMAC-SHA256 of
    ``f"{client_id}|{account_id}"`` keyed with ``client_secret``, compared in
    constant time. Returns ``False`` (never raises) for a signature that is
    not a ``str`` or ``bytes``, or not ASCII.
    """
    if isinstance(signature, str):
        if not signature.isascii():
            return False
        given = signature.encode("ascii")
    elif isinstance(signature, bytes):
        given = signature
    else:
        return False
    expected = hmac.new(
        client_secret.encode("utf-8"), f"{client_id}|{account_id}".encode(), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(given, expected.encode("ascii"))
