"""An in-memory OpenTelemetry exporter behind the global tracer provider, set once per run.

OpenTelemetry lets a process set its global tracer provider only once, so every
test that looks at spans shares this one and clears it first (:func:`spans`).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter: InMemorySpanExporter | None = None


def span_exporter() -> InMemorySpanExporter:
    """The exporter of the global provider (installed on first use), emptied."""
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    return _exporter


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The spans ended so far, oldest first."""
    return list(exporter.get_finished_spans())
