"""The runtime's grpc.aio server, for services whose hot handlers are ``async def``.

A sync server runs every call on one of its pool's threads: a call costs two thread hand-offs (gRPC's
polling thread to the pool and back) and, with many threads runnable at once, a convoy on the GIL. A
``grpc.aio`` server takes calls up, parses and answers them on one event loop; an ``async def`` handler
runs there and awaits its work (a scorer group, say) without holding a thread.

Only the hot handlers need be ``async def``. Every other handler of the service, and health and
reflection, stays a plain function and runs on the migration pool as before: :class:`InterceptorChain`
runs the runtime's interceptors (the same objects as on a sync server: each wraps a coroutine behaviour in
its async form, a plain one in its sync form) and hands a plain result to the pool with a
:class:`PoolContext`, the sync ``grpc.ServicerContext`` over the call's aio context. :class:`LoopServer`
keeps the sync server's face (``start``, ``stop(grace)`` returning an event, ``wait_for_termination``) so
that the runtime's drain, its barriers and every caller are the same for both kinds of server.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc

from guardmesh.handlers import Behaviour, is_async

T = TypeVar("T")

_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_END = object()  # a sync response stream's end, as next() returns it on the pool


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return next(k for k in _KINDS if getattr(handler, k))


class PoolContext:
    """A sync ``grpc.ServicerContext`` over a grpc.aio call, for a plain handler running on the pool.

    The calls that touch the call's state on the loop (abort, initial metadata) are run there and waited
    for; the others read or set fields, as the aio context allows from any thread. ``add_callback``
    registers a callback run when the call ends (health's Watch closes its stream with one)."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self.left = False  # the caller cancelled the call

    def __getattr__(self, name: str) -> Any:  # invocation_metadata, time_remaining, set_code, peer, ...
        return getattr(self._context, name)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()) -> None:
        """End the call with ``code``; raises (the aio call's abort error, which the server recognises)."""
        self._on_loop(self._context.abort(code, details, tuple(trailing_metadata)))

    def abort_with_status(self, status: grpc.Status) -> None:
        """End the call with a rich status; raises."""
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, metadata: Sequence[Any]) -> None:
        """Send the initial metadata now."""
        self._on_loop(self._context.send_initial_metadata(metadata))

    def is_active(self) -> bool:
        """Whether the call is still going (not answered, not cancelled by its caller)."""
        return not (self.left or self._context.done() or self._context.cancelled())

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends."""
        self._context.add_done_callback(lambda _context: callback())
        return True


def _blocking_requests(messages: Any, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """A request stream read on the loop, iterated on a pool thread."""
    stream = messages.__aiter__()
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(stream.__anext__(), loop).result()
        except StopAsyncIteration:
            return


def on_pool(behaviour: Behaviour, request_streaming: bool, response_streaming: bool, pool: futures.Executor) -> Any:
    """A plain behaviour as a coroutine (or async generator) that runs it on ``pool`` with a
    :class:`PoolContext`, in a copy of the call's context variables (a streaming response's messages are
    each produced in that same copy, whichever pool thread takes them)."""

    if response_streaming:

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            pool_context = PoolContext(context, loop)
            run = contextvars.copy_context().run
            if request_streaming:
                request = _blocking_requests(request, loop)
            try:
                responses = iter(await loop.run_in_executor(pool, run, behaviour, request, pool_context))
                while (response := await loop.run_in_executor(pool, run, next, responses, _END)) is not _END:  # type: ignore[arg-type]
                    yield response
            except asyncio.CancelledError:
                pool_context.left = True
                raise

        return stream

    async def unary(request: Any, context: Any) -> Any:
        loop = asyncio.get_running_loop()
        pool_context = PoolContext(context, loop)
        if request_streaming:
            request = _blocking_requests(request, loop)
        try:
            return await loop.run_in_executor(pool, contextvars.copy_context().run, behaviour, request, pool_context)
        except asyncio.CancelledError:
            pool_context.left = True
            raise

    return unary


async def _parse_or_refuse(raw: bytes, deserializer: Callable[[bytes], Any], method: str, context: Any) -> Any:
    try:
        return deserializer(raw)
    except Exception as exc:  # protobuf's DecodeError, or any other refusal of the bytes
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method} ({type(exc).__name__})"
        )


def parsed(behaviour: Any, deserializer: Callable[[bytes], Any], response_streaming: bool, method: str) -> Any:
    """An async unary-request behaviour that parses its request's bytes itself: bytes that do not parse end
    the call INVALID_ARGUMENT naming the method. (grpc.aio answers a deserializer's exception UNKNOWN, as an
    unhandled exception in the servicer; the sync server answers it INTERNAL.)"""

    if response_streaming:

        async def stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            request = await _parse_or_refuse(raw, deserializer, method, context)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def unary(raw: bytes, context: Any) -> Any:
        return await behaviour(await _parse_or_refuse(raw, deserializer, method, context), context)

    return unary


class InterceptorChain(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The runtime's interceptors, outermost first, on a grpc.aio server (see the module docstring).

    Each interceptor's ``intercept_service`` runs as on a sync server, over the handler the server resolved:
    the drain gate refuses and counts here, tracing and authorization wrap here, in the same order. A
    handler whose wrapped behaviour is plain is then moved to the pool (once per method and handler)."""

    def __init__(self, interceptors: Sequence[grpc.ServerInterceptor], pool: futures.Executor) -> None:
        self._interceptors = tuple(interceptors)
        self._pool = pool
        self._moved: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The resolved handler through every interceptor; a plain behaviour moved to the pool."""
        resolved = await continuation(handler_call_details)
        handler = self._through(0, resolved, handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        moved = self._moved.get(method)
        if moved is not None and moved[0] is handler:
            return moved[1]
        kind = _kind(handler)
        behaviour = getattr(handler, kind)
        if not is_async(behaviour):
            behaviour = on_pool(behaviour, handler.request_streaming, handler.response_streaming, self._pool)
        replaced: dict[str, Any] = {kind: behaviour}
        if not handler.request_streaming and handler.request_deserializer is not None:
            replaced = {kind: parsed(behaviour, handler.request_deserializer, handler.response_streaming, method)}
            replaced["request_deserializer"] = None  # the bytes reach parsed(), which answers a corrupt request
        adapted = handler._replace(**replaced)  # type: ignore[attr-defined]
        self._moved[method] = (handler, adapted)
        return adapted  # type: ignore[no-any-return]

    def _through(
        self, index: int, resolved: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if index == len(self._interceptors):
            return resolved
        return self._interceptors[index].intercept_service(  # type: ignore[no-any-return]
            lambda d: self._through(index + 1, resolved, d), details
        )


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def serving_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for grpc.aio servers, on a daemon thread started at first use.

    grpc.aio shares one completion queue per process and initialises and shuts itself down by reference count
    as servers come and go, and its authors support one loop per process best. With a loop per server, a
    scorer restarted in one process (a test) was once seen refusing connections (not reproduced in 6 runs,
    so the cause is not proven). One loop that lives as long as the process serves every server in turn."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="guardmesh-aio", daemon=True).start()
            _loop = loop
        return _loop


class LoopServer:
    """A grpc.aio server on an event loop in its own thread, with the sync server's face for the runtime.

    ``server`` is the aio server itself, for ``add_*_to_server`` (adding handlers is a plain call)."""

    def __init__(
        self,
        name: str,
        pool: futures.ThreadPoolExecutor,
        interceptors: Sequence[grpc.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self._pool = pool
        self._loop = serving_loop()
        self._terminated = threading.Event()

        async def make() -> grpc.aio.Server:  # the server binds to the loop it is made on
            return grpc.aio.server(
                migration_thread_pool=pool,
                interceptors=[InterceptorChain(interceptors, pool)],
                options=list(options),
                maximum_concurrent_rpcs=None,
            )

        self.server = self._on_loop(make())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server's async handlers run on."""
        return self._loop

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def add_insecure_port(self, address: str) -> int:
        """Bind ``address`` without TLS; the bound port (0: failed)."""
        return self.server.add_insecure_port(address)  # type: ignore[no-any-return]

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        """Bind ``address`` with TLS; the bound port (0: failed)."""
        return self.server.add_secure_port(address, credentials)  # type: ignore[no-any-return]

    def start(self) -> None:
        """Start serving."""

        async def start() -> None:
            await self.server.start()

        self._on_loop(start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls; let those in flight finish within ``grace`` (None: cancel them now). The event
        is set once the server has stopped, its loop ended and its pool shut down."""
        if self._terminated.is_set():
            return self._terminated
        stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)

        def stopped(_: futures.Future[None]) -> None:
            self._pool.shutdown(wait=False)
            self._terminated.set()

        stopping.add_done_callback(stopped)
        return self._terminated

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` passed."""
        return self._terminated.wait(timeout)
