"""The tracing module: path templates, switching on, and the spans it makes (no I/O)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from otel_support import finished, span_exporter

from kommo_talks._tracing import ENV_VAR, OtelTracer, make_tracer, path_template, tracing_wanted


@pytest.mark.parametrize(
    ("url", "template"),
    [
        ("/api/v4/talks/117/close", "/api/v4/talks/{id}/close"),
        ("leads/123", "leads/{id}"),
        ("/api/v4/talks/117", "/api/v4/talks/{id}"),
        ("/api/v4/talks", "/api/v4/talks"),
        ("https://x.kommo.com/api/v4/talks/117?filter[id]=5", "/api/v4/talks/{id}"),
        ("http://127.0.0.1:8080/api/v4/leads/9/notes/10", "/api/v4/leads/{id}/notes/{id}"),
        ("/api/v4/talks?page=2&limit=250", "/api/v4/talks"),
        ("/api/v4/talks/117#frag", "/api/v4/talks/{id}"),
        ("/oauth2/access_token", "/oauth2/access_token"),
        ("/api/v4/v4leads/12a", "/api/v4/v4leads/12a"),  # not all digits: a name, kept
        (
            "/api/v4/chats/4f1c2a3b-1d2e-4f5a-8b9c-0a1b2c3d4e5f/messages",
            "/api/v4/chats/{id}/messages",
        ),
        ("", ""),
        ("https://x.kommo.com", ""),
        ("https://x.kommo.com?page=2", ""),
        ("http://[::1]:8080/api/v4/talks/5", "/api/v4/talks/{id}"),
        ("/api/v4/talks/\u0661\u0662", "/api/v4/talks/\u0661\u0662"),  # not ASCII digits: kept
    ],
)
def test_path_template_replaces_ids_and_drops_host_and_query(url: str, template: str) -> None:
    assert path_template(url) == template


@pytest.mark.parametrize(
    ("tracing", "env", "wanted"),
    [
        (None, {}, False),
        (None, {ENV_VAR: "1"}, True),
        (None, {ENV_VAR: " TRUE "}, True),
        (None, {ENV_VAR: "on"}, True),
        (None, {ENV_VAR: "0"}, False),
        (None, {ENV_VAR: ""}, False),
        (False, {ENV_VAR: "1"}, False),  # the argument wins
        (True, {}, True),
    ],
)
def test_tracing_is_on_by_argument_else_by_environment(
    tracing: bool | None, env: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(tracing, env) is wanted


def test_tracing_must_be_a_bool_or_none() -> None:
    with pytest.raises(ValueError, match="tracing must be a bool or None"):
        tracing_wanted("yes")  # type: ignore[arg-type]


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys, kommo_talks\n"
        "from kommo_talks._tracing import make_tracer\n"
        "assert make_tracer(None, 'h') is None and make_tracer(False, 'h') is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={ENV_VAR: "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_tracing_true_without_opentelemetry_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed

    with pytest.raises(ImportError, match=r"kommo-talks\[otel\]"):
        make_tracer(True, "example.kommo.com")


def test_tracing_by_environment_without_opentelemetry_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setenv(ENV_VAR, "1")

    with caplog.at_level(logging.WARNING, logger="kommo_talks"):
        assert make_tracer(None, "example.kommo.com") is None
    assert "kommo-talks[otel]" in caplog.text


def test_a_call_is_one_client_span_with_an_event_per_attempt() -> None:
    exporter = span_exporter()
    tracer = OtelTracer("x.kommo.com")

    call = tracer.start("GET", "https://x.kommo.com/api/v4/talks/117?secret=abc")
    call.attempt(1, 503, None)
    call.retry(503)
    call.attempt(2, None, "ServerDisconnectedError")
    call.retry("connection")
    call.attempt(3, 200, None)
    call.finish(None)

    [span] = finished(exporter)
    assert span.name == "GET /api/v4/talks/{id}"
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.template": "/api/v4/talks/{id}",
        "server.address": "x.kommo.com",
        "http.request.resend_count": 2,
        "http.response.status_code": 200,
    }
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        (
            "attempt",
            {
                "http.request.method": "GET",
                "url.template": "/api/v4/talks/{id}",
                "kommo_talks.attempt": 1,
                "http.response.status_code": 503,
                "kommo_talks.retry_cause": "status",
            },
        ),
        (
            "attempt",
            {
                "http.request.method": "GET",
                "url.template": "/api/v4/talks/{id}",
                "kommo_talks.attempt": 2,
                "error.type": "ServerDisconnectedError",
                "kommo_talks.retry_cause": "connection",
            },
        ),
        (
            "attempt",
            {
                "http.request.method": "GET",
                "url.template": "/api/v4/talks/{id}",
                "kommo_talks.attempt": 3,
                "http.response.status_code": 200,
            },
        ),
    ]
    assert span.status.status_code is StatusCode.UNSET


def test_a_failed_call_marks_its_span_as_an_error_by_class_name_only() -> None:
    exporter = span_exporter()
    call = OtelTracer("x.kommo.com").start("POST", "/api/v4/talks/5/close")

    call.attempt(1, 404, None)
    call.finish(LookupError("the body said: token abc123"))

    [span] = finished(exporter)
    assert span.name == "POST /api/v4/talks/{id}/close"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "LookupError"
    assert (span.attributes or {})["error.type"] == "LookupError"
    assert (span.attributes or {})["http.response.status_code"] == 404
    assert "abc123" not in repr(span.to_json())


def test_the_call_span_is_current_while_the_call_runs() -> None:
    from opentelemetry import trace

    span_exporter()
    outside = trace.get_current_span()
    call = OtelTracer("x.kommo.com").start("GET", "/api/v4/talks/1")

    inside = trace.get_current_span()
    call.finish(None)

    assert inside is not outside
    assert inside.get_span_context().is_valid
    assert trace.get_current_span() is outside
