"""FakeKommo's webhooks: Kommo-format deliveries that parse_webhook understands."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web
from loopback import serving

from kommo_talks import KommoClient, LongLivedToken
from kommo_talks.testing import FakeKommo, Fault, WebhookDelivery
from kommo_talks.testing._webhooks import MANAGER_USER_ID
from kommo_talks.webhooks import (
    MessageEvent,
    TalkEvent,
    WebhookEvent,
    WebhookReceiver,
    parse_webhook,
)


class Hook:
    """A webhook endpoint on loopback that records what it is sent and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.hang = False
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.status)


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    endpoint = Hook()
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    async with serving(app) as url:
        endpoint.url = f"{url}/hook?secret=s3cret"
        yield endpoint
        endpoint.release.set()


def only_event(body: bytes) -> WebhookEvent:
    webhook = parse_webhook(body)
    assert len(webhook.events) == 1
    return webhook.events[0]


async def test_a_closed_talk_is_posted_as_talk_update_with_is_in_work_0(
    fake: FakeKommo, client: KommoClient, hook: Hook
) -> None:
    fake.add_webhook(hook.url)
    await client.close_talk(5, force=True)
    await fake.webhooks_idle()

    assert fake.webhook_deliveries == [WebhookDelivery(hook.url, hook.bodies[0], 200)]
    assert fake.webhook_deliveries[0].ok
    event = only_event(hook.bodies[0])
    talk = fake.talks[5]
    assert event == TalkEvent(
        action="update",
        talk_id=5,
        contact_id=talk["contact_id"],
        chat_id=talk["chat_id"],
        entity_id=talk["entity_id"],
        entity_type="lead",
        is_in_work=False,
        is_read=True,
        rate=0,
        origin="telegram",
        created_at=datetime.fromtimestamp(talk["created_at"], UTC),
        updated_at=datetime.fromtimestamp(talk["updated_at"], UTC),
        account_id=talk["account_id"],
        subdomain="example",
    )
    assert event.closed


async def test_delivery_is_a_kommo_form_body_of_strings(
    fake: FakeKommo, client: KommoClient, hook: Hook
) -> None:
    fake.add_webhook(hook.url)
    fake.talks[9].update(entity_id=None, entity_type=None)
    await client.close_talk(9, force=True)
    await fake.webhooks_idle()

    assert hook.headers[0]["Content-Type"] == "application/x-www-form-urlencoded"
    assert hook.headers[0]["User-Agent"] == "amoCRM-WebHook-client/1.0"
    # The account first, as recent deliveries have it; brackets percent-encoded.
    assert hook.bodies[0].startswith(b"account%5Bsubdomain%5D=example&account%5Bid%5D=")
    fields = dict(parse_qsl(hook.bodies[0].decode(), keep_blank_values=True))
    talk = fake.talks[9]
    assert fields == {
        "talk[update][0][talk_id]": "9",
        "talk[update][0][created_at]": str(talk["created_at"]),
        "talk[update][0][updated_at]": str(talk["updated_at"]),
        "talk[update][0][rate]": "0",
        "talk[update][0][contact_id]": str(talk["contact_id"]),
        "talk[update][0][chat_id]": talk["chat_id"],
        "talk[update][0][entity_id]": "",
        "talk[update][0][entity_type]": "",
        "talk[update][0][is_in_work]": "0",
        "talk[update][0][is_read]": "1",
        "talk[update][0][origin]": "telegram",
        "account[id]": "17029541",
        "account[subdomain]": "example",
        "account[_links][self]": fake.url,
    }


async def test_no_delivery_when_nothing_was_closed(
    fake: FakeKommo, client: KommoClient, hook: Hook
) -> None:
    fake.add_webhook(hook.url)
    fake.nps_bot = True
    await client.close_talk(3)  # launches the NPS bot: the talk stays open
    fake.talks[4]["is_in_work"] = False
    with pytest.raises(Exception, match="422"):
        await client.close_talk(4, force=True)
    await fake.webhooks_idle()
    assert fake.webhook_deliveries == []


async def test_an_ambiguous_close_is_delivered_once(
    fake: FakeKommo, client: KommoClient, hook: Hook
) -> None:
    fake.add_webhook(hook.url)
    fake.script("close", Fault.then_error(503))  # closed, but answered 503; the retry gets 422
    await client.close_talk(6, force=True)
    await fake.webhooks_idle()
    assert [only_event(body).talk_id for body in hook.bodies] == [6]


async def test_every_subscriber_gets_every_delivery_in_order(
    fake: FakeKommo, client: KommoClient, hook: Hook
) -> None:
    second = f"{hook.url}&copy=2"
    fake.add_webhook(hook.url)
    fake.add_webhook(second)
    await client.close_talk(1, force=True)
    await client.close_talk(2, force=True)
    await fake.webhooks_idle()
    assert [(d.url, only_event(d.body).talk_id) for d in fake.webhook_deliveries] == [
        (hook.url, 1),
        (second, 1),
        (hook.url, 2),
        (second, 2),
    ]
    assert all(d.status == 200 for d in fake.webhook_deliveries)


async def test_emit_talk_added_and_updated(fake: FakeKommo, hook: Hook) -> None:
    fake.add_webhook(hook.url)
    fake.add_talk(500, is_read=False)
    body = await fake.emit_talk_added(500)
    fake.talks[500]["is_read"] = True
    await fake.emit_talk_updated(500)
    await fake.webhooks_idle()

    assert hook.bodies[0] == body
    added, updated = (only_event(b) for b in hook.bodies)
    assert isinstance(added, TalkEvent)
    assert isinstance(updated, TalkEvent)
    assert (added.action, added.talk_id, added.is_in_work, added.is_read) == (
        "add",
        500,
        True,
        False,
    )
    assert (updated.action, updated.is_read, updated.closed) == ("update", True, False)


async def test_emit_message_incoming_with_unicode_text(fake: FakeKommo, hook: Hook) -> None:
    fake.add_webhook(hook.url)
    text = "Привет 👋 & 100% #done"
    await fake.emit_message(7, text, author_name="Ана Мария", message_id="m-1")
    await fake.webhooks_idle()

    event = only_event(hook.bodies[0])
    talk = fake.talks[7]
    assert isinstance(event, MessageEvent)
    assert event.message_id == "m-1"
    assert event.text == text
    assert event.direction == "incoming"
    assert event.author_name == "Ана Мария"
    assert (event.talk_id, event.chat_id, event.contact_id) == (
        7,
        talk["chat_id"],
        talk["contact_id"],
    )
    assert (event.entity_type, event.entity_id) == ("lead", talk["entity_id"])
    assert event.origin == "telegram"
    assert event.account_id == 17029541
    assert event.created_at is not None
    assert (event.author_type, event.message_type, event.author_user_id) == (
        "external",
        "text",
        None,
    )
    fields = dict(parse_qsl(hook.bodies[0].decode(), keep_blank_values=True))
    assert fields["message[add][0][element_type]"] == "2"
    assert "message[add][0][author][avatar_url]" not in fields  # never sent empty
    assert list(fields)[:2] == ["account[subdomain]", "account[id]"]


async def test_emit_message_outgoing_defaults(fake: FakeKommo, hook: Hook) -> None:
    fake.add_webhook(hook.url)
    await fake.emit_message(8, "on it", direction="outgoing")
    await fake.emit_message(8, "another")
    await fake.webhooks_idle()
    first, second = (only_event(b) for b in hook.bodies)
    assert isinstance(first, MessageEvent)
    assert isinstance(second, MessageEvent)
    assert (first.direction, first.author_name) == ("outgoing", "Manager")
    assert (second.direction, second.author_name) == ("incoming", "Customer")
    assert first.message_id != second.message_id


async def test_outgoing_message_comes_in_its_own_section_from_a_manager(
    fake: FakeKommo, hook: Hook
) -> None:
    fake.add_webhook(hook.url)
    await fake.emit_message(8, "#done", direction="outgoing")
    await fake.webhooks_idle()

    fields = dict(parse_qsl(hook.bodies[0].decode(), keep_blank_values=True))
    assert not any(key.startswith("message[add]") for key in fields)
    assert fields["outgoing_message[add][0][type]"] == "outgoing"
    event = only_event(hook.bodies[0])
    assert isinstance(event, MessageEvent)
    assert (event.direction, event.author_type, event.message_type) == (
        "outgoing",
        "internal",
        "text",
    )
    assert event.author_user_id == MANAGER_USER_ID
    assert event.recipient_type == "external"
    assert (event.talk_id, event.text) == (8, "#done")


async def test_emit_refuses_mistakes(fake: FakeKommo, hook: Hook) -> None:
    with pytest.raises(RuntimeError, match="add_webhook"):
        await fake.emit_message(1, "hi")
    fake.add_webhook(hook.url)
    with pytest.raises(KeyError, match="add_talk"):
        await fake.emit_talk_added(999)
    with pytest.raises(ValueError, match="direction"):
        await fake.emit_message(1, "hi", direction="sideways")
    with pytest.raises(ValueError, match="http"):
        fake.add_webhook("ftp://example.com/hook")
    assert fake.webhook_deliveries == []


async def test_failed_deliveries_are_recorded_not_retried(fake: FakeKommo, hook: Hook) -> None:
    hook.status = 500
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    fake.add_webhook(hook.url)
    fake.add_webhook(dead)
    await fake.emit_talk_added(1)
    await fake.webhooks_idle()

    served, refused = fake.webhook_deliveries
    assert (served.status, served.error, served.ok) == (500, None, False)
    assert refused.url == dead
    assert refused.status is None
    assert refused.error is not None
    assert "Connect" in refused.error
    assert len(hook.bodies) == 1


async def test_a_receiver_that_does_not_answer_in_time_is_a_failed_delivery(
    fake: FakeKommo, hook: Hook
) -> None:
    hook.hang = True
    fake.webhook_timeout = 0.05  # Kommo waits 2 s; a test need not
    fake.add_webhook(hook.url)
    await fake.emit_talk_added(1)
    await fake.webhooks_idle()
    (delivery,) = fake.webhook_deliveries
    assert (delivery.status, delivery.error) == (None, "no answer in 0.05 s")


async def test_closing_the_fake_drops_queued_deliveries_cleanly(hook: Hook) -> None:
    hook.hang = True
    async with FakeKommo() as fake:
        fake.add_webhook(hook.url)
        await fake.emit_talk_added(1)
        await fake.emit_talk_added(2)
    # No task, session or connector is left behind (warnings are errors here).
    assert fake.webhook_deliveries == []
    assert len(hook.bodies) <= 1


async def test_deliveries_drive_a_webhook_receiver(fake: FakeKommo, client: KommoClient) -> None:
    received: list[WebhookEvent] = []
    done = asyncio.Event()

    async def callback(event: WebhookEvent) -> None:
        received.append(event)
        if len(received) == 3:
            done.set()

    receiver = WebhookReceiver(callback, secret="s3cret")
    app = web.Application()
    receiver.setup(app, "/kommo")
    async with serving(app) as url:
        fake.add_webhook(f"{url}/kommo?secret=wrong")
        fake.add_webhook(f"{url}/kommo?secret=s3cret")
        await fake.emit_talk_added(3)
        await fake.emit_message(3, "hello")
        await client.close_talk(3, force=True)
        await asyncio.wait_for(done.wait(), 10)
    statuses = [(d.url.endswith("wrong"), d.status) for d in fake.webhook_deliveries]
    assert statuses == [(True, 403), (False, 200)] * 3
    kinds: list[Any] = [(type(e).__name__, getattr(e, "action", None), e.talk_id) for e in received]
    assert kinds == [
        ("TalkEvent", "add", 3),
        ("MessageEvent", None, 3),
        ("TalkEvent", "update", 3),
    ]


async def test_webhooks_idle_returns_when_the_fake_closes_with_deliveries_queued(
    hook: Hook,
) -> None:
    hook.hang = True  # the first delivery never gets its answer
    fake = FakeKommo()
    async with fake:
        fake.add_webhook(hook.url)
        await fake.emit_talk_updated(1)
        await fake.emit_talk_updated(2)  # queued behind the hanging one
        idle = asyncio.create_task(fake.webhooks_idle())
    # Leaving `async with` closed the fake: what was queued is dropped.
    async with asyncio.timeout(5):
        await idle


async def test_each_fake_account_names_itself_in_every_delivery(hook: Hook) -> None:
    async with (
        FakeKommo(account_id=111, subdomain="alpha") as alpha,
        FakeKommo(account_id=222, subdomain="beta") as beta,
    ):
        for fake in (alpha, beta):
            fake.add_webhook(hook.url)
            async with KommoClient(fake.url, auth=LongLivedToken(fake.token)) as client:
                await client.close_talk(5, force=True)
                assert (await client.get_talk(6)).account_id == fake.account_id
            await fake.emit_talk_added(6)
            await fake.emit_message(6, "hi")
            await fake.emit_message(6, "on it", direction="outgoing")
            await fake.webhooks_idle()

    seen = [(w.account_id, w.subdomain) for w in map(parse_webhook, hook.bodies)]
    assert seen == [(111, "alpha")] * 4 + [(222, "beta")] * 4
    events = [only_event(body) for body in hook.bodies]
    assert {(e.account_id, e.subdomain) for e in events[4:]} == {(222, "beta")}
