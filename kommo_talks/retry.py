"""Retry policy and the pure decisions of the retry loop.

Nothing here does I/O or sleeps: the client's request pipeline asks these
functions what to do and does it. That keeps every decision testable with a
seeded RNG and no event loop.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import attrs

__all__ = [
    "MAX_SERVER_WAIT",
    "RETRYABLE_STATUSES",
    "RetryPolicy",
    "backoff_delay",
    "is_retryable_exception",
    "is_retryable_status",
    "parse_retry_after",
    "server_wait",
]

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""HTTP statuses that are retried. Every other 4xx is final."""

MAX_SERVER_WAIT = 3600.0
"""The longest server-given wait honoured, in seconds (Kommo documents 300 s).

A longer one is cut to this, so that no answer can pause a client for ever.
"""


def _positive_int(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _non_negative(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """How a request is retried.

    Attributes:
        max_attempts: attempts per call, retries and the replay after a token
            refresh included. ``1`` disables retries.
        base_delay: the backoff of the first retry, in seconds; it doubles on
            each retry (full jitter: the actual wait is uniform in ``[0, cap]``).
        max_delay: the longest wait the SDK will sleep. A server-given wait
            (``Retry-After``, or the 429 body's ``retry_after``) above it is not
            slept through: the call raises at once with ``retry_after`` set.

    Retried: 429, 500, 502, 503, 504, connection errors and timeouts.
    """

    max_attempts: int = attrs.field(default=5, validator=_positive_int)
    base_delay: float = attrs.field(default=0.5, validator=_non_negative)
    max_delay: float = attrs.field(default=30.0, validator=_non_negative)


def is_retryable_status(status: int) -> bool:
    """True for the statuses worth another attempt: 429, 500, 502, 503, 504."""
    return status in RETRYABLE_STATUSES


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """The wait before retry *retry_number* (1, 2, ...): full-jitter exponential backoff.

    ``rng.uniform(0, min(max_delay, base_delay * 2 ** (retry_number - 1)))``.
    """
    try:
        grown = policy.base_delay * 2.0 ** (retry_number - 1)
    except OverflowError:  # past retry 1024 the doubling leaves the float range
        grown = math.inf if policy.base_delay else 0.0
    return rng.uniform(0.0, min(policy.max_delay, grown))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delay-seconds or an HTTP date.

    Returns the wait in seconds (finite, never negative), or ``None`` if the
    value is absent or unreadable: anything that is not a finite,
    non-negative number or a valid HTTP date (a date with an out-of-range
    field included) counts as absent. ``now`` (UTC) is used for HTTP dates.
    """
    if value is None:
        return None
    value = value.strip()
    # Both forms are ASCII (RFC 9110); str.isdigit() and float() would also
    # take other scripts' digits, and "²".isdigit() is true but float("²") raises.
    if not value or not value.isascii():
        return None
    try:
        return _seconds(float(value))  # a 400-digit number parses as inf: absent
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # Overflow: a huge field
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _seconds(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _body_retry_after(problem: Mapping[str, Any]) -> float | None:
    value = problem.get("retry_after")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return _seconds(float(value))
    except (ValueError, OverflowError):  # OverflowError: an int beyond the float range
        return None


def server_wait(
    status: int,
    retry_after_header: str | None,
    problem: Mapping[str, Any],
    now: datetime | None = None,
) -> float | None:
    """The wait the server asked for, in seconds, or ``None`` if it asked for none.

    The ``Retry-After`` header wins; for a 429 the problem body's
    ``retry_after`` field (Kommo documents ``"retry_after": 300``) is used
    when there is no readable header. A wait is capped at
    :data:`MAX_SERVER_WAIT`; an unreadable one counts as absent.
    """
    wait = parse_retry_after(retry_after_header, now)
    if wait is None and status == 429:
        wait = _body_retry_after(problem)
    return None if wait is None else min(wait, MAX_SERVER_WAIT)


def is_retryable_exception(exc: BaseException) -> bool:
    """True for connection failures and timeouts, false for TLS verification failures.

    A certificate or fingerprint mismatch will not heal by retrying, so it is
    raised at once.
    """
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return False
    return isinstance(exc, aiohttp.ClientError | TimeoutError)
