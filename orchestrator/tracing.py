"""OpenTelemetry tracing, switched on by `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); every other standard `OTEL_*` variable is honoured by the
SDK itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`,
`OTEL_EXPORTER_OTLP_HEADERS`, ...). `OTEL_EXPORTER_OTLP_PROTOCOL` picks the exporter: `grpc` or
`http/protobuf` (the default, as the OpenTelemetry specification recommends).

Unset, nothing here imports the SDK or the API: every helper is a no-op that costs one check.

Each process calls `setup(role)` once (the CLI entry points; a prefork Celery child from
`worker_process_init`). It installs the SDK's instrumentation for Flask (HTTP requests), Celery
(publishing a task puts the trace context in its headers; running it continues that trace),
requests (calls to the media services and GitLab) and confluent-kafka on the outbox's producer
(`instrument_kafka_producer`: a send span, W3C `traceparent`/`tracestate` in the headers).
Written by hand here: spans for engine transitions and outbox publishes, the propagation through
the outbox row (`carrier()` stored in `outbox.trace_context`, the publish span's parent), and the
bridge's consume span, parented from the message's headers (the instrumentation's consumer only
links a consumed message's trace, under a `recv` span of a trace of its own).

Every span about an instance carries `workflow.id`, `workflow.type` and, where they apply,
`workflow.key`, `workflow.step`, `workflow.attempt` (`workflow_attributes`).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Mapping

log = logging.getLogger(__name__)

#: The tracer, once `setup` switched tracing on in this process; None: every helper is a no-op.
_tracer: Any = None
_instrumented: set[str] = set()


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an OTLP endpoint is set (tracing is wanted)."""
    env = os.environ if environ is None else environ
    return bool((env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "")
                .strip()) and (env.get("OTEL_SDK_DISABLED") or "").lower() != "true"


def enabled() -> bool:
    return _tracer is not None


def setup(role: str) -> bool:
    """Switch tracing on in this process when an OTLP endpoint is configured: a tracer provider
    with a batching OTLP exporter, service name `OTEL_SERVICE_NAME` or `orchestrator-<role>`, and
    the Celery and requests instrumentation. Idempotent: a forked child (a prefork Celery pool
    process, a gunicorn worker) keeps its parent's provider, whose exporter thread the SDK starts
    again after the fork. Returns whether tracing is on."""
    global _tracer
    if not configured():
        return False
    if _tracer is not None:
        return True
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"orchestrator-{role}"}
    provider = TracerProvider(resource=Resource.create({"process.role": role, **attrs}))
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("orchestrator")
    _instrument()
    log.info("tracing on: spans exported over OTLP (%s)", _protocol())
    return True


def _protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip()


def _exporter() -> Any:
    protocol = _protocol()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; using http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter
    return HTTPExporter()


def _instrument() -> None:
    if "celery" not in _instrumented:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        CeleryInstrumentor().instrument()
        _instrumented.add("celery")
    if "requests" not in _instrumented:
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        RequestsInstrumentor().instrument()
        _instrumented.add("requests")


def instrument_flask(app: Any) -> None:
    """Spans for the app's HTTP requests (Flask instrumentation); no-op when tracing is off."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    FlaskInstrumentor().instrument_app(app)


def flush(timeout_seconds: float = 5.0) -> None:
    """Export what is buffered (before a process exits on its own)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(int(timeout_seconds * 1000))


def workflow_attributes(instance_id: str | None, type_name: str | None = None, key: str | None = None,
                        step: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    """The span attributes about one instance (only those given)."""
    values = {"workflow.id": instance_id, "workflow.type": type_name, "workflow.key": key,
              "workflow.step": step, "workflow.attempt": attempt}
    return {k: v for k, v in values.items() if v is not None}


def span(name: str, attributes: Mapping[str, Any] | None = None, *, parent: Mapping[str, str] | None = None,
         link: Mapping[str, str] | None = None, kind: str = "internal", new_trace: bool = False
         ) -> ContextManager[Any]:
    """A span around a block (a null context when tracing is off). `parent`: a carrier (see
    `carrier`) to continue instead of the current context; `new_trace`: start a trace of its own;
    `link`: a carrier of another trace to link to (the instance's first trace). `kind`:
    internal, producer, consumer, client or server."""
    if _tracer is None:
        return nullcontext()
    return _span(name, attributes, parent, link, kind, new_trace)


@contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None, parent: Mapping[str, str] | None,
          link: Mapping[str, str] | None, kind: str, new_trace: bool) -> Iterator[Any]:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    ctx = otel_context.Context() if new_trace else extract(dict(parent)) if parent else None
    links = []
    if link:
        linked = trace.get_current_span(extract(dict(link))).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    with _tracer.start_as_current_span(name, context=ctx, kind=getattr(trace.SpanKind, kind.upper()),
                                       attributes=dict(attributes or {}), links=links) as current:
        yield current


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (e.g. workflow.* on a Celery task's span)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (`traceparent`, `tracestate`), for an outbox row
    or a message; None when tracing is off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry.propagate import inject
    out: dict[str, str] = {}
    inject(out)
    return out or None


def instrument_kafka_producer(producer: Any) -> Any:
    """The confluent-kafka `Producer` traced by the SDK's instrumentation when tracing is on (each
    `produce` is a `<topic> send` span, child of the current one, whose context goes into the
    message's headers as `traceparent`/`tracestate`); the producer itself when it is off. The
    instrumentation wraps an instance (a proxy with `produce`, `flush`, `poll`, `purge`): the
    C-extension class cannot be patched."""
    if _tracer is None:
        return producer
    from opentelemetry import trace
    from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor
    return ConfluentKafkaInstrumentor.instrument_producer(producer, tracer_provider=trace.get_tracer_provider())
