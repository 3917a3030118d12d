"""guardmesh.handlers.wrap_behaviour: each of the four handler kinds is wrapped in its own field, with the
response's streaming told right; a handler without behaviour comes back as it is."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from guardmesh.handlers import Behaviour, BehaviourInterceptor, wrap_behaviour


def _behaviour(request: Any, context: Any) -> Any:
    return request


@pytest.mark.parametrize(
    ("make", "kind", "streaming"),
    [
        (grpc.unary_unary_rpc_method_handler, "unary_unary", False),
        (grpc.unary_stream_rpc_method_handler, "unary_stream", True),
        (grpc.stream_unary_rpc_method_handler, "stream_unary", False),
        (grpc.stream_stream_rpc_method_handler, "stream_stream", True),
    ],
)
def test_each_kind_is_wrapped_in_its_own_field(make: Any, kind: str, streaming: bool) -> None:
    seen: list[tuple[Behaviour, bool]] = []

    def wrapped(request: Any, context: Any) -> Any:
        return ("wrapped", request)

    def wrap(fn: Behaviour, is_stream: bool) -> Behaviour:
        seen.append((fn, is_stream))
        return wrapped

    handler = make(_behaviour)
    out = wrap_behaviour(handler, wrap)
    assert seen == [(_behaviour, streaming)]
    assert getattr(out, kind) is wrapped
    others = [k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if k != kind]
    assert all(getattr(out, k) is None for k in others)
    assert out.request_streaming == handler.request_streaming and out.response_streaming == streaming


def test_a_handler_without_behaviour_is_returned_unchanged() -> None:
    handler = grpc.unary_unary_rpc_method_handler(None)  # type: ignore[arg-type]
    assert wrap_behaviour(handler, lambda fn, streaming: pytest.fail("no behaviour to wrap")) is handler


class _Recorder(BehaviourInterceptor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        self.calls.append((method, streaming))
        return behaviour


class _Details(grpc.HandlerCallDetails):
    method = "/guardmesh.v1.Demo/Watch"
    invocation_metadata = ()


def test_an_interceptor_wraps_with_the_called_method_and_passes_an_unknown_one_through() -> None:
    recorder = _Recorder()
    handler = grpc.unary_stream_rpc_method_handler(_behaviour)
    assert recorder.intercept_service(lambda details: handler, _Details()) is not None
    assert recorder.calls == [("/guardmesh.v1.Demo/Watch", True)]
    assert recorder.intercept_service(lambda details: None, _Details()) is None
    assert recorder.calls == [("/guardmesh.v1.Demo/Watch", True)]
