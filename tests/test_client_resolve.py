"""The client factory follows instances (guardmesh/client.py), with real scheduler servers and real channels:

* Consul's passing set (the labelled double in tests/consul_double.py, which runs the real gRPC health
  checks): a new instance gets calls within seconds, one that goes away stops getting them;
* a static list of replicas sharing one store: calls that land on the standby are redirected to the
  leader it names, and after the leader stops the client follows the replica that took over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from guardmesh.client import FollowingChannel, open_channel
from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from tests import test_discovery
from tests.conftest import make_config, node_pb
from tests.consul_double import ConsulDouble

#: The fixture of real scheduler servers, stopped afterwards (one definition, in test_discovery).
start = test_discovery.start

#: How long a change of instances may take to reach the client (re-resolution every 0.3 s here).
FOLLOW_WITHIN_S = 60.0


def served_by(stub: spb_grpc.SchedulerServiceStub) -> str:
    """Which instance answered: each one's store holds one node named after it."""
    nodes = stub.ListNodes(spb.ListNodesRequest(), timeout=10).nodes
    return ",".join(sorted(n.spec.name for n in nodes))


def mark(running: RunningService, name: str) -> None:
    with grpc.insecure_channel(running.address) as channel:
        spb_grpc.SchedulerServiceStub(channel).RegisterNode(spb.RegisterNodeRequest(node=node_pb(name, 1, 16384)))


def seen_within(stub: spb_grpc.SchedulerServiceStub, want: Callable[[set[str]], bool], calls: int = 12) -> set[str]:
    """Call until a window of ``calls`` answers satisfies ``want``; that window (AssertionError on timeout)."""
    end = time.monotonic() + FOLLOW_WITHIN_S
    while True:
        window = {served_by(stub) for _ in range(calls)}
        if want(window):
            return window
        assert time.monotonic() < end, f"instances seen {window} never satisfied the condition"
        time.sleep(0.2)


def test_consul_passing_set_is_followed(
    tmp_path: Path, start: Callable[[MeshConfig], RunningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    consul = ConsulDouble()
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.addr)
    try:

        def config(name: str) -> MeshConfig:
            return make_config(
                tmp_path / name,
                **{
                    "discovery.mode": "consul",
                    "discovery.consul_addr": consul.addr,
                    "client.reresolve_s": 0.3,
                },
            )

        a, b = start(config("a")), start(config("b"))
        mark(a, "at-a")
        mark(b, "at-b")
        with open_channel("scheduler", config("client")) as channel:
            stub = spb_grpc.SchedulerServiceStub(channel)
            assert seen_within(stub, lambda w: w == {"at-a", "at-b"}) == {"at-a", "at-b"}
            c = start(config("c"))
            mark(c, "at-c")
            seen_within(stub, lambda w: "at-c" in w, calls=20)  # the new instance gets calls
            a.stop(grace=1.0)  # deregisters
            # The instance that went away gets no more calls, and no call fails meanwhile.
            window = seen_within(stub, lambda w: "at-a" not in w, calls=20)
            assert window <= {"at-b", "at-c"}
            # ... and the next re-resolution drops it from the channel's target.
            end = time.monotonic() + FOLLOW_WITHIN_S
            while f":{a.port}" in channel.target:
                assert time.monotonic() < end, channel.target
                time.sleep(0.1)
    finally:
        consul.stop()


def test_static_replicas_follow_the_leader(tmp_path: Path, start: Callable[[MeshConfig], RunningService]) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"

    def config(name: str, **extra: object) -> MeshConfig:
        return make_config(tmp_path / name, **{"scheduler.store_url": store, "scheduler.leader_lease_s": 5.0, **extra})

    leader, standby = start(config("a")), start(config("b"))
    mark(leader, "shared")  # one store: both would list it, but only the leader answers
    # The standby refuses, naming the leader.
    with grpc.insecure_channel(standby.address) as direct, pytest.raises(grpc.RpcError) as refused:
        spb_grpc.SchedulerServiceStub(direct).ListNodes(spb.ListNodesRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"leader={leader.address}" in (refused.value.details() or "")

    client = config("client", **{"services.scheduler.replicas": [standby.address, leader.address]})
    with (
        open_channel("scheduler", client) as replicas,
        open_channel("scheduler", client, address=standby.address) as pointed,
    ):
        assert isinstance(pointed, FollowingChannel)
        over_replicas, over_pointed = spb_grpc.SchedulerServiceStub(replicas), spb_grpc.SchedulerServiceStub(pointed)
        for _ in range(10):  # every call succeeds: those that reach the standby end on the leader
            assert served_by(over_replicas) == "shared"
        # A channel given only the standby's address learns the leader from its answer and moves there.
        assert served_by(over_pointed) == "shared"
        assert pointed.leader == leader.address
        leader.stop(grace=1.0)  # hands the lease back: the standby takes over at once
        for stub in (over_replicas, over_pointed):
            end = time.monotonic() + FOLLOW_WITHIN_S
            while True:
                try:
                    assert served_by(stub) == "shared"
                    break
                except grpc.RpcError as err:  # the old leader is gone, until the client moves on
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    assert time.monotonic() < end, "the client never reached the new leader"
                    time.sleep(0.2)
        assert pointed.leader in ("", standby.address)
        assert pointed.target == standby.address


def test_a_call_on_a_closed_channel_raises_as_grpc_does(tmp_path: Path) -> None:
    channel = open_channel("scheduler", make_config(tmp_path), address="127.0.0.1:1")
    stub = spb_grpc.SchedulerServiceStub(channel)
    channel.close()
    with pytest.raises(ValueError, match="closed channel"):  # not a crash of the process
        stub.ListJobs(spb.ListJobsRequest())
