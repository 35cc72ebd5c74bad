"""WebhookReceiver over real loopback HTTP, and verify_disconnect_signature."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from loopback import serving

from kommo_talks.webhooks import (
    InvalidEvent,
    MessageEvent,
    TalkEvent,
    WebhookEvent,
    WebhookReceiver,
    verify_disconnect_signature,
)

PATH = "/kommo/hook"
# Only a broken receiver ever waits this long: a bug fails the test instead of hanging it.
HANG = 10.0


def delivery(*talk_ids: int, section: str = "update", account: int = 29785537) -> bytes:
    """A Kommo-format body with one talk event per ID, ``is_in_work`` 0."""
    pairs: list[tuple[str, str]] = []
    for index, talk_id in enumerate(talk_ids):
        prefix = f"talk[{section}][{index}]"
        pairs += [
            (f"{prefix}[talk_id]", str(talk_id)),
            (f"{prefix}[is_in_work]", "0"),
            (f"{prefix}[is_read]", "1"),
        ]
    pairs += [("account[id]", str(account)), ("account[subdomain]", "example")]
    return urlencode(pairs).encode()


def talk_ids(events: list[WebhookEvent]) -> list[int]:
    ids = []
    for event in events:
        assert isinstance(event, TalkEvent)
        ids.append(event.talk_id)
    return ids


class Recorder:
    """A webhook callback that records events and can be held on an Event."""

    def __init__(self, *, hold: bool = False) -> None:
        self.started: list[WebhookEvent] = []
        self.finished: list[WebhookEvent] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.running = 0
        self.most_running = 0
        self._changed = asyncio.Event()

    async def __call__(self, event: WebhookEvent) -> None:
        self.started.append(event)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self._changed.set()
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        self.finished.append(event)
        self._changed.set()

    async def wait_started(self, count: int) -> None:
        async with asyncio.timeout(HANG):
            while len(self.started) < count:
                self._changed.clear()
                await self._changed.wait()

    async def wait_finished(self, count: int) -> None:
        async with asyncio.timeout(HANG):
            while len(self.finished) < count:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 (ephemeral port) and yield its hook URL."""
    # A short shutdown_timeout only matters to a broken receiver whose handler hangs.
    async with serving(app, shutdown_timeout=HANG / 5) as base:
        yield f"{base}{PATH}"


@asynccontextmanager
async def serve_receiver(receiver: WebhookReceiver) -> AsyncIterator[str]:
    app = web.Application()
    receiver.setup(app, PATH)
    async with serve(app) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, url: str, body: bytes, **kwargs: object) -> int:
    async with (
        asyncio.timeout(HANG),
        http.post(url, data=body, **kwargs) as response,  # type: ignore[arg-type]
    ):
        await response.read()
        return response.status


# ------------------------------------------------------------------ secret


@pytest.mark.parametrize(
    "query",
    [{}, {"secret": "wrong"}, {"secret": ""}, {"secret": "s3cret-"}, {"secret": "sécret"}],
    ids=["missing", "wrong", "empty", "longer", "non-ascii"],
)
async def test_wrong_or_missing_secret_is_403_and_nothing_is_called(
    http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder, secret="s3cret")
    async with serve_receiver(receiver) as url:
        assert await post(http, url, delivery(1), params=query) == 403
        assert await post(http, url, delivery(2), params={"secret": "s3cret"}) == 200
        await receiver.close()

    assert talk_ids(recorder.finished) == [2]


async def test_wrong_secret_is_refused_before_the_body_is_read(
    http: aiohttp.ClientSession,
) -> None:
    never = asyncio.Event()

    async def endless_body() -> AsyncIterator[bytes]:
        yield delivery(1)
        await never.wait()  # the body never ends: only an answer that skips it can come
        yield b"&x=y"

    receiver = WebhookReceiver(Recorder(), secret="s3cret")
    url_params = {"secret": "nope"}
    async with (
        serve_receiver(receiver) as url,
        asyncio.timeout(HANG),
        http.post(url, data=endless_body(), params=url_params) as response,
    ):
        status = response.status
        response.close()  # drop the connection with the body unfinished

    assert status == 403


# ------------------------------------------------------------ answer first


async def test_200_arrives_before_the_callback_runs(http: aiohttp.ClientSession) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        status = await post(http, url, delivery(117))
        finished_before_release = list(recorder.finished)
        recorder.release.set()
        await recorder.wait_finished(1)

    assert status == 200
    assert finished_before_release == []
    (event,) = recorder.finished
    assert isinstance(event, TalkEvent)
    assert (event.talk_id, event.closed, event.account_id) == (117, True, 29785537)


async def test_events_of_one_delivery_run_one_at_a_time_in_order(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, delivery(*range(1, 13))) == 200
        await recorder.wait_finished(12)

    assert talk_ids(recorder.finished) == list(range(1, 13))
    assert recorder.most_running == 1


async def test_deliveries_run_concurrently(http: aiohttp.ClientSession) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, delivery(1)) == 200
        assert await post(http, url, delivery(2)) == 200
        await recorder.wait_started(2)  # both are running while neither may finish
        recorder.release.set()
        await recorder.wait_finished(2)

    assert sorted(talk_ids(recorder.finished)) == [1, 2]


async def test_message_events_reach_the_callback(http: aiohttp.ClientSession) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    body = urlencode(
        {
            "message[add][0][id]": "m-1",
            "message[add][0][type]": "incoming",
            "message[add][0][text]": "Привет #done",
            "message[add][0][talk_id]": "117",
        }
    ).encode()
    async with serve_receiver(receiver) as url:
        assert await post(http, url, body) == 200
        await recorder.wait_finished(1)

    (event,) = recorder.finished
    assert isinstance(event, MessageEvent)
    assert (event.message_id, event.text, event.talk_id) == ("m-1", "Привет #done", 117)


async def test_form_posted_by_a_client_as_a_dict_is_accepted(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    form = {"talk[add][0][talk_id]": "5", "talk[add][0][is_in_work]": "1"}
    form["talk[add][0][is_read]"] = "0"
    async with serve_receiver(receiver) as url:
        async with http.post(url, data=form) as response:
            assert response.status == 200
        await recorder.wait_finished(1)

    assert talk_ids(recorder.finished) == [5]


async def test_deliveries_still_run_concurrently_once_workers_are_reused(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        for talk_id in (1, 2, 3):  # finished one by one: their workers wait idle
            assert await post(http, url, delivery(talk_id)) == 200
            await recorder.wait_finished(talk_id)
        recorder.release.clear()
        for talk_id in (4, 5, 6, 7):
            assert await post(http, url, delivery(talk_id)) == 200
        await recorder.wait_started(7)  # all four running while none may finish
        recorder.release.set()
        await recorder.wait_finished(7)

    assert sorted(talk_ids(recorder.finished)) == [1, 2, 3, 4, 5, 6, 7]
    assert recorder.most_running == 4


async def test_close_leaves_no_task_behind(http: aiohttp.ClientSession) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    before = asyncio.all_tasks()
    async with asyncio.timeout(HANG), serve_receiver(receiver) as url:
        await asyncio.gather(*(post(http, url, delivery(i)) for i in range(1, 41)))
        await recorder.wait_finished(40)
        # (the app's shutdown hook closes the receiver)

    assert asyncio.all_tasks() <= before
    assert receiver.pending == 0


async def test_a_body_read_before_handle_is_still_delivered(http: aiohttp.ClientSession) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)

    async def logging_route(request: web.Request) -> web.StreamResponse:
        assert await request.read()  # the user's own handler looks at the body first
        return await receiver.handle(request)

    app = web.Application()
    app.router.add_post(PATH, logging_route)
    async with serve(app) as url:
        assert await post(http, url, delivery(21)) == 200
        await recorder.wait_finished(1)

    assert talk_ids(recorder.finished) == [21]


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_each_delivery_runs_in_its_own_requests_context(
    http: aiohttp.ClientSession,
) -> None:
    seen: list[tuple[int | None, str]] = []
    done = asyncio.Event()

    async def callback(event: WebhookEvent) -> None:
        seen.append((event.talk_id, REQUEST_ID.get()))
        REQUEST_ID.set("changed by a callback")  # must not reach later deliveries
        if len(seen) == 3:
            done.set()

    @web.middleware
    async def request_ids(request: web.Request, handler: Any) -> web.StreamResponse:
        REQUEST_ID.set(request.headers["X-Request-Id"])
        response: web.StreamResponse = await handler(request)
        return response

    receiver = WebhookReceiver(callback)
    app = web.Application(middlewares=[request_ids])
    receiver.setup(app, PATH)
    async with serve(app) as url:
        for n in (1, 2, 3):
            status = await post(http, url, delivery(n), headers={"X-Request-Id": f"req-{n}"})
            assert status == 200
        async with asyncio.timeout(HANG):
            await done.wait()

    assert sorted(seen) == [(1, "req-1"), (2, "req-2"), (3, "req-3")]


async def test_body_arriving_in_pieces_is_read_whole(http: aiohttp.ClientSession) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    body = delivery(11, 12)
    sent_first = asyncio.Event()
    go_on = asyncio.Event()

    async def in_two_pieces() -> AsyncIterator[bytes]:
        yield body[:40]
        sent_first.set()
        await go_on.wait()  # the handler starts before the rest has arrived
        yield body[40:]

    async with serve_receiver(receiver) as url:
        posting = asyncio.create_task(post(http, url, in_two_pieces()))  # type: ignore[arg-type]
        async with asyncio.timeout(HANG):
            await sent_first.wait()
        go_on.set()
        assert await posting == 200
        await recorder.wait_finished(2)

    assert talk_ids(recorder.finished) == [11, 12]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
async def test_body_over_the_apps_size_limit_is_413_and_nothing_is_called(
    http: aiohttp.ClientSession, chunked: bool
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    body = delivery(*range(1, 30))
    assert len(body) > 1000

    async def streamed() -> AsyncIterator[bytes]:
        yield body

    app = web.Application(client_max_size=1000)
    receiver.setup(app, PATH)
    async with serve(app) as url:
        status = await post(http, url, streamed() if chunked else body)  # type: ignore[arg-type]
        assert await post(http, url, delivery(7)) == 200
        await recorder.wait_finished(1)

    assert status == 413
    assert talk_ids(recorder.finished) == [7]


# -------------------------------------------------------------- bad bodies


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe", b"talk%5Bupdate%5D%5B0%5D%5Btalk_id%5D=1&" * 10_001],
    ids=["not-utf8", "over-max-fields"],
)
async def test_body_that_is_not_a_form_is_400_and_nothing_is_called(
    http: aiohttp.ClientSession, body: bytes
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, body) == 400
        await receiver.close()  # waits for anything that was accepted

    assert recorder.started == []
    assert receiver.invalid_events == 0


async def test_delivery_without_modelled_events_is_200_with_no_call(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, b"leads%5Bstatus%5D%5B0%5D%5Bid%5D=1") == 200
        await receiver.close()

    assert recorder.started == []
    assert receiver.pending == 0


# ------------------------------------------------------------------- bound


async def test_delivery_over_the_bound_is_503_and_none_of_it_is_queued(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder, max_pending=3)
    async with serve_receiver(receiver) as url:
        statuses = [
            await post(http, url, delivery(1, 2)),  # 2 pending
            await post(http, url, delivery(3, 4)),  # 4 > 3: refused whole
            await post(http, url, delivery(5)),  # exactly 3
            await post(http, url, delivery(6)),  # 4 > 3
        ]
        pending_at_bound = receiver.pending
        recorder.release.set()
        await recorder.wait_finished(3)
        after_drain = await post(http, url, delivery(7))  # room again
        await recorder.wait_finished(4)

    assert statuses == [200, 503, 200, 503]
    assert pending_at_bound == 3
    assert after_drain == 200
    assert sorted(talk_ids(recorder.finished)) == [1, 2, 5, 7]


async def test_oversized_delivery_is_accepted_when_nothing_is_pending(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder, max_pending=2)
    async with serve_receiver(receiver) as url:
        first = await post(http, url, delivery(1, 2, 3, 4, 5))
        second = await post(http, url, delivery(6))  # something is pending now
        recorder.release.set()
        await recorder.wait_finished(5)

    assert (first, second) == (200, 503)
    assert talk_ids(recorder.finished) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- failures


async def _cancelled_elsewhere() -> None:
    cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cancelled.cancel()
    await cancelled  # e.g. awaiting a task that someone else cancelled


async def _broken() -> None:
    raise RuntimeError("bot broke on talk 1")


@pytest.mark.parametrize(
    ("failure", "logged"),
    [(_broken, "RuntimeError: bot broke on talk 1"), (_cancelled_elsewhere, "CancelledError")],
    ids=["error", "a CancelledError it met"],
)
async def test_callback_failure_is_logged_with_traceback_and_others_go_on(
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    failure: Callable[[], Awaitable[None]],
    logged: str,
) -> None:
    seen: list[int | None] = []
    done = asyncio.Event()

    async def callback(event: WebhookEvent) -> None:
        seen.append(event.talk_id)
        if event.talk_id == 1:
            await failure()
        if event.talk_id == 3:
            done.set()

    receiver = WebhookReceiver(callback)
    caplog.set_level(logging.ERROR, logger="kommo_talks.webhooks")
    async with serve_receiver(receiver) as url:
        assert await post(http, url, delivery(1, 2, 3)) == 200
        async with asyncio.timeout(HANG):
            await done.wait()

    assert seen == [1, 2, 3]
    (record,) = [r for r in caplog.records if r.name == "kommo_talks.webhooks"]
    assert record.levelno == logging.ERROR
    assert "talk 1" in record.getMessage()
    assert record.exc_info is not None
    assert "Traceback" in caplog.text
    assert logged in caplog.text
    assert receiver.pending == 0


# ---------------------------------------------------------------- draining


async def test_shutdown_waits_for_callbacks_before_the_app_cleanup(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    shutdown_started = asyncio.Event()
    finished_at_cleanup: list[WebhookEvent] = []
    cleanup_reached = asyncio.Event()

    async def on_shutdown(app: web.Application) -> None:  # runs just before the drain
        shutdown_started.set()

    async def on_cleanup(app: web.Application) -> None:  # where users close their client
        finished_at_cleanup.extend(recorder.finished)
        cleanup_reached.set()

    app = web.Application()
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    receiver.setup(app, PATH)
    # The same receiver also behind a second app that stays up, to watch it drain.
    other = web.Application()
    other.router.add_post(PATH, receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    cleanup: asyncio.Task[None] | None = None
    try:
        async with serve(other) as other_url:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            assert await post(http, f"http://{host}:{port}{PATH}", delivery(1, 2)) == 200
            await recorder.wait_started(1)
            cleanup = asyncio.create_task(runner.cleanup())
            async with asyncio.timeout(HANG):
                await shutdown_started.wait()
            assert await post(http, other_url, delivery(3)) == 503  # draining now
            assert not cleanup_reached.is_set()  # held while the callback runs
    finally:
        recorder.release.set()
        await (cleanup if cleanup is not None else runner.cleanup())

    assert talk_ids(finished_at_cleanup) == [1, 2]


async def test_close_drains_and_later_deliveries_get_503(http: aiohttp.ClientSession) -> None:
    recorder = Recorder(hold=True)
    receiver = WebhookReceiver(recorder)
    app = web.Application()
    app.router.add_post(PATH, receiver.handle)  # routed by the user, no setup()
    async with serve(app) as url:
        assert await post(http, url, delivery(1)) == 200
        await recorder.wait_started(1)
        closing = asyncio.create_task(receiver.close())
        assert await post(http, url, delivery(2)) == 503
        still_waiting = not closing.done()
        recorder.release.set()
        async with asyncio.timeout(HANG):
            await closing
        finished_when_closed = talk_ids(recorder.finished)
        assert await post(http, url, delivery(3)) == 503

    assert still_waiting
    assert finished_when_closed == [1]
    assert receiver.pending == 0
    await receiver.close()  # idempotent


def test_receiver_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        WebhookReceiver(Recorder(), max_pending=0)
    with pytest.raises(ValueError, match="secret"):
        WebhookReceiver(Recorder(), secret="")
    for timeout in (0, -1.0, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="read_timeout"):
            WebhookReceiver(Recorder(), read_timeout=timeout)  # type: ignore[arg-type]


def test_receiver_needs_exactly_one_of_callback_and_queue() -> None:
    with pytest.raises(TypeError, match="exactly one of callback and queue"):
        WebhookReceiver()
    with pytest.raises(TypeError, match="exactly one of callback and queue"):
        WebhookReceiver(None, secret="s3cret")
    with pytest.raises(TypeError, match="exactly one of callback and queue"):
        WebhookReceiver(Recorder(), queue=object())  # type: ignore[arg-type]


# --------------------------------------------------- partly bad deliveries


def bad_talk(index: int) -> list[tuple[str, str]]:
    prefix = f"talk[update][{index}]"
    return [(f"{prefix}[talk_id]", "not-a-number"), (f"{prefix}[is_in_work]", "0")]


def mixed_delivery() -> bytes:
    """Two good talk events (1 and 3) and a bad one between them, at index 1."""
    pairs = [("account[id]", "29785537")]
    for index, talk_id in ((0, 1), (2, 3)):
        prefix = f"talk[update][{index}]"
        pairs += [(f"{prefix}[talk_id]", str(talk_id)), (f"{prefix}[is_in_work]", "0")]
        pairs += [(f"{prefix}[is_read]", "1")]
    return urlencode(pairs + bad_talk(1)).encode()


async def test_delivery_with_a_bad_event_is_200_the_good_ones_run_and_the_bad_one_is_reported(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    reported: list[InvalidEvent] = []
    receiver = WebhookReceiver(recorder, on_invalid=reported.append)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, mixed_delivery()) == 200
        await recorder.wait_finished(2)
        await receiver.close()

    assert talk_ids(recorder.finished) == [1, 3]
    (invalid,) = reported
    assert (invalid.section, invalid.index) == ("talk[update]", 1)
    assert invalid.error.path == "talk[update][1][talk_id]"
    assert dict(invalid.fields) == {"talk_id": "not-a-number", "is_in_work": "0"}
    assert receiver.invalid_events == 1
    (record,) = [r for r in caplog.records if r.name == "kommo_talks.webhooks"]
    assert record.levelno == logging.WARNING
    assert "talk[update][1][talk_id]" in record.getMessage()
    assert "talk[update][0]" not in record.getMessage()  # the event's path, not the body


async def test_on_invalid_that_raises_is_logged_and_the_answer_stays_200(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(invalid: InvalidEvent) -> None:
        raise RuntimeError("dead-letter store is down")

    recorder = Recorder()
    receiver = WebhookReceiver(recorder, on_invalid=broken)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, mixed_delivery()) == 200
        await recorder.wait_finished(2)
        await receiver.close()

    assert receiver.invalid_events == 1
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "dead-letter store is down" in str(failures[0].exc_info[1])


async def test_delivery_of_only_bad_events_is_200_with_no_call(
    http: aiohttp.ClientSession,
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, urlencode(bad_talk(0)).encode()) == 200
        await receiver.close()

    assert recorder.started == []
    assert receiver.invalid_events == 1


async def test_refused_delivery_reports_no_invalid_event(http: aiohttp.ClientSession) -> None:
    # Answered 503, the delivery comes again: its bad events are counted then, once.
    recorder = Recorder(hold=True)
    reported: list[InvalidEvent] = []
    receiver = WebhookReceiver(recorder, max_pending=2, on_invalid=reported.append)
    async with serve_receiver(receiver) as url:
        assert await post(http, url, delivery(7)) == 200
        await recorder.wait_started(1)
        assert await post(http, url, mixed_delivery()) == 503
        recorder.release.set()
        await receiver.close()

    assert (reported, receiver.invalid_events) == ([], 0)


# ------------------------------------------------------------------- routes


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_path_is_served_with_and_without_a_trailing_slash(
    http: aiohttp.ClientSession, suffix: str
) -> None:
    recorder = Recorder()
    receiver = WebhookReceiver(recorder)
    async with serve_receiver(receiver) as url:
        assert await post(http, url + suffix, delivery(5)) == 200
        await recorder.wait_finished(1)
        await receiver.close()

    assert talk_ids(recorder.finished) == [5]


# ------------------------------------------------------------- read timeout


async def test_body_not_complete_within_read_timeout_is_408_and_nothing_is_parsed() -> None:
    recorder = Recorder()
    reported: list[InvalidEvent] = []
    receiver = WebhookReceiver(recorder, read_timeout=0.05, on_invalid=reported.append)
    body = mixed_delivery()
    async with serve_receiver(receiver) as url:
        port = int(url.split(":")[2].split("/")[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = (
                f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body[: len(body) // 2])  # then it stalls
            await writer.drain()
            async with asyncio.timeout(HANG):
                status_line = await reader.readline()
        finally:
            writer.close()
            await writer.wait_closed()
        await receiver.close()

    assert status_line.startswith(b"HTTP/1.1 408 ")
    assert recorder.started == []
    assert (reported, receiver.invalid_events) == ([], 0)


# --------------------------------------------------------------- signature


def sign(client_id: str, secret: str, account_id: int | str) -> str:
    message = f"{client_id}|{account_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


CLIENT_ID = "0f6a2c3e-1d47-4a8e-9d7b-5a1c9b2f7e10"
SECRET = "AbCdEf0123456789secret"
GOOD = sign(CLIENT_ID, SECRET, 29785537)


@pytest.mark.parametrize("account_id", [29785537, "29785537"])
def test_disconnect_signature_accepts_kommos_signature(account_id: int | str) -> None:
    assert verify_disconnect_signature(
        client_id=CLIENT_ID, client_secret=SECRET, account_id=account_id, signature=GOOD
    )
    assert verify_disconnect_signature(
        client_id=CLIENT_ID, client_secret=SECRET, account_id=account_id, signature=GOOD.encode()
    )


@pytest.mark.parametrize(
    ("account_id", "signature"),
    [
        (29785538, GOOD),  # another account
        (29785537, sign(CLIENT_ID, "other-secret", 29785537)),
        (29785537, sign("other-client", SECRET, 29785537)),
        (29785537, GOOD[:-1]),
        (29785537, GOOD.upper()),  # Kommo sends lowercase hex
        (29785537, ""),
        (29785537, "é" * 64),
        (29785537, None),
        (29785537, 12345),
        (29785537, ["not", "a", "signature"]),
    ],
)
def test_disconnect_signature_rejects_anything_else(account_id: int, signature: object) -> None:
    assert not verify_disconnect_signature(
        client_id=CLIENT_ID, client_secret=SECRET, account_id=account_id, signature=signature
    )


@pytest.mark.parametrize("secret", ["", " ", "\t\n"], ids=["empty", "space", "blank"])
def test_disconnect_signature_with_an_empty_or_blank_secret_is_a_value_error(secret: str) -> None:
    forged = sign(CLIENT_ID, secret, 29785537)  # anyone can compute this one

    with pytest.raises(ValueError, match="client_secret"):
        verify_disconnect_signature(
            client_id=CLIENT_ID, client_secret=secret, account_id=29785537, signature=forged
        )
