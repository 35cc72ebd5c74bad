"""The pure decisions of the retry loop: no I/O, no sleeping, a seeded RNG."""

from __future__ import annotations

import asyncio
import random
import ssl
import statistics
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp.client_reqrep import ConnectionKey

from kommo_talks import RetryPolicy
from kommo_talks.retry import (
    MAX_SERVER_WAIT,
    backoff_delay,
    is_retryable_exception,
    is_retryable_status,
    parse_retry_after,
    server_wait,
)

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
KOMMO_443 = ConnectionKey("example.kommo.com", 443, True, True, None, None, None)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


# -- RetryPolicy ----------------------------------------------------------------


def test_policy_defaults_are_the_documented_ones() -> None:
    policy = RetryPolicy()

    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (5, 0.5, 30.0)


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.max_attempts = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 2.0},
        {"max_attempts": True},
        {"max_attempts": "3"},
        {"base_delay": -0.1},
        {"base_delay": float("nan")},
        {"base_delay": float("inf")},
        {"base_delay": True},
        {"base_delay": "1"},
        {"max_delay": -1},
        {"max_delay": float("nan")},
        {"max_delay": float("inf")},
        {"max_delay": None},
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


def test_policy_accepts_the_edges() -> None:
    policy = RetryPolicy(max_attempts=1, base_delay=0, max_delay=0)

    assert policy.max_attempts == 1
    assert backoff_delay(policy, 1, random.Random(0)) == 0.0


# -- backoff --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_number", "cap"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 16.0), (7, 30.0), (12, 30.0)],
)
def test_backoff_is_full_jitter_up_to_the_cap_of_each_retry(retry_number: int, cap: float) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0)
    rng = random.Random(retry_number)

    samples = [backoff_delay(policy, retry_number, rng) for _ in range(4000)]

    assert all(0.0 <= s <= cap for s in samples)
    # Full jitter: uniform over [0, cap], not "cap plus a little noise".
    assert min(samples) < 0.01 * cap
    assert max(samples) > 0.99 * cap
    assert statistics.fmean(samples) == pytest.approx(cap / 2, rel=0.05)
    below_quarter = sum(s < cap / 4 for s in samples) / len(samples)
    assert below_quarter == pytest.approx(0.25, abs=0.03)


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy()

    first = [backoff_delay(policy, n, random.Random(42)) for n in range(1, 6)]
    second = [backoff_delay(policy, n, random.Random(42)) for n in range(1, 6)]

    assert first == second


@pytest.mark.parametrize("retry_number", [20, 1024, 1100, 5000])
def test_backoff_never_exceeds_max_delay_however_many_retries(retry_number: int) -> None:
    policy = RetryPolicy(max_attempts=10_000, base_delay=0.5, max_delay=3.0)
    rng = random.Random(7)

    samples = [backoff_delay(policy, retry_number, rng) for _ in range(200)]

    assert all(0.0 <= s <= 3.0 for s in samples)
    assert max(samples) > 2.9


def test_backoff_with_zero_base_delay_never_waits() -> None:
    policy = RetryPolicy(max_attempts=5000, base_delay=0, max_delay=30.0)
    rng = random.Random(1)

    assert {backoff_delay(policy, n, rng) for n in (1, 10, 2000)} == {0.0}


# -- Retry-After ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("1.5", 1.5), ("300", 300.0)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    header = http_date(NOW + timedelta(seconds=90))

    assert parse_retry_after(header, NOW) == 90.0


@pytest.mark.parametrize(
    "header",
    [
        "Fri, 27 Nov 2026 12:01:30 GMT",  # IMF-fixdate
        "Friday, 27-Nov-26 12:01:30 GMT",  # RFC 850 (obsolete, still to be accepted)
        "Fri Nov 27 12:01:30 2026",  # asctime
        "Fri, 27 Nov 2026 14:01:30 +0200",  # a zone other than GMT
    ],
)
def test_retry_after_accepts_every_http_date_form(header: str) -> None:
    assert parse_retry_after(header, NOW) == 90.0


def test_retry_after_as_a_date_without_now_uses_the_wall_clock() -> None:
    header = http_date(datetime.now(UTC) + timedelta(seconds=60))

    wait = parse_retry_after(header)

    assert wait is not None
    assert 58.0 <= wait <= 60.0


def test_retry_after_date_in_the_past_means_no_wait() -> None:
    assert parse_retry_after(http_date(NOW - timedelta(hours=1)), NOW) == 0.0


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "-0.5",
        "inf",
        "nan",
        "1e999",
        "12 seconds",
        "Wed, 99 Foo 2015 07:28:00 GMT",
        "Sun, 06 Nov 99999 08:49:37 GMT",
        "\u00b2",  # SUPERSCRIPT TWO: str.isdigit() says yes, float() says no
        "\u0663",  # ARABIC-INDIC DIGIT THREE: not an RFC 9110 delay-seconds
    ],
)
def test_unreadable_or_negative_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header, NOW) is None


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("9" * 400, id="400-digit-number"),
        pytest.param("9" * 5000, id="5000-digit-number"),
        pytest.param("Wed, 21 Oct 99999999999999999999 07:28:00 GMT", id="huge-year"),
        pytest.param("Wed, 99999999999 Oct 2015 07:28:00 GMT", id="huge-day"),
        pytest.param("Wed, 21 Oct 2015 99999999999999999999:28:00 GMT", id="huge-hour"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 +99999999999999", id="huge-zone"),
        pytest.param("1e308" + "0" * 10, id="float-overflow"),
    ],
)
def test_hostile_retry_after_counts_as_absent_and_never_raises(header: str) -> None:
    assert parse_retry_after(header, NOW) is None
    assert server_wait(503, header, {}, NOW) is None
    assert server_wait(429, header, {"retry_after": 7}, NOW) == 7.0  # the body is used instead


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("3600", {}, 3600.0),
        ("3601", {}, MAX_SERVER_WAIT),
        ("86400", {}, MAX_SERVER_WAIT),
        ("1e300", {}, MAX_SERVER_WAIT),
        (None, {"retry_after": 10**6}, MAX_SERVER_WAIT),
        (None, {"retry_after": "99999999"}, MAX_SERVER_WAIT),
        (None, {"retry_after": 300}, 300.0),
    ],
)
def test_a_server_given_wait_is_capped_at_an_hour(
    header: str | None, body: dict[str, object], expected: float
) -> None:
    assert MAX_SERVER_WAIT == 3600.0
    assert server_wait(429, header, body, NOW) == expected


def test_a_far_http_date_is_capped_at_an_hour() -> None:
    header = http_date(NOW + timedelta(days=3000))

    assert server_wait(503, header, {}, NOW) == MAX_SERVER_WAIT


# -- server_wait: header or 429 body ----------------------------------------------


def test_body_retry_after_is_used_for_a_429() -> None:
    assert server_wait(429, None, {"retry_after": 300}, NOW) == 300.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_body_retry_after_is_ignored_for_a_5xx(status: int) -> None:
    assert server_wait(status, None, {"retry_after": 300}, NOW) is None


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_header_wins_over_the_body(status: int) -> None:
    assert server_wait(status, "5", {"retry_after": 300}, NOW) == 5.0


def test_http_date_header_wins_over_the_body() -> None:
    header = http_date(NOW + timedelta(seconds=12))

    assert server_wait(429, header, {"retry_after": 300}, NOW) == 12.0


def test_unreadable_header_falls_back_to_the_429_body() -> None:
    assert server_wait(429, "later", {"retry_after": 20}, NOW) == 20.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (300, 300.0),
        (2.5, 2.5),
        ("45", 45.0),
        (0, 0.0),
        (-1, None),
        (True, None),
        (None, None),
        ("soon", None),
        ([300], None),
        (float("nan"), None),
        pytest.param(10**400, None, id="int-beyond-float"),  # never a crash
        ("1e999", None),
    ],
)
def test_body_retry_after_values(value: object, expected: float | None) -> None:
    assert server_wait(429, None, {"retry_after": value}, NOW) == expected


def test_no_wait_without_header_or_body_field() -> None:
    assert server_wait(429, None, {}, NOW) is None
    assert server_wait(503, None, {}, NOW) is None


# -- what is retried --------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 202, 302, 400, 401, 402, 403, 404, 409, 422, 501, 505])
def test_other_statuses_are_final(status: int) -> None:
    assert not is_retryable_status(status)


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectionError("refused"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("truncated"),
        aiohttp.ServerTimeoutError("read timeout"),
        TimeoutError(),
        aiohttp.ConnectionTimeoutError("connect timeout"),
    ],
    ids=type,
)
def test_connection_failures_and_timeouts_are_retried(exc: BaseException) -> None:
    assert is_retryable_exception(exc)


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectorCertificateError(
            KOMMO_443, ssl.SSLCertVerificationError("certificate verify failed")
        ),
        aiohttp.ServerFingerprintMismatch(b"a" * 32, b"b" * 32, "example.kommo.com", 443),
        ValueError("a bug"),
        KeyError("x"),
        asyncio.CancelledError(),
    ],
    ids=type,
)
def test_tls_mismatches_and_bugs_are_not_retried(exc: BaseException) -> None:
    assert not is_retryable_exception(exc)
