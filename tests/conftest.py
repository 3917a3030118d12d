"""Shared fixtures: real servers on ephemeral ports, real channels, real SQLite files."""

from __future__ import annotations

import os

# As the paramserver process does (services/paramserver/__main__.py): set before native kernels load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from guardmesh.client import open_channel
from guardmesh.config import MeshConfig, load_config
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.paramserver import ParamServerClient
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent


def make_config(tmp_path: Path, **overrides: object) -> MeshConfig:
    """Embedded defaults with state under ``tmp_path``, port 0 and the given dotted-key overrides."""
    base = load_config(env={})
    return base.with_overrides(
        {
            "mesh.state_dir": str(tmp_path / "state"),
            "services.scheduler.port": 0,
            "scheduler.reap_interval_s": 0.05,
            "grpc.grace_s": 2.0,
            "grpc.drain_delay_s": 0.0,
            "metrics.enabled": False,  # in-process servers: one Prometheus registry per process
            **overrides,
        }
    )


def ps_config(tmp_path: Path, **overrides: object) -> MeshConfig:
    """:func:`make_config` for an in-process paramserver on an ephemeral port."""
    return make_config(tmp_path, **{"services.paramserver.port": 0, **overrides})


@pytest.fixture
def ps(tmp_path: Path) -> Iterator[tuple[RunningService, MeshConfig]]:
    """A real paramserver shard on an ephemeral port, with its config."""
    config = ps_config(tmp_path)
    running = start_service(load_definition("paramserver"), config, port=0)
    yield running, config
    running.stop(grace=0.5)


def ps_client(running: RunningService, config: MeshConfig, worker: str = "w0", model: str = "m") -> ParamServerClient:
    """The SDK's client of ``model`` on one running shard, as ``worker``."""
    return ParamServerClient.connect(model, worker_id=worker, config=config, addresses=[running.address])


@pytest.fixture
def mesh_config(tmp_path: Path) -> MeshConfig:
    """A config whose state lives in the test's temporary folder."""
    return make_config(tmp_path)


@pytest.fixture
def scheduler_service(mesh_config: MeshConfig) -> Iterator[RunningService]:
    """A real scheduler server on an ephemeral port (SQLite under tmp_path)."""
    running = start_service(load_definition("scheduler"), mesh_config, port=0)
    yield running
    running.stop(grace=1.0)


@pytest.fixture
def scheduler_channel(scheduler_service: RunningService, mesh_config: MeshConfig) -> Iterator[grpc.Channel]:
    """A channel from the client factory to the scheduler fixture."""
    channel = open_channel("scheduler", mesh_config, address=scheduler_service.address)
    yield channel
    channel.close()


@pytest.fixture
def scheduler_stub(scheduler_channel: grpc.Channel) -> spb_grpc.SchedulerServiceStub:
    """A SchedulerService stub over a real channel."""
    return spb_grpc.SchedulerServiceStub(scheduler_channel)


def node_pb(
    name: str, gpus: int, memory_mib: int, model: str = "A100-80GB", group_size: int = 0, **labels: str
) -> spb.NodeSpec:
    """A node message with ``gpus`` identical cards (optionally in topology groups of ``group_size``)."""
    return spb.NodeSpec(
        name=name,
        labels=labels,
        gpus=[
            spb.GpuDevice(
                index=i,
                uuid=f"GPU-{name}-{i}",
                model=model,
                memory_mib=memory_mib,
                topology_group=f"{name}/nvl{i // group_size}" if group_size else "",
            )
            for i in range(gpus)
        ],
    )


def check_invariant(nodes: spb.ListNodesResponse, reserve_mib: int) -> list[str]:
    """Breaches of the card invariant read from ListNodes: what a client can verify on its own."""
    out = []
    for node in nodes.nodes:
        for gpu in node.gpus:
            allocs = list(gpu.allocations)
            label = f"{node.spec.name}/{gpu.device.index}"
            if len(allocs) > 1 and not all(a.shared for a in allocs):
                out.append(f"{label}: exclusive job shares the card: {[a.job_id for a in allocs]}")
            total = sum(a.memory_cap_mib for a in allocs)
            if total > gpu.device.memory_mib - reserve_mib:
                out.append(f"{label}: caps {total} > {gpu.device.memory_mib - reserve_mib}")
    return out


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (tests/postgres.py), stopped and removed at the end."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each backend: a SQLite file under tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
