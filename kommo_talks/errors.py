"""The exception hierarchy of kommo-talks.

Every exception the SDK raises derives from :class:`KommoError`. Exceptions
carry the facts as attributes and print one line a person can act on. No
message or ``repr`` ever holds a token or a client secret: the SDK never puts
one into an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "APIError",
    "ClientClosedError",
    "CoordinationError",
    "DecodeError",
    "ForbiddenError",
    "KommoError",
    "NotFoundError",
    "PaymentRequiredError",
    "RateLimitError",
    "RedactedError",
    "ServerError",
    "TalkAlreadyClosedError",
    "TokenRefreshError",
    "TokenStoreError",
    "TransportError",
    "UnauthorizedError",
    "redacted",
]


class KommoError(Exception):
    """Base class of every error raised by kommo-talks."""


class APIError(KommoError):
    """Kommo answered with a non-success HTTP status.

    Attributes:
        status: the HTTP status code.
        title, detail, type: the fields of the ``application/problem+json``
            body, each ``None`` when absent (Kommo's 500 has no ``type``).
            For a body that is not JSON, ``detail`` holds at most its first
            500 characters.
        problem: the parsed problem body, ``{}`` if there was none; of a
            body over 4 KiB, only its standard members (``type``, ``title``,
            ``status``, ``detail``, ``instance``, ``hint``, ``retry_after``;
            strings cut to 500 characters).
        request_method, request_url: the request that got this answer.
        request_id: the ``X-Request-Id`` response header, or ``None``.
    """

    def __init__(
        self,
        status: int,
        *,
        title: str | None = None,
        detail: str | None = None,
        type: str | None = None,
        problem: dict[str, Any] | None = None,
        request_method: str | None = None,
        request_url: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.problem: dict[str, Any] = problem if problem is not None else {}
        self.request_method = request_method
        self.request_url = request_url
        self.request_id = request_id
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status}"
        if self.title:
            text += f" {self.title}"
        if self.detail and self.detail != self.title:
            detail = " ".join(self.detail.split())
            text += f": {detail[:200]}..." if len(detail) > 200 else f": {detail}"
        if self.request_method and self.request_url:
            text += f" ({self.request_method} {self.request_url}"
            text += f", request id {self.request_id})" if self.request_id else ")"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls: type[APIError], state: dict[str, Any]) -> APIError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._message())
    return error


class UnauthorizedError(APIError):
    """401: the token is invalid, expired or revoked (after a refresh, for OAuth2)."""


class PaymentRequiredError(APIError):
    """402: the account's paid or trial period has ended."""


class ForbiddenError(APIError):
    """403: not allowed; with a non-JSON body, usually an IP or account block.

    ``is_block`` tells the two apart: Kommo serves an HTML page to every
    request of a blocked IP or account, and a problem+json body for an
    ordinary permission error.
    """

    @property
    def is_block(self) -> bool:
        """True if this 403 looks like Kommo's IP/account block (body not JSON)."""
        return is_block_problem(self.status, self.problem)


class NotFoundError(APIError):
    """404: no such talk (or no such endpoint)."""


class TalkAlreadyClosedError(APIError):
    """422 from close: the talk is already closed or being closed."""


class _WaitError(APIError):
    """An APIError that may carry a server-given wait (``retry_after``)."""

    def __init__(self, status: int, *, retry_after: float | None = None, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(status, **kwargs)

    def _message(self) -> str:
        text = super()._message()
        if self.retry_after is not None:
            text += f"; retry after {self.retry_after:.1f} s"
        return text


class RateLimitError(_WaitError):
    """429 once retries are exhausted, or a server-given wait above ``max_delay``.

    ``retry_after`` is the server-given wait in seconds, or ``None``.
    """


class ServerError(_WaitError):
    """5xx once retries are exhausted, or a server-given wait above ``max_delay``.

    ``retry_after`` is the server-given wait in seconds, or ``None``.
    """


class TransportError(KommoError):
    """A connection failure or timeout, once retries are exhausted.

    ``request_method`` and ``request_url`` name the request; the original
    aiohttp or timeout exception is chained as ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        request_method: str | None = None,
        request_url: str | None = None,
    ) -> None:
        self.request_method = request_method
        self.request_url = request_url
        super().__init__(message)


class TokenRefreshError(KommoError):
    """The OAuth token endpoint refused or failed; re-authorization is needed.

    Attributes:
        status: the token endpoint's HTTP status, or ``None`` (network failure).
        hint: the ``hint`` of Kommo's problem body (e.g. ``"Token has been
            revoked"``), or ``None``. Never contains a token.
        problem: the parsed problem body, ``{}`` if there was none.
        is_block: the answer was Kommo's IP/account block (a 403 whose body
            is not JSON), which every other request would meet too: a batch
            stops at it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        hint: str | None = None,
        problem: dict[str, Any] | None = None,
        is_block: bool = False,
    ) -> None:
        self.status = status
        self.hint = hint
        self.problem: dict[str, Any] = problem if problem is not None else {}
        self.is_block = is_block
        super().__init__(message)


class TokenStoreError(TokenRefreshError):
    """A token store cannot be read or written (corrupt file, unreadable, ...).

    The store is left as it was: a corrupt file is never overwritten by the
    SDK, except by :meth:`OAuth2.exchange_code`, which is how a user recovers.
    """


class ClientClosedError(KommoError):
    """The :class:`KommoClient` is closed (or the session lent to it is): nothing is sent.

    Raised by every call on a closed client, and by a call that was waiting
    (for a rate-limit slot, a backoff, a server-given pause) when the client
    was closed. Also raised, saying why, when the client cannot send from the
    running event loop: the session lent to it belongs to another loop, or
    its own session belongs to another loop that is still open. (A client
    with its own session whose loop has ended, after ``asyncio.run()``, opens
    a new session instead.) A batch stops at the first one.
    """


class CoordinationError(KommoError):
    """A service that coordinates several clients (Redis) cannot be used.

    Nothing is sent on a guess instead: a batch stops at the first one, as it
    does at an IP block, since every other talk would fail the same way.
    """


class DecodeError(KommoError):
    """A response body is not what the API documents.

    Attributes:
        status: the HTTP status of the response, or ``None`` when decoding
            something that did not come from a response (a webhook body).
        path: the offending field path (e.g. ``"talk_id"``), or ``None``.
    """

    def __init__(self, message: str, *, status: int | None = None, path: str | None = None) -> None:
        self.status = status
        self.path = path
        super().__init__(message)


MIN_SECRET_LENGTH = 8
"""Secrets shorter than this are not searched for: no real token is that short."""

REDACTED = "[redacted]"
_BEARER = re.compile(r"(Bearer\s+)[^\s'\"\\,;]+", re.IGNORECASE)
_CAUSE_TEXT_LIMIT = 500
_CAUSE_CHAIN_LIMIT = 8


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and whatever follows ``Bearer``, replaced by ``[redacted]``."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return _BEARER.sub(rf"\g<1>{REDACTED}", text)


class RedactedError(Exception):
    """A stand-in for an exception from below the SDK (aiohttp's, say), cleaned of secrets.

    The SDK chains it as ``__cause__`` instead of the original, whose ``repr``
    may hold the request, ``Authorization`` header included. It keeps what a
    person needs: its class is named like the original's (so
    ``type(error.__cause__).__name__`` reads ``ClientConnectorError``),
    ``original`` is the original's full class name, the message is the
    original's with every known secret and bearer token replaced (at most
    500 characters), and its own ``__cause__`` stands in for the original's
    cause. A stand-in for a timeout is also a :class:`TimeoutError`.
    """

    def __init__(self, message: str, original: str = "") -> None:
        self.original = original
        super().__init__(message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


_stand_in_classes: dict[type[BaseException], type[RedactedError]] = {}


def _stand_in_class(original: type[BaseException]) -> type[RedactedError]:
    cls = _stand_in_classes.get(original)
    if cls is None:
        bases: tuple[type, ...] = (RedactedError,)
        if issubclass(original, TimeoutError):
            bases = (RedactedError, TimeoutError)
        name = original.__name__
        cls = type(name, bases, {"__module__": __name__, "__qualname__": name})
        _stand_in_classes[original] = cls
    return cls


def is_block_problem(status: int, problem: Mapping[str, Any]) -> bool:
    """The block rule: a 403 whose body is not a JSON object is Kommo's IP/account block."""
    return status == 403 and not problem


def redacted(exc: BaseException, secrets: Iterable[str] = ()) -> RedactedError:
    """A :class:`RedactedError` standing in for ``exc`` and the exceptions chained to it."""
    secrets = tuple(secrets)
    stand_in: RedactedError | None = None
    first: RedactedError | None = None
    current: BaseException | None = exc
    for _ in range(_CAUSE_CHAIN_LIMIT):
        if current is None:
            break
        original = type(current)
        text = redact_text(str(current), secrets)[:_CAUSE_TEXT_LIMIT]
        link = _stand_in_class(original)(text, f"{original.__module__}.{original.__qualname__}")
        if stand_in is None:
            first = link
        else:
            stand_in.__cause__ = link
        stand_in = link
        context = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or context
    assert first is not None
    return first
