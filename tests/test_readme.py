"""What a newcomer runs, run for real: the README's trainer snippet and the SDK guide's trainer examples
(docs/sdk.md), each twice, in fresh processes against a mesh started as ``make up`` starts it (its simulated
cluster included); benchmarks that leave the tracked result files alone unless asked to record."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import records

from .conftest import REPO
from .processes import clean_env, free_port

SDK_GUIDE = REPO / "docs" / "sdk.md"


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def _readme_trainer_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("A trainer, in a few lines:\n\n```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.timeout(600)
def test_readme_and_sdk_guide_trainer_snippets_run_twice_on_a_fresh_make_up_mesh(tmp_path: Path) -> None:
    ports = {"scheduler": free_port(), "paramserver": free_port()}
    config = tmp_path / "mesh.toml"
    config.write_text(
        '[mesh]\nstate_dir = ".mesh"\n'
        + "".join(f"[services.{name}]\nport = {port}\nmetrics_port = 0\n" for name, port in ports.items())
        + "[services.scorer]\nenabled = false\n[services.abrouter]\nenabled = false\n[grpc]\ndrain_delay_s = 0.1\n"
    )
    env = clean_env({"PYTHONPATH": str(REPO), "GUARDMESH_CONFIG": str(config)})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )

    readme_snippet = tmp_path / "readme_trainer.py"
    readme_snippet.write_text(
        _readme_trainer_snippet() + '\nassert job.state == pb.JOB_STATE_RUNNING, job\nprint("RAN", job_id)\n'
    )
    trainer, pieces = _python_blocks(SDK_GUIDE.read_text())[:2]
    guide = tmp_path / "sdk_trainers.py"
    prelude = "from guardmesh.config import load_config\n\nconfig = load_config()\n"
    guide.write_text(prelude + trainer + "\n" + pieces + '\nprint("RAN", run)\n')
    try:
        up = run("-c", "from guardmesh.cli import app; app()", "mesh", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "simulated" in up.stdout
        ran: list[str] = []
        for attempt in (1, 2):
            for script in (readme_snippet, guide):
                result = run(str(script))
                assert result.returncode == 0, (
                    f"{script.name}, run {attempt}:\n{result.stdout}\n{result.stderr[-4000:]}"
                )
                ran += [line for line in result.stdout.splitlines() if line.startswith("RAN ")]
        assert len(ran) == 4 and len(set(ran)) == 4  # every run its own job ids
    finally:
        down = run("-c", "from guardmesh.cli import app; app()", "mesh", "down")
    assert down.returncode == 0, down.stdout + down.stderr


def test_benchmarks_leave_tracked_results_alone_unless_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "RESULTS", tmp_path)
    tracked = tmp_path / "probe.json"
    tracked.write_text("[]\n")
    monkeypatch.delenv(records.RECORD_ENV, raising=False)
    rows = [records.record("probe", "ops/s", 2.0, "peer", 1.0, None)]
    written = records.write_records("probe", rows)
    assert written == tmp_path / "local" / "probe.json" and tracked.read_text() == "[]\n"
    monkeypatch.setenv(records.RECORD_ENV, "1")
    assert records.write_records("probe", rows) == tracked and '"probe"' in tracked.read_text()


def test_cluster_file_documentation_example_loads(tmp_path: Path) -> None:
    from guardmesh.inventory import load_cluster_file

    doc = (REPO / "docs" / "cluster-file.md").read_text()
    (example,) = re.findall(r"^```toml\n(.*?)^```", doc, flags=re.DOTALL | re.MULTILINE)
    path = tmp_path / "cluster.toml"
    path.write_text(example)
    nodes = {n.name: n for n in load_cluster_file(path)}
    assert len(nodes["dgx-0"].gpus) == 8 and nodes["dgx-0"].gpus[5].topology_group.endswith("1")
    assert [g.model for g in nodes["mixed-1"].gpus] == ["T4", "T4"]
    assert dict(nodes["dgx-0"].labels) == {"zone": "a", "rack": "r12"}
    simulated = load_cluster_file(REPO / "guardmesh" / "simulated_cluster.toml")
    assert simulated and all(dict(n.labels)["guardmesh.io/simulated"] == "true" for n in simulated)
