"""``KommoClient``: the facade over the request pipeline.

It checks arguments, owns the lifecycle and offers the public operations;
:mod:`kommo_talks._pipeline` sends, :mod:`kommo_talks.sansio` decides.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import aiohttp

from . import _calls, _talks
from ._pipeline import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ERROR_BODY_READ_LIMIT,
    USER_AGENT,
    Pipeline,
    decode,
)
from ._tracing import make_tracer
from .auth import Auth, LongLivedToken
from .errors import KommoError
from .listing import iter_talks, paginate
from .models import CloseOutcome, Talk
from .ratelimit import RateLimiter, SlidingWindowRateLimiter
from .retry import RetryPolicy
from .sansio import Kind
from .stats import ClientStats
from .urls import normalize_base_url

if TYPE_CHECKING:
    from .oauth import OAuth2

__all__ = ["ERROR_BODY_READ_LIMIT", "USER_AGENT", "KommoClient"]

_CLOSE: Final = Kind.CLOSE  # read once: an enum member read through its class is slow


class KommoClient:
    """An async client of Kommo's Talks API; safe to share among tasks.

    Args:
        base_url: the account's address, e.g. ``https://example.kommo.com``;
            ``https://`` only (``http://`` only for ``localhost``,
            ``127.0.0.1`` and ``[::1]``, for tests).
        auth: :class:`LongLivedToken` or :class:`OAuth2`.
        session: an ``aiohttp.ClientSession`` to borrow; it is never closed
            by the client. Without one, the client creates its own (lazily,
            inside the running loop) with a pool of ``max_connections``.
        retry: the :class:`RetryPolicy`.
        rate_limit: requests per second for this client (default 7, Kommo's
            documented limit), a :class:`RateLimiter`, or ``None`` for none.
        timeout: seconds per request attempt, or an ``aiohttp.ClientTimeout``.
        max_connections: connection pool size of the client's own session.
        max_response_bytes: the largest answer body read, in bytes after
            decompression (default 16 MiB; a page of 250 talks is well under
            1 MiB). A larger one is not read further and its connection is
            dropped: a 2xx answer raises :class:`DecodeError`, another is
            handled by its status with the part read (of an error answer,
            at most the first MiB is read).
        trace_configs: aiohttp ``TraceConfig``s for the session the client
            creates (with ``session=``, configure your own session instead).
        tracing: one OpenTelemetry span per call (needs the ``otel`` extra);
            ``None`` (default) follows the ``KOMMO_TALKS_TRACING`` environment
            variable. See the "Logging and metrics" guide.
        sleep: the sleep function of the retry loop and limiter (tests pass a fake).
        clock: the monotonic clock of the retry loop and limiter.
        rng: the random generator of the backoff jitter.

    Use it as ``async with KommoClient(...) as client:`` or call
    :meth:`close`. Redirects are never followed, so the ``Authorization``
    header never leaves the account's host.

    Raises:
        ValueError: a bad ``base_url`` or argument, or ``trace_configs`` with ``session``.
        ImportError: ``tracing=True`` without ``opentelemetry-api`` installed.
    """

    def __init__(
        self,
        base_url: str,
        auth: LongLivedToken | OAuth2 | Auth,
        *,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        rate_limit: float | RateLimiter | None = 7.0,
        timeout: float | aiohttp.ClientTimeout = 30.0,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        trace_configs: Sequence[aiohttp.TraceConfig] | None = None,
        tracing: bool | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        base = normalize_base_url(base_url)
        if not callable(getattr(auth, "access_token", None)):
            raise ValueError(f"auth must be LongLivedToken or OAuth2, got {type(auth).__name__}")
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValueError("session must be an aiohttp.ClientSession")
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise ValueError("retry must be a RetryPolicy")
        _check_count("max_connections", max_connections)
        _check_count("max_response_bytes", max_response_bytes)
        self._pipeline = Pipeline(
            base,
            auth,
            session=session,
            retry=retry,
            limiter=_make_limiter(rate_limit, clock, sleep),
            timeout=_make_timeout(timeout),
            max_connections=max_connections,
            max_response_bytes=max_response_bytes,
            sleep=sleep,
            clock=clock,
            rng=rng if rng is not None else random.Random(),
            trace_configs=_check_trace_configs(trace_configs, session),
            tracer=make_tracer(tracing, base.host or ""),
        )
        self.base_url: str = self._pipeline.base_url
        self.retry = retry

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<KommoClient {self.base_url} {state}>"

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._pipeline.ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session the client owns (a borrowed one stays open). Idempotent.

        A token refresh already sent is waited for (and its new pair saved)
        first: Kommo may have rotated the tokens, and the pair must not be lost.
        """
        await self._pipeline.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._pipeline.closed

    def stats(self) -> ClientStats:
        """A frozen snapshot of what the client has done since it was created.

        See :class:`ClientStats`; the counters cost well under a microsecond
        per request and are always on.
        """
        return self._pipeline.counts.snapshot()

    # -- operations --------------------------------------------------------

    async def get_talk(self, talk_id: int) -> Talk:
        """Fetch one talk.

        Raises:
            ValueError: ``talk_id`` is not a positive int (nothing is sent).
            NotFoundError: no such talk. See :class:`APIError` for the others.
            DecodeError: the answer does not fit :class:`Talk`.
        """
        # The pipeline is called here, not through _talks.get_talk: a coroutine
        # level costs on every suspension of the request.
        pipeline = self._pipeline
        answer = await pipeline.send("GET", _talks.talk_url(pipeline, talk_id))
        return decode(answer, Talk)

    async def close_talk(self, talk_id: int, *, force: bool = False) -> None:
        """Close a talk; with ``force=True`` without launching Kommo's NPS bot.

        Sends ``{"force_close": true}`` with ``force``, else ``{}`` (Kommo's
        default: it may launch the NPS bot instead of closing at once).
        Returns on any 2xx (Kommo answers 202). A 422 raises
        :class:`TalkAlreadyClosedError`, unless an earlier attempt of this same
        call ended ambiguously (timeout, dropped connection, 5xx): that attempt
        may have closed the talk, so the call returns ``None``.

        Raises:
            ValueError: ``talk_id`` is not a positive int (nothing is sent).
        """
        url, body = _talks.close_request(self._pipeline, talk_id, force)
        await self._pipeline.send("POST", url, body=body, kind=_CLOSE)

    async def close_talks(
        self,
        ids: Iterable[int] | AsyncIterable[int],
        *,
        force: bool = False,
        concurrency: int = 10,
        progress: Callable[[CloseOutcome], object] | None = None,
    ) -> list[CloseOutcome]:
        """Close many talks concurrently; one :class:`CloseOutcome` per distinct ID.

        ``ids`` is read lazily. Outcomes come in order of first appearance.
        See :mod:`kommo_talks.batch` for the full rules (stops, cancellation).
        """
        from .batch import close_talks

        return await close_talks(self, ids, force=force, concurrency=concurrency, progress=progress)

    def iter_close_talks(
        self,
        ids: Iterable[int] | AsyncIterable[int],
        *,
        force: bool = False,
        concurrency: int = 10,
    ) -> AsyncGenerator[CloseOutcome, None]:
        """Close many talks; yield each :class:`CloseOutcome` as it completes."""
        from .batch import iter_close_talks

        return iter_close_talks(self, ids, force=force, concurrency=concurrency)

    async def get_talks(
        self,
        ids: Iterable[int] | AsyncIterable[int],
        *,
        concurrency: int = 10,
    ) -> list[Talk | KommoError]:
        """Fetch many talks; one entry (a Talk or the error) per distinct ID, in order."""
        from .batch import get_talks

        return await get_talks(self, ids, concurrency=concurrency)

    def iter_talks(
        self,
        *,
        filter: Mapping[str, Any] | None = None,
        page_size: int = 250,
    ) -> AsyncGenerator[Talk, None]:
        """Iterate over the account's talks, one page at a time.

        Raises:
            ValueError: a bad ``filter`` or ``page_size`` (before any request).
        """
        return iter_talks(self._pipeline, filter=filter, page_size=page_size)

    # -- any other Kommo v4 call ----------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Send any Kommo v4 call through the client's token, limiter, pauses and retries.

        ``path`` is relative to the account (``/api/v4/leads``); an absolute
        URL is accepted only with the client's origin. ``json`` is sent as
        the JSON body; ``headers`` may add headers (``If-Modified-Since``...)
        but not ``Authorization``. GET, HEAD, PUT and DELETE are retried like
        the talk calls; POST and PATCH only when nothing can have been sent
        (a connect failure, a 429), unless ``idempotent=True``
        (``idempotent=False`` turns the retries after an ambiguous attempt off).

        Returns:
            The answer's JSON value; ``None`` for a 204 or an empty body.

        Raises:
            ValueError: a bad argument, another origin (nothing is sent).
            APIError: an error answer, by status (a 422 is a plain ``APIError``).
            TransportError, DecodeError: as for the talk calls.
        """
        return await _calls.request(
            self._pipeline,
            method,
            path,
            params=params,
            json=json,
            headers=headers,
            idempotent=idempotent,
        )

    def paginate(
        self, path: str, *, params: Mapping[str, Any] | None = None, embedded: str
    ) -> AsyncGenerator[Any, None]:
        """Yield the items of ``_embedded[embedded]`` of a Kommo list, page after page.

        Follows each page's ``_links.next`` (on the client's origin only, and
        never to a page already fetched: both raise :class:`DecodeError`);
        a 204, an empty page or a page without a next link ends it. Items are
        the JSON objects as Kommo sends them, e.g.
        ``client.paginate("/api/v4/leads", params={"limit": 250}, embedded="leads")``.

        Raises:
            ValueError: a bad ``path``, ``params`` or ``embedded`` (nothing is sent).
        """
        return paginate(self._pipeline, path, params=params, embedded=embedded)


def _check_trace_configs(
    trace_configs: Sequence[aiohttp.TraceConfig] | None, session: aiohttp.ClientSession | None
) -> list[aiohttp.TraceConfig] | None:
    """The ``trace_configs`` for the client's own session, checked.

    Raises:
        ValueError: not a sequence of ``aiohttp.TraceConfig``, or given with a borrowed session.
    """
    if trace_configs is None:
        return None
    if session is not None:
        raise ValueError(
            "trace_configs applies to the session the client creates; with session=, "
            "configure your own session: aiohttp.ClientSession(trace_configs=[...])"
        )
    if not isinstance(trace_configs, Sequence) or isinstance(trace_configs, str):
        raise ValueError(
            f"trace_configs must be a list of aiohttp.TraceConfig, got {trace_configs!r}"
        )
    configs = list(trace_configs)
    for config in configs:
        if not isinstance(config, aiohttp.TraceConfig):
            raise ValueError(f"trace_configs must hold aiohttp.TraceConfig, got {config!r}")
    return configs


def _make_timeout(timeout: float | aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    if isinstance(timeout, aiohttp.ClientTimeout):
        return timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise ValueError(
            f"timeout must be a positive, finite number of seconds, got {timeout!r} "
            "(for no total limit, pass aiohttp.ClientTimeout(total=None))"
        )
    return aiohttp.ClientTimeout(total=float(timeout))


def _check_count(name: str, value: object) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _make_limiter(
    rate_limit: float | RateLimiter | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[object]],
) -> RateLimiter | None:
    if rate_limit is None:
        return None
    if isinstance(rate_limit, int | float) and not isinstance(rate_limit, bool):
        return SlidingWindowRateLimiter(rate_limit, clock=clock, sleep=sleep)
    if callable(getattr(rate_limit, "acquire", None)):
        return rate_limit  # type: ignore[return-value]
    raise ValueError(f"rate_limit must be a number, a RateLimiter or None, got {rate_limit!r}")
