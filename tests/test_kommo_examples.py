"""Kommo's own documented examples (tests/data/kommo/), decoded as Kommo sends them."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from kommo_talks import Talk, converter
from kommo_talks.converter import structure_talk
from kommo_talks.webhooks import MessageEvent, TalkEvent, parse_webhook, verify_disconnect_signature

EXAMPLES = Path(__file__).parent / "data" / "kommo"


def load_example(name: str) -> str:
    """The body of an example: what follows its header lines (up to the first empty line)."""
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    header, _, body = text.partition("\n\n")
    assert header.startswith("# ")
    assert "Source:" in header  # where it comes from stays with it
    return body.rstrip("\n")


def test_every_example_file_is_tested_here() -> None:
    names = sorted(p.name for p in EXAMPLES.iterdir() if p.name != "README.md")
    source = Path(__file__).read_text(encoding="utf-8")

    assert len(names) == 6
    assert all(f'"{name}"' in source for name in names)


def test_documented_incoming_message() -> None:
    (event,) = parse_webhook(load_example("01-doc-kommo-message-add.form").encode()).events

    assert isinstance(event, MessageEvent)
    assert (event.message_id, event.talk_id, event.direction) == (
        "660b5b93-4ead-ac38-3797c062146c",
        191,
        "incoming",
    )
    assert (event.author_name, event.origin, event.text) == ("user name", "telegram", "Hello!")
    assert (event.author_id, event.author_type) == (
        "e1ec058c-7efb-4b59-24b1bcesdf3168f6",
        "external",
    )
    assert (event.chat_id, event.contact_id) == ("33b41601-443b-9108-6938ae6b7935", 11018118)
    assert (event.entity_type, event.entity_id) == ("lead", 9276114)
    assert event.created_at == datetime.fromtimestamp(1726581295, UTC)
    assert event.account_id is None  # the docs' example has no account[...] keys
    assert event.attachment is None


def test_documented_talk_added() -> None:
    (event,) = parse_webhook(load_example("02-doc-kommo-talk-add.form")).events

    assert isinstance(event, TalkEvent)
    assert (event.action, event.talk_id, event.is_in_work, event.is_read, event.rate) == (
        "add",
        191,
        True,
        False,
        0,
    )
    assert event.chat_id == "33b41601-7ed1-333ff2-9108-6938ae6b7935"  # not a UUID: kept as is
    assert not event.closed


def test_documented_talk_marked_answered() -> None:
    (event,) = parse_webhook(load_example("03-doc-kommo-talk-update-mark-answered.form")).events

    assert isinstance(event, TalkEvent)
    assert (event.action, event.is_in_work, event.is_read, event.closed) == (
        "update",
        True,
        True,
        False,
    )


def test_documented_talk_closed() -> None:
    (event,) = parse_webhook(load_example("04-doc-kommo-talk-update-close.form")).events

    assert isinstance(event, TalkEvent)
    assert (event.action, event.is_in_work, event.closed) == ("update", False, True)
    assert event.updated_at == datetime.fromtimestamp(1726581548, UTC)


def documented_talk() -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(load_example("05-doc-kommo-get-talk-117.json"))
    return payload


def test_documented_talk_117_decodes_and_round_trips_exactly() -> None:
    talk = converter.structure(documented_talk(), Talk)

    assert talk == structure_talk(documented_talk())  # the client's fast path agrees
    assert (talk.talk_id, talk.missed_at, talk.status, talk.source_id) == (117, None, None, None)
    assert talk.chat_id == "88278e98-2b8d-4ae2-a5f0-bfab511cd621"
    # status and source_id, absent from the GET shape, are left out again.
    assert converter.unstructure(talk) == documented_talk()


def test_documented_talk_117_in_the_list_shape_decodes() -> None:
    item = copy.deepcopy(documented_talk())
    del item["missed_at"]
    item.update(status="in_work", source_id=None)

    talk = structure_talk(item)

    assert (talk.status, talk.source_id, talk.missed_at) == ("in_work", None, None)
    assert converter.unstructure(talk) == {**documented_talk(), "status": "in_work"}


def test_documented_disconnect_hook_query() -> None:
    query = parse_qs(load_example("06-doc-kommo-disconnect-hook.query"), strict_parsing=True)

    assert set(query) == {"client_uuid", "account_id", "signature"}
    (client_id,), (account_id,), (signature,) = (
        query["client_uuid"],
        query["account_id"],
        query["signature"],
    )
    assert re.fullmatch(r"[0-9a-f]{64}", signature)  # lowercase hex SHA-256
    # The client secret is not public: a wrong one gives False, never an error.
    for account in (account_id, int(account_id)):
        assert not verify_disconnect_signature(
            client_id=client_id,
            client_secret="not-the-integrations-secret",
            account_id=account,
            signature=signature,
        )
    with pytest.raises(ValueError, match="client_secret"):
        verify_disconnect_signature(
            client_id=client_id, client_secret="", account_id=account_id, signature=signature
        )
