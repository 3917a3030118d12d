"""A small, real OTLP/gRPC trace receiver for tests.

It stands in for Jaeger's OTLP ingest (the same protocol: ``opentelemetry.proto.collector.trace.v1.TraceService/
Export`` over gRPC, the endpoint ``OTEL_EXPORTER_OTLP_ENDPOINT`` points at). Nothing is mocked: services export
to it with the stock ``OTLPSpanExporter`` over a real gRPC connection, and it flattens every span it receives
into a :class:`ReceivedSpan` the test can assert on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: ids as lowercase hex, kind as ``SERVER``/``CLIENT``/``INTERNAL``/..."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service_name: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parent = self.parent_span_id or "-"
        return f"{self.service_name}:{self.kind}:{self.name} trace={self.trace_id} span={self.span_id} parent={parent}"


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _kind(kind: int) -> str:
    return trace_pb2.Span.SpanKind.Name(kind).removeprefix("SPAN_KIND_")


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service_name = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=_kind(span.kind),
                            service_name=service_name,
                            attributes=_attributes(span.attributes),
                        )
                    )
        self.sink._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP gRPC trace receiver on ``127.0.0.1:<ephemeral port>`` collecting every exported span."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.export_calls = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        if self.port == 0:
            raise RuntimeError("OTLP receiver: cannot bind 127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of the spans received so far."""
        with self._cond:
            return list(self._spans)

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.export_calls += 1
            self._spans.extend(spans)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds and return the spans; TimeoutError listing them if it never does."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    listing = "\n  ".join(str(s) for s in self._spans) or "(none)"
                    raise TimeoutError(f"spans not received within {timeout}s; received:\n  {listing}")
                self._cond.wait(left)
            return list(self._spans)

    def stop(self) -> None:
        """Stop the server at once."""
        self._server.stop(0).wait()
