"""What :class:`~kommo_talks.testing.FakeKommo` records: counters and requests."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import attrs
import orjson

__all__ = ["FakeStats", "RecordedRequest", "busiest_window"]


def busiest_window(times: Iterable[float], window: float = 1.0) -> int:
    """The most of ``times`` (seconds) inside any rolling window of ``window`` seconds.

    Check a rate limit from the arrival times the fake recorded::

        assert busiest_window(r.at for r in fake.requests) <= 7
    """
    ordered = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


@attrs.define
class FakeStats:
    """What the fake has seen.

    Attributes:
        requests: requests received (every route).
        throttled: 429 answers served by the enforced rate limit.
        in_flight: requests being handled right now.
        max_in_flight: the most requests ever handled at once.
        by_route: requests per route name (``"get"``, ``"close"``, ``"list"``, ``"token"``).
    """

    requests: int = 0
    throttled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    by_route: collections.Counter[str] = attrs.Factory(collections.Counter)


@attrs.frozen
class RecordedRequest:
    """One request the fake received."""

    route: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float
    """``time.monotonic()`` when it arrived."""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)
