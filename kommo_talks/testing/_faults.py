"""Scripted and random faults for :class:`~kommo_talks.testing.FakeKommo`."""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["ROUTES", "Fault", "FaultPlan"]

ROUTES = frozenset({"get", "close", "list", "token", "account", "leads", "lead_update"})
"""Route names faults can be scripted for."""


@attrs.frozen
class Fault:
    """One injected misbehaviour of the fake server, for one request.

    Build one with the class methods; a plain ``int`` given to
    :meth:`FakeKommo.script` means :meth:`Fault.error` of that status.

    Attributes:
        status: the status to answer instead of the real one (``None``: the
            real answer).
        delay: seconds to wait before answering (latency).
        drop: close the connection without an answer.
        html: answer an HTML page instead of problem+json (a proxy error or
            Kommo's block page).
        after_effect: do the real work first (e.g. close the talk), then
            answer ``status`` or drop: the ambiguous case of a retried close.
        retry_after: the ``retry_after`` of a 429 problem body, and of a
            ``Retry-After`` header when ``retry_after_header`` is set.
    """

    status: int | None = None
    delay: float = 0.0
    drop: bool = False
    html: bool = False
    after_effect: bool = False
    retry_after: float | None = None
    retry_after_header: bool = False

    @classmethod
    def error(
        cls,
        status: int,
        *,
        html: bool = False,
        retry_after: float | None = None,
        retry_after_header: bool = False,
    ) -> Fault:
        """Answer ``status`` (problem+json, or HTML with ``html``) without doing the work."""
        return cls(
            status=status,
            html=html,
            retry_after=retry_after,
            retry_after_header=retry_after_header,
        )

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer normally, ``seconds`` late (to trigger client timeouts)."""
        return cls(delay=seconds)

    @classmethod
    def dropped(cls, *, after_effect: bool = False) -> Fault:
        """Close the connection without answering (optionally after doing the work)."""
        return cls(drop=True, after_effect=after_effect)

    @classmethod
    def then_error(cls, status: int = 503) -> Fault:
        """Do the work (e.g. close the talk), then answer ``status``: "close then answer 503"."""
        return cls(status=status, after_effect=True)


class FaultPlan:
    """The faults waiting for each route: scripted queues first, then random ones."""

    def __init__(self) -> None:
        self._scripts: dict[str, collections.deque[Fault]] = {
            route: collections.deque() for route in ROUTES
        }
        self._random_rate = 0.0
        self._random_faults: Sequence[Fault] = ()
        self._random_routes: frozenset[str] = frozenset()
        self._rng = random.Random(0)

    def script(self, route: str, faults: Iterable[Fault | int]) -> None:
        """Queue faults for the next requests on ``route``, one per request."""
        _check_route(route)
        for fault in faults:
            if isinstance(fault, int) and not isinstance(fault, bool):
                fault = Fault.error(fault)
            if not isinstance(fault, Fault):
                raise TypeError(f"expected a Fault or an int status, got {fault!r}")
            self._scripts[route].append(fault)

    def randomize(
        self, rate: float, faults: Sequence[Fault], routes: Iterable[str], seed: int | None
    ) -> None:
        """Give every request on ``routes`` a ``rate`` chance of one of ``faults``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate!r}")
        routes = frozenset(routes)
        for route in routes:
            _check_route(route)
        if rate and not faults:
            raise ValueError("give at least one fault to inject")
        self._random_rate = rate
        self._random_faults = tuple(faults)
        self._random_routes = routes
        self._rng = random.Random(seed)

    def clear(self) -> None:
        """Forget every scripted and random fault."""
        for queue in self._scripts.values():
            queue.clear()
        self._random_rate = 0.0

    def pending(self, route: str) -> int:
        """How many scripted faults are still waiting on ``route``."""
        return len(self._scripts[route])

    def next(self, route: str) -> Fault | None:
        """The fault for the request that just arrived on ``route``, if any."""
        queue = self._scripts[route]
        if queue:
            return queue.popleft()
        if (
            self._random_rate
            and route in self._random_routes
            and self._rng.random() < self._random_rate
        ):
            return self._rng.choice(self._random_faults)
        return None


def _check_route(route: str) -> None:
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {sorted(ROUTES)}")
