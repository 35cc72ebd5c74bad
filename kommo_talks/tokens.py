"""OAuth2 token pairs: :class:`TokenSet`, and how it is read and written.

A :class:`TokenSet` is built from Kommo's token endpoint answer with
:meth:`TokenSet.from_token_response` and stored by token stores through
:meth:`TokenSet.to_json` / :meth:`TokenSet.from_json`. Its ``repr`` and
``str`` never show either token, and no error raised here quotes a token.

Stored form (the JSON object written by ``FileTokenStore`` and meant for any
other store)::

    {
      "access_token": "<access token>",
      "refresh_token": "<refresh token>",
      "expires_at": "2026-11-27T10:00:00+00:00"
    }

``expires_at`` is an ISO 8601 timestamp in UTC with an explicit ``+00:00``
offset, and microseconds only when they are not zero (what
``datetime.isoformat()`` writes), so a ``TokenSet`` round-trips exactly.
Unknown keys are ignored when reading, so later versions may add fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import attrs

from .errors import DecodeError, TokenRefreshError

__all__ = ["MAX_EXPIRES_IN", "TokenResponseError", "TokenSet", "is_token_text"]

_REDACTED = "'***'"


def _redact(_: object) -> str:
    return _REDACTED


MAX_EXPIRES_IN: Final = 365 * 24 * 3600
"""The longest ``expires_in`` accepted from the token endpoint: one year, in seconds.

Kommo's access tokens live a day; a larger value is a broken answer.
"""

_TOKEN_TEXT: Final = re.compile(r"[\x21-\x7e]+")
VISIBLE_ASCII_ONLY: Final = (
    "visible ASCII characters only (no spaces, line breaks or other control characters)"
)
"""What a token must hold, as error messages put it (see :func:`is_token_text`)."""


def is_token_text(value: str) -> bool:
    """True if ``value`` is non-empty and made only of visible ASCII characters (``!`` to ``~``).

    What a bearer token can be: a space, CR, LF, NUL or any other control or
    non-ASCII character could not be sent in an HTTP header (or would change it).
    """
    return _TOKEN_TEXT.fullmatch(value) is not None


class TokenResponseError(TokenRefreshError, DecodeError):
    """The token endpoint answered with a body that is not a usable token pair.

    Both a :class:`TokenRefreshError` (the refresh failed and nothing was
    saved) and a :class:`DecodeError`. ``path`` names the offending field
    (``None`` when the body is not an object); ``status`` is the HTTP status.
    The message names the field, never its value.
    """

    def __init__(self, message: str, *, status: int | None = None, path: str | None = None) -> None:
        TokenRefreshError.__init__(self, message, status=status)
        # Set after: DecodeError.__init__, reached through the MRO, resets them.
        self.status = status
        self.path = path


def _check_token(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    # Never put `value` into a message: it is a secret.
    if type(value) is not str:
        raise TypeError(f"{attribute.name} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")
    if not is_token_text(value):
        raise ValueError(f"{attribute.name} must hold {VISIBLE_ASCII_ONLY}")


def _is_aware(value: datetime) -> bool:
    return value.tzinfo is not None and value.tzinfo.utcoffset(value) is not None


def _check_aware(_: object, attribute: attrs.Attribute[datetime], value: object) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{attribute.name} must be a datetime, got {type(value).__name__}")
    if not _is_aware(value):
        raise ValueError(f"{attribute.name} must be timezone-aware (e.g. tzinfo=datetime.UTC)")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if not _is_aware(now):
        raise ValueError("now must be timezone-aware (e.g. tzinfo=datetime.UTC)")
    return now


@attrs.frozen
class TokenSet:
    """An OAuth2 access token, its refresh token and when the access token expires.

    ``repr`` and ``str`` show ``'***'`` in place of both tokens. Each token
    must be visible ASCII (``!`` to ``~``): one with a space, a line break, a
    control or non-ASCII character could never be sent, so it is refused here
    rather than failing every request later.

    Raises:
        TypeError: a token is not a ``str`` or ``expires_at`` not a ``datetime``.
        ValueError: a token is empty or holds other characters (the message
            names the field, never the token), or ``expires_at`` is naive.
    """

    access_token: str = attrs.field(repr=_redact, validator=_check_token)
    refresh_token: str = attrs.field(repr=_redact, validator=_check_token)
    expires_at: datetime = attrs.field(validator=_check_aware)

    def expires_within(self, seconds: float, now: datetime | None = None) -> bool:
        """True if the access token expires within ``seconds`` of ``now`` (or is expired).

        ``now`` defaults to the current time and must be timezone-aware
        (``ValueError`` otherwise).
        """
        return self.expires_at <= _now(now) + timedelta(seconds=seconds)

    @classmethod
    def from_token_response(
        cls, body: Mapping[str, Any], *, now: datetime, status: int | None = None
    ) -> TokenSet:
        """Build a ``TokenSet`` from the JSON answer of ``POST /oauth2/access_token``.

        The answer must hold ``token_type`` (``"Bearer"``, any case),
        ``expires_in`` (a positive integer of seconds, at most one year), and
        ``access_token`` and ``refresh_token``: non-empty strings of visible
        ASCII characters (no spaces, line breaks or other control characters,
        which could never be sent in a header). Other fields (such as
        ``server_time``) are ignored. ``expires_at`` is ``now + expires_in``:
        pass the time the request was sent, timezone-aware. Kommo's
        ``server_time`` is not used, so a skewed server clock does not matter.

        Raises:
            TokenResponseError: the answer is not an object, or a field is
                missing or wrong (a :class:`TokenRefreshError` and a
                :class:`DecodeError`); ``path`` names the field and
                ``status`` is the given HTTP status. The message never
                contains a value from the answer.
            ValueError: ``now`` is naive.
        """
        now = _now(now)
        problem = _answer_problem(body)
        if problem is not None:
            path, what = problem
            where = f" (HTTP {status})" if status is not None else ""
            subject = f"field {path!r}" if path else "body"
            raise TokenResponseError(
                f"unexpected token endpoint answer{where}: {subject} {what}",
                status=status,
                path=path,
            )
        return cls(
            access_token=body["access_token"],
            refresh_token=body["refresh_token"],
            expires_at=now + timedelta(seconds=body["expires_in"]),
        )

    def to_json(self) -> dict[str, str]:
        """Return the stored form: a JSON-ready dict (see the module docstring).

        ``expires_at`` becomes an ISO 8601 string in UTC, e.g.
        ``"2026-11-27T10:00:00+00:00"``. The result holds both tokens in
        clear: write it only where the tokens belong.
        """
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at.astimezone(UTC).isoformat(),
        }

    @classmethod
    def from_json(cls, data: Any) -> TokenSet:
        """Build a ``TokenSet`` from its stored form, as written by :meth:`to_json`.

        ``expires_at`` must be an ISO 8601 string with a UTC offset (any
        offset is accepted; the result is in UTC). Unknown keys are ignored.

        Raises:
            ValueError: ``data`` is not a dict of the stored form; the message
                names the offending key and never contains a token.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"token record is not a JSON object (got {_kind(data)})")
        for name in ("access_token", "refresh_token"):
            value = data.get(name)
            if type(value) is not str or not value:
                raise ValueError(f"token record: {name!r} must be a non-empty string")
            if not is_token_text(value):
                raise ValueError(f"token record: {name!r} must hold {VISIBLE_ASCII_ONLY}")
        raw = data.get("expires_at")
        try:
            expires_at = datetime.fromisoformat(raw) if type(raw) is str else None
        except ValueError:
            expires_at = None
        if expires_at is None or not _is_aware(expires_at):
            raise ValueError(
                "token record: 'expires_at' must be an ISO 8601 timestamp with a UTC offset"
            )
        return cls(
            access_token=data["access_token"],
            refresh_token=data["refresh_token"],
            expires_at=expires_at.astimezone(UTC),
        )


_ANSWER_FIELDS: Final = ("token_type", "expires_in", "access_token", "refresh_token")


def _answer_problem(body: object) -> tuple[str | None, str] | None:
    """The first thing wrong with a token endpoint answer: (field or None, what), or None.

    Never quotes a value: the answer holds tokens.
    """
    if not isinstance(body, Mapping):
        return None, f"is not a JSON object (got {_kind(body)})"
    for name in _ANSWER_FIELDS:
        if name not in body:
            return name, "is missing"
    token_type = body["token_type"]
    if type(token_type) is not str or token_type.lower() != "bearer":
        got = "another string" if type(token_type) is str else _kind(token_type)
        return "token_type", f"must be 'Bearer' (got {got})"
    expires_in = body["expires_in"]
    # `type(...) is int` rejects bool, which is a subclass of int.
    if type(expires_in) is not int or not 0 < expires_in <= MAX_EXPIRES_IN:
        too_long = type(expires_in) is int and expires_in > MAX_EXPIRES_IN
        got = "more than one year" if too_long else _kind(expires_in)
        return "expires_in", f"must be a positive integer of seconds, at most one year (got {got})"
    for name in ("access_token", "refresh_token"):
        value = body[name]
        if type(value) is not str or not value:
            return name, f"must be a non-empty string (got {_kind(value)})"
        if not is_token_text(value):
            return name, f"must hold {VISIBLE_ASCII_ONLY}"
    return None


def _kind(value: object) -> str:
    """Describe a value by its JSON kind only: values may be secrets."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer" if value > 0 else "a non-positive integer"
    if isinstance(value, float):
        return "a fractional number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__
