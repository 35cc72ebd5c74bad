"""The request loop's decisions, as pure functions over plain values (no I/O).

Every attempt ends in an :class:`Answer` (the server's reply) or a
:class:`WireFailure` (the request failed on the wire). :func:`decide` reads
it with the :class:`Tally` of the attempts so far, the :class:`RetryPolicy`
and the :class:`Kind` of request, and returns the :class:`Step` to take. The
pipeline (:mod:`kommo_talks._pipeline`) only carries the step out: sleep,
pause the client, refresh the token, or raise the error built here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from .errors import APIError, RateLimitError, ServerError, TokenRefreshError, TransportError
from .problems import is_block_problem, make_api_error, parse_problem, redact
from .retry import RetryPolicy, is_retryable_status, server_wait

__all__ = ["Action", "Answer", "Kind", "Step", "Tally", "WireFailure", "decide", "describe"]


@attrs.define
class Answer:
    """One HTTP answer; ``whole`` is false when the body was cut at the size limit.

    Not frozen only because that is cheaper to build on every request: treat it as a value.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    method: str
    url: str
    whole: bool = True

    @property
    def content_type(self) -> str | None:
        """The Content-Type header, or None."""
        return self.headers.get("Content-Type")

    def redacted(self, secrets: Iterable[str]) -> Answer:
        """This answer with every secret in its body replaced (an echo must not leak one)."""
        return attrs.evolve(self, body=redact(self.body, secrets, cut=not self.whole))


@attrs.frozen
class WireFailure:
    """A request that failed on the wire.

    Attributes:
        method, url: the request.
        cause: the exception, already stripped of secrets (see
            :func:`~kommo_talks.errors.redacted`).
        connect: the connection was never made, so nothing was sent.
        retryable: another attempt may help (not a TLS verification failure).
    """

    method: str
    url: str
    cause: BaseException
    connect: bool
    retryable: bool


@attrs.frozen
class Tally:
    """The attempts of one call so far.

    Attributes:
        attempt: the number of the attempt just made (1 for the first).
        ambiguous: an earlier attempt may have reached the server (a timeout,
            a dropped connection, a 5xx) although it did not succeed.
        refreshed: the token was already refreshed once after a 401.
    """

    attempt: int = 1
    ambiguous: bool = False
    refreshed: bool = False


class Kind(enum.Enum):
    """What a request is: it changes which answers succeed and which errors are raised."""

    CALL = "call"
    """An API call: success is any 2xx, errors are :class:`APIError` by status."""
    UNSAFE_CALL = "unsafe_call"
    """A call that must not be sent twice (POST, PATCH): retried only if nothing was sent."""
    CLOSE = "close"
    """Closing a talk: a 422 is ``TalkAlreadyClosedError``, or success after an ambiguous try."""
    TOKEN = "token"  # noqa: S105 - a kind of request, not a secret
    """The OAuth token endpoint: success is a 200, errors are :class:`TokenRefreshError`."""


class Action(enum.Enum):
    """What the pipeline does next (see :class:`Step`)."""

    SUCCEED = "succeed"
    """Return the answer."""
    GIVE_UP = "give_up"
    """Raise ``Step.error`` (after pausing the client for ``Step.pause`` if set)."""
    BACK_OFF = "back_off"
    """Sleep the policy's backoff for ``Step.tally.attempt``, then try again."""
    WAIT_PAUSE = "wait_pause"
    """Pause the client for ``Step.pause`` (the gates wait it out), then try again."""
    REFRESH = "refresh"
    """Ask the auth to refresh the token; try again if it did and ``retry``, else raise."""


@attrs.frozen
class Step:
    """The outcome of :func:`decide`.

    Attributes:
        action: what to do.
        tally: the next attempt's counts (not meaningful for ``SUCCEED``).
        error: the exception to raise (``GIVE_UP``, or ``REFRESH`` when no refresh helps).
        pause: a server-given wait that pauses the whole client, in seconds.
        pause_error: the error the pause stands for (raised by calls that cannot wait).
        retry: for ``REFRESH``: an attempt is left for the replay.
    """

    action: Action
    tally: Tally
    error: Exception | None = None
    pause: float | None = None
    pause_error: RateLimitError | ServerError | None = None
    retry: bool = False


SUCCEED: Final = Step(Action.SUCCEED, Tally())
"""The step of every success (one value: nothing is allocated per request)."""

# An enum member read through its class costs about ten global reads on
# Python 3.11: the success path reads this alias instead.
_TOKEN: Final = Kind.TOKEN


def decide(tally: Tally, outcome: Answer | WireFailure, policy: RetryPolicy, kind: Kind) -> Step:
    """The step after one attempt: succeed, give up, back off, wait a pause or refresh.

    ``outcome`` of a failed answer must already be redacted (:meth:`Answer.redacted`).
    A :data:`Kind.UNSAFE_CALL` whose attempt may have reached the server is
    not retried; after a 429 or a connect failure it is, since nothing was done.
    """
    if isinstance(outcome, WireFailure):
        return _after_failure(tally, outcome, policy, kind)
    status = outcome.status
    if (200 <= status < 300 and kind is not _TOKEN) or (status == 200):
        return SUCCEED
    if status == 422 and kind is Kind.CLOSE and tally.ambiguous:
        return SUCCEED  # the earlier attempt closed the talk
    if status == 401 and kind is not Kind.TOKEN and not tally.refreshed:
        nxt = attrs.evolve(tally, attempt=tally.attempt + 1, refreshed=True)
        retry = tally.attempt < policy.max_attempts
        return Step(Action.REFRESH, nxt, error_for(outcome, kind, tally), retry=retry)
    if not is_retryable_status(status):
        return Step(Action.GIVE_UP, tally, error_for(outcome, kind, tally))
    return _after_retryable(tally, outcome, policy, kind)


def _after_failure(tally: Tally, failure: WireFailure, policy: RetryPolicy, kind: Kind) -> Step:
    ambiguous = tally.ambiguous or not failure.connect
    if not failure.retryable or tally.attempt >= policy.max_attempts:
        return Step(Action.GIVE_UP, tally, _failure_error(tally, failure, kind))
    if kind is Kind.UNSAFE_CALL and not failure.connect:
        return Step(Action.GIVE_UP, tally, _failure_error(tally, failure, kind))
    return Step(Action.BACK_OFF, Tally(tally.attempt + 1, ambiguous, tally.refreshed))


def _after_retryable(tally: Tally, answer: Answer, policy: RetryPolicy, kind: Kind) -> Step:
    parsed = parse_problem(answer.content_type, answer.body)
    wait = server_wait(answer.status, answer.headers.get("Retry-After"), parsed[0])
    api_error = _api_error(answer, kind, wait, parsed)
    assert isinstance(api_error, RateLimitError | ServerError)
    long_wait = wait is not None and wait > policy.max_delay
    error: Exception = api_error
    if kind is Kind.TOKEN:
        error = token_error(answer.status, *parsed, tally.attempt)
        if long_wait:
            error.__cause__ = api_error
    # A server-given wait pauses the whole client even on the last attempt:
    # the other calls must not send through it.
    give_up = Step(Action.GIVE_UP, tally, error, wait, api_error)
    ambiguous = tally.ambiguous or answer.status != 429
    if long_wait or tally.attempt >= policy.max_attempts:
        return give_up
    if kind is Kind.UNSAFE_CALL and answer.status != 429:
        return give_up
    nxt = Tally(tally.attempt + 1, ambiguous, tally.refreshed)
    if wait is None:
        return Step(Action.BACK_OFF, nxt)
    return Step(Action.WAIT_PAUSE, nxt, pause=wait, pause_error=api_error)


def error_for(answer: Answer, kind: Kind, tally: Tally) -> Exception:
    """The exception for a failed answer of this kind of request."""
    if kind is Kind.TOKEN:
        problem, text = parse_problem(answer.content_type, answer.body)
        return token_error(answer.status, problem, text, tally.attempt)
    return _api_error(answer, kind, None)


def _api_error(
    answer: Answer,
    kind: Kind,
    retry_after: float | None,
    parsed: tuple[dict[str, Any], str | None] | None = None,
) -> APIError:
    return make_api_error(
        answer.status,
        answer.content_type,
        answer.body,
        parsed=parsed,
        request_method=answer.method,
        request_url=answer.url,
        request_id=answer.headers.get("X-Request-Id"),
        closing=kind is Kind.CLOSE,
        retry_after=retry_after,
    )


def _failure_error(tally: Tally, failure: WireFailure, kind: Kind) -> Exception:
    cause = failure.cause
    error: Exception
    if kind is Kind.TOKEN:
        error = TokenRefreshError(
            f"the token endpoint could not be reached after {tally.attempt} attempt(s): "
            f"{describe(cause)}"
        )
    else:
        error = TransportError(
            f"{failure.method} {failure.url} failed after {tally.attempt} attempt(s): "
            f"{describe(cause)}",
            request_method=failure.method,
            request_url=failure.url,
        )
    error.__cause__ = cause
    return error


def token_error(
    status: int, problem: dict[str, Any], text: str | None, attempts: int
) -> TokenRefreshError:
    """The :class:`TokenRefreshError` for a token endpoint's answer."""
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
    block = is_block_problem(status, problem)
    if block:
        message += " (Kommo blocks this IP or account)"
    return TokenRefreshError(message, status=status, hint=hint, problem=problem, is_block=block)


def describe(exc: BaseException) -> str:
    """A short text for an exception: its class and message ("timed out" for a bare timeout)."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
