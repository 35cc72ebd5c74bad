"""The durable queue's pure parts: event encoding, dedupe identity, the worker's decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from kommo_talks.errors import DecodeError
from kommo_talks.webhooks import Attachment, MessageEvent, TalkEvent, parse_webhook
from kommo_talks.webhooks._codec import decode_event, dedupe_identity, encode_event, order_key
from kommo_talks.webhooks._plan import (
    AutoclaimReply,
    Lanes,
    Step,
    after_failure,
    backoff_delay,
    on_delivery,
    parse_autoclaim,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

FULL_TALK = TalkEvent(
    action="update",
    talk_id=2**63 - 1,
    contact_id=7,
    chat_id="chat-1",
    entity_id=9,
    entity_type="lead",
    is_in_work=False,
    is_read=True,
    rate=5,
    origin="telegram",
    created_at=T0,
    updated_at=T0 + timedelta(seconds=1),
    account_id=29785537,
    subdomain="example",
)
FULL_MESSAGE = MessageEvent(
    message_id="0d1c-ü-🙂",
    talk_id=117,
    chat_id="chat-1",
    contact_id=7,
    entity_id=9,
    entity_type="lead",
    direction="outgoing",
    text='hello\nworld "quoted" ü',
    created_at=T0,
    author_name="Ann",
    origin="whatsapp",
    account_id=1,
    subdomain="acme",
    message_type="text",
    source_id=3,
    author_id="a-1",
    author_type="internal",
    author_user_id=11,
    recipient_id="r-1",
    recipient_type="contact",
    attachment=Attachment(type="picture", link="https://x.example/f.png", file_name="f.png"),
)


@pytest.mark.parametrize(
    "event",
    [
        FULL_TALK,
        TalkEvent(action="add", talk_id=1, is_in_work=True, is_read=False),
        FULL_MESSAGE,
        MessageEvent(message_id="m", direction="incoming"),
        MessageEvent(message_id="m", direction="incoming", attachment=Attachment(link="l")),
    ],
    ids=["full-talk", "bare-talk", "full-message", "bare-message", "partial-attachment"],
)
def test_a_queued_event_decodes_to_an_equal_event(event: TalkEvent | MessageEvent) -> None:
    assert decode_event(encode_event(event)) == event


def test_parsed_deliveries_survive_the_round_trip(kommo_body: bytes) -> None:
    events = parse_webhook(kommo_body).events
    assert events
    assert [decode_event(encode_event(e)) for e in events] == list(events)


@pytest.fixture
def kommo_body() -> bytes:
    return (
        b"talk[add][0][talk_id]=5&talk[add][0][is_in_work]=1&talk[add][0][is_read]=0"
        b"&talk[add][0][created_at]=1700000000&talk[update][0][talk_id]=5"
        b"&talk[update][0][is_in_work]=0&talk[update][0][is_read]=1"
        b"&talk[update][0][updated_at]=1700000009&message[add][0][id]=m-1"
        b"&message[add][0][type]=incoming&message[add][0][talk_id]=5"
        b"&message[add][0][text]=hi&message[add][0][attachment][link]=https%3A%2F%2Fa"
        b"&account[id]=29785537&account[subdomain]=example"
    )


def test_encoding_is_compact_and_versioned() -> None:
    record = orjson.loads(
        encode_event(TalkEvent(action="add", talk_id=3, is_in_work=True, is_read=False))
    )
    assert record == {
        "v": 1,
        "k": "talk",
        "action": "add",
        "talk_id": 3,
        "is_in_work": True,
        "is_read": False,
    }
    assert orjson.loads(encode_event(FULL_TALK))["updated_at"] == int(T0.timestamp()) + 1


def test_timestamps_in_other_zones_decode_to_the_same_instant() -> None:
    local = T0.astimezone(timezone(timedelta(hours=3)))
    event = TalkEvent(action="add", talk_id=3, is_in_work=True, is_read=False, created_at=local)
    assert decode_event(encode_event(event)).created_at == T0


def test_a_naive_timestamp_is_refused_before_anything_is_stored() -> None:
    naive = TalkEvent(
        action="add", talk_id=3, is_in_work=True, is_read=False, created_at=datetime(2026, 1, 1)
    )
    with pytest.raises(ValueError, match="naive"):
        encode_event(naive)


def test_fields_a_newer_writer_adds_are_ignored() -> None:
    record = orjson.loads(encode_event(FULL_TALK)) | {"mood": "happy"}
    assert decode_event(orjson.dumps(record)) == FULL_TALK


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"v": 2, "k": "talk"}', "format version 2"),
        (b'{"v": 1, "k": "lead"}', "unknown kind"),
        (b'{"v": 1, "k": "talk", "talk_id": 1}', "incomplete"),
        (
            b'{"v": 1, "k": "message", "message_id": "m", "direction": "x", "created_at": "x"}',
            "Unix",
        ),
    ],
)
def test_an_undecodable_entry_names_what_is_wrong(payload: bytes, complaint: str) -> None:
    with pytest.raises(DecodeError, match=complaint):
        decode_event(payload)


def _talk(**changes: object) -> TalkEvent:
    base = {"action": "update", "talk_id": 5, "is_in_work": True, "is_read": False}
    return TalkEvent(**(base | {"account_id": 1, "updated_at": T0} | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        (_talk(), _talk(), True),
        (_talk(), _talk(rate=5, origin="x", contact_id=3), True),
        (_talk(), _talk(account_id=2), False),
        (_talk(), _talk(talk_id=6), False),
        (_talk(), _talk(action="add"), False),
        (_talk(), _talk(updated_at=T0 + timedelta(seconds=1)), False),
        (_talk(), _talk(is_in_work=False), False),
        (_talk(), _talk(is_read=True), False),
        (_talk(), _talk(updated_at=None), False),
        (
            MessageEvent(message_id="m", direction="incoming", account_id=1),
            MessageEvent(message_id="m", direction="incoming", account_id=1, text="edited"),
            True,
        ),
        (
            MessageEvent(message_id="m", direction="incoming", account_id=1),
            MessageEvent(message_id="m", direction="incoming", account_id=2),
            False,
        ),
        (
            MessageEvent(message_id="5", direction="incoming"),
            TalkEvent(action="update", talk_id=5, is_in_work=True, is_read=False),
            False,
        ),
    ],
)
def test_dedupe_identity(
    first: TalkEvent | MessageEvent, second: TalkEvent | MessageEvent, same: bool
) -> None:
    assert (dedupe_identity(first) == dedupe_identity(second)) is same


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (_talk(), ("talk", 1, 5)),
        (
            MessageEvent(message_id="m", direction="incoming", talk_id=5, account_id=1),
            ("talk", 1, 5),
        ),
        (MessageEvent(message_id="m", direction="incoming", chat_id="c"), ("chat", None, "c")),
        (MessageEvent(message_id="m", direction="incoming"), None),
    ],
)
def test_events_of_one_talk_share_an_order_key(
    event: TalkEvent | MessageEvent, key: object
) -> None:
    assert order_key(event) == key


@pytest.mark.parametrize(
    ("deliveries", "max_deliveries", "step"),
    [(1, 5, Step.RUN), (5, 5, Step.RUN), (6, 5, Step.DEAD), (1, 1, Step.RUN), (2, 1, Step.DEAD)],
)
def test_on_delivery(deliveries: int, max_deliveries: int, step: Step) -> None:
    assert on_delivery(deliveries, max_deliveries) is step


@pytest.mark.parametrize(
    ("deliveries", "max_deliveries", "step"),
    [(1, 5, Step.RETRY_LATER), (4, 5, Step.RETRY_LATER), (5, 5, Step.DEAD), (1, 1, Step.DEAD)],
)
def test_after_failure(deliveries: int, max_deliveries: int, step: Step) -> None:
    assert after_failure(deliveries, max_deliveries) is step


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 0.1), (2, 0.2), (4, 0.8), (7, 5.0), (10_000, 5.0)]
)
def test_backoff_doubles_up_to_a_cap(failures: int, delay: float) -> None:
    assert backoff_delay(failures) == pytest.approx(delay)


def test_autoclaim_reply_of_redis_6_2() -> None:
    reply = [b"0-0", [[b"1-0", [b"e", b"x"]], None, [b"3-0", None]]]
    assert parse_autoclaim(reply) == AutoclaimReply("0-0", (("1-0", {"e": b"x"}),), ("3-0",))


def test_autoclaim_reply_of_redis_7() -> None:
    reply = [b"5-0", [[b"1-0", [b"e", b"x", b"f", b"y"]]], [b"2-0", b"3-0"]]
    assert parse_autoclaim(reply) == AutoclaimReply(
        "5-0", (("1-0", {"e": b"x", "f": b"y"}),), ("2-0", "3-0")
    )


def test_autoclaim_reply_parsed_by_a_client_library() -> None:
    reply = ["0-0", [("1-0", {"e": "x"})], []]
    assert parse_autoclaim(reply) == AutoclaimReply("0-0", (("1-0", {"e": "x"}),), ())


def test_autoclaim_reply_of_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="4 elements"):
        parse_autoclaim([b"0-0", [], [], []])


def test_lanes_run_one_item_per_key_in_order() -> None:
    lanes: Lanes[str] = Lanes()
    started = [
        lanes.add(key, item)
        for key, item in [("a", "a1"), ("b", "b1"), ("a", "a2"), (None, "x"), ("a", "a3")]
    ]
    assert started == ["a1", "b1", None, "x", None]
    assert lanes.finish("a") == "a2"
    assert lanes.finish("b") is None
    assert lanes.add("b", "b2") == "b2"
    assert lanes.finish("a") == "a3"
    assert lanes.finish("a") is None
    assert lanes.add("a", "a4") == "a4"
    assert lanes.finish(None) is None


def test_lanes_drain_takes_what_has_not_started() -> None:
    lanes: Lanes[str] = Lanes()
    for key, item in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2"), ("b", "b3")]:
        lanes.add(key, item)
    assert sorted(lanes.drain()) == ["a2", "b2", "b3"]
    assert lanes.finish("a") is None
    assert lanes.finish("b") is None
