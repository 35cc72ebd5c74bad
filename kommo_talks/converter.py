"""The strict cattrs converter that decodes Kommo's JSON into the models.

``converter.structure(payload, Talk)`` builds a :class:`~kommo_talks.Talk`;
``converter.unstructure(talk)`` gives back Kommo's JSON shape, so that a
documented payload round-trips exactly. The converter never coerces: a
``"5"`` is not an ``int``, ``True`` is not an ``int``, ``"false"`` is not a
``bool`` and ``None`` is not a ``str``. Failures raise cattrs'
``ClassValidationError``; :func:`describe_validation_error` turns one into a
short text naming the field path.

All hooks are generated once, at import time, and reused on every call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .models import EntityRef, Talk, TalkEmbedded

__all__ = [
    "TalksPage",
    "TalksPageDocument",
    "converter",
    "describe_validation_error",
    "structure_talk",
    "structure_talks",
]

T = TypeVar("T")

converter = cattrs.Converter(detailed_validation=True)
"""The converter used for every API response (see the module docstring)."""


def _strict(expected: type[T], name: str) -> Callable[[Any, Any], T]:
    def structure(value: Any, _: Any) -> T:
        # `type(...) is` rejects subclasses on purpose: bool is a subclass of int.
        if type(value) is not expected:
            raise TypeError(f"expected {name}, got {_describe(value)}")
        return value

    return structure


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


converter.register_structure_hook(int, _strict(int, "an integer"))
converter.register_structure_hook(str, _strict(str, "a string"))
converter.register_structure_hook(bool, _strict(bool, "a boolean"))


def _structure_unix_seconds(value: Any, _: Any) -> datetime:
    if type(value) is not int:
        raise TypeError(f"expected Unix seconds (an integer), got {_describe(value)}")
    return datetime.fromtimestamp(value, UTC)


def _unstructure_unix_seconds(value: datetime) -> int:
    return int(value.timestamp())


converter.register_structure_hook(datetime, _structure_unix_seconds)
converter.register_unstructure_hook(datetime, _unstructure_unix_seconds)


def _structure_self_href(links: Any, _: Any) -> str | None:
    """``_links`` → ``_links.self.href`` (``None`` when absent)."""
    if links is None:
        return None
    if type(links) is not dict:
        raise TypeError(f"expected an object, got {_describe(links)}")
    link = links.get("self")
    if link is None:
        return None
    if type(link) is not dict:
        raise TypeError(f"expected an object at self, got {_describe(link)}")
    href = link.get("href")
    if href is not None and type(href) is not str:
        raise TypeError(f"expected a string at self.href, got {_describe(href)}")
    return href


def _unstructure_self_href(href: str | None) -> dict[str, Any]:
    return {"self": {"href": href}}


def _structure_refs(value: Any, _: Any) -> tuple[EntityRef, ...]:
    if type(value) is not list:
        raise TypeError(f"expected an array, got {_describe(value)}")
    return converter.structure(value, tuple[EntityRef, ...])


def _unstructure_refs(refs: tuple[EntityRef, ...]) -> list[dict[str, Any]]:
    return [converter.unstructure(ref, EntityRef) for ref in refs]


def _structure_embedded(value: Any, _: Any) -> TalkEmbedded:
    if value is None:
        return TalkEmbedded()
    if type(value) is not dict:
        raise TypeError(f"expected an object, got {_describe(value)}")
    return converter.structure(value, TalkEmbedded)


_self_url = override(
    rename="_links",
    omit_if_default=True,
    struct_hook=_structure_self_href,
    unstruct_hook=_unstructure_self_href,
)
_refs = override(struct_hook=_structure_refs, unstruct_hook=_unstructure_refs)
_OVERRIDES: dict[type[Any], dict[str, Any]] = {
    EntityRef: {"href": _self_url},
    TalkEmbedded: {"contacts": _refs, "leads": _refs, "customers": _refs},
    Talk: {
        "embedded": override(rename="_embedded", struct_hook=_structure_embedded),
        "self_url": _self_url,
        # Only list items carry them: a single talk unstructures to its documented JSON.
        "status": override(omit_if_default=True),
        "source_id": override(omit_if_default=True),
    },
}

# The hooks are generated on first use, not at import: `import kommo_talks`
# stays light, and the client's hot path (`structure_talk`) rarely needs them.
converter.register_structure_hook_factory(
    lambda cls: cls in _OVERRIDES,
    lambda cls: make_dict_structure_fn(cls, converter, **_OVERRIDES[cls]),
)
converter.register_unstructure_hook_factory(
    lambda cls: cls in _OVERRIDES,
    lambda cls: make_dict_unstructure_fn(cls, converter, **_OVERRIDES[cls]),
)


# Attribute names that differ from the API's field names, for error paths.
_WIRE_NAMES = {"embedded": "_embedded", "self_url": "_links"}
# EntityRef.href is `_links` only inside an embedded reference (`contacts[0].href`).
_REF_LIST = re.compile(r"(contacts|leads|customers)\[\d+\]")


def _wire_path(path: str) -> str:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in _WIRE_NAMES:
            parts[i] = _WIRE_NAMES[part]
        elif part == "href" and i and _REF_LIST.fullmatch(parts[i - 1]):
            parts[i] = "_links"
    return ".".join(parts)


def describe_validation_error(exc: BaseException) -> tuple[str, str | None]:
    """Summarise a cattrs structuring error as ``(text, first field path)``.

    The path has no ``$.`` prefix (``"talk_id"``, ``"_embedded.contacts[0].id"``).
    """
    messages = cattrs.transform_error(exc, path="$")
    first_path: str | None = None
    parts = []
    for message in messages:
        text, _, where = message.rpartition(" @ ")
        path = _wire_path(where.removeprefix("$").removeprefix(".")) or None
        if first_path is None:
            first_path = path
        parts.append(f"{path}: {text}" if path else text)
    return "; ".join(parts), first_path


class _Unusual(Exception):
    """The fast path met something it leaves to the converter."""


_MISSING: Any = object()
_NO_EMBEDDED = TalkEmbedded()
_from_timestamp = datetime.fromtimestamp


def _fast_refs(value: Any) -> tuple[EntityRef, ...]:
    if type(value) is not list:
        raise _Unusual
    refs = []
    for item in value:
        if type(item) is not dict:
            raise _Unusual
        ref_id = item["id"]
        if type(ref_id) is not int:
            raise _Unusual
        refs.append(EntityRef(ref_id, _fast_self_href(item)))
    return tuple(refs)


def _fast_self_href(data: dict[str, Any]) -> str | None:
    """``_links.self.href`` of the common shape, else what the converter's hook says."""
    links = data.get("_links", _MISSING)
    if links is _MISSING:
        return None
    if type(links) is dict:
        link = links.get("self")
        if type(link) is dict:
            href = link.get("href")
            if type(href) is str:
                return href
    return _structure_self_href(links, None)


def _fast_embedded(embedded: Any) -> TalkEmbedded:
    if embedded is None:
        return _NO_EMBEDDED
    if type(embedded) is not dict:
        raise _Unusual
    contacts = embedded.get("contacts", _MISSING)
    leads = embedded.get("leads", _MISSING)
    customers = embedded.get("customers", _MISSING)
    return TalkEmbedded(
        () if contacts is _MISSING else _fast_refs(contacts),
        () if leads is _MISSING else _fast_refs(leads),
        () if customers is _MISSING else _fast_refs(customers),
    )


# A non-dict fails at the first subscript (TypeError: the callers' slow path);
# missed_at, status and source_id are optional (a list item has no missed_at).
def _fast_talk(data: Any) -> Talk:
    talk_id = data["talk_id"]
    created_at = data["created_at"]
    updated_at = data["updated_at"]
    rate = data["rate"]
    contact_id = data["contact_id"]
    chat_id = data["chat_id"]
    entity_id = data["entity_id"]
    entity_type = data["entity_type"]
    is_in_work = data["is_in_work"]
    is_read = data["is_read"]
    origin = data["origin"]
    account_id = data["account_id"]
    if (
        type(talk_id) is not int
        or type(created_at) is not int
        or type(updated_at) is not int
        or type(rate) is not int
        or type(contact_id) is not int
        or (chat_id is not None and type(chat_id) is not str)
        or (entity_id is not None and type(entity_id) is not int)
        or (entity_type is not None and type(entity_type) is not str)
        or type(is_in_work) is not bool
        or type(is_read) is not bool
        or type(origin) is not str
        or ((missed_at := data.get("missed_at")) is not None and type(missed_at) is not int)
        or type(account_id) is not int
        or ((status := data.get("status")) is not None and type(status) is not str)
        or ((source_id := data.get("source_id")) is not None and type(source_id) is not int)
    ):
        raise _Unusual
    return Talk(
        talk_id,
        _from_timestamp(created_at, UTC),
        _from_timestamp(updated_at, UTC),
        rate,
        contact_id,
        chat_id,
        entity_id,
        entity_type,
        is_in_work,
        is_read,
        origin,
        account_id,
        _fast_embedded(data.get("_embedded")),
        _fast_self_href(data),
        status,
        source_id,
        missed_at=None if missed_at is None else _from_timestamp(missed_at, UTC),
    )


def structure_talk(data: Any, _: Any = None) -> Talk:
    """Build a :class:`Talk` from a decoded payload, as ``converter.structure`` does.

    The client's hot path: a hand-written check of the common, valid shape
    (about three times faster than the generated hook). Anything it does not
    accept goes to the converter, which decodes it or raises the detailed
    ``ClassValidationError`` naming the field, so both paths agree.
    """
    if type(data) is dict:
        try:
            return _fast_talk(data)
        except (_Unusual, LookupError, TypeError, ValueError, OverflowError, OSError):
            pass
    return converter.structure(data, Talk)


def structure_talks(items: list[Any]) -> tuple[Talk, ...]:
    """Build the talks of a list page, as ``converter.structure(items, tuple[Talk, ...])``.

    Every item goes through the fast path of :func:`structure_talk`; if any
    is unusual, the whole list goes to the converter, whose error then names
    the item's index (``[3].talk_id``).
    """
    try:
        return tuple([_fast_talk(item) for item in items])
    except (_Unusual, LookupError, TypeError, ValueError, OverflowError, OSError):
        pass
    return converter.structure(items, tuple[Talk, ...])


# -- the talks list page (``GET /api/v4/talks``) -----------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@attrs.frozen
class TalksPage:
    """The talks of one list page (``_embedded.talks``), decoded as :class:`Talk`."""

    talks: tuple[Talk, ...]


@attrs.frozen
class TalksPageDocument:
    """The part of a talks list page the converter decodes: its ``_embedded`` object."""

    embedded: TalksPage


def _structure_talk_list(value: Any, _: Any) -> tuple[Talk, ...]:
    # Checked here: cattrs' tuple hook would iterate a string or a dict.
    if type(value) is not list:
        raise TypeError(f"expected an array, got {_type_name(value)}")
    return structure_talks(value)


def _structure_page_embedded(value: Any, _: Any) -> TalksPage:
    if type(value) is not dict:
        raise TypeError(f"expected an object, got {_type_name(value)}")
    return _structure_page(value, TalksPage)


_structure_page = make_dict_structure_fn(
    TalksPage, converter, talks=override(struct_hook=_structure_talk_list)
)
converter.register_structure_hook(TalksPage, _structure_page)
converter.register_structure_hook(
    TalksPageDocument,
    make_dict_structure_fn(
        TalksPageDocument,
        converter,
        # The attribute is named `embedded` so that error paths read `_embedded.talks[3]...`.
        embedded=override(rename="_embedded", struct_hook=_structure_page_embedded),
    ),
)
