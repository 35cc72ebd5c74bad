"""Turning an error response into the right exception (pure functions).

Kommo answers errors with ``application/problem+json`` bodies whose fields
are all optional in practice (its 500 has no ``type``), and a blocked IP or a
proxy answers with an HTML page. Both must give the right exception class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from .errors import (
    MIN_SECRET_LENGTH,
    APIError,
    ForbiddenError,
    NotFoundError,
    PaymentRequiredError,
    RateLimitError,
    ServerError,
    TalkAlreadyClosedError,
    UnauthorizedError,
    is_block_problem,
)
from .errors import REDACTED as _REDACTED_TEXT

__all__ = [
    "DETAIL_LIMIT",
    "KEPT_BODY_LIMIT",
    "KEPT_MEMBERS",
    "error_class",
    "is_block",
    "is_block_problem",
    "make_api_error",
    "parse_problem",
    "redact",
]

DETAIL_LIMIT = 500
"""A non-JSON error body is kept as ``detail``, cut to this many characters."""

KEPT_BODY_LIMIT = 4096
"""The most of an error body an exception keeps, in bytes.

A larger problem body keeps only its standard members (:data:`KEPT_MEMBERS`,
strings cut to :data:`DETAIL_LIMIT` characters), so that errors held in
memory (a batch's failed outcomes, say) stay small whatever the server sent.
"""

KEPT_MEMBERS = ("type", "title", "status", "detail", "instance", "hint", "retry_after")
"""The members of a problem body larger than :data:`KEPT_BODY_LIMIT` that are kept."""

_LEADING_SPACE = re.compile(rb"\s*")

_STATUS_CLASSES: dict[int, type[APIError]] = {
    401: UnauthorizedError,
    402: PaymentRequiredError,
    403: ForbiddenError,
    404: NotFoundError,
    429: RateLimitError,
}


def error_class(status: int, *, closing: bool = False) -> type[APIError]:
    """The exception class for an HTTP status (``closing``: the request was a close)."""
    if status == 422 and closing:
        return TalkAlreadyClosedError
    if status >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status, APIError)


def parse_problem(content_type: str | None, body: bytes) -> tuple[dict[str, Any], str | None]:
    """Parse an error body into ``(problem, text)``.

    ``problem`` is the JSON object if the body is one, else ``{}``: a body is
    parsed when its content type mentions ``json`` or when it starts like a
    JSON object (a mislabelled problem is still a problem, not a block page).
    A problem body over :data:`KEPT_BODY_LIMIT` bytes keeps only its
    standard members. ``text`` is the body's first :data:`DETAIL_LIMIT`
    characters when it is not a JSON object (an HTML page, say), else ``None``.
    """
    labelled = content_type is not None and "json" in content_type.lower()  # case-insensitive
    if labelled or _starts_like_object(body):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(data, dict):
                return (data if len(body) <= KEPT_BODY_LIMIT else _standard_members(data)), None
    # Only the excerpt is decoded: a body of megabytes is not copied as text.
    text = body[:KEPT_BODY_LIMIT].decode("utf-8", errors="replace").strip()
    return {}, (text[:DETAIL_LIMIT] or None)


def _starts_like_object(body: bytes) -> bool:
    match = _LEADING_SPACE.match(body)  # finds the start without copying the body
    start = match.end() if match else 0
    return body[start : start + 1] == b"{"


def _standard_members(problem: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key in KEPT_MEMBERS:
        value = problem.get(key)
        if isinstance(value, str):
            kept[key] = value[:DETAIL_LIMIT]
        elif isinstance(value, int | float | bool):
            kept[key] = value
    return kept


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def make_api_error(
    status: int,
    content_type: str | None,
    body: bytes,
    *,
    request_method: str,
    request_url: str,
    request_id: str | None,
    closing: bool = False,
    retry_after: float | None = None,
    parsed: tuple[dict[str, Any], str | None] | None = None,
) -> APIError:
    """Build the exception for a non-success answer (``parsed``: its :func:`parse_problem`)."""
    problem, text = parsed if parsed is not None else parse_problem(content_type, body)
    cls = error_class(status, closing=closing)
    fields: dict[str, Any] = {
        "title": _str_or_none(problem.get("title")),
        "detail": _str_or_none(problem.get("detail")) if problem else text,
        "type": _str_or_none(problem.get("type")),
        "problem": problem,
        "request_method": request_method,
        "request_url": request_url,
        "request_id": request_id,
    }
    if issubclass(cls, RateLimitError | ServerError):
        return cls(status, retry_after=retry_after, **fields)
    return cls(status, **fields)


def is_block(status: int, content_type: str | None, body: bytes) -> bool:
    """Is this answer Kommo's IP/account block: a 403 whose body is not a JSON object?"""
    if status != 403:
        return False
    return is_block_problem(status, parse_problem(content_type, body)[0])


REDACTED = _REDACTED_TEXT.encode()


def redact(body: bytes, secrets: Iterable[str], *, cut: bool = False) -> bytes:
    """``body`` with every secret in it (as UTF-8) replaced by ``[redacted]``.

    For error bodies, which end up in exception messages: a proxy or a
    debugging endpoint may echo the request, ``Authorization`` header
    included. Strings shorter than :data:`MIN_SECRET_LENGTH` are left alone:
    no real token is that short, and replacing every ``t`` of a body would
    destroy it. With ``cut`` (the body is an excerpt, not read to its end),
    a tail that is the start of a secret is redacted too.
    """
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            raw = secret.encode("utf-8")
            body = body.replace(raw, REDACTED)
            if cut:
                body = _redact_cut_tail(body, raw)
    return body


def _redact_cut_tail(body: bytes, secret: bytes) -> bytes:
    for size in range(min(len(secret) - 1, len(body)), 0, -1):
        if body.endswith(secret[:size]):
            return body[:-size] + REDACTED
    return body
