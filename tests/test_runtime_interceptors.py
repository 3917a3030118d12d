"""The runtime's per-call work (issue #22): interceptors build their handlers once per method, and server spans
are built only while a span processor takes them, the caller's trace context carried either way.

A real gRPC server on port 0 with the runtime's tracing interceptor over its own tracer provider (not the
process's, which other tests add processors to), a real channel sending W3C ``traceparent`` metadata; the
same on the runtime's grpc.aio server, for ``async def`` handlers and plain ones, with a refusal and a domain
error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from guardmesh.aio_server import LoopServer
from guardmesh.errors import DomainErrorInterceptor, InvalidArgument
from guardmesh.handlers import Behaviour, BehaviourInterceptor, CallRefused, within
from guardmesh.tracing import MeshTracerProvider, ServerTracing

METHOD = "/guardmesh.test.Probe/Look"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


class _Counting(BehaviourInterceptor):
    def __init__(self) -> None:
        self.wraps = 0

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        self.wraps += 1
        return behaviour


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _echo(request: Any, context: Any) -> Any:
    return request


def test_a_behaviour_interceptor_wraps_each_method_once_and_again_when_its_handler_changes() -> None:
    interceptor = _Counting()
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    first = interceptor.intercept_service(lambda d: handler, _Details(METHOD))
    second = interceptor.intercept_service(lambda d: handler, _Details(METHOD))
    assert first is not None and second is first and interceptor.wraps == 1
    other = interceptor.intercept_service(lambda d: handler, _Details("/guardmesh.test.Probe/Other"))
    assert other is not first and interceptor.wraps == 2
    replaced = grpc.unary_unary_rpc_method_handler(_echo)
    third = interceptor.intercept_service(lambda d: replaced, _Details(METHOD))
    assert third is not first and interceptor.wraps == 3
    assert third is not None and third.unary_unary is _echo


@pytest.fixture
def probe() -> Iterator[tuple[grpc.Channel, MeshTracerProvider, list[trace.Span]]]:
    """A server whose one method records the span current while it runs; a channel to it."""
    provider = MeshTracerProvider()
    seen: list[trace.Span] = []

    def look(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(trace.get_current_span())
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ServerTracing(provider)])
    handlers = {"Look": grpc.unary_unary_rpc_method_handler(look)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("guardmesh.test.Probe", handlers),))
    with _serving(server) as channel:
        yield channel, provider, seen


@contextlib.contextmanager
def _serving(server: grpc.Server | LoopServer) -> Iterator[grpc.Channel]:
    """Start ``server`` on a free port; a channel to it; the server stopped on the way out."""
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        assert server.stop(0).wait(30)


def test_no_server_span_without_a_processor_yet_the_callers_trace_is_carried_and_spans_start_with_one(
    probe: tuple[grpc.Channel, MeshTracerProvider, list[trace.Span]],
) -> None:
    channel, provider, seen = probe
    call = channel.unary_unary(METHOD)
    assert call(b"x", metadata=(("traceparent", TRACEPARENT),), timeout=30) == b"x"
    carried = seen[-1]
    assert not carried.is_recording()  # no span built: nothing would take it
    assert (carried.get_span_context().trace_id, carried.get_span_context().span_id) == (TRACE_ID, CALLER_SPAN_ID)
    assert call(b"y", timeout=30) == b"y"
    assert not seen[-1].get_span_context().is_valid  # no caller's context, no span: no trace at all

    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # as a test or an application may, later
    assert call(b"z", metadata=(("traceparent", TRACEPARENT),), timeout=30) == b"z"
    (span,) = exporter.get_finished_spans()
    assert seen[-1].get_span_context().span_id == span.context.span_id  # the server span ran the call
    assert span.name == METHOD and span.kind == trace.SpanKind.SERVER
    assert span.context.trace_id == TRACE_ID and span.parent is not None and span.parent.span_id == CALLER_SPAN_ID
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]


class _Refusing(BehaviourInterceptor):
    """Refuses a call whose metadata says ``deny`` (PERMISSION_DENIED) before its behaviour runs, as the
    authorization interceptor does, through :func:`within`."""

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        def enter(context: Any) -> None:
            if ("deny", "1") in tuple(context.invocation_metadata()):
                raise CallRefused(grpc.StatusCode.PERMISSION_DENIED, "denied by the probe")

        return within(behaviour, streaming, enter, lambda token: None)


@pytest.fixture
def aio_probe() -> Iterator[tuple[grpc.Channel, MeshTracerProvider, list[trace.Span]]]:
    """The runtime's grpc.aio server with tracing, a refusing interceptor and domain errors: ``Look`` async
    (on its loop), ``LookPlain`` a plain function (on its pool), ``Fail`` async raising a domain error."""
    provider = MeshTracerProvider()
    seen: list[trace.Span] = []

    async def look(request: bytes, context: Any) -> bytes:
        seen.append(trace.get_current_span())
        return request

    def look_plain(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(trace.get_current_span())
        return request

    async def fail(request: bytes, context: Any) -> bytes:
        raise InvalidArgument("probe.size", "must be positive")

    interceptors = [ServerTracing(provider), _Refusing(), DomainErrorInterceptor()]
    server = LoopServer("probe", futures.ThreadPoolExecutor(max_workers=4), interceptors, [])
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {"Look": look, "LookPlain": look_plain, "Fail": fail}.items()
    }
    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("guardmesh.test.Probe", handlers),))
    with _serving(server) as channel:
        yield channel, provider, seen


@pytest.mark.parametrize("method", ["Look", "LookPlain"])
def test_on_the_aio_server_async_and_plain_handlers_carry_the_callers_trace_and_get_server_spans(
    aio_probe: tuple[grpc.Channel, MeshTracerProvider, list[trace.Span]], method: str
) -> None:
    channel, provider, seen = aio_probe
    call = channel.unary_unary(f"/guardmesh.test.Probe/{method}")
    assert call(b"x", metadata=(("traceparent", TRACEPARENT),), timeout=30) == b"x"
    carried = seen[-1]
    assert not carried.is_recording()
    assert (carried.get_span_context().trace_id, carried.get_span_context().span_id) == (TRACE_ID, CALLER_SPAN_ID)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert call(b"z", metadata=(("traceparent", TRACEPARENT),), timeout=30) == b"z"
    (span,) = exporter.get_finished_spans()
    assert seen[-1].get_span_context().span_id == span.context.span_id
    assert span.kind == trace.SpanKind.SERVER and span.name == f"/guardmesh.test.Probe/{method}"
    assert span.parent is not None and span.parent.span_id == CALLER_SPAN_ID


@pytest.mark.parametrize("method", ["Look", "LookPlain"])
def test_on_the_aio_server_a_refusal_and_a_domain_error_end_the_call_with_their_status(
    aio_probe: tuple[grpc.Channel, MeshTracerProvider, list[trace.Span]], method: str
) -> None:
    channel, _, seen = aio_probe
    before = len(seen)
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(f"/guardmesh.test.Probe/{method}")(b"x", metadata=(("deny", "1"),), timeout=30)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "denied by the probe")
    assert len(seen) == before  # the behaviour never ran
    with pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/guardmesh.test.Probe/Fail")(b"x", timeout=30)
    assert (failed.value.code(), failed.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "probe.size: must be positive",
    )
