"""examples/close_on_done_bot.py end to end against FakeKommo, over real loopback HTTP.

message webhook in (``fake.emit_message``) → bot → ``close_talk`` → FakeKommo →
``talk[update]`` webhook back to the bot. Events, not sleeps, say when.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
from aiohttp.log import access_logger
from conftest import FAST_RETRY
from loopback import serving

from kommo_talks import KommoClient, LongLivedToken
from kommo_talks.testing import FakeKommo
from kommo_talks.webhooks import MessageEvent, TalkEvent, WebhookEvent

EXAMPLE = Path(__file__).parent.parent / "examples" / "close_on_done_bot.py"
SECRET = "s3cret-for-tests"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("close_on_done_bot", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


bot = load_example()


class Seen:
    """Events the bot has finished handling, with a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[WebhookEvent] = []
        self._waiters: list[tuple[Callable[[WebhookEvent], bool], asyncio.Future[None]]] = []

    def __call__(self, event: WebhookEvent) -> None:
        self.events.append(event)
        for matches, future in self._waiters:
            if matches(event) and not future.done():
                future.set_result(None)

    async def wait_for(self, matches: Callable[[WebhookEvent], bool]) -> None:
        if any(matches(e) for e in self.events):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((matches, future))
        await asyncio.wait_for(future, 10)  # a guard against a hang, not a wait


def message_handled(talk_id: int) -> Callable[[WebhookEvent], bool]:
    return lambda e: isinstance(e, MessageEvent) and e.talk_id == talk_id


def closed_reported(talk_id: int) -> Callable[[WebhookEvent], bool]:
    return lambda e: isinstance(e, TalkEvent) and e.closed and e.talk_id == talk_id


@attrs.define
class Running:
    fake: FakeKommo
    url: str
    seen: Seen
    clients: list[KommoClient]


@contextlib.asynccontextmanager
async def run_bot(
    fake: FakeKommo, *, secret: str | None = SECRET, access_log: bool = False, **options: Any
) -> AsyncIterator[Running]:
    seen = Seen()
    clients: list[KommoClient] = []

    def client_factory() -> KommoClient:
        client = KommoClient(
            fake.url, auth=LongLivedToken(fake.token), retry=FAST_RETRY, rate_limit=None
        )
        clients.append(client)
        return client

    app = bot.make_app(client_factory, secret=secret, on_event=seen, **options)
    logs = {"access_log": access_logger, "access_log_format": bot.ACCESS_LOG_FORMAT}
    async with serving(app, **(logs if access_log else {})) as base:
        yield Running(fake, f"{base}{bot.WEBHOOK_PATH}", seen, clients)
    assert all(client.closed for client in clients)


@pytest.fixture
async def running(fake: FakeKommo) -> AsyncIterator[Running]:
    async with run_bot(fake) as item:
        fake.add_webhook(f"{item.url}?secret={SECRET}")
        yield item


async def test_a_managers_done_closes_the_talk_and_the_update_comes_back(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    fake = running.fake
    caplog.set_level(logging.INFO, logger="close_on_done_bot")

    await fake.emit_message(7, "All sorted, thanks! #done", direction="outgoing")
    await running.seen.wait_for(closed_reported(7))

    assert not fake.is_open(7)
    closes = [r for r in fake.requests if r.route == "close"]
    assert [(r.path, r.json()) for r in closes] == [
        ("/api/v4/talks/7/close", {"force_close": True})
    ]
    await fake.webhooks_idle()
    kinds = [type(parse(d.body)).__name__ for d in fake.webhook_deliveries]
    assert kinds == ["MessageEvent", "TalkEvent"]
    assert b"outgoing_message%5Badd%5D%5B0%5D%5Btext%5D=" in fake.webhook_deliveries[0].body
    assert all(d.status == 200 for d in fake.webhook_deliveries)
    assert "closed talk 7 on an outgoing #done" in caplog.text
    assert "Kommo reports talk 7 closed" in caplog.text
    assert len(running.clients) == 1  # one shared client


async def test_a_customers_done_closes_the_talk_by_default(running: Running) -> None:
    await running.fake.emit_message(3, "#DONE please", direction="incoming")
    await running.seen.wait_for(closed_reported(3))
    assert not running.fake.is_open(3)


async def test_incoming_done_is_ignored_when_turned_off(fake: FakeKommo) -> None:
    async with run_bot(fake, accept_incoming=False) as running:
        fake.add_webhook(f"{running.url}?secret={SECRET}")
        await fake.emit_message(3, "#done", direction="incoming")
        await running.seen.wait_for(message_handled(3))
        assert fake.is_open(3)
        await fake.emit_message(3, "closing it #done", direction="outgoing")
        await running.seen.wait_for(closed_reported(3))
    assert fake.stats.by_route["close"] == 1


@pytest.mark.parametrize("text", ["all done", "#done2", "x#done", "##done", "#don", ""])
async def test_messages_without_the_tag_do_nothing(running: Running, text: str) -> None:
    await running.fake.emit_message(5, text, direction="outgoing")
    await running.seen.wait_for(message_handled(5))
    assert running.fake.is_open(5)
    assert running.fake.stats.by_route["close"] == 0


async def test_an_already_closed_talk_is_fine(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    running.fake.talks[4]["is_in_work"] = False
    caplog.set_level(logging.INFO)
    await running.fake.emit_message(4, "#done", direction="outgoing")
    await running.seen.wait_for(message_handled(4))
    assert "talk 4 was already closed" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_wrong_secret_is_refused_and_closes_nothing(fake: FakeKommo) -> None:
    async with run_bot(fake) as running:
        fake.add_webhook(f"{running.url}?secret=guess")
        fake.add_webhook(running.url)
        await fake.emit_message(2, "#done", direction="outgoing")
        await fake.webhooks_idle()
    assert [d.status for d in fake.webhook_deliveries] == [403, 403]
    assert fake.is_open(2)
    assert fake.stats.requests == 0


async def test_shutdown_finishes_the_close_before_the_client_is_closed(fake: FakeKommo) -> None:
    async with run_bot(fake) as running:
        fake.add_webhook(f"{running.url}?secret={SECRET}")
        await fake.emit_message(9, "#done", direction="outgoing")
        await fake.webhooks_idle()  # accepted (200): its callback may still be running
    # run_bot's cleanup drained the receiver before closing the client.
    assert not fake.is_open(9)
    assert fake.webhook_deliveries[0].status == 200


async def test_the_access_log_does_not_show_the_secret(
    fake: FakeKommo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with run_bot(fake, access_log=True) as running:
        fake.add_webhook(f"{running.url}?secret={SECRET}")
        await fake.emit_message(3, "#done", direction="outgoing")
        await fake.webhooks_idle()

    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert access  # deliveries are logged ...
    assert all(SECRET not in line for line in access)  # ... without the URL's secret


def test_settings_come_from_the_environment() -> None:
    env = {
        "KOMMO_BASE_URL": "https://example.kommo.com",
        "KOMMO_TOKEN": "tok",
        "BOT_SECRET": "sec",
        "PORT": "9000",
        "BOT_ACCEPT_INCOMING": "0",
    }
    settings = bot.settings_from_env(env)
    assert (settings.base_url, settings.port, settings.accept_incoming) == (
        "https://example.kommo.com",
        9000,
        False,
    )
    assert "tok" not in repr(settings)
    assert "sec" not in repr(settings)
    del env["PORT"], env["BOT_ACCEPT_INCOMING"]
    defaults = bot.settings_from_env(env)
    assert (defaults.port, defaults.accept_incoming) == (8080, True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"KOMMO_TOKEN": ""}, "set KOMMO_TOKEN"),
        ({"BOT_SECRET": ""}, "set BOT_SECRET"),
        ({"PORT": "http"}, "PORT must be a port number"),
        ({"PORT": "70000"}, "PORT must be a port number"),
    ],
)
def test_bad_settings_stop_the_bot_with_a_clear_message(
    change: dict[str, str], message: str
) -> None:
    env = {"KOMMO_BASE_URL": "https://example.kommo.com", "KOMMO_TOKEN": "t", "BOT_SECRET": "s"}
    with pytest.raises(SystemExit, match=message):
        bot.settings_from_env({**env, **change})


def parse(body: bytes) -> WebhookEvent:
    from kommo_talks.webhooks import parse_webhook

    (event,) = parse_webhook(body).events
    return event
