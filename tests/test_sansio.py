"""The request loop's decisions as a table: no server, no event loop, no sleep."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey

from kommo_talks import (
    APIError,
    ForbiddenError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    TalkAlreadyClosedError,
    TokenRefreshError,
    TransportError,
    UnauthorizedError,
)
from kommo_talks.retry import MAX_SERVER_WAIT
from kommo_talks.sansio import Action, Answer, Kind, Tally, WireFailure, decide

POLICY = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=30.0)
URL = "https://example.kommo.com/api/v4/talks/1"
JSON = {"Content-Type": "application/problem+json"}
KEY = ConnectionKey("example.kommo.com", 443, True, True, None, None, None)


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    raw = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
    return Answer(status, headers or dict(JSON), raw, "GET", URL)


def failure(exc: BaseException) -> WireFailure:
    connect = isinstance(exc, aiohttp.ClientConnectorError)
    retryable = not isinstance(exc, aiohttp.ClientSSLError)
    return WireFailure("GET", URL, exc, connect=connect, retryable=retryable)


DROPPED = failure(aiohttp.ServerDisconnectedError())
TIMED_OUT = failure(TimeoutError())
REFUSED = failure(aiohttp.ClientConnectorError(KEY, OSError(111, "refused")))
BAD_CERT = failure(
    aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError("bad"))
)
FIRST = Tally()
LAST = Tally(attempt=3)
AMBIGUOUS = Tally(ambiguous=True)


@attrs.frozen
class Row:
    tally: Tally
    outcome: Answer | WireFailure
    kind: Kind
    action: Action
    then: Tally | None = None  # the next tally, when the call goes on
    error: type[Exception] | None = None
    pause: float | None = None


ROWS = {
    # success
    "a 200 succeeds": Row(FIRST, answer(200, {}), Kind.CALL, Action.SUCCEED),
    "a 202 close succeeds": Row(FIRST, answer(202, b""), Kind.CLOSE, Action.SUCCEED),
    "a 204 call succeeds": Row(FIRST, answer(204), Kind.UNSAFE_CALL, Action.SUCCEED),
    "the token endpoint succeeds on 200": Row(FIRST, answer(200, {}), Kind.TOKEN, Action.SUCCEED),
    # final statuses
    "a 404 gives up": Row(FIRST, answer(404, {}), Kind.CALL, Action.GIVE_UP, error=NotFoundError),
    "a 400 gives up": Row(FIRST, answer(400, {}), Kind.CALL, Action.GIVE_UP, error=APIError),
    "a 422 of a call is a plain APIError": Row(
        AMBIGUOUS, answer(422, {}), Kind.CALL, Action.GIVE_UP, error=APIError
    ),
    "a first 422 of a close is already closed": Row(
        FIRST, answer(422, {}), Kind.CLOSE, Action.GIVE_UP, error=TalkAlreadyClosedError
    ),
    "a 422 of a close after an ambiguous attempt succeeds": Row(
        AMBIGUOUS, answer(422, {}), Kind.CLOSE, Action.SUCCEED
    ),
    "an HTML 403 (a block) gives up": Row(
        FIRST,
        answer(403, b"<html>blocked</html>", {}),
        Kind.CALL,
        Action.GIVE_UP,
        error=ForbiddenError,
    ),
    "a token endpoint 201 is an error": Row(
        FIRST, answer(201, {}), Kind.TOKEN, Action.GIVE_UP, error=TokenRefreshError
    ),
    "a token endpoint 400 gives up": Row(
        FIRST,
        answer(400, {"hint": "revoked"}),
        Kind.TOKEN,
        Action.GIVE_UP,
        error=TokenRefreshError,
    ),
    # 401
    "a first 401 refreshes": Row(
        FIRST,
        answer(401, {}),
        Kind.CALL,
        Action.REFRESH,
        Tally(2, False, True),
        UnauthorizedError,
    ),
    "a second 401 gives up": Row(
        Tally(2, False, True),
        answer(401, {}),
        Kind.CALL,
        Action.GIVE_UP,
        error=UnauthorizedError,
    ),
    "a token endpoint 401 is never refreshed": Row(
        FIRST, answer(401, {}), Kind.TOKEN, Action.GIVE_UP, error=TokenRefreshError
    ),
    # retryable statuses
    "a 503 backs off and is ambiguous": Row(
        FIRST, answer(503, {}), Kind.CALL, Action.BACK_OFF, Tally(2, True, False)
    ),
    "an HTML 502 backs off": Row(
        FIRST,
        answer(502, b"<html>bad gateway</html>", {}),
        Kind.CALL,
        Action.BACK_OFF,
        Tally(2, True, False),
    ),
    "a 429 backs off and is not ambiguous": Row(
        FIRST, answer(429, {}), Kind.CLOSE, Action.BACK_OFF, Tally(2, False, False)
    ),
    "ambiguity survives a later 429": Row(
        AMBIGUOUS, answer(429, {}), Kind.CLOSE, Action.BACK_OFF, Tally(2, True, False)
    ),
    "a 429 with Retry-After waits a pause": Row(
        FIRST,
        answer(429, {}, {"Retry-After": "2"}),
        Kind.CALL,
        Action.WAIT_PAUSE,
        Tally(2, False, False),
        pause=2.0,
    ),
    "a 429 body's retry_after waits a pause": Row(
        FIRST,
        answer(429, {"retry_after": 3}),
        Kind.CALL,
        Action.WAIT_PAUSE,
        Tally(2, False, False),
        pause=3.0,
    ),
    "the Retry-After header wins over the body": Row(
        FIRST,
        answer(429, {"retry_after": 3}, {"Retry-After": "1"}),
        Kind.CALL,
        Action.WAIT_PAUSE,
        Tally(2, False, False),
        pause=1.0,
    ),
    "an unreadable Retry-After backs off": Row(
        FIRST,
        answer(503, {}, {"Retry-After": "soon"}),
        Kind.CALL,
        Action.BACK_OFF,
        Tally(2, True, False),
    ),
    "a wait above max_delay gives up at once but still pauses": Row(
        FIRST,
        answer(429, {}, {"Retry-After": "300"}),
        Kind.CALL,
        Action.GIVE_UP,
        error=RateLimitError,
        pause=300.0,
    ),
    "a day-long wait pauses an hour at most": Row(
        FIRST,
        answer(503, {}, {"Retry-After": "86400"}),
        Kind.CALL,
        Action.GIVE_UP,
        error=ServerError,
        pause=MAX_SERVER_WAIT,
    ),
    "the last attempt's 503 gives up": Row(
        LAST, answer(503, {}), Kind.CALL, Action.GIVE_UP, error=ServerError
    ),
    "the last attempt's 429 keeps its wait as a pause": Row(
        LAST,
        answer(429, {}, {"Retry-After": "2"}),
        Kind.CALL,
        Action.GIVE_UP,
        error=RateLimitError,
        pause=2.0,
    ),
    "an unsafe call is not retried after a 5xx": Row(
        FIRST, answer(500, {}), Kind.UNSAFE_CALL, Action.GIVE_UP, error=ServerError
    ),
    "an unsafe call is retried after a 429": Row(
        FIRST, answer(429, {}), Kind.UNSAFE_CALL, Action.BACK_OFF, Tally(2, False, False)
    ),
    "the token endpoint backs off a 503": Row(
        FIRST, answer(503, {}), Kind.TOKEN, Action.BACK_OFF, Tally(2, True, False)
    ),
    "the token endpoint's wait pauses the client": Row(
        FIRST,
        answer(429, {}, {"Retry-After": "2"}),
        Kind.TOKEN,
        Action.WAIT_PAUSE,
        Tally(2, False, False),
        pause=2.0,
    ),
    "the token endpoint's long wait gives up as a token error": Row(
        FIRST,
        answer(429, {}, {"Retry-After": "300"}),
        Kind.TOKEN,
        Action.GIVE_UP,
        error=TokenRefreshError,
        pause=300.0,
    ),
    "the token endpoint's last 5xx gives up as a token error": Row(
        LAST, answer(500, {}), Kind.TOKEN, Action.GIVE_UP, error=TokenRefreshError
    ),
    # wire failures
    "a dropped connection backs off and is ambiguous": Row(
        FIRST, DROPPED, Kind.CLOSE, Action.BACK_OFF, Tally(2, True, False)
    ),
    "a timeout backs off": Row(FIRST, TIMED_OUT, Kind.CALL, Action.BACK_OFF, Tally(2, True, False)),
    "a refused connect backs off and is not ambiguous": Row(
        FIRST, REFUSED, Kind.CLOSE, Action.BACK_OFF, Tally(2, False, False)
    ),
    "the last attempt's drop gives up": Row(
        LAST, DROPPED, Kind.CALL, Action.GIVE_UP, error=TransportError
    ),
    "a certificate failure gives up at once": Row(
        FIRST, BAD_CERT, Kind.CALL, Action.GIVE_UP, error=TransportError
    ),
    "an unsafe call is not retried after a drop": Row(
        FIRST, DROPPED, Kind.UNSAFE_CALL, Action.GIVE_UP, error=TransportError
    ),
    "an unsafe call is retried after a refused connect": Row(
        FIRST, REFUSED, Kind.UNSAFE_CALL, Action.BACK_OFF, Tally(2, False, False)
    ),
    "the token endpoint's failure is a token error": Row(
        LAST, TIMED_OUT, Kind.TOKEN, Action.GIVE_UP, error=TokenRefreshError
    ),
    "the token endpoint's certificate failure is a token error": Row(
        FIRST, BAD_CERT, Kind.TOKEN, Action.GIVE_UP, error=TokenRefreshError
    ),
}


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_decide(row: Row) -> None:
    step = decide(row.tally, row.outcome, POLICY, row.kind)

    assert step.action is row.action
    if row.then is not None:
        assert step.tally == row.then
    if row.error is None:
        assert step.error is None or row.action is Action.REFRESH
    else:
        assert type(step.error) is row.error
    assert step.pause == row.pause


def test_a_refresh_on_the_last_attempt_is_not_replayed() -> None:
    step = decide(Tally(attempt=3), answer(401, {}), POLICY, Kind.CALL)

    assert step.action is Action.REFRESH
    assert not step.retry
    assert isinstance(step.error, UnauthorizedError)


def test_an_error_names_the_request_and_keeps_the_problem() -> None:
    body = {"title": "Not Found", "detail": "no such talk", "status": 404}
    headers = {**JSON, "X-Request-Id": "req-1"}
    step = decide(FIRST, answer(404, body, headers), POLICY, Kind.CALL)

    error = step.error
    assert isinstance(error, NotFoundError)
    assert (error.request_method, error.request_url, error.request_id) == ("GET", URL, "req-1")
    assert error.detail == "no such talk"
    assert error.problem == body


def test_a_server_wait_error_carries_the_wait_as_retry_after() -> None:
    step = decide(LAST, answer(429, {}, {"Retry-After": "2"}), POLICY, Kind.CALL)

    assert isinstance(step.error, RateLimitError)
    assert step.error.retry_after == 2.0
    assert step.pause_error is step.error


def test_a_transport_error_chains_the_failure_and_counts_the_attempts() -> None:
    step = decide(LAST, DROPPED, POLICY, Kind.CALL)

    assert isinstance(step.error, TransportError)
    assert step.error.__cause__ is DROPPED.cause
    assert "after 3 attempt(s)" in str(step.error)


def test_a_blocked_token_endpoint_says_so() -> None:
    step = decide(FIRST, answer(403, b"<html>blocked</html>", {}), POLICY, Kind.TOKEN)

    assert isinstance(step.error, TokenRefreshError)
    assert step.error.is_block
    assert "blocks this IP" in str(step.error)


def test_a_redacted_answer_hides_a_secret_even_at_a_cut() -> None:
    secret = "s3cr3t-token-value-0123456789"
    cut = Answer(
        500, {}, b"echo: " + secret.encode() + b" and " + secret[:9].encode(), "GET", URL, False
    )

    assert secret.encode() not in cut.redacted([secret]).body
    assert not cut.redacted([secret]).body.endswith(secret[:9].encode())
