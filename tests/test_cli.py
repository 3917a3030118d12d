"""The ``guardmesh`` command's listings over real services: jobs, nodes, models and experiments, each listed
and described as a table and as JSON (the RPC's answer in the protobuf JSON mapping)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guardmesh import __version__
from guardmesh.cli import app
from guardmesh.client import open_channel
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.v1 import abrouter_pb2 as apb
from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc
from guardmesh.v1 import common_pb2
from guardmesh.v1 import scheduler_pb2 as spb
from guardmesh.v1 import scheduler_pb2_grpc as spb_grpc
from guardmesh.v1 import scorer_pb2 as scpb
from guardmesh.v1 import scorer_pb2_grpc as scpb_grpc

from .conftest import REPO, make_config, node_pb
from .processes import clean_env

#: A job id long enough that a table squeezed to 80 columns would cut it.
LONG_JOB = "nightly-resnet152-imagenet-finetune-tenant-research-vision-0001"


@pytest.fixture
def services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, RunningService]]:
    """A scheduler with a node and a running job, a scorer with a model, an abrouter with an experiment."""
    # The commands read this (empty: the defaults), not a profile remembered by a `make up` in the repository.
    (tmp_path / "mesh.toml").write_text("")
    monkeypatch.setenv("GUARDMESH_CONFIG", str(tmp_path / "mesh.toml"))
    config = make_config(tmp_path, **{"services.scorer.port": 0, "services.abrouter.port": 0})
    running: dict[str, RunningService] = {}
    try:
        for name in ("scheduler", "scorer", "abrouter"):
            running[name] = start_service(load_definition(name), config, port=0)
        with open_channel("scheduler", config, address=running["scheduler"].address) as ch:
            sched = spb_grpc.SchedulerServiceStub(ch)
            sched.RegisterNode(spb.RegisterNodeRequest(node=node_pb("gpu-node-1", 2, 16384, model="T4")))
            spec = spb.JobSpec(
                job_id=LONG_JOB, tenant="research", replicas=1, gpus_per_replica=1, memory_mib_per_gpu=4096
            )
            sched.SubmitJob(spb.SubmitJobRequest(job=spec))
        with open_channel("scorer", config, address=running["scorer"].address) as ch:
            module = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid()).eval()
            buf = io.BytesIO()
            torch.jit.save(torch.jit.script(module), buf)
            reference = np.random.default_rng(0).standard_normal((50, 2)).astype("<f4")
            scpb_grpc.ScorerServiceStub(ch).RegisterModel(
                scpb.RegisterModelRequest(
                    model="fraud",
                    version="v1",
                    features=["amount", "age"],
                    format=scpb.MODEL_FORMAT_TORCHSCRIPT,
                    payload=buf.getvalue(),
                    activate=True,
                    reference=common_pb2.Tensor(
                        dtype=common_pb2.D_TYPE_FLOAT32, shape=[50, 2], data=reference.tobytes()
                    ),
                )
            )
        with open_channel("abrouter", config, address=running["abrouter"].address) as ch:
            apb_grpc.ABRouterServiceStub(ch).CreateExperiment(
                apb.CreateExperimentRequest(
                    spec=apb.ExperimentSpec(
                        key="checkout-button",
                        arms=[apb.Arm(name="control", weight=0.5), apb.Arm(name="green", weight=0.5)],
                    )
                )
            )
        yield running
    finally:
        for svc in running.values():
            svc.stop(grace=0.5)


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


LISTINGS = [
    ("jobs", "scheduler", "jobs", LONG_JOB, ("job_id",), "RUNNING"),
    ("nodes", "scheduler", "nodes", "gpu-node-1", ("spec", "name"), "2 x T4"),
    ("models", "scorer", "models", "fraud", ("model",), "v1"),
    ("experiments", "abrouter", "experiments", "checkout-button", ("spec", "key"), "control:0.5"),
]


@pytest.mark.parametrize(("kind", "service", "field", "name", "path", "cell"), LISTINGS)
def test_every_listing_as_table_and_json(
    services: dict[str, RunningService],
    kind: str,
    service: str,
    field: str,
    name: str,
    path: tuple[str, ...],
    cell: str,
) -> None:
    address = services[service].address
    table = _run(kind, "list", "--address", address)
    (row,) = [line for line in table.splitlines() if name in line]  # the whole name: nothing cut to "…"
    assert cell in row and "…" not in table
    listed = json.loads(_run(kind, "list", "--address", address, "--output", "json"))[field]
    (item,) = listed
    if kind == "jobs":
        item = item["spec"]
    value = item
    for key in path:
        value = value[key]
    assert value == name

    described = _run(kind, "describe", name, "--address", address)
    assert name in described and "…" not in described
    detail = json.loads(_run(kind, "describe", name, "--address", address, "-o", "json"))
    if kind == "models":
        assert detail["model"] == name and [v["version"] for v in detail["versions"]] == ["v1"]
    elif kind == "nodes":
        assert detail["spec"]["name"] == name and len(detail["gpus"]) == 2
    else:
        spec = detail["spec"]
        assert spec.get("job_id", spec.get("key")) == name


def test_describe_unknown_names_the_missing_thing(services: dict[str, RunningService]) -> None:
    result = CliRunner().invoke(app, ["nodes", "describe", "nope", "--address", services["scheduler"].address])
    assert result.exit_code == 1 and "no node named 'nope'" in result.output
    result = CliRunner().invoke(app, ["jobs", "describe", "nope", "--address", services["scheduler"].address])
    assert result.exit_code == 1 and "scheduler: NOT_FOUND" in result.output
    result = CliRunner().invoke(
        app, ["jobs", "list", "--state", "SLEEPING", "--address", services["scheduler"].address]
    )
    assert result.exit_code == 2 and "--state: unknown state 'SLEEPING'" in result.output


def test_piped_table_is_whole_without_columns(services: dict[str, RunningService], tmp_path: Path) -> None:
    """A real process writing into a pipe, no COLUMNS in its environment: the job id is printed whole."""
    env = clean_env({"GUARDMESH_CONFIG": str(tmp_path / "mesh.toml")})
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from guardmesh.cli import app; app()",
            "jobs",
            "list",
            "--address",
            services["scheduler"].address,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert LONG_JOB in proc.stdout and "…" not in proc.stdout
    assert "\x1b[" not in proc.stdout  # no colour codes into a pipe


def test_version() -> None:
    assert _run("--version").strip() == f"guardmesh {__version__}"
