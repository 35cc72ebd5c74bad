"""``KommoClient``: the session's lifecycle and the request pipeline.

Every request goes through one short recipe (:meth:`KommoClient._send`):
get a token, wait out any server-given pause, take a rate-limit slot, send one
attempt, then ask the pure functions of :mod:`kommo_talks.retry` and
:mod:`kommo_talks.problems` what the answer means.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
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
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import aiohttp
import cattrs
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from ._tracing import CallSpan, OtelTracer, make_tracer
from ._version import __version__
from .auth import Auth, LongLivedToken
from .converter import converter, describe_validation_error, structure_talk
from .errors import (
    APIError,
    ClientClosedError,
    DecodeError,
    KommoError,
    RateLimitError,
    ServerError,
    TokenRefreshError,
    TransportError,
    redacted,
)
from .models import CloseOutcome, Talk
from .pause import ServerPause
from .problems import make_api_error, parse_problem, redact
from .ratelimit import RateLimiter, SlidingWindowRateLimiter
from .retry import (
    RetryPolicy,
    backoff_delay,
    is_retryable_exception,
    is_retryable_status,
    server_wait,
)
from .stats import CONNECTION, TIMEOUT, ClientStats, Counters, RetryCause
from .urls import normalize_base_url

if TYPE_CHECKING:
    from .oauth import OAuth2

__all__ = ["KommoClient"]

T = TypeVar("T")

logger = logging.getLogger("kommo_talks")

USER_AGENT: Final = (
    f"kommo-talks/{__version__} aiohttp/{aiohttp.__version__} "
    f"Python/{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
)
# Without force, no force_close at all: the reference says Kommo's NPS bot is
# launched only when none is supplied, so the SDK leaves Kommo's default alone.
_CLOSE_BODIES: Final = {True: orjson.dumps({"force_close": True}), False: b"{}"}
_STRUCTURE_HOOKS: dict[type[Any], Callable[[Any, Any], Any]] = {Talk: structure_talk}
_TOKEN_PATH: Final = "/oauth2/access_token"  # noqa: S105 - a path, not a secret
DEFAULT_MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
#: The most of an error answer read (within ``max_response_bytes``): enough for
#: any problem+json body, while an exception keeps at most 4 KiB of it.
ERROR_BODY_READ_LIMIT: Final = 1024 * 1024
# A body with a Content-Length within the limit and no Content-Encoding is read
# in one go; any other (chunked, or compressed: its size after decompression is
# unknown) is read in chunks and cut at the limit.
_ENCODING: Final = "Content-Encoding"

#: A batch's veto on sending (see :mod:`kommo_talks.batch`), set in its worker
#: tasks only. Every attempt of a talk request calls it with ``False`` before
#: its waits (token, server pause, rate limiter) and with ``True`` just before
#: the request goes on the wire; it raises to refuse, once the batch has stopped.
send_gate: ContextVar[Callable[[bool], None] | None] = ContextVar(
    "kommo_talks_send_gate", default=None
)


def check_talk_id(talk_id: object) -> int:
    """Return ``talk_id`` if it is a positive ``int`` (not a ``bool``), else raise ValueError."""
    if type(talk_id) is not int or talk_id <= 0:
        raise ValueError(f"talk_id must be a positive int, got {talk_id!r}")
    return talk_id


class Response:
    """One HTTP answer (internal); ``whole`` is false when the body was cut at the size limit."""

    __slots__ = ("body", "headers", "method", "status", "url", "whole")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        body: bytes,
        method: str,
        url: str,
        whole: bool = True,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.method = method
        self.url = url
        self.whole = whole

    @property
    def content_type(self) -> str | None:
        """The Content-Type header, or None."""
        return self.headers.get("Content-Type")


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
        self._base = normalize_base_url(base_url)
        self.base_url: str = str(self._base)
        if not callable(getattr(auth, "access_token", None)):
            raise ValueError(f"auth must be LongLivedToken or OAuth2, got {type(auth).__name__}")
        self._auth: Auth = auth
        self._static_token = auth.token if isinstance(auth, LongLivedToken) else None
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ValueError("session must be an aiohttp.ClientSession")
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise ValueError("retry must be a RetryPolicy")
        self.retry = retry
        self._timeout = _make_timeout(timeout)
        if type(max_connections) is not int or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
        self._max_connections = max_connections
        if type(max_response_bytes) is not int or max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be an int >= 1, got {max_response_bytes!r}")
        self._max_response_bytes = max_response_bytes
        self._sleep = sleep
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._limiter: RateLimiter | None
        if rate_limit is None:
            self._limiter = None
        elif isinstance(rate_limit, int | float) and not isinstance(rate_limit, bool):
            self._limiter = SlidingWindowRateLimiter(rate_limit, clock=clock, sleep=sleep)
        elif callable(getattr(rate_limit, "acquire", None)):
            self._limiter = rate_limit  # type: ignore[assignment]
        else:
            raise ValueError(
                f"rate_limit must be a number, a RateLimiter or None, got {rate_limit!r}"
            )
        self._pause = ServerPause(clock)
        self._trace_configs = _check_trace_configs(trace_configs, session)
        self._counts = Counters()
        self._tracer = make_tracer(tracing, self._base.host or "")
        self._session = session
        self._session_loop: asyncio.AbstractEventLoop | None = None  # where it was first used
        self._owns_session = session is None
        self._closed = False
        # With a rate limit: one permit per pooled connection (see _connection_slots).
        self._slots = None if session is None else _connection_slots(session, self._limiter)
        self._talks_url = f"{self.base_url}/api/v4/talks/"
        self._token_url = f"{self.base_url}{_TOKEN_PATH}"
        self._headers_token: str | None = None
        self._get_headers: dict[str, str] = {}
        self._post_headers: dict[str, str] = {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<KommoClient {self.base_url} {state}>"

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._ready()
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
        self._closed = True
        settle = getattr(self._auth, "_settle", None)  # OAuth2's refresh in flight
        try:
            if settle is not None:
                await settle()
        finally:  # even if cancelled while waiting: never leave the session open
            session, self._session = self._session, None
            if session is not None and self._owns_session and not session.closed:
                await session.close()

    def stats(self) -> ClientStats:
        """A frozen snapshot of what the client has done since it was created."""
        return self._counts.snapshot()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def _session_or_raise(self) -> aiohttp.ClientSession:
        session = self._session
        if self._closed:
            raise ClientClosedError("this KommoClient is closed")
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                auto_decompress=True,
                trace_configs=self._trace_configs,
            )
            self._slots = _connection_slots(session, self._limiter)
            self._session_loop = asyncio.get_running_loop()
        elif session.closed:
            raise ClientClosedError("the aiohttp session lent to this KommoClient is closed")
        elif self._session_loop is None:  # a lent session's first use
            self._session_loop = asyncio.get_running_loop()
        return session

    async def _ready(self) -> aiohttp.ClientSession:
        """The session to send with in the running loop; raise if the client cannot send.

        A client used again in a new event loop (a second ``asyncio.run()``)
        with its own session opens a new one there: the old one, whose loop
        has closed, is closed without touching that loop (Python may report
        its pooled sockets as ``ResourceWarning: unclosed transport``; close
        the client in each loop to avoid that).

        Raises:
            ClientClosedError: the client is closed, the session lent to it
                is closed or belongs to another event loop, or its own session
                belongs to another event loop that is still open.
        """
        loop = asyncio.get_running_loop()
        old_loop = self._session_loop
        if old_loop is not None and old_loop is not loop and not self._closed:
            if not self._owns_session:
                raise ClientClosedError(
                    "the aiohttp session lent to this KommoClient belongs to another event "
                    "loop: lend it a session created in this loop, or use one client per loop"
                )
            if not old_loop.is_closed():
                raise ClientClosedError(
                    "this KommoClient's session belongs to another event loop that is still "
                    "open: close the client there first, or use one client per loop"
                )
            old, self._session, self._session_loop = self._session, None, None
            if old is not None:
                await old.close()  # its loop is closed: aiohttp leaves that loop alone
        return self._session_or_raise()

    def _refuse_during_long_pause(self, method: str, url: str) -> None:
        """Raise if a server-given pause lasts longer than ``max_delay``: send nothing.

        Checked before a token is fetched, so that not even a token refresh
        is sent during such a pause, and the error names this call's request.
        """
        remaining = self._pause.remaining()
        if remaining > self.retry.max_delay:
            raise self._pause.error_for(method, url, remaining)

    # -- operations --------------------------------------------------------

    async def get_talk(self, talk_id: int) -> Talk:
        """Fetch one talk.

        Raises:
            ValueError: ``talk_id`` is not a positive int (nothing is sent).
            NotFoundError: no such talk. See :class:`APIError` for the others.
            DecodeError: the answer does not fit :class:`Talk`.
        """
        url = self._talks_url + str(check_talk_id(talk_id))
        response = await self._send("GET", url)
        return self.decode(response, Talk)

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
        url = self._talks_url + str(check_talk_id(talk_id)) + "/close"
        if not isinstance(force, bool):
            raise ValueError(f"force must be a bool, got {force!r}")
        await self._send("POST", url, body=_CLOSE_BODIES[force], closing=True)

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
        from .listing import iter_talks

        return iter_talks(self, filter=filter, page_size=page_size)

    # -- decoding ------------------------------------------------------------

    def decode(self, response: Response, cls: type[T]) -> T:
        """Decode a JSON answer into ``cls``, or raise :class:`DecodeError`."""
        data = self.parse_json(response)
        if type(data) is not dict:
            raise DecodeError(
                f"{response.method} {response.url} returned {response.status} with a JSON "
                f"{type(data).__name__}, expected an object",
                status=response.status,
            )
        hook = _STRUCTURE_HOOKS.get(cls)
        if hook is None:
            # The converter's dispatch costs more than the generated hook itself:
            # look the hook up once per class and call it directly afterwards.
            hook = _STRUCTURE_HOOKS[cls] = converter.get_structure_hook(cls)
        try:
            return hook(data, cls)  # type: ignore[no-any-return]
        except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
            text, path = describe_validation_error(exc)
            raise DecodeError(
                f"{response.method} {response.url} returned {response.status} with a body "
                f"that does not fit {cls.__name__}: {text}",
                status=response.status,
                path=path,
            ) from None

    @staticmethod
    def parse_json(response: Response) -> Any:
        """The JSON value of a response body, or raise :class:`DecodeError`."""
        try:
            return orjson.loads(response.body)
        except orjson.JSONDecodeError:
            what = "an empty body" if not response.body else "a body that is not JSON"
            raise DecodeError(
                f"{response.method} {response.url} returned {response.status} with {what} "
                f"(Content-Type {response.content_type or 'missing'})",
                status=response.status,
            ) from None

    # -- the request pipeline -------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        closing: bool = False,
    ) -> Awaitable[Response]:
        """Send a request under the retry policy; return a success answer.

        With ``closing``, a 422 after an ambiguous attempt is returned as a
        success (the earlier attempt closed the talk), and a first-attempt
        422 raises :class:`TalkAlreadyClosedError`. With tracing on, the call
        is one span (see :mod:`kommo_talks._tracing`); off, this adds no
        coroutine to the call.
        """
        if self._tracer is None:
            return self._attempts(method, url, body, params, closing, None)
        return self._traced(method, url, body, params, closing, self._tracer)

    async def _traced(
        self,
        method: str,
        url: str,
        body: bytes | None,
        params: Mapping[str, str] | None,
        closing: bool,
        tracer: OtelTracer,
    ) -> Response:
        """:meth:`_attempts` inside the call's span."""
        span = tracer.start(method, url)
        try:
            response = await self._attempts(method, url, body, params, closing, span)
        except BaseException as exc:
            span.finish(exc)
            raise
        span.finish(None)
        return response

    async def _attempts(
        self,
        method: str,
        url: str,
        body: bytes | None,
        params: Mapping[str, str] | None,
        closing: bool,
        span: CallSpan | None,
    ) -> Response:
        """The retry loop of :meth:`_send`."""
        # A closed client fails before anything, a token refresh too. The loop
        # check is inline: a coroutine per request costs more than the check.
        if self._session_loop is asyncio.get_running_loop():
            self._session_or_raise()
        else:  # first use, or a new event loop
            await self._ready()
        policy = self.retry
        auth = self._auth
        static_token = self._static_token
        attempt = 0
        ambiguous = False
        refreshed = False
        gate = send_gate.get()
        while True:
            attempt += 1
            if gate is not None:
                gate(False)
            self._refuse_during_long_pause(method, url)
            # A long-lived token needs no await, and with no limiter and no pause
            # there is nothing to wait for: the common path skips two coroutines.
            token = static_token or await auth.access_token(self)
            headers = self._headers_for(token, post=body is not None)
            response, started = await self._exchange(method, url, body, headers, params, gate)
            if not isinstance(response, Response):
                failure = response
                if span is not None:
                    span.attempt(attempt, None, type(failure).__name__)
                retryable = self._triage(failure, method, url, started, attempt, (token,))
                # A failed connect sent nothing; anything later may have landed.
                ambiguous = ambiguous or not isinstance(failure, aiohttp.ClientConnectorError)
                if not retryable or attempt >= policy.max_attempts:
                    # aiohttp's exception may hold the request, Authorization included.
                    cause = redacted(failure, (token,))
                    raise TransportError(
                        f"{method} {url} failed after {attempt} attempt(s): {_describe(cause)}",
                        request_method=method,
                        request_url=url,
                    ) from cause
                self._retrying(span, TIMEOUT if isinstance(failure, TimeoutError) else CONNECTION)
                await self._sleep(backoff_delay(policy, attempt, self._rng))
                continue

            status = response.status
            if span is not None:
                span.attempt(attempt, status, None)
            self._log(method, url, status, started, attempt)
            if 200 <= status < 300:
                return response
            # An echo must not leak the token, not even a part of it at a cut.
            response.body = redact(response.body, (token,), cut=not response.whole)
            if status == 422 and closing and ambiguous:
                return response
            if status == 401 and not refreshed:
                refreshed = True
                self._refuse_during_long_pause(method, url)
                if await auth.handle_unauthorized(self, token) and attempt < policy.max_attempts:
                    self._retrying(span, status)
                    continue
            if not is_retryable_status(status):
                raise self._error(response, closing=closing)

            problem, _ = parse_problem(response.content_type, response.body)
            wait, error = self._honour_server_wait(response, problem)
            if wait is not None and wait > policy.max_delay:
                raise error
            if status != 429:
                ambiguous = True
            if attempt >= policy.max_attempts:
                raise error
            self._retrying(span, status)
            if wait is None:
                await self._sleep(backoff_delay(policy, attempt, self._rng))
            # else: the client-wide pause makes the next pass of the gates wait.

    def _retrying(self, span: CallSpan | None, cause: RetryCause) -> None:
        """Count a retry and note its cause on the call's span."""
        self._counts.on_retry(cause)
        if span is not None:
            span.retry(cause)

    async def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
        gate: Callable[[bool], None] | None = None,
    ) -> tuple[Response | Exception, float]:
        """One attempt on the wire: pass the gates, then send, holding a connection permit.

        Returns the answer, or the exception of a request that failed (the
        caller decides on a retry once the permit is free), and the clock
        reading at the send. What the gates raise (a long pause, a closed
        client, a stopped batch) propagates.
        """
        slots = self._slots
        if slots is not None:
            await slots.acquire()
        try:
            if self._limiter is not None or self._pause.remaining() > 0:
                await self._pass_gates(method, url)
            if gate is not None:
                gate(True)
            # Taken after every wait: a client closed meanwhile sends nothing.
            session = self._session_or_raise()
            started = self._clock()
            counts = self._counts
            counts.on_send(method)
            status: int | None = None
            try:
                async with session.request(
                    method,
                    url,
                    params=params,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    raise_for_status=False,
                    timeout=self._timeout,
                ) as raw:
                    limit = self._max_response_bytes
                    if not 200 <= raw.status < 300:
                        limit = min(limit, ERROR_BODY_READ_LIMIT)
                    length = raw.content_length
                    if length is not None and length <= limit and _ENCODING not in raw.headers:
                        read, whole = await raw.read(), True  # a Talk: one read, as before
                    else:
                        read, whole = await _read_capped(raw, limit)
                    answer = Response(raw.status, raw.headers, read, method, url, whole)
                    status = raw.status
            except Exception as exc:
                return exc, started
            finally:
                counts.on_done(status)
            if not whole and 200 <= answer.status < 300:
                raise DecodeError(
                    f"{method} {url} returned {answer.status} with a body larger than "
                    f"max_response_bytes ({self._max_response_bytes} bytes); "
                    "it was not read further",
                    status=answer.status,
                )
            return answer, started
        finally:
            if slots is not None:
                slots.release()

    def _triage(
        self,
        failure: Exception,
        method: str,
        url: str,
        started: float,
        attempt: int,
        secrets: Iterable[str],
    ) -> bool:
        """Log a request that failed on the wire; True if retrying it may help.

        Raises:
            ClientClosedError: the client was closed while the request was in
                flight (its cause is a stand-in for ``failure`` without
                ``secrets``: see :func:`~kommo_talks.errors.redacted`).
            Exception: ``failure`` itself, when it is not a connection failure
                (a bug). A connection failure that retrying cannot heal (TLS
                verification) returns False: the caller ends it as its own error.
        """
        if self._closed:
            raise ClientClosedError(
                f"{method} {url}: the KommoClient was closed during the request"
            ) from redacted(failure, secrets)
        retryable = is_retryable_exception(failure)
        if not retryable and not isinstance(failure, aiohttp.ClientError):
            raise failure
        self._log(method, url, type(failure).__name__, started, attempt)
        return retryable

    async def _pass_gates(self, method: str, url: str) -> None:
        """Wait out the client-wide server pause, then take a rate-limit slot.

        A pause that begins while the request waits for its slot is waited out
        too, and a fresh slot is taken after it: nothing is sent during a
        pause, and a slot taken before the wait would not match the send time.
        """
        pause = self._pause
        limiter = self._limiter
        while True:
            remaining = pause.remaining()
            while remaining > 0:
                if remaining > self.retry.max_delay:
                    raise pause.error_for(method, url, remaining)
                await self._sleep(remaining)
                remaining = pause.remaining()
            if limiter is None:
                return
            asked = self._clock()
            await limiter.acquire()
            self._counts.on_limiter_wait(self._clock() - asked)
            if pause.remaining() <= 0:
                return

    def _honour_server_wait(
        self, response: Response, problem: dict[str, Any]
    ) -> tuple[float | None, RateLimitError | ServerError]:
        """The wait a 429/5xx asked for (or None), and its error; a wait pauses the client."""
        wait = server_wait(response.status, response.headers.get("Retry-After"), problem)
        error = self._error(response, retry_after=wait)
        assert isinstance(error, RateLimitError | ServerError)
        if wait is not None:
            before = max(0.0, self._pause.remaining())
            self._pause.extend(wait, error)
            self._counts.on_pause(max(0.0, self._pause.remaining()) - before)
        return wait, error

    def _headers_for(self, token: str, *, post: bool) -> dict[str, str]:
        # Built once per token, not per request: the hot path reuses the dicts.
        if token is not self._headers_token:
            base = {
                "Authorization": f"Bearer {token}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            }
            self._get_headers = base
            self._post_headers = {**base, "Content-Type": "application/json"}
            self._headers_token = token
        return self._post_headers if post else self._get_headers

    def _error(
        self, response: Response, *, closing: bool = False, retry_after: float | None = None
    ) -> APIError:
        return make_api_error(
            response.status,
            response.content_type,
            response.body,
            request_method=response.method,
            request_url=response.url,
            request_id=response.headers.get("X-Request-Id"),
            closing=closing,
            retry_after=retry_after,
        )

    def _log(self, method: str, url: str, status: int | str, started: float, attempt: int) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %s in %.1f ms (attempt %d)",
                method,
                URL(url).path,
                status,
                (self._clock() - started) * 1000,
                attempt,
            )

    # -- the token endpoint (used by OAuth2) -----------------------------------

    async def request_tokens(self, payload: Mapping[str, str]) -> dict[str, Any]:
        """POST to ``{base_url}/oauth2/access_token`` and return the JSON answer.

        Used by :class:`OAuth2`; goes through the same rate limiter and
        server-given pauses as every other request. Network failures, 429,
        500, 502, 503 and 504 are retried with the same payload under the
        client's :class:`RetryPolicy` (its own attempt budget).

        Raises:
            TokenRefreshError: the endpoint refused (400/401, carrying the
                problem's ``hint``), answered otherwise, or kept failing.
        """
        tracer = self._tracer
        if tracer is None:
            return await self._request_tokens(payload, None)
        span = tracer.start("POST", self._token_url)
        try:
            answer = await self._request_tokens(payload, span)
        except BaseException as exc:
            span.finish(exc)
            raise
        span.finish(None)
        return answer

    async def _request_tokens(
        self, payload: Mapping[str, str], span: CallSpan | None
    ) -> dict[str, Any]:
        """The retry loop of :meth:`request_tokens`."""
        await self._ready()
        policy = self.retry
        method, url = "POST", self._token_url
        data = orjson.dumps(dict(payload))
        secrets = _secrets_of(payload)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        attempt = 0
        while True:
            attempt += 1
            response, started = await self._exchange(method, url, data, headers)
            if not isinstance(response, Response):
                failure = response
                if span is not None:
                    span.attempt(attempt, None, type(failure).__name__)
                retryable = self._triage(failure, method, url, started, attempt, secrets)
                if not retryable or attempt >= policy.max_attempts:
                    cause = redacted(failure, secrets)
                    raise TokenRefreshError(
                        f"the token endpoint could not be reached after {attempt} attempt(s): "
                        f"{_describe(cause)}"
                    ) from cause
                self._retrying(span, TIMEOUT if isinstance(failure, TimeoutError) else CONNECTION)
                await self._sleep(backoff_delay(policy, attempt, self._rng))
                continue
            status = response.status
            if span is not None:
                span.attempt(attempt, status, None)
            self._log(method, url, status, started, attempt)
            if status == 200:
                self._counts.on_refresh()
                body = self.parse_json(response)
                if type(body) is not dict:
                    raise DecodeError(
                        f"{method} {url} returned {status} with a JSON {type(body).__name__}, "
                        "expected an object",
                        status=status,
                    )
                return body
            response.body = redact(response.body, secrets, cut=not response.whole)
            problem, text = parse_problem(response.content_type, response.body)
            if is_retryable_status(status):
                # The server-given wait pauses the whole client even when this
                # was the last attempt: the other calls must not send through it.
                wait, error = self._honour_server_wait(response, problem)
                if wait is not None and wait > policy.max_delay:
                    raise _token_error(status, problem, text, attempt) from error
                if attempt < policy.max_attempts:
                    self._retrying(span, status)
                    if wait is None:
                        await self._sleep(backoff_delay(policy, attempt, self._rng))
                    continue
            raise _token_error(status, problem, text, attempt)


async def _read_capped(raw: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body of ``raw`` (decompressed), at most ``limit`` bytes, and whether it is whole.

    A body that would pass the limit is not read further and its connection
    is dropped. aiohttp decompresses in bounded steps as the body is read,
    so a compressed bomb costs no more memory than the limit.
    """
    chunks: list[bytes] = []
    size = 0
    content = raw.content
    while chunk := await content.readany():
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: len(chunk) - (size - limit)])
            raw.close()  # drop the connection: the rest is never read
            return b"".join(chunks), False
        chunks.append(chunk)
    return b"".join(chunks), True


def _connection_slots(
    session: aiohttp.ClientSession, limiter: RateLimiter | None
) -> asyncio.Semaphore | None:
    """One permit per connection the session's pool allows, when a rate limit applies.

    A request takes a permit before its rate-limit slot and gives it back once
    answered. Requests that would wait for a free connection wait here instead,
    so the limiter's slots stay the send times: requests queued in the pool
    would otherwise go out together, over the limit. ``None`` without a limiter
    or without a pool limit.
    """
    if limiter is None:
        return None
    connector = session.connector
    limits = [
        limit
        for limit in (getattr(connector, "limit", 0), getattr(connector, "limit_per_host", 0))
        if isinstance(limit, int) and limit > 0
    ]
    return asyncio.Semaphore(min(limits)) if limits else None


def _secrets_of(payload: Mapping[str, str]) -> list[str]:
    """The values of a token request that an echoed error body must not show."""
    return [payload[key] for key in ("client_secret", "refresh_token", "code") if key in payload]


def _token_error(
    status: int, problem: dict[str, Any], text: str | None, attempts: int
) -> TokenRefreshError:
    hint = problem.get("hint") if isinstance(problem.get("hint"), str) else None
    title = problem.get("title") if isinstance(problem.get("title"), str) else None
    if status in (400, 401):
        message = f"the token endpoint refused the request ({status}"
        message += f" {title})" if title else ")"
        if hint:
            message += f": {hint}"
        if title and "client" in title.lower():  # "Invalid client": wrong ID, secret or URI
            message += "; check the integration's client ID, client secret and redirect URI"
        else:
            message += "; the integration needs to be authorized again"
    else:
        message = f"the token endpoint answered {status} after {attempts} attempt(s)"
        detail = problem.get("detail") if problem else text
        if isinstance(detail, str) and detail:
            message += f": {detail[:200]}"
    block = status == 403 and not problem  # Kommo's block page, not a JSON problem
    if block:
        message += " (Kommo blocks this IP or account)"
    return TokenRefreshError(message, status=status, hint=hint, problem=problem, is_block=block)


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


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
