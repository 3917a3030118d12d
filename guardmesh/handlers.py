"""Server interceptors' one shared step: wrap the behaviour of a resolved gRPC method handler.

A ``grpc.RpcMethodHandler`` carries its behaviour in one of four fields (``unary_unary``, ``unary_stream``,
``stream_unary``, ``stream_stream``); an interceptor that wraps it cares only whether the response is a
stream (the behaviour yields) or a single message (it returns).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import grpc

#: A handler's behaviour: ``(request or request iterator, context) -> response or response iterator``.
Behaviour = Callable[[Any, grpc.ServicerContext], Any]

#: Handler fields by kind, with whether the response is a stream.
_KINDS = (("unary_unary", False), ("unary_stream", True), ("stream_unary", False), ("stream_stream", True))


def wrap_behaviour(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by ``wrap(behaviour, response_streaming)``.

    A handler with no behaviour set is returned as it is.
    """
    for kind, streaming in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour:
            return handler._replace(**{kind: wrap(behaviour, streaming)})  # type: ignore[attr-defined, no-any-return]
    return handler


class BehaviourInterceptor(grpc.ServerInterceptor, ABC):
    """A server interceptor that wraps the behaviour of every resolved handler with :meth:`wrap`.

    A method the server does not know (no handler) passes through as ``None``.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Resolve the handler and wrap its behaviour for the called method."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return wrap_behaviour(handler, lambda fn, streaming: self.wrap(fn, streaming, method))

    @abstractmethod
    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """``behaviour`` of ``method`` (``/package.Service/Method``) wrapped; ``streaming``: the response is a
        stream."""
