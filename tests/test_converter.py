"""The strict converter: documented payload round-trip, strictness, error paths."""

from __future__ import annotations

import copy
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import cattrs
import pytest

from kommo_talks import EntityRef, Talk, TalkEmbedded, converter
from kommo_talks.converter import (
    _fast_talk,
    describe_validation_error,
    structure_talk,
    structure_talks,
)

# The response example of GET /api/v4/talks/{id} in Kommo's reference, verbatim.
DOCUMENTED: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "talk_117.json").read_text(encoding="utf-8")
)


def test_documented_payload_round_trips_exactly() -> None:
    talk = converter.structure(copy.deepcopy(DOCUMENTED), Talk)

    assert converter.unstructure(talk) == DOCUMENTED


def test_documented_payload_decodes_to_typed_fields() -> None:
    talk = converter.structure(DOCUMENTED, Talk)

    assert talk == Talk(
        talk_id=117,
        created_at=datetime(2021, 9, 7, 12, 38, 11, tzinfo=UTC),
        updated_at=datetime(2021, 9, 7, 17, 32, 9, tzinfo=UTC),
        rate=0,
        contact_id=3372695,
        chat_id="88278e98-2b8d-4ae2-a5f0-bfab511cd621",
        entity_id=667999637,
        entity_type="lead",
        is_in_work=True,
        is_read=True,
        origin="telegram",
        missed_at=None,
        account_id=17029541,
        embedded=TalkEmbedded(
            contacts=(EntityRef(3372695, "https://example.kommo.ru/api/v4/contacts/3372695"),),
            leads=(EntityRef(667999637, "https://example.kommo.ru/api/v4/leads/667999637"),),
            customers=(),
        ),
        self_url="https://example.kommo.ru/api/v4/talks/117",
    )
    assert talk.created_at.tzinfo is UTC


def test_talk_is_frozen_and_slotted() -> None:
    talk = converter.structure(DOCUMENTED, Talk)

    with pytest.raises(AttributeError):
        talk.rate = 5  # type: ignore[misc]
    assert not hasattr(talk, "__dict__")


def test_missing_embedded_and_links_give_empty_tuples_and_none() -> None:
    payload = copy.deepcopy(DOCUMENTED)
    del payload["_embedded"], payload["_links"]

    talk = converter.structure(payload, Talk)

    assert talk.embedded == TalkEmbedded((), (), ())
    assert talk.self_url is None


def test_missed_at_and_nullable_entity_decode() -> None:
    payload = {**DOCUMENTED, "missed_at": 1631020000, "entity_id": None, "entity_type": None}

    talk = converter.structure(payload, Talk)

    assert talk.missed_at == datetime.fromtimestamp(1631020000, UTC)
    assert (talk.entity_id, talk.entity_type) == (None, None)


def test_unknown_entity_type_is_kept() -> None:
    talk = converter.structure({**DOCUMENTED, "entity_type": "company"}, Talk)
    assert talk.entity_type == "company"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("talk_id", "117"),
        ("talk_id", True),
        ("talk_id", 117.0),
        ("rate", None),
        ("is_in_work", "false"),
        ("is_read", 1),
        ("chat_id", 5),
        ("origin", ["telegram"]),
        ("created_at", "1631018291"),
        ("created_at", True),
        ("missed_at", 1.5),
        ("account_id", "17029541"),
    ],
)
def test_wrong_types_are_never_coerced(field: str, value: Any) -> None:
    with pytest.raises(cattrs.ClassValidationError) as caught:
        converter.structure({**DOCUMENTED, field: value}, Talk)

    _, path = describe_validation_error(caught.value)
    assert path == field


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda p: p["_embedded"]["contacts"][0].update(id="x"), "_embedded.contacts[0].id"),
        (lambda p: p["_embedded"].update(leads={"id": 1}), "_embedded.leads"),
        (lambda p: p.update(_links={"self": {"href": 5}}), "_links"),
        (lambda p: p.pop("talk_id"), "talk_id"),
    ],
)
def test_nested_errors_name_the_api_path(change: Any, path: str) -> None:
    payload = copy.deepcopy(DOCUMENTED)
    change(payload)

    with pytest.raises(cattrs.ClassValidationError) as caught:
        converter.structure(payload, Talk)

    text, first = describe_validation_error(caught.value)
    assert first == path
    assert path in text


FAST_PATH_CASES: list[Any] = [
    lambda p: p,
    lambda p: p.pop("_embedded"),
    lambda p: p.pop("_links"),
    lambda p: p.update(_embedded=None),
    lambda p: p.update(_links=None),
    lambda p: p.update(_embedded={}),
    lambda p: p["_embedded"].update(contacts=None),
    lambda p: p["_embedded"]["contacts"][0].pop("_links"),
    lambda p: p["_embedded"]["contacts"].append("x"),
    lambda p: p.update(_links={"self": None}),
    lambda p: p.update(_links={"self": {"href": 5}}),
    lambda p: p.update(_links=[]),
    lambda p: p.update(missed_at=1631020000),
    lambda p: p.update(missed_at=10**20),
    lambda p: p.update(entity_id=None, entity_type=None),
    lambda p: p.pop("entity_id"),
    lambda p: p.update(is_read=1),
    lambda p: p.update(extra={"new": "field"}),
]


@pytest.mark.parametrize("change", FAST_PATH_CASES)
def test_client_fast_path_agrees_with_the_converter(change: Any) -> None:
    payload = copy.deepcopy(DOCUMENTED)
    change(payload)

    try:
        expected: Any = converter.structure(copy.deepcopy(payload), Talk)
    except cattrs.ClassValidationError as error:
        expected = describe_validation_error(error)
    try:
        got: Any = structure_talk(payload)
    except cattrs.ClassValidationError as error:
        got = describe_validation_error(error)

    assert got == expected


def test_list_fast_path_agrees_and_names_the_bad_item() -> None:
    good = [copy.deepcopy(DOCUMENTED) for _ in range(3)]
    assert structure_talks(good) == converter.structure(copy.deepcopy(good), tuple[Talk, ...])

    bad = copy.deepcopy(good)
    bad[2]["talk_id"] = "3"
    with pytest.raises(cattrs.BaseValidationError) as caught:
        structure_talks(bad)
    _, path = describe_validation_error(caught.value)
    assert path == "[2].talk_id"


# ------------------------------------------- the fast path and the converter agree

# For each top-level key: values of the right type, and values of wrong types.
_GOOD: dict[str, list[Any]] = {
    "talk_id": [117, 1],
    "created_at": [1631018291, 0],
    "updated_at": [1631035929],
    "rate": [0, 10],
    "contact_id": [3372695],
    "chat_id": ["88278e98-2b8d-4ae2-a5f0-bfab511cd621", ""],
    "entity_id": [667999637],
    "entity_type": ["lead", "customer", "company"],
    "is_in_work": [True, False],
    "is_read": [True, False],
    "origin": ["telegram", ""],
    "missed_at": [1631020000],
    "account_id": [17029541],
    "status": ["in_work", "closed", "nps_scheduled", "with_error"],
    "source_id": [5501, 0],
    "_embedded": [DOCUMENTED["_embedded"], {}, {"contacts": [{"id": 1}]}],
    "_links": [DOCUMENTED["_links"], {}, {"self": {}}],
}
_WRONG: list[Any] = ["5", 5, 5.0, True, [], {}, "true"]


def _payloads(seed: int, count: int) -> list[dict[str, Any]]:
    """Valid talk payloads with zero to three keys dropped, nulled or given another type."""
    rng = random.Random(seed)
    payloads = []
    for _ in range(count):
        payload = {key: copy.deepcopy(rng.choice(good)) for key, good in _GOOD.items()}
        for key in rng.sample(sorted(_GOOD), rng.randrange(4)):
            change = rng.randrange(3)
            if change == 0:
                del payload[key]
            else:
                payload[key] = None if change == 1 else rng.choice(_WRONG)
        payloads.append(payload)
    return payloads


def _outcome(build: Any, payload: Any) -> Any:
    try:
        return build(payload)
    except Exception as exc:  # compared by kind: both paths must refuse the same payloads
        return type(exc).__name__


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_and_converter_agree_on_generated_payloads(seed: int) -> None:
    accepted_fast = 0
    for payload in _payloads(seed, 500):
        expected = _outcome(lambda p: converter.structure(copy.deepcopy(p), Talk), payload)
        fast = _outcome(_fast_talk, payload)
        if isinstance(fast, Talk):  # the fast path may decline, never decide otherwise
            accepted_fast += 1
            assert fast == expected, payload
        assert _outcome(structure_talk, payload) == expected, payload
        listed = _outcome(structure_talks, [payload])
        if isinstance(expected, Talk):
            assert listed == (expected,), payload
        else:  # the list's error wraps the item's
            assert listed == "IterableValidationError", payload
    assert accepted_fast > 0  # the generator reaches the fast path's accepting branch


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({**DOCUMENTED}, id="get-shape"),
        pytest.param(
            {k: v for k, v in DOCUMENTED.items() if k != "missed_at"}
            | {"status": "closed", "source_id": None},
            id="list-shape",
        ),
        pytest.param({**DOCUMENTED, "chat_id": None}, id="null-chat-id"),
    ],
)
def test_both_documented_shapes_take_the_fast_path(payload: dict[str, Any]) -> None:
    # Declining would fall back to the slow converter on every talk of a list.
    assert _fast_talk(payload) == converter.structure(payload, Talk)


def test_absent_missed_at_status_and_source_id_are_none() -> None:
    payload = {k: v for k, v in DOCUMENTED.items() if k != "missed_at"}

    talk = converter.structure(payload, Talk)

    assert (talk.missed_at, talk.status, talk.source_id) == (None, None, None)


def test_status_and_source_id_are_unstructured_only_when_set() -> None:
    talk = converter.structure({**DOCUMENTED, "status": "closed", "source_id": 5501}, Talk)

    assert converter.unstructure(talk) == {**DOCUMENTED, "status": "closed", "source_id": 5501}
    assert "status" not in converter.unstructure(attrs.evolve(talk, status=None, source_id=None))
