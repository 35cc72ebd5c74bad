"""Rate limiters of :class:`KommoAccounts`: one per account, an optional global one first."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

from ..ratelimit import RateLimiter, SlidingWindowRateLimiter

__all__ = ["AccountLimits", "ChainedRateLimiter"]

RateLimitOption = float | Callable[[int], RateLimiter] | None


class ChainedRateLimiter:
    """A :class:`~kommo_talks.RateLimiter` that waits for each of ``limiters`` in turn.

    ``ChainedRateLimiter(global_limiter, account_limiter)``: a request waits
    for a turn in the global limit first, then in its account's. A turn taken
    in the first is spent even if the second makes the request wait.
    """

    def __init__(self, *limiters: RateLimiter) -> None:
        self.limiters = limiters
        """The limiters, in the order they are waited for."""

    def __repr__(self) -> str:
        return f"ChainedRateLimiter{self.limiters!r}"

    async def acquire(self) -> None:
        """Wait for a turn in every limiter, in order."""
        for limiter in self.limiters:
            await limiter.acquire()


def _check_rate(name: str, value: object) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value > 0:  # type: ignore[arg-type, operator]
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"{name} must be a positive number of requests per second")


class AccountLimits:
    """Hands out each account's limiter (global one first, if any).

    A number gives each account a :class:`SlidingWindowRateLimiter` of that
    rate, kept while any client of the account holds it (so a client built
    again after an eviction shares the limit with one still in use).
    """

    def __init__(self, rate_limit: object, global_rate_limit: object) -> None:
        self._per_account: float | Callable[[int], RateLimiter] | None
        if rate_limit is None or callable(rate_limit):
            self._per_account = rate_limit
        else:
            self._per_account = _check_rate("rate_limit", rate_limit)
        self._global: RateLimiter | None
        if global_rate_limit is None or isinstance(global_rate_limit, RateLimiter):
            self._global = global_rate_limit
        else:
            self._global = SlidingWindowRateLimiter(
                _check_rate("global_rate_limit", global_rate_limit)
            )
        self._kept: weakref.WeakValueDictionary[int, RateLimiter] = weakref.WeakValueDictionary()

    def for_account(self, account_id: int) -> RateLimiter | None:
        """The limiter a new client of ``account_id`` gets, or ``None`` (no limit)."""
        own = self._account_limiter(account_id)
        parts = [limiter for limiter in (self._global, own) if limiter is not None]
        if len(parts) < 2:
            return parts[0] if parts else None
        return ChainedRateLimiter(*parts)

    def for_install(self) -> RateLimiter | None:
        """The limiter of an install's ``GET /api/v4/account``: the global one, if any.

        The account's own limiter is keyed by its ID, which that call is what reveals.
        """
        return self._global

    def _account_limiter(self, account_id: int) -> RateLimiter | None:
        option = self._per_account
        if option is None:
            return None
        if callable(option):
            return option(account_id)
        limiter = self._kept.get(account_id)
        if limiter is None:
            limiter = self._kept[account_id] = SlidingWindowRateLimiter(option)
        return limiter
