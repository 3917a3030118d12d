"""OpenTelemetry set-up shared by every service and client.

Each process gets one TracerProvider whose resource carries ``service.name``; spans go to an OTLP gRPC
endpoint (Jaeger ingests OTLP natively) when one is configured. W3C trace context crosses every hop through
the gRPC server and client interceptors of ``opentelemetry-instrumentation-grpc``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor, server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)
_lock = threading.Lock()
_provider: TracerProvider | None = None
_meter_provider: object | None = None


def setup_tracing(service_name: str, otlp_endpoint: str = "", prometheus: bool = False) -> TracerProvider:
    """Create (once per process) the tracer provider for ``service_name`` and make it global.

    With ``otlp_endpoint`` (e.g. ``http://127.0.0.1:4317``) spans are batched to that OTLP gRPC receiver.
    Later calls return the first provider: a process is one service.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            insecure = not otlp_endpoint.startswith("https://")
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)))
            log.info("exporting spans", extra={"otlp_endpoint": otlp_endpoint})
        trace.set_tracer_provider(provider)
        _setup_metrics(service_name, otlp_endpoint, prometheus)
        _provider = provider
        return provider


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
    """The process's provider; a provider without exporter if tracing was never set up."""
    return _provider if _provider is not None else setup_tracing("guardmesh-client")


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


def server_tracing_interceptor() -> grpc.ServerInterceptor:
    """Server interceptor: a SERVER span per RPC, parented by the caller's traceparent."""
    return server_interceptor(tracer_provider=tracer_provider())


def client_tracing_interceptor() -> object:
    """Client interceptor: a CLIENT span per call, with traceparent injected into the metadata."""
    return client_interceptor(tracer_provider=tracer_provider())
