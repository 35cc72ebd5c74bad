"""The request pipeline: the session, the gates and one driver loop over :func:`sansio.decide`.

Every request, the token endpoint's included, goes through :meth:`Pipeline.send`:
get a token, wait out any server-given pause, take a rate-limit slot, send one
attempt, then do what :func:`~kommo_talks.sansio.decide` says. Nothing here
decides; :mod:`kommo_talks.sansio` does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import cattrs
import orjson
from yarl import URL

from ._session import SessionHolder
from ._tracing import CallSpan, OtelTracer, traced
from ._version import __version__
from .auth import Auth, LongLivedToken
from .converter import converter, describe_validation_error, structure_talk
from .errors import ClientClosedError, DecodeError, redacted
from .models import Talk
from .pause import ServerPause
from .ratelimit import RateLimiter, SlidingWindowRateLimiter
from .retry import RetryPolicy, backoff_delay, is_retryable_exception
from .sansio import SUCCEED, Action, Answer, Kind, Step, Tally, WireFailure, decide
from .stats import CONNECTION, TIMEOUT, Counters, RetryCause
from .urls import normalize_base_url

__all__ = [
    "ERROR_BODY_READ_LIMIT",
    "USER_AGENT",
    "Pipeline",
    "SendGate",
    "decode",
    "decode_json",
    "json_object",
    "token_pipeline",
]

T = TypeVar("T")

logger = logging.getLogger("kommo_talks")

USER_AGENT: Final = (
    f"kommo-talks/{__version__} aiohttp/{aiohttp.__version__} "
    f"Python/{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
)
DEFAULT_RATE: Final = 7.0  # requests per second: Kommo's documented limit
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_MAX_CONNECTIONS: Final = 100
DEFAULT_MAX_RESPONSE_BYTES: Final = 16 * 1024 * 1024
TOKEN_PATH: Final = "/oauth2/access_token"  # noqa: S105 - a path, not a secret
#: The most of an error answer read (within ``max_response_bytes``): enough for
#: any problem+json body, while an exception keeps at most 4 KiB of it.
ERROR_BODY_READ_LIMIT: Final = 1024 * 1024
# A body with a Content-Length within the limit and no Content-Encoding is read
# in one go; any other (chunked, or compressed: its size after decompression is
# unknown) is read in chunks and cut at the limit.
_ENCODING: Final = "Content-Encoding"
_FIRST: Final = Tally()
_CALL: Final = Kind.CALL
_TOKEN_HEADERS: Final = {
    "User-Agent": USER_AGENT,
    "Accept": "application/json",
    "Content-Type": "application/json",
}
Params = Mapping[str, str] | Sequence[tuple[str, str]] | None
_STRUCTURE_HOOKS: dict[type[Any], Callable[[Any, Any], Any]] = {Talk: structure_talk}


class SendGate(Protocol):
    """A veto on sending (a batch's, once it has stopped): each method raises to refuse."""

    def before_waits(self) -> None:
        """Called at the start of every attempt, before its token and gates."""
        ...

    def before_send(self) -> None:
        """Called just before the attempt goes on the wire."""
        ...


class Pipeline:
    """The session, connection permits, server pause, limiter gate and retry driver of a client.

    ``auth`` is ``None`` for a pipeline that only talks to the token endpoint
    (:meth:`OAuth2.exchange_code`). It implements
    :class:`~kommo_talks.auth.TokenEndpoint`.
    """

    def __init__(
        self,
        base: URL,
        auth: Auth | None,
        *,
        session: aiohttp.ClientSession | None,
        retry: RetryPolicy,
        limiter: RateLimiter | None,
        timeout: aiohttp.ClientTimeout,
        max_connections: int,
        max_response_bytes: int,
        sleep: Callable[[float], Awaitable[object]],
        clock: Callable[[], float],
        rng: random.Random,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
        tracer: OtelTracer | None = None,
    ) -> None:
        self.base = base
        self.counts = Counters()
        self._tracer = tracer
        self.base_url = str(base)
        self.auth = auth
        self._static_token = auth.token if isinstance(auth, LongLivedToken) else None
        self.retry = retry
        self._limiter = limiter
        self._timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._pause = ServerPause(clock)
        self._session = SessionHolder(
            session,
            max_connections=max_connections,
            timeout=timeout,
            limiter=limiter,
            trace_configs=trace_configs,
        )
        self._token_url = f"{self.base_url}{TOKEN_PATH}"
        self.talks_url = f"{self.base_url}/api/v4/talks/"
        self._headers_token: str | None = None
        self._get_headers: dict[str, str] = {}
        self._post_headers: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._session.closed

    async def ready(self) -> aiohttp.ClientSession:
        """The session to send with in the running loop (see :meth:`SessionHolder.ready`)."""
        return await self._session.ready()

    async def close(self) -> None:
        """Close the session the pipeline owns, after any token refresh in flight. Idempotent."""
        self._session.closed = True
        try:
            if self.auth is not None:
                await self.auth.aclose()
        finally:  # even if cancelled while waiting: never leave the session open
            await self._session.close()

    # -- the driver --------------------------------------------------------------

    async def send(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        params: Params = None,
        kind: Kind = _CALL,
        gate: SendGate | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send a request under the retry policy; return the answer :func:`decide` accepts.

        ``headers`` are added to the SDK's (``Authorization`` cannot be replaced).
        With tracing on, the call is one span (see :mod:`kommo_talks._tracing`).
        """
        # A closed client fails before anything, a token refresh too. The loop
        # check is inline: a coroutine per request costs more than the check.
        holder = self._session
        if holder.loop is asyncio.get_running_loop():
            holder.current()
        else:  # first use, or a new event loop
            await holder.ready()
        span = None if self._tracer is None else self._tracer.start(method, url)
        tally = _FIRST
        try:
            while True:
                if gate is not None:
                    gate.before_waits()
                self._refuse_during_long_pause(method, url)
                # A long-lived token needs no await, and with no limiter and no pause
                # there is nothing to wait for: the common path skips two coroutines.
                token = self._static_token or await self.auth.access_token(self)  # type: ignore[union-attr]
                sent = self._headers_for(token, post=body is not None)
                if headers:
                    sent = {**headers, **sent}
                outcome = await self._exchange(
                    method, url, body, sent, params, gate, (token,), tally.attempt
                )
                step = decide(tally, outcome, self.retry, kind)
                if span is not None:
                    _note_attempt(span, tally.attempt, outcome, step is SUCCEED)
                if step is SUCCEED:
                    return outcome  # type: ignore[return-value]
                tally = await self._carry_out(step, method, url, token, outcome, span)
        except BaseException as exc:
            if span is not None:
                span.finish(exc)
            raise

    async def _carry_out(
        self,
        step: Step,
        method: str,
        url: str,
        token: str | None,
        outcome: Answer | WireFailure,
        span: CallSpan | None,
    ) -> Tally:
        """Do what a step other than SUCCEED asks; return the next attempt's tally.

        A retry is counted (and noted on the call's span) once it is certain.
        """
        if step.pause is not None and step.pause_error is not None:
            self.counts.on_pause(self._pause.extend(step.pause, step.pause_error))
        action = step.action
        if action is Action.BACK_OFF:
            _retried(self.counts, outcome, span)
            await self._sleep(backoff_delay(self.retry, step.tally.attempt - 1, self._rng))
        elif action is Action.REFRESH:
            assert step.error is not None
            assert self.auth is not None
            assert token is not None
            self._refuse_during_long_pause(method, url)
            if not (await self.auth.handle_unauthorized(self, token) and step.retry):
                raise step.error
            _retried(self.counts, outcome, span)
        elif action is Action.GIVE_UP:
            assert step.error is not None
            raise step.error
        else:  # the gates wait the pause out; a success is always the SUCCEED value
            assert action is Action.WAIT_PAUSE, action
            _retried(self.counts, outcome, span)
        return step.tally

    async def request_tokens(self, payload: Mapping[str, str]) -> dict[str, Any]:
        """POST to ``{base_url}/oauth2/access_token`` and return the JSON object answered.

        Goes through the same rate limiter and server-given pauses as every
        other request; retried like one under the :class:`RetryPolicy`.

        Raises:
            TokenRefreshError: the endpoint refused (400/401, carrying the
                problem's ``hint``), answered otherwise, or kept failing.
        """
        tracer, run = self._tracer, partial(self._tokens, payload)
        answer = await (
            run(None) if tracer is None else traced(tracer, "POST", self._token_url, run)
        )
        self.counts.on_refresh()
        return answer

    async def _tokens(self, payload: Mapping[str, str], span: CallSpan | None) -> dict[str, Any]:
        """The retry loop of :meth:`request_tokens`."""
        await self.ready()
        method, url = "POST", self._token_url
        data = orjson.dumps(dict(payload))
        secrets = [payload[k] for k in ("client_secret", "refresh_token", "code") if k in payload]
        tally = _FIRST
        while True:
            outcome = await self._exchange(
                method, url, data, _TOKEN_HEADERS, None, None, secrets, tally.attempt
            )
            step = decide(tally, outcome, self.retry, Kind.TOKEN)
            if span is not None:
                _note_attempt(span, tally.attempt, outcome, step is SUCCEED)
            if step is SUCCEED:
                assert isinstance(outcome, Answer)
                return json_object(outcome)
            tally = await self._carry_out(step, method, url, None, outcome, span)

    def _refuse_during_long_pause(self, method: str, url: str) -> None:
        """Raise if a server-given pause lasts longer than ``max_delay``: send nothing."""
        remaining = self._pause.remaining()
        if remaining > self.retry.max_delay:
            raise self._pause.error_for(method, url, remaining)

    async def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        params: Params,
        gate: SendGate | None,
        secrets: Iterable[str],
        attempt: int,
    ) -> Answer | WireFailure:
        """One attempt: pass the gates, send holding a connection permit (gate errors propagate)."""
        slots = self._session.slots
        if slots is not None:
            await slots.acquire()
        try:
            if self._limiter is not None or self._pause.remaining() > 0:
                await self._pass_gates(method, url)
            if gate is not None:
                gate.before_send()
            session = self._session.current()  # after the waits: a closed client sends nothing
            started = self._clock()
            self.counts.on_send(method)
            answer: Answer | None = None
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
                    limit = _read_limit(raw, self.max_response_bytes)
                    if limit is None:  # a Talk: one read
                        read, whole = await raw.read(), True
                    else:
                        read, whole = await _read_capped(raw, limit)
                    answer = Answer(raw.status, raw.headers, read, method, url, whole)
            except Exception as exc:
                closed = self._session.closed
                return _triage(exc, method, url, closed, self._clock, started, secrets, attempt)
            finally:
                self.counts.on_done(None if answer is None else answer.status)
        finally:
            if slots is not None:
                slots.release()
        return _received(answer, self.max_response_bytes, self._clock, started, secrets, attempt)

    async def _pass_gates(self, method: str, url: str) -> None:
        """Wait out the client-wide server pause, then take a rate-limit slot.

        A pause that begins while the request waits for its slot is waited out
        too, and a fresh slot is taken after it: nothing is sent during a pause.
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
            self.counts.on_limiter_wait(self._clock() - asked)
            if pause.remaining() <= 0:
                return

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


def _triage(
    failure: Exception,
    method: str,
    url: str,
    closed: bool,
    clock: Callable[[], float],
    started: float,
    secrets: Iterable[str],
    attempt: int,
) -> WireFailure:
    """The facts of a request that failed on the wire (logged); ``closed``: the client was closed.

    Raises:
        ClientClosedError: the client was closed while the request was in flight.
        Exception: ``failure`` itself when it is not a connection failure (a bug).
    """
    if closed:
        raise ClientClosedError(
            f"{method} {url}: the KommoClient was closed during the request"
        ) from redacted(failure, secrets)
    retryable = is_retryable_exception(failure)
    if not retryable and not isinstance(failure, aiohttp.ClientError):
        raise failure
    _log(clock, method, url, type(failure).__name__, started, attempt)
    connect = isinstance(failure, aiohttp.ClientConnectorError)
    # aiohttp's exception may hold the request, Authorization included.
    return WireFailure(method, url, redacted(failure, secrets), connect, retryable)


def _received(
    answer: Answer,
    max_bytes: int,
    clock: Callable[[], float],
    started: float,
    secrets: Iterable[str],
    attempt: int,
) -> Answer:
    """Log an answer; redact a failed one's body. A cut 2xx raises :class:`DecodeError`."""
    status = answer.status
    if not answer.whole and 200 <= status < 300:
        raise DecodeError(
            f"{answer.method} {answer.url} returned {status} with a body larger than "
            f"max_response_bytes ({max_bytes} bytes); it was not read further",
            status=status,
        )
    _log(clock, answer.method, answer.url, status, started, attempt)
    if not 200 <= status < 300:
        answer = answer.redacted(secrets)  # an echo must not leak a secret
    return answer


def _log(
    clock: Callable[[], float],
    method: str,
    url: str,
    status: int | str,
    started: float,
    attempt: int,
) -> None:
    """One DEBUG line per attempt: the path only (never the query), status, time, attempt."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s %s -> %s in %.1f ms (attempt %d)",
            method,
            URL(url).path,
            status,
            (clock() - started) * 1000,
            attempt,
        )


def _read_limit(raw: aiohttp.ClientResponse, max_bytes: int) -> int | None:
    """The most of the body to read, or None to read it in one go.

    A body with a Content-Length within the limit and no Content-Encoding
    is read in one go; any other (chunked, or compressed: its size after
    decompression is unknown) is read in chunks and cut at the limit (an
    error answer's at :data:`ERROR_BODY_READ_LIMIT`).
    """
    limit = max_bytes
    if not 200 <= raw.status < 300:
        limit = min(limit, ERROR_BODY_READ_LIMIT)
    length = raw.content_length
    if length is not None and length <= limit and _ENCODING not in raw.headers:
        return None
    return limit


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


def token_pipeline(
    base_url: str,
    *,
    session: aiohttp.ClientSession | None = None,
    retry: RetryPolicy | None = None,
) -> Pipeline:
    """A pipeline without auth for the token endpoint alone, with a client's defaults.

    Raises:
        ValueError: a bad ``base_url``, ``session`` or ``retry``.
    """
    if session is not None and not isinstance(session, aiohttp.ClientSession):
        raise ValueError("session must be an aiohttp.ClientSession")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ValueError("retry must be a RetryPolicy")
    return Pipeline(
        normalize_base_url(base_url),
        None,
        session=session,
        retry=retry or RetryPolicy(),
        limiter=SlidingWindowRateLimiter(DEFAULT_RATE),
        timeout=aiohttp.ClientTimeout(total=DEFAULT_TIMEOUT),
        max_connections=DEFAULT_MAX_CONNECTIONS,
        max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES,
        sleep=asyncio.sleep,
        clock=time.monotonic,
        rng=random.Random(),
    )


def decode_json(answer: Answer) -> Any:
    """The JSON value of an answer's body, or raise :class:`DecodeError`."""
    try:
        return orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _not_json(answer) from None


def _not_json(answer: Answer) -> DecodeError:
    what = "an empty body" if not answer.body else "a body that is not JSON"
    return DecodeError(
        f"{answer.method} {answer.url} returned {answer.status} with {what} "
        f"(Content-Type {answer.content_type or 'missing'})",
        status=answer.status,
    )


def json_object(answer: Answer) -> dict[str, Any]:
    """The JSON object of an answer's body, or raise :class:`DecodeError`."""
    try:  # not through decode_json: a call less on every talk
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise _not_json(answer) from None
    if type(data) is not dict:
        raise DecodeError(
            f"{answer.method} {answer.url} returned {answer.status} with a JSON "
            f"{type(data).__name__}, expected an object",
            status=answer.status,
        )
    return data


def decode(answer: Answer, cls: type[T]) -> T:
    """Decode a JSON answer into ``cls``, or raise :class:`DecodeError`."""
    data = json_object(answer)
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
            f"{answer.method} {answer.url} returned {answer.status} with a body "
            f"that does not fit {cls.__name__}: {text}",
            status=answer.status,
            path=path,
        ) from None


def _retry_cause(outcome: Answer | WireFailure) -> RetryCause:
    """Why a failed attempt is retried: its status, or how it failed on the wire."""
    if isinstance(outcome, Answer):
        return outcome.status
    return TIMEOUT if isinstance(outcome.cause, TimeoutError) else CONNECTION


def _retried(counts: Counters, outcome: Answer | WireFailure, span: CallSpan | None) -> None:
    """Count a retry of ``outcome``'s attempt, and note its cause on the call's span."""
    cause = _retry_cause(outcome)
    counts.on_retry(cause)
    if span is not None:
        span.retry(cause)


def _note_attempt(span: CallSpan, attempt: int, outcome: Answer | WireFailure, last: bool) -> None:
    """Note an attempt on the call's span (its status, or the class of its failure).

    With ``last`` (the call succeeded), the span ends.
    """
    if isinstance(outcome, Answer):
        span.attempt(attempt, outcome.status, None)
    else:
        span.attempt(attempt, None, type(outcome.cause).__name__)
    if last:
        span.finish(None)
