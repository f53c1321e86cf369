"""OpenTelemetry tracing, off by default (`DISTILCAST_OTEL=true` turns it on).

Off, `span(name)` returns one shared no-op context manager: no SDK import, no allocation, no
cost. On (the `otel` extra installs the SDK), each forecast request gets a `forecast` span with
`decode`, `inference` and `encode` children, and FastAPI's own request spans are enabled. The
exporter follows the standard `OTEL_TRACES_EXPORTER` variable: `console` (JSON to stdout),
`otlp` (needs `opentelemetry-exporter-otlp-proto-http`; endpoint from
`OTEL_EXPORTER_OTLP_ENDPOINT`), or `none` (spans are made but not exported). The service name is
`OTEL_SERVICE_NAME`, default `distilcast`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import AbstractContextManager
from typing import Any

log = logging.getLogger(__name__)

_NOOP: AbstractContextManager[Any] = contextlib.nullcontext()
_tracer: Any = None  # the active tracer; None: tracing off
_installed: Any = None  # the tracer of the provider installed in this process, if any


def span(name: str) -> AbstractContextManager[Any]:
    """A span named `name` around the block when tracing is on; a shared no-op otherwise."""
    if _tracer is None:
        return _NOOP
    cm: AbstractContextManager[Any] = _tracer.start_as_current_span(name)
    return cm


def _exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            raise RuntimeError(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http"
            ) from None
        return OTLPSpanExporter()
    if kind == "none":
        return None
    raise RuntimeError(f"OTEL_TRACES_EXPORTER={kind!r}: use console, otlp or none")


def setup(enabled: bool) -> None:
    """Turn tracing on or off for the app being built; the SDK's tracer provider is installed
    once per process (OpenTelemetry allows one)."""
    global _tracer, _installed
    if not enabled:
        _tracer = None
        return
    if _installed is not None:
        _tracer = _installed
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise RuntimeError(
            "DISTILCAST_OTEL=true needs the OpenTelemetry SDK: pip install 'distilcast[otel]'"
        ) from None
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "console").split(",")[0].strip() or "console"
    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "distilcast")}
    ))
    exporter = _exporter(kind)
    if exporter is not None:
        # Console output is for looking at: write each span as it ends.
        processor = SimpleSpanProcessor if kind == "console" else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    trace.set_tracer_provider(provider)
    _installed = _tracer = trace.get_tracer("distilcast")
    log.info("OpenTelemetry tracing on (exporter: %s)", kind)
