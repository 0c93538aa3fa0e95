"""OpenTelemetry tracing for hub and agent: one small facade, free when tracing is off.

Off unless the `otel` extra is installed and the standard OTEL_* variables name an exporter
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER`;
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off). Until `configure()`
finds both, `span()` returns one shared no-op context manager and nothing here imports
opentelemetry: the agent's footprint is a target, and shared/ itself depends on pydantic only.

Spans leave through the SDK's BatchSpanProcessor (bounded queue, `OTEL_BSP_*`) on its own
thread, so a collector that is down or slow costs dropped spans, counted by `stats()`, never
a blocked request, rollout step or update. Exit waits at most a couple of seconds for it.
Trace context crosses processes as a W3C `traceparent` (`shared.tracecontext`): an HTTP
header, or an MQTT 5 user property of desired states and commands.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from shared.tracecontext import USER_PROPERTY, TraceParent

__all__ = [
    "capture",
    "configure",
    "current",
    "enabled",
    "provider",
    "remote",
    "resumed",
    "shutdown",
    "span",
    "stats",
    "traced",
    "user_properties",
    "wanted",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_NOOP: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


class _State:
    tracer: Any = None  # an opentelemetry Tracer once configured
    provider: Any = None
    counter: Any = None  # the _Counting exporter
    lock = threading.Lock()


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Return True when the OTEL_* variables ask for traces (an exporter named, SDK not disabled)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter) or any(env.get(name, "").strip() for name in _ENDPOINT_VARS)


def configure(service_name: str, attributes: Mapping[str, str] | None = None) -> bool:
    """Start tracing when the environment asks for it and the SDK is installed; return whether on."""
    with _State.lock:
        if _State.tracer is not None:
            return True
        if not wanted():
            return False
        try:
            _State.provider, _State.counter = _build(service_name, dict(attributes or {}))
        except ImportError as exc:
            logger.warning("OTEL_* asks for traces but the otel extra is not installed (%s): tracing off", exc)
            return False
        except Exception as exc:  # a bad OTEL_* value must not stop a daemon: it runs untraced
            logger.warning("tracing not started: %s", exc)
            return False
        _State.tracer = _State.provider.get_tracer("autodl")
        # The SDK logs a warning per span a full queue drops: a dead collector would flood the
        # log. They are counted (stats(), on /metrics) instead.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
        # And a retry per second to a dead collector is not news either: its failed batches are.
        logging.getLogger("opentelemetry.exporter").setLevel(logging.ERROR)
        atexit.register(shutdown)
        logger.info("tracing on: %s spans of %s", type(_State.counter.inner).__name__, service_name)
        return True


def enabled() -> bool:
    """Return True once tracing is configured."""
    return _State.tracer is not None


def provider() -> Any:
    """Return the SDK TracerProvider (None when off), for instrumentation libraries."""
    return _State.provider


def shutdown(timeout_s: float = 2.0) -> None:
    """Flush what is queued, waiting at most `timeout_s`: a dead collector does not hold up exit."""
    tracer_provider, counter = _State.provider, _State.counter
    if tracer_provider is None:
        return
    _State.tracer = None  # spans after this are no-ops

    def finish() -> None:
        tracer_provider.force_flush(int(timeout_s * 1000))
        # The exporter's own shutdown first: it ends a retry loop to a dead collector,
        # which the processor's shutdown would otherwise wait out.
        counter.inner.shutdown()
        tracer_provider.shutdown()

    # On a daemon thread: whatever the SDK waits for, exit waits `timeout_s` at most.
    done = threading.Thread(target=finish, name="otel-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)


def stats() -> dict[str, int]:
    """Return span counts by outcome (exported, failed, dropped); empty when tracing is off."""
    counter = _State.counter
    if counter is None:
        return {}
    return {"exported": counter.exported, "failed": counter.failed, "dropped": counter.dropped}


def span(
    name: str, attributes: Mapping[str, Any] | None = None, parent: TraceParent | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Return a context manager timing `name` as a child of the current span (or of `parent`)."""
    tracer = _State.tracer
    if tracer is None:
        return _NOOP
    context = _remote_context(parent) if parent is not None else None
    return tracer.start_as_current_span(name, context=context, attributes=dict(attributes or {}))  # type: ignore[no-any-return]


def traced(name: str) -> Callable[[F], F]:
    """Decorate a function so that each call is one span named `name` (free when tracing is off)."""

    def wrap(function: F) -> F:
        import functools

        @functools.wraps(function)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if _State.tracer is None:
                return function(*args, **kwargs)
            with span(name):
                return function(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def current() -> TraceParent | None:
    """Return the current span as a `traceparent` to send on (None when off or outside a span)."""
    if _State.tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return TraceParent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))


def user_properties() -> list[tuple[str, str]]:
    """Return the MQTT 5 user properties that carry the current span (empty when off)."""
    parent = current()
    return [] if parent is None else [(USER_PROPERTY, parent.format())]


def capture() -> Any:
    """Return the current trace context, to continue it on another thread (None when off)."""
    if _State.tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


@contextlib.contextmanager
def resumed(captured: Any) -> Iterator[None]:
    """Make a context from `capture()` current on this thread for the block."""
    if captured is None or _State.tracer is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(captured)
    try:
        yield
    finally:
        context.detach(token)


def remote(parent: TraceParent | None) -> contextlib.AbstractContextManager[Any]:
    """Make a remote parent (a parsed `traceparent`) the current context for the block."""
    if parent is None or _State.tracer is None:
        return _NOOP
    return resumed(_remote_context(parent))


def _remote_context(parent: TraceParent) -> Any:
    from opentelemetry import trace

    span_context = trace.SpanContext(
        trace_id=parent.trace_id, span_id=parent.span_id, is_remote=True, trace_flags=trace.TraceFlags(parent.flags)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _exporter() -> Any:
    """Return the span exporter that the OTEL_* variables name (it reads its endpoint itself)."""
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: only otlp, console and none are supported")
    protocol = next((os.environ[v].strip() for v in _PROTOCOL_VARS if os.environ.get(v, "").strip()), "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r}: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _build(service_name: str, attributes: dict[str, str]) -> tuple[Any, Any]:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class _Counting(SpanExporter):
        """Counts what the wrapped exporter sent and what it failed to send."""

        def __init__(self, inner: SpanExporter) -> None:
            self.inner = inner
            self.exported = 0
            self.failed = 0
            self.dropped = 0  # refused by the full queue (counted by _Ended)

        def export(self, spans: Any) -> SpanExportResult:
            try:
                result = self.inner.export(spans)
            except Exception:  # an exporter bug must not kill the export thread
                logger.exception("span export failed")
                result = SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(self.inner.force_flush(timeout_millis))

    class _Ended(BatchSpanProcessor):
        """The SDK's batch processor, counting the spans its full queue drops (it only logs them)."""

        def on_end(self, span: Any) -> None:
            batch = getattr(self, "_batch_processor", None)
            queue = getattr(batch, "_queue", None)
            if queue is not None and len(queue) >= getattr(batch, "_max_queue_size", 1 << 62):
                counter.dropped += 1
            super().on_end(span)

    env_attributes = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    resource = Resource.create({**attributes, **({} if env_attributes else {SERVICE_NAME: service_name})})
    counter = _Counting(_exporter())
    processor = _Ended(counter)
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    tracer_provider.add_span_processor(processor)
    return tracer_provider, counter
