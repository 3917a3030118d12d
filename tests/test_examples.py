"""The README's examples run for real against real servers."""

from __future__ import annotations

import runpy
from pathlib import Path

from guardmesh.runtime import load_definition, start_service

from .conftest import make_config

REPO = Path(__file__).resolve().parent.parent


def test_train_digits_example(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"services.paramserver.port": 0})
    server = start_service(load_definition("paramserver"), config, port=0)
    try:
        main = runpy.run_path(str(REPO / "examples" / "train_digits.py"))["main"]
        acc = main(["--address", server.address, "--epochs", "3"])
        assert acc > 0.9
    finally:
        server.stop(grace=0.5)


def test_readme_scheduler_snippet(scheduler_service, mesh_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The scheduler snippet of the README, run against a live scheduler."""
    from guardmesh.v1 import scheduler_pb2 as pb
    from guardmesh.v1 import scheduler_pb2_grpc

    from .conftest import node_pb

    stub = scheduler_pb2_grpc.SchedulerServiceStub(
        __import__("guardmesh.client").client.open_channel("scheduler", mesh_config, address=scheduler_service.address)
    )
    for i in range(2):
        stub.RegisterNode(pb.RegisterNodeRequest(node=node_pb(f"dgx-{i}", 8, 81920, group_size=4)))
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("A trainer, in a few lines:\n\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("GUARDMESH__SERVICES__SCHEDULER__PORT", str(scheduler_service.port))
    scope: dict[str, object] = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    job = scope["job"]
    assert job.state == pb.JOB_STATE_RUNNING  # type: ignore[attr-defined]
    assert job.placements[0].env["CUDA_VISIBLE_DEVICES"].startswith("GPU-dgx-")  # type: ignore[attr-defined]
