"""Consul discovery over the real HTTP API shape and real gRPC health checks.

The agent is :class:`tests.consul_double.ConsulDouble`, a test double of Consul's HTTP endpoints (not Consul)
that runs each registered gRPC health check for real when asked for passing instances. Services are real
scheduler servers started through the runtime; clients are channels from the client factory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.discovery import ConsulRegistry, Endpoint, StaticRegistry, grpc_target, registry_for
from guardmesh.errors import Unavailable
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests.conftest import make_config, node_pb
from tests.consul_double import ConsulDouble, grpc_health_status

pytestmark = pytest.mark.timeout(180)  # a hang guard, not a speed check: loaded machines are slow


@pytest.fixture
def consul(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulDouble]:
    double = ConsulDouble()
    # Where users point their tools; guardmesh itself must take the address from its config.
    monkeypatch.setenv("CONSUL_HTTP_ADDR", double.addr)
    yield double
    double.stop()


def consul_config(tmp_path: Path, consul: ConsulDouble, name: str, **overrides: object) -> MeshConfig:
    return make_config(
        tmp_path / name,
        **{"discovery.mode": "consul", "discovery.consul_addr": f"127.0.0.1:{consul.port}", **overrides},
    )


@pytest.fixture
def start() -> Iterator[Callable[[MeshConfig], RunningService]]:
    started: list[RunningService] = []

    def _start(config: MeshConfig) -> RunningService:
        running = start_service(load_definition("scheduler"), config, port=0)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.stop(grace=1.0)


def list_nodes(channel: grpc.Channel) -> list[str]:
    reply = spb_grpc.SchedulerServiceStub(channel).ListNodes(spb.ListNodesRequest(), timeout=30)
    return sorted(n.spec.name for n in reply.nodes)


def test_scheduler_registers_with_grpc_health_check_from_config(tmp_path, consul, start):
    config = consul_config(
        tmp_path, consul, "a", **{"discovery.check_interval": "3s", "discovery.deregister_after": "90s"}
    )
    running = start(config)

    assert running.registration_id in consul.services, (running.registration_id, list(consul.services))
    reg = consul.services[running.registration_id]
    assert reg.name == "scheduler"
    assert (reg.address, reg.port) == ("127.0.0.1", running.port)
    assert len(reg.checks) == 1
    check = reg.checks[0].as_dict()
    assert check["GRPC"] == f"{running.address}/scheduler"
    assert check["Interval"] == "3s"
    assert check["DeregisterCriticalServiceAfter"] == "90s"
    assert check["GRPCUseTLS"] is False
    # The check Consul would run passes against the live server: it asks about the short service name.
    assert grpc_health_status(check["GRPC"]) == ("passing", f"gRPC check {check['GRPC']}: success")


def test_resolve_returns_the_instance_and_client_reaches_it_without_an_address(tmp_path, consul, start):
    config = consul_config(tmp_path, consul, "a")
    running = start(config)

    assert ConsulRegistry(config).resolve("scheduler") == [Endpoint("127.0.0.1", running.port)]
    assert ("health", "scheduler") in consul.calls

    with open_channel("scheduler", config) as channel:
        stub = spb_grpc.SchedulerServiceStub(channel)
        stub.RegisterNode(spb.RegisterNodeRequest(node=node_pb("n1", 1, 81920)), timeout=30)
        assert list_nodes(channel) == ["n1"]


def test_two_instances_resolve_to_both_and_calls_round_robin(tmp_path, consul, start):
    a = start(consul_config(tmp_path, consul, "a"))
    b = start(consul_config(tmp_path, consul, "b"))
    config = consul_config(tmp_path, consul, "client")

    endpoints = ConsulRegistry(config).resolve("scheduler")
    assert sorted(endpoints, key=lambda e: e.port) == sorted(
        [Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port)], key=lambda e: e.port
    )
    target = grpc_target(endpoints)
    assert target == "ipv4:" + ",".join(f"127.0.0.1:{e.port}" for e in endpoints)

    # Each instance has its own database: a node registered on one tells which instance answered.
    with open_channel("scheduler", config, address=a.address) as direct:
        spb_grpc.SchedulerServiceStub(direct).RegisterNode(
            spb.RegisterNodeRequest(node=node_pb("only-on-a", 1, 81920)), timeout=30
        )
    seen = set()
    with open_channel("scheduler", config) as channel:
        for _ in range(40):
            seen.add(tuple(list_nodes(channel)))
            if len(seen) == 2:
                break
    assert seen == {("only-on-a",), ()}, f"calls through {target} reached only {seen}"


def test_stopped_instance_is_deregistered(tmp_path, consul, start):
    config = consul_config(tmp_path, consul, "a")
    running = start(config)
    service_id = running.registration_id
    assert service_id in consul.services

    running.stop(grace=1.0)

    assert service_id not in consul.services
    assert consul.deregistered == [service_id]
    with pytest.raises(Unavailable, match="no passing instance of 'scheduler'"):
        ConsulRegistry(config).resolve("scheduler")
    with pytest.raises(Unavailable):
        open_channel("scheduler", config)


def test_not_serving_instance_is_not_resolved(tmp_path, consul, start):
    a = start(consul_config(tmp_path, consul, "a"))
    b = start(consul_config(tmp_path, consul, "b"))
    config = consul_config(tmp_path, consul, "client")
    registry = ConsulRegistry(config)

    # Only the name the check asks about ("scheduler") goes NOT_SERVING; "" and the proto name stay SERVING.
    a.health.set("scheduler", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert registry.resolve("scheduler") == [Endpoint("127.0.0.1", b.port)]
    assert len(consul.instances("scheduler")) == 2  # still registered, just not passing
    with open_channel("scheduler", config) as channel:
        assert list_nodes(channel) == []

    b.health.set("scheduler", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(Unavailable):
        registry.resolve("scheduler")

    a.health.set("scheduler", health_pb2.HealthCheckResponse.SERVING)
    assert registry.resolve("scheduler") == [Endpoint("127.0.0.1", a.port)]


def test_instance_that_stopped_answering_is_not_resolved(tmp_path, consul, start):
    a = start(consul_config(tmp_path, consul, "a"))
    b = start(consul_config(tmp_path, consul, "b"))
    a.server.stop(0).wait()  # gone without deregistering (a crash): its gRPC check fails
    assert a.registration_id in consul.services
    assert ConsulRegistry(consul_config(tmp_path, consul, "client")).resolve("scheduler") == [
        Endpoint("127.0.0.1", b.port)
    ]


def test_consul_http_addr_selects_consul_mode():
    config = load_config(env={"CONSUL_HTTP_ADDR": "10.1.2.3:8501"})
    assert config.discovery.mode == "consul"
    assert config.discovery.consul_addr == "10.1.2.3:8501"
    registry = registry_for(config)
    assert isinstance(registry, ConsulRegistry)
    assert registry.client.http.base_uri == "http://10.1.2.3:8501"

    https = registry_for(load_config(env={"CONSUL_HTTP_ADDR": "https://consul.internal:8443"}))
    assert isinstance(https, ConsulRegistry)
    assert https.client.http.base_uri == "https://consul.internal:8443"

    static = load_config(env={})
    assert static.discovery.mode == "static"
    assert isinstance(registry_for(static), StaticRegistry)


def test_service_started_from_env_config_registers_and_is_reachable(tmp_path, consul):
    config = load_config(
        env={
            "CONSUL_HTTP_ADDR": consul.addr,
            "GUARDMESH__MESH__STATE_DIR": str(tmp_path / "state"),
            "GUARDMESH__SERVICES__SCHEDULER__PORT": "0",
        }
    )
    assert config.discovery.mode == "consul"
    running = start_service(load_definition("scheduler"), config)
    try:
        assert running.port != 0
        assert consul.services[running.registration_id].checks[0].grpc == f"{running.address}/scheduler"
        with open_channel("scheduler", config) as channel:
            assert list_nodes(channel) == []
    finally:
        running.stop(grace=1.0)
    assert running.registration_id in consul.deregistered


def test_advertise_host_is_what_consul_checks_and_clients_dial(tmp_path, consul, start):
    config = consul_config(tmp_path, consul, "a", **{"services.scheduler.advertise_host": "localhost"})
    running = start(config)

    reg = consul.services[running.registration_id]
    assert (reg.address, reg.port) == ("localhost", running.port)
    assert reg.checks[0].grpc == f"localhost:{running.port}/scheduler"
    assert ConsulRegistry(config).resolve("scheduler") == [Endpoint("localhost", running.port)]
    with open_channel("scheduler", config) as channel:
        assert list_nodes(channel) == []


def test_mixed_address_families_give_a_valid_target() -> None:
    from guardmesh.discovery import Endpoint, grpc_target

    target = grpc_target([Endpoint("127.0.0.1", 1), Endpoint("127.0.0.2", 2), Endpoint("::1", 3)])
    assert target == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target([Endpoint("::1", 3), Endpoint("::1", 4)]) == "ipv6:[::1]:3,[::1]:4"


def test_unreachable_consul_stops_the_service_with_a_clear_error(tmp_path) -> None:
    import socket

    from guardmesh.runtime import DiscoveryError, load_definition, start_service

    from .conftest import make_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    config = make_config(tmp_path, **{"discovery.mode": "consul", "discovery.consul_addr": f"127.0.0.1:{dead}"})
    with pytest.raises(DiscoveryError, match=r"discovery\.consul_addr"):
        start_service(load_definition("scheduler"), config, port=0)
    # The store was closed and the port released: a second start on the same state works.
    ok = start_service(load_definition("scheduler"), make_config(tmp_path), port=0)
    ok.stop(grace=0.5)
