"""Server interceptors' one shared step: wrap the behaviour of a resolved gRPC method handler.

A ``grpc.RpcMethodHandler`` carries its behaviour in one of four fields (``unary_unary``, ``unary_stream``,
``stream_unary``, ``stream_stream``); an interceptor that wraps it cares only whether the response is a
stream (the behaviour yields) or a single message (it returns).

On a ``grpc.aio`` server (:func:`guardmesh.runtime.start_service` for services that opt in) a behaviour may
also be a coroutine function (``async def``, returns) or an async generator function (yields): each wrapper
here keeps the form it was given, so one interceptor serves both kinds of handler.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

#: A handler's behaviour: ``(request or request iterator, context) -> response or response iterator``.
Behaviour = Callable[[Any, grpc.ServicerContext], Any]

#: Handler fields by kind, with whether the response is a stream.
_KINDS = (("unary_unary", False), ("unary_stream", True), ("stream_unary", False), ("stream_stream", True))


def is_async(behaviour: Behaviour) -> bool:
    """Whether ``behaviour`` runs on a grpc.aio event loop (``async def`` or an async generator function)."""
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


class CallRefused(Exception):
    """Raised by an ``enter`` step of :func:`within` to end the call with ``code`` before the behaviour runs
    (a sync wrapper aborts with it, an async one awaits the abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


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


def within(
    behaviour: Behaviour,
    streaming: bool,
    enter: Callable[[grpc.ServicerContext], T | None],
    leave: Callable[[T], None],
) -> Behaviour:
    """``behaviour`` run between ``enter(context)`` and ``leave(token)`` with the token ``enter`` returned (a
    context variable set, a trace context attached); ``None``: nothing to leave. A streaming response keeps
    the token until its last message is sent. ``enter`` may raise :class:`CallRefused` to end the call with
    its status instead (the behaviour does not run)."""
    if is_async(behaviour):
        return _within_async(behaviour, streaming, enter, leave)
    if streaming:

        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            with _Kept(_enter(enter, context), leave):
                yield from behaviour(request, context)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        with _Kept(_enter(enter, context), leave):
            return behaviour(request, context)

    return unary


class _Kept:
    """Leaves ``token`` (when there is one) as the block ends, however it ends."""

    __slots__ = ("leave", "token")

    def __init__(self, token: Any, leave: Callable[[Any], None]) -> None:
        self.token = token
        self.leave = leave

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            self.leave(self.token)


def _enter(enter: Callable[[grpc.ServicerContext], T | None], context: grpc.ServicerContext) -> T | None:
    try:
        return enter(context)
    except CallRefused as refused:
        context.abort(refused.code, refused.details)
        raise  # abort raised already; this line is for type checkers


def _within_async(
    behaviour: Behaviour,
    streaming: bool,
    enter: Callable[[grpc.ServicerContext], T | None],
    leave: Callable[[T], None],
) -> Behaviour:
    """:func:`within` for a behaviour on the event loop: the same steps, the abort awaited."""

    async def entered(context: Any) -> T | None:
        try:
            return enter(context)
        except CallRefused as refused:
            await context.abort(refused.code, refused.details)
            raise

    if streaming:

        async def stream(request: Any, context: Any) -> Any:
            with _Kept(await entered(context), leave):
                async for response in behaviour(request, context):
                    yield response

        return stream

    async def unary(request: Any, context: Any) -> Any:
        with _Kept(await entered(context), leave):
            return await behaviour(request, context)

    return unary


class BehaviourInterceptor(grpc.ServerInterceptor, ABC):
    """A server interceptor that wraps the behaviour of every resolved handler with :meth:`wrap`.

    A method the server does not know (no handler) passes through as ``None``. The wrapped handler is built
    once per method and reused while the method resolves to the same handler (a server's handlers are fixed
    once it starts, and the runtime's other interceptors reuse theirs too): a call then costs one dictionary
    look-up here, not a new handler and closures. The cache holds one entry per method that resolved, so it is
    bounded by the methods the server serves.
    """

    _wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Resolve the handler and wrap its behaviour for the called method (once per method)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        try:
            cache = self._wrapped
        except AttributeError:  # subclasses need not call a base __init__
            cache = self._wrapped = {}
        cached = cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap_behaviour(handler, lambda fn, streaming: self.wrap(fn, streaming, method))
        cache[method] = (handler, wrapped)
        return wrapped

    @abstractmethod
    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """``behaviour`` of ``method`` (``/package.Service/Method``) wrapped; ``streaming``: the response is a
        stream. Called once per method (and again only if the method's handler changes): the returned
        behaviour serves every call, so it must keep no per-call state outside its own frame."""
