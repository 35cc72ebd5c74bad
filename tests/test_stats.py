"""The counters behind ``client.stats()`` and their frozen snapshot (no I/O)."""

from __future__ import annotations

import attrs
import pytest
from conftest import FakeClock

from kommo_talks import RateLimitError
from kommo_talks.pause import ServerPause
from kommo_talks.stats import ClientStats, Counters


def test_fresh_counters_give_an_all_zero_snapshot() -> None:
    stats = Counters().snapshot()

    assert stats == ClientStats(
        requests={},
        answers={},
        retries_by_status={},
        connection_retries=0,
        timeout_retries=0,
        rate_limited=0,
        server_pauses=0,
        seconds_paused=0.0,
        token_refreshes=0,
        limiter_wait=0.0,
        in_flight=0,
    )
    assert stats.retries == 0
    assert stats.total_requests == 0


def test_sends_and_answers_count_by_method_and_status_with_in_flight_between() -> None:
    counters = Counters()
    counters.on_send("GET")
    counters.on_send("POST")
    counters.on_send("GET")
    assert counters.snapshot().in_flight == 3

    counters.on_done(503)
    counters.on_done(200)
    counters.on_done(None)  # failed on the wire: no answer
    stats = counters.snapshot()

    assert stats.requests == {"GET": 2, "POST": 1}
    assert stats.total_requests == 3
    assert stats.answers == {503: 1, 200: 1}
    assert stats.in_flight == 0


def test_429_answers_are_counted_as_rate_limited() -> None:
    counters = Counters()
    for status in (429, 200, 429):
        counters.on_send("GET")
        counters.on_done(status)

    assert counters.snapshot().rate_limited == 2


def test_retries_count_by_cause() -> None:
    counters = Counters()
    for cause in (503, 429, 503, "connection", "timeout", "timeout"):
        counters.on_retry(cause)
    stats = counters.snapshot()

    assert stats.retries_by_status == {503: 2, 429: 1}
    assert stats.connection_retries == 1
    assert stats.timeout_retries == 2
    assert stats.retries == 6


def test_pauses_refreshes_and_limiter_waits_add_up() -> None:
    counters = Counters()
    counters.on_pause(2.5)
    counters.on_pause(0.0)  # a wait inside a longer pause already set adds nothing
    counters.on_pause(-1.0)  # never subtracts
    counters.on_refresh()
    counters.on_limiter_wait(0.25)
    counters.on_limiter_wait(0.5)
    stats = counters.snapshot()

    assert (stats.server_pauses, stats.seconds_paused) == (3, 2.5)
    assert stats.token_refreshes == 1
    assert stats.limiter_wait == 0.75


def test_a_snapshot_does_not_change_with_later_requests() -> None:
    counters = Counters()
    counters.on_send("GET")
    counters.on_done(200)
    before = counters.snapshot()

    counters.on_send("GET")
    counters.on_done(404)
    counters.on_retry(503)

    assert before.requests == {"GET": 1}
    assert before.answers == {200: 1}
    assert before.retries_by_status == {}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        before.in_flight = 5  # type: ignore[misc]


def test_a_server_pause_reports_only_the_seconds_it_adds() -> None:
    clock = FakeClock()
    pause = ServerPause(clock.now)
    error = RateLimitError(429, retry_after=10.0)

    assert pause.extend(10.0, error) == 10.0
    clock.time += 4.0
    assert pause.extend(3.0, error) == 0.0  # ends before the pause already set
    assert pause.extend(8.0, error) == 2.0  # 4 + 8 = 12: two seconds past the old end
    clock.time += 20.0
    assert pause.extend(1.5, error) == 1.5  # after the pause ended: a new one
