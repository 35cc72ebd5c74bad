"""What a client has done since it was created: counters, and their frozen snapshot.

The request pipeline bumps a :class:`Counters` object (plain ints, floats and
small dicts: well under a microsecond per request, cheap enough to leave on);
:meth:`KommoClient.stats() <kommo_talks.KommoClient.stats>` hands out a
:class:`ClientStats`, a frozen copy that later requests do not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import attrs

__all__ = ["ClientStats", "Counters", "RetryCause"]

RetryCause = int | Literal["connection", "timeout"]
"""Why an attempt was retried: the status of the answer, or how the request failed."""

CONNECTION: Final = "connection"
TIMEOUT: Final = "timeout"


@attrs.frozen
class ClientStats:
    """A snapshot of a client's counters since it was created (see :meth:`KommoClient.stats`).

    Counts cover every attempt the client sent, retries and requests to the
    OAuth token endpoint included. Take two snapshots and subtract to get a
    rate; the snapshot itself never changes.
    """

    requests: Mapping[str, int]
    """Attempts sent, by HTTP method (``{"GET": 10, "POST": 2}``)."""
    answers: Mapping[int, int]
    """Answers received, by HTTP status (``{200: 9, 503: 1}``)."""
    retries_by_status: Mapping[int, int]
    """Attempts retried because of the answer's status (429, 500, 502, 503, 504;
    401 for the replay after a token refresh), by that status."""
    connection_retries: int
    """Attempts retried because the connection failed (refused, reset, dropped)."""
    timeout_retries: int
    """Attempts retried because they timed out."""
    rate_limited: int
    """Answers with status 429 (Too Many Requests)."""
    server_pauses: int
    """Server-given waits (``Retry-After``, a 429 body's ``retry_after``) that paused the client."""
    seconds_paused: float
    """Seconds those pauses added to the client-wide pause (overlapping pauses count once)."""
    token_refreshes: int
    """Access tokens obtained from the token endpoint by this client (OAuth2 only)."""
    limiter_wait: float
    """Seconds requests spent waiting in the rate limiter, summed over requests."""
    in_flight: int
    """Requests on the wire at the time of the snapshot (sent, answer not yet read)."""

    @property
    def retries(self) -> int:
        """All retries, whatever their cause."""
        return sum(self.retries_by_status.values()) + self.connection_retries + self.timeout_retries

    @property
    def total_requests(self) -> int:
        """All attempts sent."""
        return sum(self.requests.values())


class Counters:
    """The live, mutable counters behind :class:`ClientStats` (internal).

    One per client, bumped from the event loop's thread only. Attributes are
    public so that the hot path can bump them without a call.
    """

    __slots__ = (
        "answers",
        "connection_retries",
        "in_flight",
        "limiter_wait",
        "requests",
        "retries_by_status",
        "seconds_paused",
        "server_pauses",
        "timeout_retries",
        "token_refreshes",
    )

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.answers: dict[int, int] = {}
        self.retries_by_status: dict[int, int] = {}
        self.connection_retries = 0
        self.timeout_retries = 0
        self.server_pauses = 0
        self.seconds_paused = 0.0
        self.token_refreshes = 0
        self.limiter_wait = 0.0
        self.in_flight = 0

    def on_send(self, method: str) -> None:
        """An attempt goes on the wire."""
        self.requests[method] = self.requests.get(method, 0) + 1
        self.in_flight += 1

    def on_done(self, status: int | None) -> None:
        """An attempt ended: answered with ``status``, or failed on the wire (``None``)."""
        self.in_flight -= 1
        if status is not None:
            self.answers[status] = self.answers.get(status, 0) + 1

    def on_retry(self, cause: RetryCause) -> None:
        """An attempt is retried because of ``cause``."""
        if cause == CONNECTION:
            self.connection_retries += 1
        elif cause == TIMEOUT:
            self.timeout_retries += 1
        else:
            assert isinstance(cause, int), cause
            self.retries_by_status[cause] = self.retries_by_status.get(cause, 0) + 1

    def on_pause(self, added: float) -> None:
        """A server-given wait paused the client, adding ``added`` seconds to the pause."""
        self.server_pauses += 1
        self.seconds_paused += max(0.0, added)

    def on_refresh(self) -> None:
        """The token endpoint issued a new access token."""
        self.token_refreshes += 1

    def on_limiter_wait(self, seconds: float) -> None:
        """A request waited ``seconds`` for its rate-limit slot."""
        self.limiter_wait += seconds

    def snapshot(self) -> ClientStats:
        """A frozen copy of the counters now."""
        answers = self.answers
        return ClientStats(
            requests=dict(self.requests),
            answers=dict(answers),
            retries_by_status=dict(self.retries_by_status),
            connection_retries=self.connection_retries,
            timeout_retries=self.timeout_retries,
            rate_limited=answers.get(429, 0),
            server_pauses=self.server_pauses,
            seconds_paused=self.seconds_paused,
            token_refreshes=self.token_refreshes,
            limiter_wait=self.limiter_wait,
            in_flight=self.in_flight,
        )
