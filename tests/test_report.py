"""The A/B report is rendered client-side: ``guardmesh abrouter report KEY`` against a real abrouter writes the
audit line, the multi-metric table and the PNG plots; the renderer works on the SDK's records."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from guardmesh.cli import app
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.abrouter import ABRouterClient, MetricAnalysis, Observation, analysis_from_pb
from guardmesh.sdk.report import analysis_table, plot_analysis

from .conftest import make_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEY = "ranker-v2"
DAY_S = 86_400.0


@pytest.fixture
def abrouter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningService]:
    """A real abrouter with an experiment of 400 exposed units; engagement observed on days 0 to 3 after
    exposure (the treatment's lift fades: novelty), revenue once per unit with a pre-period value."""
    (tmp_path / "mesh.toml").write_text("")  # the command reads this (the defaults), not a remembered profile
    monkeypatch.setenv("GUARDMESH_CONFIG", str(tmp_path / "mesh.toml"))
    config = make_config(tmp_path, **{"services.abrouter.port": 0})
    running = start_service(load_definition("abrouter"), config, port=0)
    try:
        rng = np.random.default_rng(7)
        with ABRouterClient(config, address=running.address) as router:
            router.create_experiment(
                KEY,
                {"control": 0.5, "new ranker": 0.5},
                metrics=["engagement", "revenue"],
                metric_kinds={"engagement": "continuous", "revenue": "continuous"},
            )
            now = time.time()
            observations: list[Observation | tuple[str, str, float]] = []
            for i in range(400):
                unit = f"user-{i}"
                treated = router.assign_one(unit, KEY, log_exposure=True).arm == "new ranker"
                for day, lift in enumerate((1.0, 0.6, 0.2, 0.0)):
                    value = rng.normal(1.0 + (lift if treated else 0.0), 0.5)
                    observations.append(Observation(unit, "engagement", value, timestamp=now + day * DAY_S + 60))
                pre = rng.exponential(1.0)
                observations.append(Observation(unit, "revenue", pre, pre_period=True))
                observations.append((unit, "revenue", pre + rng.normal(0.1 if treated else 0.0, 0.3)))
            assert router.record_metrics(KEY, observations) == len(observations)
        yield running
    finally:
        running.stop(grace=0.5)


def test_report_command_writes_the_table_and_the_plots(abrouter: RunningService, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    result = CliRunner().invoke(
        app,
        ["abrouter", "report", KEY, "--address", abrouter.address, "--out", str(out), "--resamples", "200"],
        terminal_width=250,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.output
    assert f"{KEY}: 400 exposed units; SRM p=" in text
    assert "A/B analysis" in text
    for cell in ("engagement", "revenue", "new ranker vs control", "novelty", "CUPED"):
        assert cell in text, cell
    forest, daily = out / "ranker_v2_forest.png", out / "ranker_v2_daily.png"
    assert f"wrote {forest}" in text.replace("\n", "") and f"wrote {daily}" in text.replace("\n", "")
    for path in (forest, daily):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_report_command_names_an_unknown_experiment(abrouter: RunningService, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["abrouter", "report", "no-such-experiment", "--address", abrouter.address, "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "abrouter: NOT_FOUND" in result.output and "no-such-experiment" in result.output
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture
def records(abrouter: RunningService) -> tuple[list[MetricAnalysis], list[str]]:
    """The SDK's records of the experiment's analysis, as a client holds them."""
    with ABRouterClient(address=abrouter.address) as router:
        analysis = router.analyze(KEY, bootstrap_resamples=200, seed=1)
    return [analysis_from_pb(m, analysis.arms) for m in analysis.raw.metrics], analysis.arms


def test_table_names_every_metric_and_refuses_missing_arm_names(records) -> None:
    results, arms = records
    console = Console(record=True, width=250)
    console.print(analysis_table(results, arms))
    text = console.export_text()
    for name in ("engagement", "revenue", "new ranker vs control", "novelty", "CUPED"):
        assert name in text, name
    with pytest.raises(ValueError, match=r"^arm_names: has 1 names, no name for arm 1"):
        analysis_table(results, arms[:1])


def test_plots_are_written_only_for_valid_input(records, tmp_path: Path) -> None:
    results, arms = records
    with pytest.raises(ValueError, match=r"^results: nothing to plot"):
        plot_analysis([], arms, tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^arm_names: "):
        plot_analysis(results, arms[:1], tmp_path / "short")
    assert not (tmp_path / "short").exists()  # refused before anything was written
    no_days = [r for r in results if r.metric == "revenue"]
    paths = plot_analysis(no_days, arms, tmp_path / "revenue", title="Revenue only")
    assert [p.name for p in paths] == ["revenue_only_forest.png"]  # one day: no daily plot
