"""Optional OpenTelemetry tracing of the client's calls (extra ``kommo-talks[otel]``).

Off by default, and then free: :func:`make_tracer` returns ``None``, the
pipeline checks for ``None`` and ``opentelemetry`` is never imported. On
(``KommoClient(..., tracing=True)`` or ``KOMMO_TALKS_TRACING=1``), each call
is one client span named ``"{method} {path template}"`` with one event per
attempt. Spans carry the method, the host, the path with IDs replaced by
``{id}``, statuses, attempt numbers and retry causes; never a header, a
token, a body or a query value.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._version import __version__

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context.context import Context
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "ENV_VAR",
    "CallSpan",
    "OtelTracer",
    "make_tracer",
    "path_template",
    "traced",
    "tracing_wanted",
]

T = TypeVar("T")

ENV_VAR: Final = "KOMMO_TALKS_TRACING"
"""The environment variable that turns tracing on (``1``, ``true``, ``yes`` or ``on``)."""
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
# A path segment that names one record: digits, or a UUID (chat IDs in Kommo's chats API).
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# OpenTelemetry's semantic conventions for HTTP clients, and the SDK's own keys.
METHOD: Final = "http.request.method"
TEMPLATE: Final = "url.template"
STATUS: Final = "http.response.status_code"
ERROR_TYPE: Final = "error.type"
ATTEMPT: Final = "kommo_talks.attempt"
RETRY_CAUSE: Final = "kommo_talks.retry_cause"
RESEND_COUNT: Final = "http.request.resend_count"

logger = logging.getLogger("kommo_talks")
# opentelemetry's context and trace modules, set by the first OtelTracer: never
# imported while tracing is off.
_context: Any = None
_trace: Any = None


def path_template(url: str) -> str:
    """The path of ``url`` with every ID segment replaced by ``{id}``; no host, no query.

    ``https://x.kommo.com/api/v4/talks/117/close?a=1`` gives
    ``/api/v4/talks/{id}/close``; a relative path stays relative (``leads/123``
    gives ``leads/{id}``). An ID segment is all digits, or a UUID.
    """
    scheme = url.find("://")
    if scheme >= 0:  # drop the scheme and host
        rest = url[scheme + 3 :]
        ends = [i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
        url = rest[min(ends) :] if ends else ""
    path = url.split("?", 1)[0].split("#", 1)[0]
    return "/".join("{id}" if _is_id(part) else part for part in path.split("/"))


def _is_id(segment: str) -> bool:
    if segment.isdigit():
        return segment.isascii()
    return len(segment) == 36 and _UUID.fullmatch(segment) is not None


def tracing_wanted(tracing: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to trace: ``tracing`` if given, else the :data:`ENV_VAR` environment variable.

    Raises:
        ValueError: ``tracing`` is neither a bool nor ``None``.
    """
    if tracing is None:
        return environ.get(ENV_VAR, "").strip().lower() in _TRUE
    if not isinstance(tracing, bool):
        raise ValueError(f"tracing must be a bool or None, got {tracing!r}")
    return tracing


def make_tracer(tracing: bool | None, host: str) -> OtelTracer | None:
    """The tracer of a client to ``host``, or ``None`` when tracing is off.

    Raises:
        ImportError: ``tracing=True`` but ``opentelemetry-api`` is not
            installed. Turned on by the environment variable only, tracing
            stays off then, with a warning on the ``kommo_talks`` logger.
    """
    if not tracing_wanted(tracing):
        return None
    try:
        return OtelTracer(host)
    except ImportError as exc:
        message = "tracing needs opentelemetry-api: pip install 'kommo-talks[otel]'"
        if tracing:
            raise ImportError(message) from exc
        logger.warning("%s is set but %s; tracing is off", ENV_VAR, message)
        return None


async def traced(
    tracer: OtelTracer, method: str, url: str, run: Callable[[CallSpan], Awaitable[T]]
) -> T:
    """Await ``run(span)`` inside the span of one call, ended with its outcome."""
    span = tracer.start(method, url)
    try:
        result = await run(span)
    except BaseException as exc:
        span.finish(exc)
        raise
    span.finish(None)
    return result


class OtelTracer:
    """Starts one OpenTelemetry span per call, from the global tracer provider."""

    __slots__ = ("_host", "_tracer")

    def __init__(self, host: str) -> None:
        global _context, _trace
        from opentelemetry import context, trace  # imported only when tracing is on

        _context, _trace = context, trace
        self._tracer: Tracer = trace.get_tracer("kommo_talks", __version__)
        self._host = host

    def start(self, method: str, url: str) -> CallSpan:
        """Open the span of one call (current until :meth:`CallSpan.finish`)."""
        template = path_template(url)
        span = self._tracer.start_span(
            f"{method} {template}",
            kind=_trace.SpanKind.CLIENT,
            attributes={METHOD: method, TEMPLATE: template, "server.address": self._host},
        )
        # Current while the call runs: spans of the requests (aiohttp's own
        # instrumentation, if installed) become its children.
        token = _context.attach(_trace.set_span_in_context(span))
        return CallSpan(span, token, method, template)


class CallSpan:
    """The span of one call: :meth:`attempt` after each attempt, :meth:`finish` once.

    An attempt's event is written when what follows it is known: at
    :meth:`retry` (with the cause) or at :meth:`finish` (the last attempt).
    """

    __slots__ = ("_attempts", "_method", "_pending", "_span", "_status", "_template", "_token")

    def __init__(self, span: Span, token: Token[Context], method: str, template: str) -> None:
        self._span = span
        self._token = token
        self._method = method
        self._template = template
        self._attempts = 0
        self._status: int | None = None
        self._pending: dict[str, Any] | None = None

    def attempt(self, number: int, status: int | None, error_type: str | None) -> None:
        """An attempt ended: answered with ``status``, or failed on the wire with ``error_type``."""
        self._flush()
        self._attempts = number
        self._status = status
        attributes: dict[str, Any] = {
            METHOD: self._method,
            TEMPLATE: self._template,
            ATTEMPT: number,
        }
        if status is not None:
            attributes[STATUS] = status
        if error_type is not None:
            attributes[ERROR_TYPE] = error_type
        self._pending = attributes

    def retry(self, cause: int | str) -> None:
        """The last attempt is retried because of ``cause``: its status, or how it failed."""
        pending = self._pending
        if pending is not None:
            pending[RETRY_CAUSE] = "status" if isinstance(cause, int) else cause
            self._flush()

    def finish(self, error: BaseException | None) -> None:
        """End the span: with the last answer's status, or as failed by ``error``."""
        self._flush()
        span = self._span
        if self._attempts > 1:
            span.set_attribute(RESEND_COUNT, self._attempts - 1)
        if self._status is not None:
            span.set_attribute(STATUS, self._status)
        if error is not None:
            # The class name only: a message may quote an answer's body.
            name = type(error).__name__
            span.set_attribute(ERROR_TYPE, name)
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, name))
        span.end()
        _context.detach(self._token)

    def _flush(self) -> None:
        if self._pending is not None:
            self._span.add_event("attempt", self._pending)
            self._pending = None
