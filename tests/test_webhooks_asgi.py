"""WebhookReceiver.asgi_app() under a real uvicorn on loopback, and the rules' core.

The aiohttp tests (test_webhooks_receiver.py) are the behaviour spec; these
check that the ASGI adapter keeps the same rules over real HTTP, that a
FastAPI bot mounts it, and that the framework-free core answers what its
event sink answers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
from fastapi import FastAPI
from loopback import serving_asgi
from test_webhooks_receiver import HANG, Recorder, delivery, mixed_delivery, post, talk_ids

from kommo_talks.testing import FakeKommo
from kommo_talks.webhooks import InvalidEvent, WebhookEvent, WebhookReceiver
from kommo_talks.webhooks._intake import OK, Answer, WebhookIntake

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_bot.py"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def serve_asgi(receiver: WebhookReceiver, **config: object) -> AsyncIterator[str]:
    async with serving_asgi(receiver.asgi_app(), **config) as base:
        yield f"{base}/kommo/hook"


async def send_raw(url: str, head: str, body: bytes) -> bytes:
    """Send ``head`` and ``body`` on a socket of our own; return the status line."""
    parts = urlsplit(url)
    assert parts.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", parts.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        async with asyncio.timeout(HANG):
            return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


# ---------------------------------------------------------------- answers


async def test_asgi_delivery_is_200_before_the_callback_which_then_runs(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder, secret="s3cret")
    async with serve_asgi(receiver) as url:
        status = await post(http, url, delivery(117, 118), params={"secret": "s3cret"})
        finished_before_release = list(recorder.finished)
        recorder.release.set()
        await recorder.wait_finished(2)

    assert status == 200
    assert finished_before_release == []
    assert talk_ids(recorder.finished) == [117, 118]
    assert recorder.finished[0].account_id == 29785537


WRONG_SECRETS: list[dict[str, str]] = [
    {},
    {"secret": "wrong"},
    {"secret": ""},
    {"secret": "s3cret-"},
    {"secret": "sécret"},
]


async def test_asgi_wrong_or_missing_secret_is_403_and_nothing_is_called(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder, secret="s3cret")
    async with serve_asgi(receiver) as url:
        refused = [await post(http, url, delivery(1), params=query) for query in WRONG_SECRETS]
        assert await post(http, url, delivery(2), params={"x": "1", "secret": "s3cret"}) == 200
        await receiver.close()

    assert refused == [403] * len(WRONG_SECRETS)
    assert talk_ids(recorder.finished) == [2]


async def test_asgi_wrong_secret_is_refused_before_the_body_is_read() -> None:
    receiver = WebhookReceiver(Recorder(), secret="s3cret")
    async with serve_asgi(receiver) as url:
        head = (
            "POST /kommo/hook?secret=nope HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n"
        )
        status_line = await send_raw(url, head, delivery(1))  # the rest never comes

    assert status_line.startswith(b"HTTP/1.1 403 ")


async def test_asgi_body_that_is_not_a_form_is_400_and_nothing_is_called(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    not_utf8, over_max_fields = b"\xff\xfe", b"talk%5Bupdate%5D%5B0%5D%5Btalk_id%5D=1&" * 10_001
    async with serve_asgi(receiver) as url:
        statuses = [await post(http, url, body) for body in (not_utf8, over_max_fields)]
        await receiver.close()

    assert statuses == [400, 400]
    assert recorder.started == []


async def test_asgi_body_not_complete_within_read_timeout_is_408() -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder, read_timeout=0.05)
    body = delivery(1, 2)
    async with serve_asgi(receiver) as url:
        head = (
            "POST /kommo/hook HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        status_line = await send_raw(url, head, body[: len(body) // 2])  # then it stalls
        await receiver.close()

    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert recorder.started == []


async def test_asgi_body_over_max_body_size_is_413_and_nothing_is_called(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    body = delivery(*range(1, 30))
    assert len(body) > 1000

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 300):
            yield body[start : start + 300]

    async with serving_asgi(receiver.asgi_app(max_body_size=1000)) as base:
        whole = await post(http, base, body)
        streamed = await post(http, base, chunked())  # type: ignore[arg-type]
        assert await post(http, base, delivery(7)) == 200
        await recorder.wait_finished(1)

    assert (whole, streamed) == (413, 413)
    assert talk_ids(recorder.finished) == [7]


async def test_asgi_answers_405_to_other_methods(http: aiohttp.ClientSession) -> None:
    receiver = WebhookReceiver(Recorder())
    async with serve_asgi(receiver) as url, http.get(url) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"


async def test_asgi_partly_invalid_delivery_is_200_and_the_bad_event_reported(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    reported: list[InvalidEvent] = []
    receiver = WebhookReceiver(recorder, on_invalid=reported.append)
    async with serve_asgi(receiver) as url:
        assert await post(http, url, mixed_delivery()) == 200
        await recorder.wait_finished(2)

    assert talk_ids(recorder.finished) == [1, 3]
    assert [invalid.error.path for invalid in reported] == ["talk[update][1][talk_id]"]


async def test_asgi_client_leaving_mid_body_gets_nothing_called_and_no_error_logged(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    body = delivery(1, 2)
    async with serve_asgi(receiver) as url:
        parts = urlsplit(url)
        _, writer = await asyncio.open_connection("127.0.0.1", parts.port)
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[: body.index(b"talk%5Bupdate%5D%5B1%5D")])
        await writer.drain()
        writer.close()  # gone with the first event sent whole, the second not
        await writer.wait_closed()
        assert await post(http, url, delivery(3)) == 200
    await receiver.close()  # uvicorn has finished every request: drain what they queued

    assert talk_ids(recorder.finished) == [3]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# --------------------------------------------------------- bound, draining


async def test_asgi_delivery_over_max_pending_is_503_and_none_of_it_is_queued(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder, max_pending=3)
    async with serve_asgi(receiver) as url:
        statuses = [await post(http, url, delivery(*ids)) for ids in ((1, 2), (3, 4), (5,), (6,))]
        recorder.release.set()
        await recorder.wait_finished(3)

    assert statuses == [200, 503, 200, 503]
    assert sorted(talk_ids(recorder.finished)) == [1, 2, 5]


async def test_asgi_delivery_while_draining_is_503(http: aiohttp.ClientSession) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    async with serve_asgi(receiver) as url:
        assert await post(http, url, delivery(1)) == 200
        await recorder.wait_started(1)
        closing = asyncio.create_task(receiver.close())
        assert await post(http, url, delivery(2)) == 503
        still_waiting = not closing.done()
        recorder.release.set()
        async with asyncio.timeout(HANG):
            await closing

    assert still_waiting
    assert talk_ids(recorder.finished) == [1]


async def test_asgi_app_served_directly_drains_in_the_lifespan_shutdown(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    async with serve_asgi(receiver, lifespan="on") as url:
        assert await post(http, url, delivery(1, 2)) == 200
        await recorder.wait_started(1)
        asyncio.get_running_loop().call_soon(recorder.release.set)
        # leaving the block stops uvicorn, whose lifespan shutdown drains

    assert talk_ids(recorder.finished) == [1, 2]
    assert receiver.pending == 0


def test_asgi_app_refuses_a_nonsense_body_limit() -> None:
    with pytest.raises(ValueError, match="max_body_size"):
        WebhookReceiver(Recorder()).asgi_app(max_body_size=0)


def test_import_kommo_talks_webhooks_loads_no_web_framework() -> None:
    code = (
        "import sys, kommo_talks, kommo_talks.webhooks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'starlette', 'fastapi', 'uvicorn', 'pydantic'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ FastAPI


async def test_fastapi_mount_serves_the_hook_and_its_lifespan_drains(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder, secret="s3cret")
    drained_before_cleanup: list[list[int]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await receiver.close()
        drained_before_cleanup.append(talk_ids(recorder.finished))

    app = FastAPI(lifespan=lifespan)
    app.mount("/kommo/hook", receiver.asgi_app())
    async with serving_asgi(app, lifespan="on") as base:
        url = f"{base}/kommo/hook/"
        assert await post(http, url, delivery(1), params={"secret": "s3cret"}) == 200
        assert await post(http, url, delivery(2), params={"secret": "nope"}) == 403
        async with http.post(url, data=b"", allow_redirects=False) as response:
            assert response.status == 403  # the mount, not FastAPI, answers
        await recorder.wait_started(1)
        asyncio.get_running_loop().call_soon(recorder.release.set)

    assert drained_before_cleanup == [[1]]


# ------------------------------------------------------ the FastAPI example


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_bot", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("suffix", ["/", ""], ids=["slash", "no-slash"])
async def test_fastapi_example_closes_a_talk_on_done_and_drains_before_the_client_closes(
    fake: FakeKommo, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    for name, value in {
        "KOMMO_BASE_URL": fake.url,
        "KOMMO_TOKEN": fake.token,
        "BOT_SECRET": "s3cret",
    }.items():
        monkeypatch.setenv(name, value)
    bot = load_example()
    async with serving_asgi(bot.app, lifespan="on") as base:
        fake.add_webhook(f"{base}/kommo/hook{suffix}?{urlencode({'secret': 's3cret'})}")
        await fake.emit_message(9, "All sorted #done", direction="outgoing")
        await fake.emit_message(8, "thanks", direction="outgoing")
        await fake.webhooks_idle()  # both answered 200: their callbacks may still run
        # leaving the block runs the app's lifespan: drain, then close the client

    assert [d.status for d in fake.webhook_deliveries][:2] == [200, 200]
    assert not fake.is_open(9)
    assert fake.is_open(8)
    assert bot.app.state.kommo.closed


# ---------------------------------------------------------------- the core


class Sink:
    """An event sink that answers what it is told and records what it took."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.offered: list[tuple[WebhookEvent, ...]] = []

    async def accept(self, events: tuple[WebhookEvent, ...]) -> Answer:
        self.offered.append(events)
        return self.answer

    async def close(self) -> None:
        pass


async def body_of(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize("answer", [OK, Answer(503, "queue unavailable")])
async def test_core_answers_what_the_sink_answers_and_reports_invalid_only_when_taken(
    answer: Answer,
) -> None:
    sink = Sink(answer)
    reported: list[InvalidEvent] = []
    intake = WebhookIntake(sink, secret=None, read_timeout=1.0, on_invalid=reported.append)

    got = await intake.receive(None, lambda: body_of(mixed_delivery()), body_complete=True)

    assert got == answer
    assert [[e.talk_id for e in events] for events in sink.offered] == [[1, 3]]
    assert len(reported) == intake.invalid_events == (1 if answer == OK else 0)


async def test_core_checks_the_secret_and_draining_before_reading_the_body() -> None:
    sink = Sink(OK)
    intake = WebhookIntake(sink, secret="s3cret", read_timeout=1.0, on_invalid=None)

    async def never_read() -> bytes:
        raise AssertionError("the body was read")

    assert (await intake.receive("nope", never_read)).status == 403
    assert (await intake.receive(None, never_read)).status == 403
    await intake.close()
    assert (await intake.receive("s3cret", never_read)).status == 503
    assert sink.offered == []
