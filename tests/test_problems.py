"""Error bodies to exceptions (pure): problem+json with optional fields, HTML pages."""

from __future__ import annotations

import orjson
import pytest

from kommo_talks import (
    APIError,
    ForbiddenError,
    NotFoundError,
    PaymentRequiredError,
    RateLimitError,
    ServerError,
    TalkAlreadyClosedError,
    UnauthorizedError,
)
from kommo_talks.problems import error_class, is_block, make_api_error, parse_problem, redact

KOMMO_500 = {
    "title": "ErrInternalServer",
    "status": 500,
    "detail": "Our team are probably already working on the elimination of the problem",
    "trace_id": "abc",
}
KOMMO_429 = {
    "title": "Too Many Requests",
    "type": "https://httpstatus.es/429",
    "status": 429,
    "detail": "You have sent too many requests in a given amount of time. Please try again later.",
    "retry_after": 300,
}


def make(status: int, body: bytes, content_type: str | None, **kw: object) -> APIError:
    return make_api_error(
        status,
        content_type,
        body,
        request_method="GET",
        request_url="https://x.kommo.com/api/v4/talks/1",
        request_id="rid",
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("status", "closing", "cls"),
    [
        (401, False, UnauthorizedError),
        (402, False, PaymentRequiredError),
        (403, False, ForbiddenError),
        (404, False, NotFoundError),
        (422, True, TalkAlreadyClosedError),
        (422, False, APIError),
        (429, False, RateLimitError),
        (500, False, ServerError),
        (503, False, ServerError),
        (400, False, APIError),
        (302, False, APIError),
    ],
)
def test_status_maps_to_its_class(status: int, closing: bool, cls: type[APIError]) -> None:
    assert error_class(status, closing=closing) is cls


def test_kommo_500_without_type_parses() -> None:
    error = make(500, orjson.dumps(KOMMO_500), "application/problem+json")

    assert isinstance(error, ServerError)
    assert error.type is None
    assert error.title == "ErrInternalServer"
    assert error.detail == KOMMO_500["detail"]
    assert error.problem["trace_id"] == "abc"
    assert error.request_id == "rid"


def test_429_keeps_the_problem_and_retry_after() -> None:
    error = make(429, orjson.dumps(KOMMO_429), "application/problem+json", retry_after=300.0)

    assert isinstance(error, RateLimitError)
    assert error.retry_after == 300.0
    assert error.problem["retry_after"] == 300
    assert "retry after 300.0 s" in str(error)


def test_html_body_becomes_truncated_detail() -> None:
    page = b"<html>" + b"x" * 2000 + b"</html>"

    error = make(502, page, "text/html")

    assert isinstance(error, ServerError)
    assert error.problem == {}
    assert error.detail is not None
    assert len(error.detail) == 500
    assert len(str(error)) < 400  # the message stays one readable line


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/problem+json", b"not json"),
        ("application/problem+json", b"[1]"),
        ("text/plain", b"{not json"),
        ("application/json", b""),
    ],
)
def test_unparseable_or_unlabelled_bodies_give_no_problem(
    content_type: str | None, body: bytes
) -> None:
    problem, _ = parse_problem(content_type, body)
    assert problem == {}


def test_fields_of_the_wrong_type_are_ignored() -> None:
    error = make(404, b'{"title": 5, "detail": ["a"], "type": null}', "application/problem+json")

    assert (error.title, error.detail, error.type) == (None, None, None)
    assert error.problem == {"title": 5, "detail": ["a"], "type": None}


@pytest.mark.parametrize(
    ("status", "content_type", "body", "blocked"),
    [
        (403, "text/html", b"<h1>403 Forbidden</h1>", True),
        (403, None, b"", True),
        (403, "application/problem+json", b'{"title": "Forbidden", "status": 403}', False),
        (404, "text/html", b"<h1>404</h1>", False),
    ],
)
def test_block_is_a_403_whose_body_is_not_json(
    status: int, content_type: str | None, body: bytes, blocked: bool
) -> None:
    assert is_block(status, content_type, body) is blocked


def test_a_mislabelled_json_problem_is_still_parsed() -> None:
    body = b'{"title": "Forbidden", "status": 403, "detail": "Insufficient rights"}'

    problem, text = parse_problem("text/plain", body)

    assert problem["detail"] == "Insufficient rights"
    assert text is None
    assert not is_block(403, "text/plain", body)


def test_redact_replaces_real_secrets_and_leaves_short_strings_alone() -> None:
    body = b'{"detail": "Authorization: Bearer abcdef123456 was not accepted", "status": 403}'

    assert redact(body, ["abcdef123456", "t", ""]) == (
        b'{"detail": "Authorization: Bearer [redacted] was not accepted", "status": 403}'
    )
