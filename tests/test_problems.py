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
from kommo_talks.problems import (
    DETAIL_LIMIT,
    KEPT_BODY_LIMIT,
    error_class,
    is_block,
    make_api_error,
    parse_problem,
    redact,
)

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


def test_redact_of_a_cut_body_hides_a_secret_cut_in_half() -> None:
    secret = "SECRET-token-0123456789"
    body = b"<html>you sent Bearer " + secret[:11].encode()

    assert redact(body, [secret], cut=True) == b"<html>you sent Bearer [redacted]"
    assert redact(body, [secret]) == body  # a whole body ends where the server ended it


def test_a_problem_body_over_4_kib_keeps_its_standard_members_cut_short() -> None:
    problem = {
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "x" * 9000,
        "retry_after": 5,
        "hint": None,
        "validation_errors": [{"field": "talk_id"}] * 500,
    }

    kept, text = parse_problem("application/problem+json", orjson.dumps(problem))

    assert text is None
    assert kept == {
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "x" * DETAIL_LIMIT,
        "retry_after": 5,
    }
    assert len(orjson.dumps(kept)) <= KEPT_BODY_LIMIT


def test_a_problem_body_under_4_kib_is_kept_whole() -> None:
    problem = {"title": "Bad Request", "validation_errors": [{"field": "talk_id"}] * 50}

    kept, _ = parse_problem("application/problem+json", orjson.dumps(problem))

    assert kept == problem


def test_a_huge_page_gives_a_short_detail() -> None:
    body = b"   \n<html>" + b"a" * (64 * 1024 * 1024)

    problem, text = parse_problem("text/html", body)

    assert problem == {}
    assert text == ("<html>" + "a" * DETAIL_LIMIT)[:DETAIL_LIMIT]


def test_a_json_problem_after_leading_whitespace_is_still_recognised() -> None:
    body = b" " * 10_000 + orjson.dumps({"title": "Forbidden"})

    assert not is_block(403, "text/plain", body)
