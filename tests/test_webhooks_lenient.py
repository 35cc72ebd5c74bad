"""parse_webhook on what real Kommo sends: outgoing messages, attachments, IDs, strict=False."""

from __future__ import annotations

import pickle
from urllib.parse import quote_plus

import attrs
import pytest

from kommo_talks.errors import DecodeError
from kommo_talks.webhooks import (
    Attachment,
    InvalidEvent,
    MessageEvent,
    TalkEvent,
    Webhook,
    parse_webhook,
)


def form(prefix: str, **fields: str) -> str:
    """``prefix[name]=value`` pairs; a ``__`` in a name is a nested key (``author__type``)."""
    return "&".join(
        f"{prefix}[{name.replace('__', '][')}]={quote_plus(value)}"
        for name, value in fields.items()
    )


GOOD_TALK = form("talk[update][0]", talk_id="117", is_in_work="0", is_read="1")
OUTGOING = form(
    "outgoing_message[add][0]",
    id="b1c2",
    chat_id="33b41601-443b-9108-6938ae6b7935",
    talk_id="191",
    contact_id="11018118",
    text="All sorted #done",
    created_at="1726581295",
    message_type="text",
    type="outgoing",
    origin="telegram",
    source_id="5501",
    author__id="0b4f0ab4-6a5b-4a09-b8b2-3f3b6b7c2d10",
    author__type="internal",
    author__user_id="8123456",
    author__name="Maria",
    recipient__id="e1ec058c-7efb-4b59-24b1bcesdf3168f6",
    recipient__type="external",
)


# ---------------------------------------------------------------- outgoing


def test_outgoing_message_section_is_a_message_event_with_its_new_fields() -> None:
    (event,) = parse_webhook(OUTGOING).events

    assert isinstance(event, MessageEvent)
    assert (event.message_id, event.talk_id, event.direction, event.text) == (
        "b1c2",
        191,
        "outgoing",
        "All sorted #done",
    )
    assert (event.message_type, event.source_id) == ("text", 5501)
    assert (event.author_id, event.author_type, event.author_user_id, event.author_name) == (
        "0b4f0ab4-6a5b-4a09-b8b2-3f3b6b7c2d10",
        "internal",
        8123456,
        "Maria",
    )
    assert (event.recipient_id, event.recipient_type) == (
        "e1ec058c-7efb-4b59-24b1bcesdf3168f6",
        "external",
    )
    assert event.attachment is None


def test_outgoing_message_without_type_is_outgoing() -> None:
    body = form("outgoing_message[add][0]", id="m1", talk_id="5", text="hi")

    (event,) = parse_webhook(body).events

    assert isinstance(event, MessageEvent)
    assert event.direction == "outgoing"


def test_events_come_talk_add_update_then_messages_then_outgoing_messages() -> None:
    body = "&".join(
        [
            form("outgoing_message[add][0]", id="out", talk_id="4"),
            form("message[add][0]", id="in", type="incoming", talk_id="3"),
            form("talk[update][0]", talk_id="2", is_in_work="1", is_read="1"),
            form("talk[add][0]", talk_id="1", is_in_work="1", is_read="0"),
        ]
    )

    events = parse_webhook(body).events

    assert [type(e).__name__ for e in events] == [
        "TalkEvent",
        "TalkEvent",
        "MessageEvent",
        "MessageEvent",
    ]
    assert [e.talk_id for e in events] == [1, 2, 3, 4]
    assert [getattr(e, "message_id", None) for e in events] == [None, None, "in", "out"]


def test_attachment_only_message_has_its_attachment_and_empty_text() -> None:
    body = form(
        "message[add][0]",
        id="m2",
        type="incoming",
        talk_id="191",
        message_type="picture",
        author__type="external",
        attachment__type="picture",
        attachment__link="https://amojo.kommo.com/attachments/x/photo.jpg",
        attachment__file_name="photo.jpg",
    )

    (event,) = parse_webhook(body).events

    assert isinstance(event, MessageEvent)
    assert event.text == ""
    assert event.message_type == "picture"
    assert event.attachment == Attachment(
        type="picture",
        link="https://amojo.kommo.com/attachments/x/photo.jpg",
        file_name="photo.jpg",
    )


def test_attachment_with_some_fields_empty_keeps_the_others() -> None:
    body = form(
        "message[add][0]",
        id="m",
        type="incoming",
        attachment__link="https://x/y",
        attachment__type="",
    )

    (event,) = parse_webhook(body).events

    assert isinstance(event, MessageEvent)
    assert event.attachment == Attachment(link="https://x/y")


# --------------------------------------------------------------------- IDs


@pytest.mark.parametrize("talk_id", ["0", "-1", str(2**63), "9" * 40])
@pytest.mark.parametrize(
    ("section", "extra"),
    [
        ("talk[update][0]", {"is_in_work": "0", "is_read": "1"}),
        ("message[add][0]", {"id": "m", "type": "incoming"}),
    ],
)
def test_talk_id_outside_1_to_2_63_minus_1_is_refused_naming_the_key(
    talk_id: str, section: str, extra: dict[str, str]
) -> None:
    with pytest.raises(DecodeError) as caught:
        parse_webhook(form(section, talk_id=talk_id, **extra))

    assert caught.value.path == f"{section}[talk_id]"
    assert "2**63-1" in str(caught.value)


def test_talk_ids_at_the_bounds_are_accepted() -> None:
    body = f"{form('talk[update][0]', talk_id='1', is_in_work='0', is_read='1')}&" + form(
        "talk[update][1]", talk_id=str(2**63 - 1), is_in_work="0", is_read="1"
    )

    assert [e.talk_id for e in parse_webhook(body).events] == [1, 2**63 - 1]


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (GOOD_TALK + "&talk[update][0][contact_id]=0", "talk[update][0][contact_id]"),
        (GOOD_TALK + "&talk[update][0][entity_id]=-5", "talk[update][0][entity_id]"),
        (GOOD_TALK + f"&account[id]={2**63}", "account[id]"),
        (
            OUTGOING.replace("source_id%5D=5501", "x") + "&outgoing_message[add][0][source_id]=0",
            "outgoing_message[add][0][source_id]",
        ),
        (
            OUTGOING + f"&outgoing_message[add][0][author][user_id]={2**64}",
            "outgoing_message[add][0][author][user_id]",
        ),
    ],
)
def test_other_ids_outside_the_range_are_refused_naming_the_key(body: str, key: str) -> None:
    with pytest.raises(DecodeError) as caught:
        parse_webhook(body)

    assert caught.value.path == key


def test_rate_is_not_an_id() -> None:
    (event,) = parse_webhook(GOOD_TALK + "&talk[update][0][rate]=0").events

    assert isinstance(event, TalkEvent)
    assert event.rate == 0


# ------------------------------------------------------------ strict=False


def test_lenient_parse_keeps_good_events_and_lists_the_bad_one() -> None:
    bad = form("talk[update][1]", talk_id="x", is_in_work="0", is_read="1", origin="waba")
    body = f"account[id]=29785537&{GOOD_TALK}&{bad}&{OUTGOING}"

    webhook = parse_webhook(body, strict=False)

    assert [e.talk_id for e in webhook.events] == [117, 191]
    (invalid,) = webhook.invalid
    assert (invalid.section, invalid.index) == ("talk[update]", 1)
    assert invalid.error.path == "talk[update][1][talk_id]"
    assert dict(invalid.fields) == {
        "talk_id": "x",
        "is_in_work": "0",
        "is_read": "1",
        "origin": "waba",
    }
    assert webhook.account_id == 29785537


def test_strict_parse_raises_for_the_same_body() -> None:
    bad = form("talk[update][1]", talk_id="x", is_in_work="0", is_read="1")

    with pytest.raises(DecodeError) as caught:
        parse_webhook(f"{GOOD_TALK}&{bad}")

    assert caught.value.path == "talk[update][1][talk_id]"


def test_invalid_fields_are_keyed_by_the_events_own_names_with_unknown_ones_kept() -> None:
    body = form(
        "message[add][3]",
        type="incoming",
        talk_id="7",
        author__type="external",
        author__avatar_url="https://x/a.png",
        element_type="2",
        text="",
    )

    (invalid,) = parse_webhook(body, strict=False).invalid

    assert (invalid.section, invalid.index, invalid.error.path) == (
        "message[add]",
        3,
        "message[add][3][id]",
    )
    assert dict(invalid.fields) == {
        "type": "incoming",
        "talk_id": "7",
        "author[type]": "external",
        "author[avatar_url]": "https://x/a.png",
        "element_type": "2",
        "text": "",
    }


@pytest.mark.parametrize(
    "key",
    ["talk[update][x][talk_id]", "message[add][0]", "outgoing_message[add][-1][id]"],
)
def test_malformed_key_of_a_modelled_section_is_an_invalid_event_without_index(key: str) -> None:
    webhook = parse_webhook(f"{key}=1&{GOOD_TALK}", strict=False)

    assert [e.talk_id for e in webhook.events] == [117]
    (invalid,) = webhook.invalid
    assert (invalid.section, invalid.index, invalid.error.path) == (
        key.split("]")[0] + "]",
        None,
        key,
    )
    assert dict(invalid.fields) == {key: "1"}


def test_bad_account_id_is_an_invalid_event_and_the_events_have_no_account() -> None:
    webhook = parse_webhook(f"account[id]=acme&account[subdomain]=ex&{GOOD_TALK}", strict=False)

    (event,) = webhook.events
    assert (event.account_id, event.subdomain) == (None, "ex")
    (invalid,) = webhook.invalid
    assert (invalid.section, invalid.index, invalid.error.path) == ("account", None, "account[id]")
    assert dict(invalid.fields) == {"id": "acme", "subdomain": "ex"}


def test_value_that_is_not_utf8_spoils_only_its_event() -> None:
    broken = form("message[add][0]", id="m", type="incoming") + "&message[add][0][text]=%C3%28"
    body = f"{GOOD_TALK}&{broken}"

    webhook = parse_webhook(body, strict=False)

    assert [type(e) for e in webhook.events] == [TalkEvent]
    (invalid,) = webhook.invalid
    assert invalid.error.path == "message[add][0][text]"
    assert "UTF-8" in str(invalid.error)


def test_lenient_mapping_body_is_read_the_same() -> None:
    webhook = parse_webhook(
        {
            "talk[add][0][talk_id]": "0",
            "talk[add][0][is_in_work]": "1",
            "talk[add][0][is_read]": "0",
        },
        strict=False,
    )

    assert webhook.events == ()
    (invalid,) = webhook.invalid
    assert invalid.error.path == "talk[add][0][talk_id]"
    assert dict(invalid.fields) == {"talk_id": "0", "is_in_work": "1", "is_read": "0"}


@pytest.mark.parametrize(
    "body",
    [b"talk[update][0][talk_id]=1&x=\xff", "a=1&" * 10_000],
    ids=["not-utf8", "too-many-fields"],
)
def test_lenient_parse_still_raises_for_a_body_that_is_not_a_form(body: bytes | str) -> None:
    with pytest.raises(DecodeError):
        parse_webhook(body, strict=False)


def test_lenient_parse_of_a_good_body_is_the_strict_parse() -> None:
    body = f"account[id]=1&account[subdomain]=ex&{GOOD_TALK}&{OUTGOING}"

    assert parse_webhook(body, strict=False) == parse_webhook(body)
    assert parse_webhook(body).invalid == ()


def test_invalid_event_is_frozen_and_can_be_kept() -> None:
    (invalid,) = parse_webhook("talk[add][0][talk_id]=1", strict=False).invalid

    assert isinstance(invalid, InvalidEvent)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        invalid.index = 2  # type: ignore[misc]
    kept = pickle.loads(pickle.dumps(invalid))  # noqa: S301 (our own bytes, e.g. a dead-letter store)
    assert (kept.section, kept.index, dict(kept.fields)) == ("talk[add]", 0, {"talk_id": "1"})
    assert (str(kept.error), kept.error.path) == (str(invalid.error), invalid.error.path)
    assert isinstance(Webhook().invalid, tuple)


def test_key_that_is_not_utf8_is_invalid_in_a_modelled_section_and_ignored_elsewhere() -> None:
    body = f"talk%5Badd%5D%5B0%5D%5B%FF%5D=1&%FF=2&talk[update][x][talk_id]=&{GOOD_TALK}"

    webhook = parse_webhook(body, strict=False)

    assert [e.talk_id for e in webhook.events] == [117]
    assert [(i.section, i.index) for i in webhook.invalid] == [
        ("talk[add]", None),
        ("talk[update]", None),
    ]
    assert "UTF-8" in str(webhook.invalid[0].error)
    assert "index" in str(webhook.invalid[1].error)
    with pytest.raises(DecodeError, match="UTF-8"):
        parse_webhook(body)
