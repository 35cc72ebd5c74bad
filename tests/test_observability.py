"""``client.stats()``, ``trace_configs=`` and OpenTelemetry spans, over loopback to FakeKommo."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from conftest import FakeClock
from opentelemetry.trace import StatusCode
from otel_support import finished, span_exporter
from retry_support import MakeClient

from kommo_talks import (
    ClientStats,
    KommoClient,
    LongLivedToken,
    MemoryTokenStore,
    NotFoundError,
    OAuth2,
    TokenSet,
)
from kommo_talks.testing import FakeKommo, Fault


def expired_oauth(fake: FakeKommo) -> tuple[TokenSet, OAuth2]:
    """A token pair whose access token the fake now rejects, and an OAuth2 holding it."""
    old = fake.oauth.issue_tokens()
    fake.oauth.expire_access_tokens()
    store = MemoryTokenStore(old)
    return old, OAuth2(
        fake.oauth.client_id, fake.oauth.client_secret, fake.oauth.redirect_uri, store
    )


# -- stats() ---------------------------------------------------------------------------


async def test_a_new_client_has_all_zero_stats(make_client: MakeClient) -> None:
    stats = make_client().stats()

    assert isinstance(stats, ClientStats)
    assert (stats.total_requests, stats.retries, stats.in_flight) == (0, 0, 0)
    assert stats.answers == {}


async def test_a_503_then_200_counts_one_retry_by_status(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client()
    fake.script("get", 503)

    await client.get_talk(1)
    stats = client.stats()

    assert stats.requests == {"GET": 2}
    assert stats.answers == {503: 1, 200: 1}
    assert stats.retries_by_status == {503: 1}
    assert (stats.connection_retries, stats.timeout_retries, stats.retries) == (0, 0, 1)
    assert stats.rate_limited == 0
    assert stats.in_flight == 0


async def test_answers_that_raise_are_counted_too(make_client: MakeClient) -> None:
    client = make_client()

    await client.close_talk(3, force=True)
    with pytest.raises(NotFoundError):
        await client.get_talk(999_999)

    stats = client.stats()
    assert stats.requests == {"POST": 1, "GET": 1}
    assert stats.answers == {202: 1, 404: 1}
    assert stats.retries == 0


async def test_a_dropped_connection_counts_as_a_connection_retry(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client()
    fake.script("close", Fault.dropped())  # aiohttp never re-sends a POST by itself

    await client.close_talk(2, force=True)
    stats = client.stats()

    assert stats.connection_retries == 1
    assert stats.requests == {"POST": 2}
    assert stats.answers == {202: 1}  # the dropped attempt got no answer
    assert stats.in_flight == 0


async def test_a_timeout_counts_as_a_timeout_retry(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    client = make_client(timeout=0.05)
    fake.script("get", Fault.slow(0.25))

    await client.get_talk(5)
    stats = client.stats()

    assert stats.timeout_retries == 1
    assert stats.connection_retries == 0
    assert stats.answers == {200: 1}


async def test_a_429_with_retry_after_counts_a_server_pause_and_its_seconds(
    make_client: MakeClient, fake: FakeKommo, fake_clock: FakeClock
) -> None:
    client = make_client()
    fake.script("get", Fault.error(429, retry_after=0.25), Fault.error(429, retry_after=0.5))

    await client.get_talk(4)
    stats = client.stats()

    assert stats.rate_limited == 2
    assert stats.retries_by_status == {429: 2}
    assert stats.server_pauses == 2
    assert stats.seconds_paused == pytest.approx(0.75)
    assert fake_clock.sleeps == [0.25, 0.5]


async def test_time_waited_in_the_rate_limiter_is_summed(
    make_client: MakeClient, fake_clock: FakeClock
) -> None:
    client = make_client(rate_limit=1.0)

    for talk_id in (1, 2, 3):
        await client.get_talk(talk_id)
    stats = client.stats()

    assert sum(fake_clock.sleeps) > 1.0  # the second and third calls waited for a slot
    assert stats.limiter_wait == pytest.approx(sum(fake_clock.sleeps))
    assert stats.retries == 0


async def test_no_rate_limit_means_no_limiter_wait(make_client: MakeClient) -> None:
    client = make_client()

    await client.get_talk(1)

    assert client.stats().limiter_wait == 0.0


async def test_a_401_counts_a_token_refresh_and_its_replay(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    _, oauth = expired_oauth(fake)
    client = make_client(auth=oauth)

    await client.close_talk(7, force=True)
    stats = client.stats()

    assert stats.token_refreshes == 1
    assert stats.retries_by_status == {401: 1}
    assert stats.requests == {"POST": 3}  # close, token, close again
    assert stats.answers == {401: 1, 200: 1, 202: 1}


async def test_in_flight_counts_a_request_on_the_wire(make_client: MakeClient) -> None:
    seen: list[int] = []
    client: KommoClient | None = None

    async def on_request_start(*_: object) -> None:
        assert client is not None
        seen.append(client.stats().in_flight)

    hooks = aiohttp.TraceConfig()
    hooks.on_request_start.append(on_request_start)
    client = make_client(trace_configs=[hooks])

    await client.get_talk(1)

    assert seen == [1]
    assert client.stats().in_flight == 0


async def test_a_stats_snapshot_does_not_move(make_client: MakeClient) -> None:
    client = make_client()
    before = client.stats()

    await client.get_talk(1)

    assert before.total_requests == 0
    assert client.stats().total_requests == 1


# -- trace_configs ---------------------------------------------------------------------


async def test_trace_configs_see_every_request_of_the_clients_own_session(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    seen: list[tuple[str, str]] = []

    async def on_request_end(
        _: aiohttp.ClientSession, __: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        seen.append((params.method, params.url.path))

    hooks = aiohttp.TraceConfig()
    hooks.on_request_end.append(on_request_end)
    fake.script("get", 503)
    client = make_client(trace_configs=[hooks])

    await client.get_talk(8)
    await client.close_talk(8, force=True)

    assert seen == [
        ("GET", "/api/v4/talks/8"),
        ("GET", "/api/v4/talks/8"),
        ("POST", "/api/v4/talks/8/close"),
    ]


async def test_trace_configs_with_a_borrowed_session_raise(fake: FakeKommo) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match="configure your own session"):
            KommoClient(
                fake.url,
                LongLivedToken(fake.token),
                session=session,
                trace_configs=[aiohttp.TraceConfig()],
            )


@pytest.mark.parametrize("bad", [aiohttp.TraceConfig(), [object()], "hooks"])
def test_trace_configs_must_be_a_list_of_trace_configs(bad: Any) -> None:
    with pytest.raises(ValueError, match="trace_configs"):
        KommoClient("https://example.kommo.com", LongLivedToken("t"), trace_configs=bad)


# -- OpenTelemetry ---------------------------------------------------------------------


async def test_tracing_makes_a_span_per_call_with_an_event_per_attempt(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    exporter = span_exporter()
    client = make_client(tracing=True)
    fake.script("get", 503)

    await client.get_talk(17)
    await client.close_talk(17, force=True)

    get, close = finished(exporter)
    assert get.name == "GET /api/v4/talks/{id}"
    assert close.name == "POST /api/v4/talks/{id}/close"
    assert (get.attributes or {})["http.response.status_code"] == 200
    assert (get.attributes or {})["http.request.resend_count"] == 1
    assert [
        (
            (e.attributes or {}).get("kommo_talks.attempt"),
            (e.attributes or {}).get("http.response.status_code"),
            (e.attributes or {}).get("kommo_talks.retry_cause"),
        )
        for e in get.events
    ] == [(1, 503, "status"), (2, 200, None)]
    assert [(e.attributes or {}).get("http.response.status_code") for e in close.events] == [202]


async def test_a_call_that_raises_ends_its_span_as_an_error(make_client: MakeClient) -> None:
    exporter = span_exporter()
    client = make_client(tracing=True)

    with pytest.raises(NotFoundError):
        await client.get_talk(999_999)

    [span] = finished(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "NotFoundError"
    assert (span.attributes or {})["http.response.status_code"] == 404


async def test_a_dropped_connection_is_an_event_with_its_cause(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    exporter = span_exporter()
    client = make_client(tracing=True)
    fake.script("close", Fault.dropped())

    await client.close_talk(2, force=True)

    [span] = finished(exporter)
    first = dict(span.events[0].attributes or {})
    assert first["kommo_talks.retry_cause"] == "connection"
    assert "http.response.status_code" not in first
    assert first["error.type"]


async def test_spans_never_hold_the_token_or_query_values(
    make_client: MakeClient, fake: FakeKommo
) -> None:
    exporter = span_exporter()
    old, oauth = expired_oauth(fake)
    client = make_client(auth=oauth, tracing=True)

    await client.close_talk(7, force=True)  # 401, a token refresh, the replay
    async for _ in client.iter_talks(filter={"contact_id": 3372695}):
        pass

    spans = finished(exporter)
    names = [span.name for span in spans]
    assert "POST /oauth2/access_token" in names
    assert "GET /api/v4/talks" in names
    dumped = "".join(span.to_json() for span in spans)
    new = fake.oauth.issued[-1]
    secrets = [old.access_token, old.refresh_token, new.access_token, new.refresh_token]
    for secret in [*secrets, fake.oauth.client_secret, "3372695", "contact_id"]:
        assert secret not in dumped
    assert all(json.loads(span.to_json())["kind"] == "SpanKind.CLIENT" for span in spans)


async def test_the_environment_variable_turns_tracing_on(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = span_exporter()
    monkeypatch.setenv("KOMMO_TALKS_TRACING", "1")
    client = make_client()

    await client.get_talk(1)

    assert [span.name for span in finished(exporter)] == ["GET /api/v4/talks/{id}"]


async def test_without_tracing_no_span_is_made(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = span_exporter()
    monkeypatch.delenv("KOMMO_TALKS_TRACING", raising=False)
    client = make_client()

    await client.get_talk(1)

    assert finished(exporter) == []
