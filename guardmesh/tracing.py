"""OpenTelemetry set-up shared by every service and client.

Each process gets one TracerProvider whose resource carries ``service.name``; spans go where the standard
variables say: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none`` or a comma-separated list; ``otlp``
when an endpoint is set, else none), ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
(Jaeger ingests OTLP natively), ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` for an application
(a service's name is its own). W3C trace context crosses every hop through the gRPC server and client
interceptors of ``opentelemetry-instrumentation-grpc``; health checks are not traced.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from contextvars import Token
from pathlib import Path

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import client_interceptor, filters, server_interceptor
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.instrumentation.grpc._server import _wrap_rpc_behavior
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from guardmesh.handlers import Behaviour, BehaviourInterceptor, is_async, within

log = logging.getLogger(__name__)
_lock = threading.Lock()
_provider: TracerProvider | None = None
_meter_provider: object | None = None
#: Methods never traced (load balancers and discovery call them all the time).
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


class MeshTracerProvider(TracerProvider):
    """The provider :func:`setup_tracing` creates: it knows whether any span processor was added, so that the
    server interceptor creates spans only when they go somewhere (an exporter, or a processor a test or an
    application adds later)."""

    recording = False

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        """Add ``span_processor``; from now on servers record spans."""
        super().add_span_processor(span_processor)
        self.recording = True


def spans_recorded(provider: TracerProvider | None = None) -> bool:
    """Whether spans of ``provider`` (default the process's) would reach a processor: always with a provider
    the application set up itself."""
    provider = tracer_provider() if provider is None else provider
    return not isinstance(provider, MeshTracerProvider) or provider.recording


def setup_tracing(
    service_name: str = "", otlp_endpoint: str = "", prometheus: bool = False, env: Mapping[str, str] | None = None
) -> TracerProvider:
    """Create (once per process) the tracer provider and make it global.

    ``service_name`` names a service; empty (an application using the SDK), ``OTEL_SERVICE_NAME`` names it,
    else the script's name. Spans go to the exporters :func:`span_exporters` picks from ``env`` (default
    ``os.environ``) and ``otlp_endpoint``. Later calls return the first provider: a process is one service.
    """
    global _provider
    env = os.environ if env is None else env
    with _lock:
        if _provider is not None:
            return _provider
        existing = trace.get_tracer_provider()
        if isinstance(existing, TracerProvider):  # the application set OpenTelemetry up itself: use its provider
            _provider = existing
            return existing
        name = service_name or env.get("OTEL_SERVICE_NAME") or _script_name()
        provider = MeshTracerProvider(resource=Resource.create({"service.name": name}))
        for exporter in span_exporters(otlp_endpoint, env):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _setup_metrics(name, _otlp_endpoint(otlp_endpoint, env), prometheus)
        _provider = provider
        return provider


def _script_name() -> str:
    script = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else ""
    return script or "guardmesh-client"


def _otlp_endpoint(configured: str, env: Mapping[str, str]) -> str:
    return configured or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def span_exporters(otlp_endpoint: str = "", env: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (``otlp``, ``console``, ``none``; comma-separated); unset,
    OTLP when an endpoint is configured and none otherwise. An unknown name is logged and skipped."""
    env = os.environ if env is None else env
    endpoint = _otlp_endpoint(otlp_endpoint, env)
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not named:
        named = ["otlp"] if endpoint else []
    exporters: list[SpanExporter] = []
    for name in named:
        if name == "none":
            return []
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            target = endpoint or "http://localhost:4317"  # the OTLP default
            exporters.append(OTLPSpanExporter(endpoint=target, insecure=not target.startswith("https://")))
            log.info("exporting spans", extra={"otlp_endpoint": target})
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER: unknown exporter skipped", extra={"exporter": name})
    return exporters


def _setup_metrics(service_name: str, otlp_endpoint: str, prometheus: bool) -> None:
    """A meter provider for the services' OpenTelemetry instruments, exported over OTLP when configured and
    readable by Prometheus (through prometheus_client's registry) when ``prometheus``."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    readers: list[MetricReader] = []
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        insecure = not otlp_endpoint.startswith("https://")
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=insecure)))
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        # No otel_scope_* labels: the metric names already say which service (and scope) they come from.
        readers.append(PrometheusMetricReader(scope_info_enabled=False))
    global _meter_provider
    _meter_provider = MeterProvider(resource=Resource.create({"service.name": service_name}), metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)


def start_metrics_endpoint(host: str, port: int) -> Callable[[], None] | None:
    """Serve ``/metrics`` for Prometheus on ``host:port``; returns a function that stops it, or None (and a
    warning) when the port cannot be bound: metrics never keep a service from starting."""
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics endpoint not started", extra={"port": port, "error": str(exc)})
        return None
    log.info("metrics endpoint", extra={"address": f"http://{host}:{port}/metrics"})

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def tracer_provider() -> TracerProvider:
    """The process's provider; set up from the ``OTEL_*`` variables (an application's) if it was not yet."""
    return _provider if _provider is not None else setup_tracing()


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Export buffered spans now, as part of the drain, rather than relying on interpreter-exit hooks
    (which a SIGTERM without our handler, or os._exit in a worker, never runs)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)
    if _meter_provider is not None:
        _meter_provider.force_flush(timeout_ms)  # type: ignore[attr-defined]


def shutdown_tracing() -> None:
    """Flush and stop the exporter."""
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()
    if _meter_provider is not None:
        _meter_provider.shutdown()  # type: ignore[attr-defined]


class ServerTracing(BehaviourInterceptor):
    """Server spans, only when they are recorded somewhere; health checks never.

    While a span processor is set (:func:`spans_recorded`), every call but a health check goes through
    ``opentelemetry-instrumentation-grpc``'s server interceptor: a SERVER span parented by the caller's
    ``traceparent``, with its status code. Without one, spans would be built and dropped, the largest part of
    what the interceptors cost a call (``python -m bench.runtime --profile runtime_echo``), so none is built: a
    call that carries trace context runs with that context attached instead, so that the calls it makes and
    the lines it logs stay in the caller's trace.
    """

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = tracer_provider() if provider is None else provider
        self._spans = server_interceptor(tracer_provider=self._provider, filter_=None)
        # Its aio twin builds the same spans around ``async def`` behaviours (a grpc.aio server's hot handlers).
        self._aio_spans = OpenTelemetryAioServerInterceptor(self._spans._tracer, filter_=None)
        self._fields = frozenset(propagate.get_global_textmap().fields)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """A span per call while spans are recorded; the caller's context attached otherwise."""
        if handler_call_details.method in HEALTH_METHODS:
            return continuation(handler_call_details)
        if spans_recorded(self._provider):
            handler = continuation(handler_call_details)
            if handler is not None and is_async(_behaviour(handler)):
                return _wrap_rpc_behavior(handler, self._aio_span_wrapper(handler_call_details))  # type: ignore[no-any-return]
            return self._spans.intercept_service(lambda _: handler, handler_call_details)  # type: ignore[no-any-return]
        return super().intercept_service(continuation, handler_call_details)

    def _aio_span_wrapper(self, details: grpc.HandlerCallDetails) -> Callable[[Behaviour, bool, bool], Behaviour]:
        """What OpenTelemetryAioServerInterceptor.intercept_service wraps a handler with (it is a coroutine
        there, and the runtime resolves handlers through its interceptors synchronously)."""
        spans = self._aio_spans

        def wrap(behaviour: Behaviour, request_streaming: bool, response_streaming: bool) -> Behaviour:
            if response_streaming:
                return spans._intercept_aio_server_stream(behaviour, details)  # type: ignore[no-any-return]
            return spans._intercept_aio_server_unary(behaviour, details)  # type: ignore[no-any-return]

        return wrap

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """``behaviour`` run in the caller's trace context when its metadata carries one."""
        return within(behaviour, streaming, self._attach_callers_context, otel_context.detach)

    def _attach_callers_context(self, context: grpc.ServicerContext) -> Token[Context] | None:
        metadata = context.invocation_metadata()
        if not any(key in self._fields for key, _ in metadata):
            return None
        return otel_context.attach(propagate.extract({key: value for key, value in metadata if isinstance(value, str)}))


def _behaviour(handler: grpc.RpcMethodHandler) -> Behaviour:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[no-any-return]


def server_tracing_interceptor() -> grpc.ServerInterceptor:
    """Server interceptor: a SERVER span per RPC but health checks, parented by the caller's traceparent, while
    spans are recorded (:class:`ServerTracing`)."""
    return ServerTracing()


def client_tracing_interceptor() -> object:
    """Client interceptor: a CLIENT span per call but health checks, with traceparent injected into the
    metadata; without a current span it is the trace's root. Built whether or not spans are exported (unlike
    server spans): the called service's span is parented by this client span in every process, as
    tests/test_tracing.py pins."""
    return client_interceptor(tracer_provider=tracer_provider(), filter_=filters.negate(filters.health_check()))
