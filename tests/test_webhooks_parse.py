"""parse_webhook: Kommo's form-encoded account webhooks into typed events."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote_plus, urlencode

import attrs
import pytest
from multidict import MultiDict, MultiDictProxy

from kommo_talks.errors import DecodeError
from kommo_talks.webhooks import MessageEvent, TalkEvent, Webhook, parse_webhook

# A talk closed by a manager, as Kommo sends it (brackets percent-encoded).
CLOSE_PAIRS = [
    ("talk[update][0][talk_id]", "117"),
    ("talk[update][0][created_at]", "1700000000"),
    ("talk[update][0][updated_at]", "1700000123"),
    ("talk[update][0][rate]", "0"),
    ("talk[update][0][contact_id]", "3362157"),
    ("talk[update][0][chat_id]", "33b41601-48c4-4cd4-9b95-4b6e0ac7c5bc"),
    ("talk[update][0][entity_id]", "12345"),
    ("talk[update][0][entity_type]", "lead"),
    ("talk[update][0][is_in_work]", "0"),
    ("talk[update][0][is_read]", "1"),
    ("talk[update][0][origin]", "telegram"),
    ("account[id]", "29785537"),
    ("account[subdomain]", "example"),
    ("account[_links][self]", "https://example.kommo.com"),
]
CLOSE_BODY = urlencode(CLOSE_PAIRS).encode()

EXPECTED_CLOSE = TalkEvent(
    action="update",
    talk_id=117,
    contact_id=3362157,
    chat_id="33b41601-48c4-4cd4-9b95-4b6e0ac7c5bc",
    entity_id=12345,
    entity_type="lead",
    is_in_work=False,
    is_read=True,
    rate=0,
    origin="telegram",
    created_at=datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
    updated_at=datetime(2023, 11, 14, 22, 15, 23, tzinfo=UTC),
    account_id=29785537,
    subdomain="example",
)


def talk(
    section: str, index: int, talk_id: int | str, *, in_work: str = "1", read: str = "0"
) -> str:
    prefix = f"talk[{section}][{index}]"
    fields = {"talk_id": str(talk_id), "is_in_work": in_work, "is_read": read}
    return "&".join(f"{prefix}[{k}]={quote_plus(v)}" for k, v in fields.items())


def message(index: int, message_id: str, **extra: str) -> str:
    fields = {"id": message_id, "type": "incoming", **extra}
    return "&".join(f"message[add][{index}][{k}]={quote_plus(v)}" for k, v in fields.items())


def decode_error(body: bytes | str | Mapping[str, str], *, max_fields: int = 10_000) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        parse_webhook(body, max_fields=max_fields)
    return caught.value


# --------------------------------------------------------------- body types


def test_closed_talk_from_bytes_is_fully_typed() -> None:
    webhook = parse_webhook(CLOSE_BODY)

    assert webhook == Webhook(account_id=29785537, subdomain="example", events=(EXPECTED_CLOSE,))
    (event,) = webhook.events
    assert isinstance(event, TalkEvent)
    assert event.closed
    assert event.created_at is not None
    assert event.created_at.tzinfo is UTC


def test_str_body_with_raw_brackets_parses_the_same() -> None:
    body = "&".join(f"{k}={v}" for k, v in CLOSE_PAIRS)

    assert parse_webhook(body).events == (EXPECTED_CLOSE,)


def test_dict_body_parses_the_same() -> None:
    assert parse_webhook(dict(CLOSE_PAIRS)).events == (EXPECTED_CLOSE,)


def test_aiohttp_multidict_proxy_parses_the_same() -> None:
    form = MultiDictProxy(MultiDict(CLOSE_PAIRS))

    assert parse_webhook(form).events == (EXPECTED_CLOSE,)


def test_bytes_like_bodies_are_accepted() -> None:
    assert parse_webhook(bytearray(CLOSE_BODY)).events == (EXPECTED_CLOSE,)
    assert parse_webhook(memoryview(CLOSE_BODY)).events == (EXPECTED_CLOSE,)


def test_other_body_types_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="int"):
        parse_webhook(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------ events


def test_add_is_not_closed_and_update_in_work_is_not_closed() -> None:
    webhook = parse_webhook(f"{talk('add', 0, 5, in_work='0')}&{talk('update', 0, 6)}")

    added, updated = webhook.events
    assert isinstance(added, TalkEvent)
    assert isinstance(updated, TalkEvent)
    assert (added.action, added.talk_id, added.closed) == ("add", 5, False)
    assert (updated.action, updated.talk_id, updated.closed) == ("update", 6, False)


def test_events_come_add_then_update_then_message_each_in_index_order() -> None:
    body = "&".join(
        [
            message(1, "m-second"),
            talk("update", 10, 110),
            message(0, "m-first"),
            talk("update", 9, 109),
            talk("update", 2, 102),
            talk("add", 1, 201),
            talk("add", 0, 200),
        ]
    )

    labels = [
        (e.action, e.talk_id) if isinstance(e, TalkEvent) else ("message", e.message_id)
        for e in parse_webhook(body).events
    ]

    assert labels == [
        ("add", 200),
        ("add", 201),
        ("update", 102),
        ("update", 109),
        ("update", 110),
        ("message", "m-first"),
        ("message", "m-second"),
    ]


def test_message_event_fields() -> None:
    body = (
        message(
            0,
            "5f9c7d3e-aaaa-bbbb-cccc-000000000001",
            talk_id="117",
            chat_id="33b41601-48c4-4cd4-9b95-4b6e0ac7c5bc",
            contact_id="3362157",
            entity_id="12345",
            entity_type="lead",
            text="hello",
            created_at="1700000000",
            origin="telegram",
            element_type="2",
        )
        + "&message[add][0][author][name]=Ann&message[add][0][author][id]=9"
        + "&account[id]=29785537&account[subdomain]=example"
    )

    (event,) = parse_webhook(body).events

    assert event == MessageEvent(
        message_id="5f9c7d3e-aaaa-bbbb-cccc-000000000001",
        talk_id=117,
        chat_id="33b41601-48c4-4cd4-9b95-4b6e0ac7c5bc",
        contact_id=3362157,
        entity_id=12345,
        entity_type="lead",
        direction="incoming",
        text="hello",
        created_at=datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        author_name="Ann",
        author_id="9",
        origin="telegram",
        account_id=29785537,
        subdomain="example",
    )


def test_unicode_text_survives_percent_encoding_and_plus_as_space() -> None:
    text = "Привет, мир! 👋 #done a+b=c & 100%"
    body = message(0, "m1", text=text)
    body += "&message[add][0][author][name]=" + quote_plus("Zoë Ñandú")

    (event,) = parse_webhook(body.encode("ascii")).events

    assert isinstance(event, MessageEvent)
    assert event.text == text
    assert event.author_name == "Zoë Ñandú"


def test_encoded_brackets_in_any_case_and_escaped_percent_signs() -> None:
    body = (
        "message%5badd%5d%5b0%5d%5bid%5d=m1&message%5Badd%5D%5B0%5D%5Btype%5D=incoming"
        "&message%5Badd%5D%5B0%5D%5Btext%5D=%255B%5B%255d%5d+%2B"
    )

    (event,) = parse_webhook(body).events

    assert isinstance(event, MessageEvent)
    assert (event.message_id, event.text) == ("m1", "%5B[%5d] +")


def test_raw_utf8_bytes_are_decoded() -> None:
    body = "message[add][0][id]=m1&message[add][0][type]=outgoing&message[add][0][text]=Olá"

    (event,) = parse_webhook(body.encode("utf-8")).events

    assert isinstance(event, MessageEvent)
    assert (event.text, event.direction) == ("Olá", "outgoing")


def test_empty_strings_are_absent_for_optional_fields() -> None:
    prefix = "talk[update][0]"
    empty = "&".join(
        f"{prefix}[{name}]="
        for name in (
            *("contact_id", "chat_id", "entity_id", "entity_type", "rate", "origin"),
            *("created_at", "updated_at"),
        )
    )
    body = f"{talk('update', 0, 7, in_work='0')}&{empty}&account[id]=&account[subdomain]="

    webhook = parse_webhook(body)

    assert (webhook.account_id, webhook.subdomain) == (None, None)
    (event,) = webhook.events
    defaults = TalkEvent(action="update", talk_id=7, is_in_work=False, is_read=False)
    assert event == defaults
    assert event.closed


def test_message_without_text_has_empty_text() -> None:
    (event,) = parse_webhook(message(0, "m1") + "&message[add][0][text]=").events

    assert isinstance(event, MessageEvent)
    assert event.text == ""
    assert event.author_name is None


def test_account_is_copied_onto_every_event() -> None:
    body = f"{talk('add', 0, 1)}&{message(0, 'm')}&account[id]=42&account[subdomain]=acme"

    events = parse_webhook(body).events

    assert [(e.account_id, e.subdomain) for e in events] == [(42, "acme"), (42, "acme")]


def test_unknown_sections_and_fields_are_ignored() -> None:
    body = (
        "leads[status][0][id]=1&leads[status][0][status_id]=oops"
        "&contacts[add][0][id]=x&message[update][0][id]=nope&talk[delete][0][talk_id]=x"
        "&unsorted[add][0][uid]=u&account[_links][self]=https%3A%2F%2Fexample.kommo.com"
        "&talk[update][0][tags][0][name]=vip&message[add][0][attachment][type]=picture"
        f"&{talk('update', 0, 3)}&{message(0, 'm')}"
    )

    events = parse_webhook(body).events

    assert [type(e) for e in events] == [TalkEvent, MessageEvent]


def test_long_keys_are_classified_like_short_ones() -> None:
    long_unknown = "leads[add][0][custom_fields][0][values][0][" + "x" * 80 + "]"
    body = f"{long_unknown}=1&{talk('update', 0, 1)}"

    assert len(parse_webhook(body).events) == 1
    long_bad = "talk[update][" + "0" * 70 + "][talk_id]"
    assert decode_error(f"{long_bad}=1").path == long_bad


def test_delivery_of_only_other_sections_has_no_events() -> None:
    webhook = parse_webhook("leads[add][0][id]=1&account[id]=5&account[subdomain]=x")

    assert webhook == Webhook(account_id=5, subdomain="x", events=())


def test_repeated_key_keeps_the_last_value() -> None:
    body = f"{talk('update', 0, 1)}&talk[update][0][talk_id]=2"

    (event,) = parse_webhook(body).events

    assert isinstance(event, TalkEvent)
    assert event.talk_id == 2


def test_events_are_frozen() -> None:
    (event,) = parse_webhook(CLOSE_BODY).events

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.talk_id = 1  # type: ignore[misc]


# --------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("body", "key"),
    [
        pytest.param(
            "talk[update][0][is_in_work]=0&talk[update][0][is_read]=1",
            "talk[update][0][talk_id]",
            id="missing-talk-id",
        ),
        pytest.param(
            "talk[add][3][talk_id]=1&talk[add][3][is_read]=1",
            "talk[add][3][is_in_work]",
            id="missing-is-in-work",
        ),
        pytest.param(
            "talk[update][0][talk_id]=1&talk[update][0][is_in_work]=1&talk[update][0][is_read]=",
            "talk[update][0][is_read]",
            id="empty-required-flag",
        ),
        pytest.param("message[add][0][type]=incoming", "message[add][0][id]", id="missing-id"),
        pytest.param("message[add][2][id]=m", "message[add][2][type]", id="missing-type"),
    ],
)
def test_missing_required_field_is_named_by_key(body: str, key: str) -> None:
    error = decode_error(body)

    assert error.path == key
    assert key in str(error)
    assert "missing" in str(error)


GOOD_TALK = talk("update", 0, 1)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (talk("update", 0, "abc"), "talk[update][0][talk_id]"),
        (talk("update", 0, "1.5"), "talk[update][0][talk_id]"),
        (talk("update", 0, " 1"), "talk[update][0][talk_id]"),
        (talk("update", 0, "+1"), "talk[update][0][talk_id]"),
        (talk("update", 0, "1_000"), "talk[update][0][talk_id]"),
        (talk("update", 0, "\u0663"), "talk[update][0][talk_id]"),  # ARABIC-INDIC DIGIT THREE
        (GOOD_TALK + "&talk[update][0][contact_id]=x", "talk[update][0][contact_id]"),
        (GOOD_TALK + "&talk[update][0][entity_id]=-", "talk[update][0][entity_id]"),
        (GOOD_TALK + "&talk[update][0][rate]=five", "talk[update][0][rate]"),
        (GOOD_TALK + "&talk[update][0][created_at]=2024-01-01", "talk[update][0][created_at]"),
        (GOOD_TALK + "&talk[update][0][updated_at]=1e9", "talk[update][0][updated_at]"),
        (GOOD_TALK + "&talk[update][0][updated_at]=" + "9" * 30, "talk[update][0][updated_at]"),
        (GOOD_TALK + "&account[id]=acme", "account[id]"),
        (message(0, "m", talk_id="t1"), "message[add][0][talk_id]"),
        (message(0, "m", created_at="yesterday"), "message[add][0][created_at]"),
    ],
)
def test_non_integer_is_named_by_key(body: str, key: str) -> None:
    error = decode_error(body)

    assert error.path == key
    assert key in str(error)


@pytest.mark.parametrize("flag", ["true", "2", "yes", "-1", "00", " 1"])
@pytest.mark.parametrize("field", ["is_in_work", "is_read"])
def test_flag_other_than_0_or_1_is_named_by_key(field: str, flag: str) -> None:
    body = talk("update", 0, 1, **{"in_work" if field == "is_in_work" else "read": flag})

    error = decode_error(body)

    assert error.path == f"talk[update][0][{field}]"
    assert "0 or 1" in str(error)


def test_every_bad_field_of_an_event_is_reported() -> None:
    error = decode_error("talk[update][4][talk_id]=x&talk[update][4][is_in_work]=maybe")

    assert error.path == "talk[update][4][talk_id]"
    for key in ("[talk_id]", "[is_in_work]", "[is_read]"):
        assert f"talk[update][4]{key}" in str(error)


def test_bad_event_among_good_ones_is_named_by_its_own_index() -> None:
    body = f"{talk('update', 0, 1)}&{talk('update', 11, 2)}&talk[update][11][rate]=x"

    assert decode_error(body).path == "talk[update][11][rate]"


@pytest.mark.parametrize(
    "key",
    [
        "talk[update][x][talk_id]",
        "talk[add][-1][talk_id]",
        "talk[add][1234567890][talk_id]",
        "message[add][][id]",
        "talk[update][0]",
    ],
)
def test_malformed_index_is_named_by_key(key: str) -> None:
    assert decode_error(f"{key}=1").path == key


def test_body_that_is_not_utf8_is_refused() -> None:
    error = decode_error(b"message[add][0][id]=m&message[add][0][type]=incoming&x=\xff\xfe")

    assert "UTF-8" in str(error)


def test_percent_encoded_bytes_that_are_not_utf8_are_named_by_key() -> None:
    error = decode_error(message(0, "m") + "&message[add][0][text]=%C3%28")

    assert error.path == "message[add][0][text]"
    assert "UTF-8" in str(error)


def test_mapping_with_non_string_value_is_named_by_key() -> None:
    with pytest.raises(DecodeError) as caught:
        parse_webhook({"talk[update][0][talk_id]": 117})  # type: ignore[dict-item]

    assert caught.value.path == "talk[update][0][talk_id]"


def test_decode_error_has_no_http_status() -> None:
    assert decode_error("talk[update][0][talk_id]=1").status is None


# ------------------------------------------------------------------ flood


def test_body_over_max_fields_is_refused() -> None:
    body = "&".join(f"leads[add][{i}][id]={i}" for i in range(11))

    assert len(parse_webhook(body, max_fields=11).events) == 0
    error = decode_error(body, max_fields=10)
    assert "10" in str(error)


def test_flood_is_refused_before_it_is_decoded() -> None:
    # Not UTF-8 either: a refusal that names the field count proves that the
    # count came first and the body was never decoded or split.
    flood = b"\xff" + b"&" * 10_000

    error = decode_error(flood)

    assert "more than 10000 fields" in str(error)
    assert "more than 10000 fields" in str(decode_error(flood.decode("latin-1")))


def test_mapping_over_max_fields_is_refused() -> None:
    form = {f"leads[add][{i}][id]": str(i) for i in range(6)}

    assert "more than 5 fields" in str(decode_error(form, max_fields=5))


def test_default_limit_admits_a_large_legitimate_delivery() -> None:
    body = "&".join(talk("update", i, i + 1) for i in range(3000))  # 9,000 fields

    events = parse_webhook(body).events

    assert [e.talk_id for e in events] == list(range(1, 3001))


def test_made_up_keys_cannot_grow_the_key_table_without_bound() -> None:
    from kommo_talks.webhooks import _parse as webhooks  # its table of keys seen is private

    for body_number in range(25):
        made_up = "&".join(f"leads[status][{body_number * 500 + n}][id]=1" for n in range(500))
        assert parse_webhook(made_up).events == ()
        assert len(webhooks._WIRE_KEYS) <= 4096
    long_key = "leads[" + "x" * 100 + "]"
    parse_webhook(f"{long_key}=1")

    assert long_key not in webhooks._WIRE_KEYS
    assert parse_webhook(CLOSE_BODY).events == (EXPECTED_CLOSE,)  # still right afterwards


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (
            "talk[update][0][talk_id]=&talk[update][0][is_in_work]=&talk[update][0][is_read]=",
            "talk[update][0][talk_id]",
        ),
        ("message[add][0][id]=&message[add][0][type]=&account[id]=1", "message[add][0][id]"),
    ],
)
def test_an_event_of_empty_values_is_missing_its_required_fields(body: str, key: str) -> None:
    assert decode_error(body).path == key
    form = dict(pair.split("=") for pair in body.split("&"))
    assert decode_error(form).path == key
