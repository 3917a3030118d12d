"""The one service runtime: every guardmesh service starts, reports health, traces, logs and drains here.

A service supplies a :class:`ServiceDefinition` (its name, its proto service names and a ``build``
function returning a :class:`Binding` that adds its servicers); the runtime does the rest:

* standard health checking (``grpc.health.v1``): NOT_SERVING while starting and draining, SERVING when
  ready, for the empty name, the short service name and each proto service;
* server reflection (v1 and v1alpha) for every proto service with its comments, so grpcurl can list,
  describe and call everything;
* OpenTelemetry server spans, domain errors mapped to status codes, message limits and keepalive;
* registration in discovery, and on SIGTERM/SIGINT a graceful drain: stop accepting, finish in-flight
  RPCs within the grace period, flush spans, deregister.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guardmesh.aio_server import LoopServer
from guardmesh.client import channel_options
from guardmesh.config import ConfigError, MeshConfig, load_config
from guardmesh.discovery import Registry, registry_for
from guardmesh.durable import StoreError
from guardmesh.errors import DomainErrorInterceptor
from guardmesh.handlers import Behaviour, BehaviourInterceptor, is_async
from guardmesh.logs import setup_logging
from guardmesh.monitoring import RpcServerMetrics
from guardmesh.reflection import V1_SERVICE, enable_reflection
from guardmesh.security import (
    AuthorizationInterceptor,
    Authorizer,
    RoleBook,
    channel_credentials,
    server_credentials,
)
from guardmesh.tracing import (
    flush_tracing,
    server_tracing_interceptor,
    setup_tracing,
    shutdown_tracing,
    start_metrics_endpoint,
)

log = logging.getLogger(__name__)

#: Services the runtime can start by short name; each lives in ``services/<name>/server.py``.
KNOWN_SERVICES = ("scheduler", "paramserver", "scorer", "abrouter")


class Binding(Protocol):
    """A service's servicers and the resources behind them."""

    def add_to_server(self, server: grpc.Server) -> None:
        """Add the servicers to ``server`` (before it starts; they answer UNAVAILABLE until ``start``)."""
        ...

    def start(self) -> None:
        """Load or restore state; runs after the server listens, while health says NOT_SERVING."""
        ...

    def drain(self) -> None:
        """Stop long-lived streams so that the grace period is not spent waiting on them."""
        ...

    def close(self) -> None:
        """Release resources (databases, background threads) after the server stopped."""
        ...

    # The runtime also sets ``fail_stop(reason)`` on every binding before ``start``: a binding whose state can
    # no longer be written calls it, and health turns NOT_SERVING until the process is restarted.


#: The reflection services every server serves (v1alpha and v1).
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", V1_SERVICE)
#: Metadata key of the drain's barrier calls (the value is the gate's secret token, so no client can forge one).
BARRIER_KEY = "guardmesh-drain-barrier"
#: A method no service serves: its barrier goes through gRPC core's queue of calls to generic handlers.
UNREGISTERED_BARRIER_METHOD = "/guardmesh.runtime.Drain/Barrier"


def _answer_barrier(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b""


_BARRIER_HANDLER = grpc.unary_unary_rpc_method_handler(_answer_barrier)
#: What a call refused by the drain gate is told.
REFUSED_WHILE_DRAINING = "server draining: the call was not started; retry another instance"


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CallGate(BehaviourInterceptor):
    """The first interceptor: open, it passes calls through; closed (draining), it refuses each new call
    UNAVAILABLE without running it, so that a client may safely retry it elsewhere.

    gRPC core's shutdown kills the calls that arrived but that the serving thread has not taken up yet (their
    clients see CANCELLED), so the drain must stop the server only once none waits there. The gate tells when:
    it counts the calls it takes up while closed and recognises the drain's own barrier calls. Core hands each
    method's calls to the serving thread in arrival order, so once the barrier sent to every method is taken up,
    every call that arrived before it has been too; a round of barriers during which no client call was taken
    up means none is left waiting.

    A refused call is held until the drain has stopped the server (or half of its own deadline has passed), then
    answered: a client that calls again as soon as it is answered cannot keep the queue from emptying, and its
    call, taken up, is never one core kills.

    A unary call taken up while open that returns while the gate is closed is held the same way before its
    answer goes out: its client, were it answered at once, could call again at once, and that call could land
    behind the last round's barriers and be cut by the stop. Held, its next call reaches a server that has
    stopped taking calls, which refuses it UNAVAILABLE.

    Limits (gRPC Python cannot send GOAWAY before its shutdown): a call from a client that had nothing in flight,
    arriving in the instant between the last barrier and the shutdown, can still be cancelled; clients that keep
    many calls in flight at once, never letting a round pass empty, keep the drain going until its grace ends.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = True
        self._token = secrets.token_hex(16)
        self._refused = 0  # client calls taken up while closed
        self._barriers = 0  # barrier calls taken up
        self._released = threading.Event()
        self._held_async: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []  # aio calls held

    @property
    def barrier_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata that marks a call as the drain's barrier."""
        return ((BARRIER_KEY, self._token),)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass the call on while open; refuse it while closed; count barriers."""
        if self._open:  # a call racing close() is taken up, so it is served (and counted while it runs)
            return super().intercept_service(continuation, handler_call_details)
        if (BARRIER_KEY, self._token) in tuple(handler_call_details.invocation_metadata or ()):
            with self._changed:
                self._barriers += 1
                self._changed.notify_all()
            return _BARRIER_HANDLER
        handler = continuation(handler_call_details)
        with self._changed:
            self._refused += 1
        if handler is None:
            return None
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        refuse = self._refuse_async if is_async(getattr(handler, kind)) else self._refuse
        return handler._replace(**{kind: refuse})  # type: ignore[attr-defined, no-any-return]

    def wrap(self, behaviour: Behaviour, streaming: bool, method: str) -> Behaviour:
        """A unary call that returns while the gate is closed is answered once the server has stopped taking
        calls (see the class); a streaming response passes as it is (the drain ends streams)."""
        if streaming:
            return behaviour
        if is_async(behaviour):

            async def answered_after_the_stop_async(request: Any, context: Any) -> Any:
                try:
                    return await behaviour(request, context)
                finally:
                    if not self._open:
                        await self._hold_async(context)

            return answered_after_the_stop_async

        def answered_after_the_stop(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            finally:
                if not self._open:
                    self._hold(context)

        return answered_after_the_stop

    def _hold(self, context: grpc.ServicerContext) -> None:
        """Wait until the server stopped taking calls, or half of the call's remaining deadline."""
        remaining = context.time_remaining()  # a call without a deadline: gRPC's far future
        self._released.wait(None if remaining is None else min(remaining / 2, threading.TIMEOUT_MAX))

    async def _hold_async(self, context: Any) -> None:
        """:meth:`_hold` on the event loop: the loop goes on serving while the call waits."""
        loop = asyncio.get_running_loop()
        released: asyncio.Future[None] = loop.create_future()
        with self._changed:
            if self._released.is_set():
                return
            self._held_async.append((loop, released))
        remaining = context.time_remaining()
        await asyncio.wait((released,), timeout=None if remaining is None else remaining / 2)

    def _refuse(self, request: object, context: grpc.ServicerContext) -> None:
        self._hold(context)
        context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_WHILE_DRAINING)

    async def _refuse_async(self, request: object, context: Any) -> None:
        await self._hold_async(context)
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_WHILE_DRAINING)

    def close(self) -> None:
        """Refuse every call taken up from now on."""
        with self._changed:
            self._open = False

    def release(self) -> None:
        """Answer the held refusals (the server is stopping: no more calls can arrive)."""
        with self._changed:
            self._released.set()
            held, self._held_async = self._held_async, []
        for loop, released in held:
            loop.call_soon_threadsafe(_settle, released)

    @property
    def refused(self) -> int:
        """Client calls taken up since the gate closed."""
        with self._changed:
            return self._refused

    @property
    def barriers(self) -> int:
        """Barrier calls taken up."""
        with self._changed:
            return self._barriers

    def wait_barriers(self, count: int, deadline: float, failed: Callable[[], bool]) -> bool:
        """Block until ``count`` barriers were taken up (True), ``deadline`` (monotonic) passed or ``failed()``."""
        with self._changed:
            while self._barriers < count:
                left = deadline - time.monotonic()
                if left <= 0 or failed():
                    return False
                self._changed.wait(min(left, 0.05))
            return True


def served_methods(service_names: Iterable[str]) -> tuple[str, ...]:
    """Full names of the methods of ``service_names`` known to the protobuf descriptor pool, and the barrier
    method for generic handlers: one barrier each, as core keeps one queue per registered method."""
    pool = descriptor_pool.Default()
    methods = [UNREGISTERED_BARRIER_METHOD]
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        methods += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return tuple(methods)


class DiscoveryError(RuntimeError):
    """The service could not announce itself to discovery; it was stopped again."""


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service tells the runtime about itself."""

    name: str
    service_names: tuple[str, ...]
    build: Callable[[MeshConfig], Binding]
    #: Name announced to discovery, when instances are not interchangeable (paramserver shards).
    instance_name: Callable[[MeshConfig], str] | None = None
    #: Authorization: roles (besides admin) allowed to call each method, keyed "package.Service/Method";
    #: a method not listed is admin-only.
    roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: Serve on a grpc.aio server (:mod:`guardmesh.aio_server`): handlers that are ``async def`` run on its
    #: event loop, the others on the pool as on the sync server.
    asyncio: bool = False


@dataclass
class RunningService:
    """A started service: its server, health servicer, bound port and discovery registration."""

    definition: ServiceDefinition
    config: MeshConfig
    server: grpc.Server | LoopServer
    health: health.HealthServicer
    binding: Binding
    host: str
    port: int
    registry: Registry
    registration_id: str | None = None
    stop_metrics: Callable[[], None] | None = None
    gate: CallGate = field(default_factory=CallGate)
    #: Methods the drain sends a barrier to (see :class:`CallGate`).
    barrier_methods: tuple[str, ...] = (UNREGISTERED_BARRIER_METHOD,)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        """``host:port`` clients dial."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, deregister, end streams, finish in-flight RPCs within ``grace``, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grpc.grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        self.health.enter_graceful_shutdown()
        if self.registration_id:
            self.registry.deregister(self.registration_id)
        time.sleep(self.config.grpc.drain_delay_s)
        deadline = time.monotonic() + grace  # the grace for calls in flight starts after the delay
        # gRPC core's shutdown kills the calls that arrived but that the serving thread has not taken up yet
        # (their clients see CANCELLED; under load there are many). So first refuse new calls with UNAVAILABLE
        # while the serving thread takes up every waiting one; only then stop.
        self.gate.close()
        self.binding.drain()
        with self._barrier_channel() as channel:
            try:
                self._take_up_waiting_calls(channel, deadline)
                done = self.server.stop(max(0.0, deadline - time.monotonic()))
            finally:
                self.gate.release()  # no more calls can arrive: answer the held ones
            done.wait()
        self.binding.close()
        if self.stop_metrics is not None:
            self.stop_metrics()
        flush_tracing()
        log.info("stopped")

    def _barrier_channel(self) -> grpc.Channel:
        """A plain channel to this server (no retries: a barrier is sent once per round)."""
        credentials = channel_credentials(self.config)
        if credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, credentials)

    def _take_up_waiting_calls(self, channel: grpc.Channel, deadline: float) -> None:
        """Send rounds of barriers (one per method) until a round during which the gate took up no client call,
        or until ``deadline``; then no call waits in gRPC core. A barrier that fails (this server unreachable
        over its own address) ends the rounds: the drain then stops as it can."""
        calls = [channel.unary_unary(method) for method in self.barrier_methods]
        sent: list[grpc.Future] = []

        def failed() -> bool:
            return any(f.done() and f.exception() is not None for f in sent)

        while True:
            refused, barriers = self.gate.refused, self.gate.barriers
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain: grace over with calls still arriving")
                return
            sent += [call.future(b"", timeout=left, metadata=self.gate.barrier_metadata) for call in calls]
            if not self.gate.wait_barriers(barriers + len(calls), deadline, failed):
                errors = [str(f.exception()) for f in sent if f.done() and f.exception() is not None]
                log.warning("drain: barriers not all taken up", extra={"errors": errors[:1]})
                return
            if self.gate.refused == refused:
                return

    def wait(self) -> None:
        """Block until the server terminates."""
        self.server.wait_for_termination()


def load_definition(name: str) -> ServiceDefinition:
    """Import ``services.<name>.server`` and return its ``SERVICE`` definition."""
    if name not in KNOWN_SERVICES:
        raise ConfigError(f"service '{name}': unknown (known: {', '.join(KNOWN_SERVICES)})")
    module = importlib.import_module(f"services.{name}.server")
    return module.SERVICE  # type: ignore[no-any-return]


def start_service(
    definition: ServiceDefinition, config: MeshConfig, *, port: int | None = None, host: str | None = None
) -> RunningService:
    """Build and start ``definition`` on ``host:port`` (port 0 picks a free one); SERVING when ready."""
    endpoint = config.services.get(definition.name)
    host = host or (endpoint.host if endpoint else "127.0.0.1")
    port = (endpoint.port if endpoint else 0) if port is None else port
    setup_tracing(definition.name, config.tracing.otlp_endpoint, prometheus=config.metrics.enabled)
    credentials = server_credentials(config, definition.name)
    gate = CallGate()
    # Metrics outermost, so that they count the calls the drain gate refuses too.
    interceptors: list[grpc.ServerInterceptor] = [RpcServerMetrics(), gate, server_tracing_interceptor()]
    if config.security.authorization:
        interceptors.append(AuthorizationInterceptor(Authorizer(RoleBook.load(config), definition.roles)))
    interceptors.append(DomainErrorInterceptor())
    pool = futures.ThreadPoolExecutor(max_workers=config.grpc.max_workers, thread_name_prefix=f"{definition.name}-rpc")
    options = [*channel_options(config), ("grpc.so_reuseport", 0)]
    server: grpc.Server | LoopServer
    if definition.asyncio:
        server = LoopServer(definition.name, pool, interceptors, options)
        handlers: Any = server.server  # the aio server: adding handlers to it is a plain call
    else:
        server = handlers = grpc.server(pool, interceptors=interceptors, options=options, maximum_concurrent_rpcs=None)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
    names = ("", definition.name, *definition.service_names)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    enable_reflection((*definition.service_names, health.SERVICE_NAME), handlers)
    binding = definition.build(config)

    def fail_stop(reason: str) -> None:
        """The service refuses every call until restarted: tell health checks, so traffic moves away."""
        log.critical("fail-stop: health NOT_SERVING until restart", extra={"reason": reason})
        for name in names:
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    binding.fail_stop = fail_stop  # type: ignore[attr-defined]  # bindings with a store call it on a failed write
    role = {"started": False, "serving": True}
    role_lock = threading.Lock()

    def set_serving(serving: bool) -> None:
        """A binding that serves in one role only (a scheduler standby does not) says when it does."""
        with role_lock:
            role["serving"] = serving
            if role["started"]:
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in names:
                    health_servicer.set(name, status)

    binding.set_serving = set_serving  # type: ignore[attr-defined]  # the scheduler's leader election calls it
    binding.add_to_server(handlers)
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        if isinstance(server, LoopServer):
            server.stop(0)  # its loop thread ends with it
        raise ConfigError(f"services.{definition.name}.port: cannot bind {host}:{port}")
    server.start()
    binding.bound_port = bound  # type: ignore[attr-defined]  # a leader publishes its address to standbys
    try:
        binding.start()
    except Exception:
        server.stop(0)
        binding.close()
        raise
    registry = registry_for(config)
    served = (*definition.service_names, health.SERVICE_NAME, *REFLECTION_SERVICES)
    running = RunningService(
        definition,
        config,
        server,
        health_servicer,
        binding,
        host,
        bound,
        registry,
        gate=gate,
        barrier_methods=served_methods(served),
    )
    advertise = (endpoint.advertise_host if endpoint else "") or host
    try:
        announced = definition.instance_name(config) if definition.instance_name else definition.name
        running.registration_id = registry.register(announced, advertise, bound)
    except Exception as exc:
        server.stop(0)
        binding.close()
        raise DiscoveryError(
            f"discovery.consul_addr: cannot register {definition.name} at {advertise}:{bound} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if config.metrics.enabled and endpoint is not None and endpoint.metrics_port:
        running.stop_metrics = start_metrics_endpoint(config.metrics.host, endpoint.metrics_port)
    with role_lock:
        role["started"] = True
        status = (
            health_pb2.HealthCheckResponse.SERVING if role["serving"] else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            health_servicer.set(name, status)
    log.info("serving", extra={"address": running.address})
    return running


def freeze_startup_objects() -> int:
    """Move every object alive now (the modules the start imported: torch, grpc, scipy, duckdb ...; the restored
    state) into the collector's permanent generation, after one full collection; returns how many it holds.

    They live as long as the process, yet every full collection walks them all while holding the GIL, stalling
    every call in flight: at 64 clients on the scorer, full collections over ~220,000 such objects took
    120-210 ms every few seconds, the source of its Score p99. Frozen, a full collection walks only what came
    after (~1 ms). Called once a service process serves (:func:`serve`), never for in-process servers: frozen,
    an object that later becomes cyclic garbage is never collected, which a long-lived service does not mind and a
    test process starting hundreds of servers would."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(name: str, config_path: str | None = None) -> int:
    """Process entry point: start service ``name`` and run until SIGTERM/SIGINT; return the exit code (2: bad
    configuration, 3: discovery refused the service, 4: its store cannot be used)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        setup_logging(name)
        log.error("configuration error: %s", exc)
        print(f"guardmesh {name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(name, config.logging.level, config.logging.format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        running = start_service(load_definition(name), config)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"guardmesh {name}: {exc}", file=sys.stderr)
        return 2
    except DiscoveryError as exc:
        log.error("discovery error: %s", exc)
        print(f"guardmesh {name}: {exc}", file=sys.stderr)
        return 3
    except StoreError as exc:  # unreachable, or a schema newer than this code: the message names no password
        log.error("store error: %s", exc)
        print(f"guardmesh {name}: {exc}", file=sys.stderr)
        return 4
    freeze_startup_objects()
    while not stop.wait(0.5):
        pass
    running.stop()
    shutdown_tracing()
    return 0
