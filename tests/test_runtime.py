"""The shared service runtime: health, reflection, drain, error mapping, retries, limits, config."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from guardmesh.aio_server import LoopServer
from guardmesh.client import open_channel
from guardmesh.config import ConfigError, MeshConfig, load_config
from guardmesh.errors import InvalidArgument, Unavailable
from guardmesh.runtime import (
    BARRIER_KEY,
    CallGate,
    RunningService,
    ServiceDefinition,
    load_definition,
    start_service,
)
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

from .conftest import make_config

SERVICE = "guardmesh.test.Probe"


def _identity(b: bytes) -> bytes:
    return b


class ProbeBinding:
    """A tiny service: Slow sleeps, Fail raises a domain error, Flaky is UNAVAILABLE N times, Echo echoes."""

    def __init__(self, config: MeshConfig, start_gate: threading.Event | None = None) -> None:
        self.start_gate = start_gate
        self.calls = {"Flaky": 0, "Fail": 0}
        self.flaky_failures = 2
        self.started = 0  # Slow calls a handler began
        self._started_lock = threading.Lock()  # handlers run on several threads: += alone could lose counts

    def add_to_server(self, server: grpc.Server) -> None:
        def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._started_lock:
                self.started += 1
            time.sleep(float(request.decode() or "1"))
            return b"done"

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls["Fail"] += 1
            raise InvalidArgument("probe.size", "must be positive")

        def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls["Flaky"] += 1
            if self.calls["Flaky"] <= self.flaky_failures:
                raise Unavailable("warming up")
            return b"ok"

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            return request

        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, _identity, _identity)
            for name, fn in {"Slow": slow, "Fail": fail, "Flaky": flaky, "Echo": echo}.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def start(self) -> None:
        if self.start_gate is not None:
            assert self.start_gate.wait(60)

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _handlers_added(server: grpc.Server, add_to_server: Callable[[grpc.Server], None]) -> list[grpc.GenericRpcHandler]:
    """The generic handlers ``add_to_server`` adds, caught instead of added."""
    captured: list[grpc.GenericRpcHandler] = []
    real_add = server.add_generic_rpc_handlers
    server.add_generic_rpc_handlers = captured.extend  # type: ignore[method-assign]
    try:
        add_to_server(server)
    finally:
        server.add_generic_rpc_handlers = real_add  # type: ignore[method-assign]
    return captured


class AsyncProbeBinding(ProbeBinding):
    """The probe on the runtime's grpc.aio server: Slow, Echo and Fail are ``async def`` (they run on its event
    loop); Flaky stays a plain function (it runs on the migration pool)."""

    def add_to_server(self, server: grpc.Server) -> None:
        sync = _handlers_added(server, super().add_to_server)[0].service  # the plain handlers (Flaky stays one)

        async def slow(request: bytes, context: object) -> bytes:
            with self._started_lock:
                self.started += 1
            await asyncio.sleep(float(request.decode() or "1"))
            return b"done"

        async def fail(request: bytes, context: object) -> bytes:
            self.calls["Fail"] += 1
            raise InvalidArgument("probe.size", "must be positive")

        async def echo(request: bytes, context: object) -> bytes:
            return request

        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, _identity, _identity)
            for name, fn in {"Slow": slow, "Fail": fail, "Echo": echo}.items()
        }
        details = namedtuple("details", "method invocation_metadata")
        handlers["Flaky"] = sync(details(f"/{SERVICE}/Flaky", ()))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


#: The runtime's two servers: sync (every handler on a pool thread) and grpc.aio (async handlers on its loop).
SERVERS = pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])


def _call(channel: grpc.Channel, method: str, payload: bytes = b"", timeout: float | None = 10) -> bytes:
    fn = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity)
    return fn(payload, timeout=timeout)


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


def _probe(tmp_path: Path, **overrides: object) -> tuple[MeshConfig, ServiceDefinition, dict[str, ProbeBinding]]:
    """The probe service and its config; ``aio=True`` among the overrides serves it on the grpc.aio server."""
    aio = bool(overrides.pop("aio", False))
    config = make_config(tmp_path, **overrides)
    made: dict[str, ProbeBinding] = {}

    def build(cfg: MeshConfig) -> ProbeBinding:
        made["binding"] = (AsyncProbeBinding if aio else ProbeBinding)(cfg)
        return made["binding"]

    return config, ServiceDefinition("probe", (SERVICE,), build, asyncio=aio), made


def test_health_not_serving_while_starting_then_serving(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    gate = threading.Event()
    definition = ServiceDefinition("probe", (SERVICE,), lambda cfg: ProbeBinding(cfg, gate))
    port_holder: dict[str, object] = {}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    thread = threading.Thread(
        target=lambda: port_holder.setdefault("svc", start_service(definition, config, port=port))
    )
    thread.start()
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        try:
            status = _health(address)
            break
        except grpc.RpcError:
            time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    gate.set()
    thread.join(10)
    running = port_holder["svc"]
    for name in ("", "probe", SERVICE):
        assert _health(address, name) == health_pb2.HealthCheckResponse.SERVING
    running.stop(grace=0.5)  # type: ignore[attr-defined]


def test_reflection_lists_every_scheduler_method(scheduler_service) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(scheduler_service.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"guardmesh.v1.SchedulerService", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("guardmesh.v1.SchedulerService")
        from google.protobuf import descriptor_pool

        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("guardmesh.v1.SchedulerService")
        methods = {m.name for m in svc.methods}
    expected = {m.name for m in spb.DESCRIPTOR.services_by_name["SchedulerService"].methods}
    assert desc is not None
    assert methods == expected and len(expected) == 13


def _reflect(channel: grpc.Channel, version: str, **request: object) -> rpb.ServerReflectionResponse:
    """One request on ``grpc.reflection.<version>.ServerReflection`` (v1 and v1alpha share their messages)."""
    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=rpb.ServerReflectionRequest.SerializeToString,
        response_deserializer=rpb.ServerReflectionResponse.FromString,
    )
    (answer,) = list(info(iter([rpb.ServerReflectionRequest(**request)]), timeout=10))  # type: ignore[arg-type]
    return answer


def _leading_comment(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    return next((loc.leading_comments for loc in file.source_code_info.location if list(loc.path) == path), "")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_with_the_proto_comments(scheduler_service, version: str) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(scheduler_service.address) as ch:
        listed = {s.name for s in _reflect(ch, version, list_services="").list_services_response.service}
        assert {
            "guardmesh.v1.SchedulerService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= listed
        answer = _reflect(ch, version, file_containing_symbol="guardmesh.v1.SchedulerService")
        files = {
            f.name: f
            for f in map(
                descriptor_pb2.FileDescriptorProto.FromString, answer.file_descriptor_response.file_descriptor_proto
            )
        }
        v1_file = _reflect(ch, version, file_containing_symbol="grpc.reflection.v1.ServerReflection")
    scheduler = files["guardmesh/v1/scheduler.proto"]
    assert "guardmesh/v1/common.proto" in files  # imports come along
    service = next(i for i, s in enumerate(scheduler.service) if s.name == "SchedulerService")
    method = next(i for i, m in enumerate(scheduler.service[service].method) if m.name == "SubmitJob")
    # FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2; message_type = 4, field = 2.
    assert "Submits a job." in _leading_comment(scheduler, [6, service, 2, method])
    spec = next(i for i, m in enumerate(scheduler.message_type) if m.name == "JobSpec")
    assert "Job id: 1 to 128 characters" in _leading_comment(scheduler, [4, spec, 2, 0])
    (reflection_file,) = v1_file.file_descriptor_response.file_descriptor_proto
    v1 = descriptor_pb2.FileDescriptorProto.FromString(reflection_file)
    assert v1.package == "grpc.reflection.v1" and v1.service[0].method[0].input_type.startswith(".grpc.reflection.v1.")


@SERVERS
def test_sigterm_drain_finishes_in_flight_rpc(tmp_path: Path, aio: bool) -> None:
    config, definition, made = _probe(tmp_path, aio=aio, **{"grpc.drain_delay_s": 0.5})
    running = start_service(definition, config, port=0)
    channel = open_channel("probe", config, address=running.address)
    result: dict[str, object] = {}

    def slow_call() -> None:
        try:
            result["value"] = _call(channel, "Slow", b"3.0", timeout=60)
        except grpc.RpcError as err:  # pragma: no cover - the assertion below reports it
            result["error"] = err.code()

    caller = threading.Thread(target=slow_call)
    caller.start()
    deadline = time.monotonic() + 30
    while made["binding"].started < 1 and time.monotonic() < deadline:  # wait until a handler runs it
        time.sleep(0.01)
    assert made["binding"].started == 1
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 30.0})
    stopper.start()
    health = health_pb2.HealthCheckResponse.SERVING
    while health == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
        health = _health(running.address)
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    caller.join(60)
    stopper.join(60)
    assert result == {"value": b"done"}
    with pytest.raises(grpc.RpcError) as err:
        _call(channel, "Echo", b"x", timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


class _LaggingLookup(grpc.GenericRpcHandler):
    """Resolves the probe's methods slowly: gRPC's serving thread looks handlers up one call at a time, so under
    load calls wait inside gRPC core, arrived but not yet taken up, as they do here."""

    def __init__(self, inner: grpc.GenericRpcHandler, lag_s: float) -> None:
        self.inner = inner
        self.lag_s = lag_s

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        time.sleep(self.lag_s)
        return self.inner.service(handler_call_details)


def _lagging_probe(tmp_path: Path, lag_s: float, aio: bool = False) -> tuple[RunningService, dict[str, ProbeBinding]]:
    """A probe service whose method lookup takes ``lag_s`` on the serving thread (the aio server's event loop),
    started on port 0."""
    config = make_config(tmp_path)
    made: dict[str, ProbeBinding] = {}

    class LaggingProbe(AsyncProbeBinding if aio else ProbeBinding):  # type: ignore[misc]
        def add_to_server(self, server: grpc.Server) -> None:
            captured = _handlers_added(server, super().add_to_server)
            server.add_generic_rpc_handlers(tuple(_LaggingLookup(h, lag_s) for h in captured))

    def build(cfg: MeshConfig) -> ProbeBinding:
        made["binding"] = LaggingProbe(cfg)
        return made["binding"]

    return start_service(ServiceDefinition("probe", (SERVICE,), build, asyncio=aio), config, port=0), made


def _wait_started(binding: ProbeBinding, count: int) -> None:
    deadline = time.monotonic() + 60
    while binding.started < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert binding.started >= count, "no call reached a handler"


@SERVERS
@pytest.mark.parametrize(("lag_s", "calls"), [(0.05, 40), (0.4, 12)])
def test_drain_with_calls_waiting_in_grpc_core_cancels_none(
    tmp_path: Path, lag_s: float, calls: int, aio: bool
) -> None:
    """The drain answers every call it took up and refuses the others as UNAVAILABLE; none is CANCELLED.

    gRPC core's shutdown kills the calls that arrived but that the serving thread has not taken up yet (their
    clients see CANCELLED). A serving thread slower than the old drain's quiet period (0.25 s a call, 0.4 s
    here) had the old drain stop with calls still waiting."""
    running, made = _lagging_probe(tmp_path, lag_s, aio)
    channels = [grpc.insecure_channel(running.address) for _ in range(4)]
    outcomes: list[object] = []
    lock = threading.Lock()

    def call(k: int) -> None:
        try:
            got: object = _call(channels[k % len(channels)], "Slow", b"0.3", timeout=120)
        except grpc.RpcError as err:
            got = err.code()
        with lock:
            outcomes.append(got)

    callers = [threading.Thread(target=call, args=(k,)) for k in range(calls)]
    for t in callers:
        t.start()
    _wait_started(made["binding"], 3)
    running.stop(grace=60)
    for t in callers:
        t.join(60)
    for ch in channels:
        ch.close()
    assert len(outcomes) == calls
    assert set(outcomes) <= {b"done", grpc.StatusCode.UNAVAILABLE}, outcomes
    # Every call a handler began was answered in full.
    assert outcomes.count(b"done") == made["binding"].started


@SERVERS
def test_drain_under_steady_traffic_ends_without_the_grace_and_cancels_none(tmp_path: Path, aio: bool) -> None:
    """Clients that keep calling through the drain (each call as soon as the last is answered, refused or not)
    neither keep the drain going for its whole grace nor see CANCELLED: in-flight calls finish, the rest are
    UNAVAILABLE (refused by the gate, or the server gone)."""
    running, made = _lagging_probe(tmp_path, 0.0, aio)
    stop_calling = threading.Event()
    outcomes: list[object] = []
    lock = threading.Lock()

    def keep_calling(method: str, payload: bytes, timeout: float | None = 120) -> None:
        with grpc.insecure_channel(running.address) as channel:
            while not stop_calling.is_set():
                try:
                    got: object = _call(channel, method, payload, timeout=timeout)
                except grpc.RpcError as err:
                    got = err.code()
                with lock:
                    outcomes.append(got)

    callers = [threading.Thread(target=keep_calling, args=("Echo", b"e")) for _ in range(3)]
    callers.append(threading.Thread(target=keep_calling, args=("Echo", b"e", None)))  # no deadline
    callers += [threading.Thread(target=keep_calling, args=("Slow", b"0.5")) for _ in range(2)]
    for t in callers:
        t.start()
    _wait_started(made["binding"], 4)
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 600.0})
    stopper.start()
    stopper.join(120)  # far below the grace: the drain ended on its own
    drained = not stopper.is_alive()
    stop_calling.set()
    for t in callers:
        t.join(60)
    assert drained, "the drain waited for its grace"
    assert grpc.StatusCode.CANCELLED not in outcomes
    assert set(outcomes) <= {b"e", b"done", grpc.StatusCode.UNAVAILABLE}, set(outcomes)
    assert outcomes.count(b"done") == made["binding"].started
    assert outcomes.count(grpc.StatusCode.UNAVAILABLE) >= 6  # each caller was refused at least once


@SERVERS
def test_calls_answered_during_the_drain_whose_clients_call_again_cancel_none(tmp_path: Path, aio: bool) -> None:
    """Calls running when the drain starts are answered in full; their clients call again at once, and those
    calls are refused UNAVAILABLE (retry elsewhere), never CANCELLED by the server's stop.

    The serving thread takes calls up slowly here (as under load), so a round of barriers takes a while: a call
    sent again as soon as its first was answered arrived behind a round's barriers, the round counted as empty,
    and the drain could stop the server with that call still waiting in gRPC core (CANCELLED). A call answered
    while the gate is closed is held until the server has stopped taking calls."""
    running, made = _lagging_probe(tmp_path, 0.1, aio)
    outcomes: list[object] = []
    lock = threading.Lock()

    def slow_then_again(k: int) -> None:
        with grpc.insecure_channel(running.address) as channel:
            # Staggered ends: calls are answered all through the drain's rounds.
            for method, payload in (("Slow", f"{1.0 + 0.25 * k}".encode()), ("Echo", b"again"), ("Echo", b"again")):
                try:
                    got: object = _call(channel, method, payload, timeout=120)
                except grpc.RpcError as err:
                    got = err.code()
                with lock:
                    outcomes.append(got)

    callers = [threading.Thread(target=slow_then_again, args=(k,)) for k in range(8)]
    for t in callers:
        t.start()
    _wait_started(made["binding"], 8)
    running.stop(grace=60)
    for t in callers:
        t.join(60)
    assert len(outcomes) == 24
    assert outcomes.count(b"done") == 8, outcomes  # every running call answered in full
    assert grpc.StatusCode.CANCELLED not in outcomes, outcomes
    assert set(outcomes) <= {b"done", grpc.StatusCode.UNAVAILABLE}, outcomes


def test_drain_gate_counts_only_its_own_barriers() -> None:
    """A client cannot pass for the drain's barrier (which would end the drain early): the token is secret."""
    details = namedtuple("details", "method invocation_metadata")

    def serve(request: bytes, context: object) -> bytes:
        return request

    echo = grpc.unary_unary_rpc_method_handler(serve)
    gate = CallGate()
    opened = gate.intercept_service(lambda d: echo, details("/p.P/Echo", ()))
    assert opened is not None and opened.unary_unary(b"x", None) == b"x"  # open: served (counted while it runs)
    assert (gate.refused, gate.barriers) == (0, 0)
    gate.close()
    forged = gate.intercept_service(lambda d: echo, details("/p.P/Echo", ((BARRIER_KEY, "guess"),)))
    assert forged is not None and forged.unary_unary is not serve  # refused like any call
    assert (gate.refused, gate.barriers) == (1, 0)
    barrier = gate.intercept_service(lambda d: echo, details("/p.P/Echo", gate.barrier_metadata))
    assert barrier is not echo and (gate.refused, gate.barriers) == (1, 1)


@SERVERS
def test_domain_error_maps_to_status_naming_field(tmp_path: Path, aio: bool) -> None:
    config, definition, made = _probe(tmp_path, aio=aio)
    running = start_service(definition, config, port=0)
    try:
        with open_channel("probe", config, address=running.address) as channel, pytest.raises(grpc.RpcError) as err:
            _call(channel, "Fail")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "probe.size: must be positive"
        assert made["binding"].calls["Fail"] == 1  # INVALID_ARGUMENT is never retried
    finally:
        running.stop(grace=0.5)


@SERVERS
def test_client_retries_unavailable_only(tmp_path: Path, aio: bool) -> None:
    config, definition, made = _probe(tmp_path, aio=aio)
    running = start_service(definition, config, port=0)
    try:
        with open_channel("probe", config, address=running.address) as channel:
            assert _call(channel, "Flaky") == b"ok"
        assert made["binding"].calls["Flaky"] == 3
        made["binding"].calls["Flaky"] = 0
        made["binding"].flaky_failures = 10
        one_try = config.with_overrides({"client.max_attempts": 1})
        with open_channel("probe", one_try, address=running.address) as channel, pytest.raises(grpc.RpcError) as err:
            _call(channel, "Flaky")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert made["binding"].calls["Flaky"] == 1
    finally:
        running.stop(grace=0.5)


def test_client_default_deadline_applies_in_full_unless_a_call_names_its_own(tmp_path: Path) -> None:
    config, definition, _ = _probe(tmp_path, **{"client.deadline_s": 1.5})
    running = start_service(definition, config, port=0)
    try:
        with open_channel("probe", config, address=running.address) as channel:
            fn = channel.unary_unary(f"/{SERVICE}/Slow", request_serializer=_identity, response_deserializer=_identity)
            fn(b"0.1")  # the channel is warm: what follows measures the deadline, not the connection
            time.sleep(1.0)  # idle: gRPC core's cached clock goes stale (its service-config deadlines came early)
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                fn(b"4.0")  # no explicit timeout: the default deadline applies
            waited = time.monotonic() - began
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 1.45 <= waited < 3.9  # the whole 1.5 s, not cut short (and not the 4 s of the call)
            assert fn(b"2.0", timeout=5.0) == b"done"  # an explicit timeout replaces the default
            assert fn.future(b"0.1").result() == b"done"
    finally:
        running.stop(grace=3)


def test_message_size_limit_rejects_oversized_payload(tmp_path: Path) -> None:
    config, definition, _ = _probe(tmp_path, **{"grpc.max_message_mib": 1})
    running = start_service(definition, config, port=0)
    try:
        with grpc.insecure_channel(running.address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            assert _call(ch, "Echo", b"a" * 1000) == b"a" * 1000
            with pytest.raises(grpc.RpcError) as err:
                _call(ch, "Echo", b"a" * (2 << 20))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(grace=0.5)


def test_scheduler_unavailable_until_started(mesh_config: MeshConfig) -> None:
    from services.scheduler.server import SchedulerServicer

    servicer = SchedulerServicer()
    with pytest.raises(Unavailable):
        _ = servicer.core


def test_config_env_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config(env={"GUARDMESH__SCHEDULER__LEASE_TTL_S": "7", "GUARDMESH__SERVICES__SCHEDULER__PORT": "0"})
    assert cfg.scheduler.lease_ttl_s == 7 and cfg.services["scheduler"].port == 0
    with pytest.raises(ConfigError, match=r"scheduler\.lease_ttl_s"):
        load_config(env={"GUARDMESH__SCHEDULER__LEASE_TTL_S": "-1"})
    with pytest.raises(ConfigError, match=r"scheduler\.polcy"):
        load_config(env={"GUARDMESH__SCHEDULER__POLCY": "fgd"})
    with pytest.raises(ConfigError, match=r"scheduler\.policy"):
        load_config(env={"GUARDMESH__SCHEDULER__POLICY": "random"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    good = tmp_path / "good.toml"
    good.write_text("[scheduler]\ngpu_reserve_mib = 1024\n")
    cfg = load_config(env={"GUARDMESH_CONFIG": str(good), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert cfg.scheduler.gpu_reserve_mib == 1024
    assert cfg.scheduler.lease_ttl_s == 30  # defaults stay under a partial file
    assert cfg.tracing.otlp_endpoint == "http://x:4317"


def test_unknown_service_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        load_definition("nope")


def test_scheduler_served_through_runtime(scheduler_stub: spb_grpc.SchedulerServiceStub) -> None:
    # The runtime serves the scheduler for real: a call crosses the wire and reaches the core.
    resp = scheduler_stub.ListNodes(spb.ListNodesRequest())
    assert list(resp.nodes) == []


def test_reflection_lists_every_paramserver_method(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"services.paramserver.port": 0})
    running = start_service(load_definition("paramserver"), config, port=0)
    try:
        with grpc.insecure_channel(running.address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            assert "guardmesh.v1.ParamServerService" in set(db.get_services())
            from google.protobuf import descriptor_pool

            svc = descriptor_pool.DescriptorPool(db).FindServiceByName("guardmesh.v1.ParamServerService")
            methods = {m.name for m in svc.methods}
        from guardmesh.v1 import paramserver_pb2

        expected = {m.name for m in paramserver_pb2.DESCRIPTOR.services_by_name["ParamServerService"].methods}
        assert methods == expected and {"Push", "PushStream", "Pull", "PullStream", "Checkpoint"} <= methods
        assert _health(running.address, "paramserver") == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0.5)


def test_reflection_lists_scorer_and_open_inference_services(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"services.scorer.port": 0})
    running = start_service(load_definition("scorer"), config, port=0)
    try:
        with grpc.insecure_channel(running.address) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"guardmesh.v1.ScorerService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        assert _health(running.address, "scorer") == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=0.5)


def test_the_scorer_serves_on_the_aio_server_and_its_health_watch_streams_through_the_drain(tmp_path: Path) -> None:
    """The scorer opts in to the grpc.aio server; health's Watch (a plain streaming handler, on the pool there)
    streams SERVING, then NOT_SERVING when the drain begins, and the drain ends with the stream still open."""
    config = make_config(tmp_path, **{"services.scorer.port": 0})
    running = start_service(load_definition("scorer"), config, port=0)
    assert isinstance(running.server, LoopServer)
    with grpc.insecure_channel(running.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="scorer"), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 1.0})
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(60)
        assert not stopper.is_alive(), "the drain hung on the open stream"
        assert running.server.wait_for_termination(0)
        watch.cancel()


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("GUARDMESH__SCHEDULER__POLCY", "did you mean 'scheduler.policy'?"),
        ("GUARDMESH__SERVICES__SCORER__METRICS_PROT", "did you mean 'services.scorer.metrics_port'?"),
        ("GUARDMESH__PARAMSERVR__SHARDS", "did you mean 'paramserver'?"),
    ],
)
def test_config_typo_suggests_the_nearest_valid_key(variable: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={variable: "1"})
    assert suggestion in str(err.value)


def test_config_file_typo_suggests_the_nearest_valid_key_and_nothing_when_none_is_near(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text("[grpc]\ngrace = 3\nwibble = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert "grpc.grace: Extra inputs are not permitted (got 3) (did you mean 'grpc.grace_s'?)" in message
    (wibble,) = [problem for problem in message.split("; ") if "grpc.wibble" in problem]
    assert wibble.endswith("grpc.wibble: Extra inputs are not permitted (got 1)")  # no key is near: no guess
