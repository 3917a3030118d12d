"""The analysis over the Parquet tables through the wire (issue #20 item 2): ``AnalyzeExperiment(from_table=true)``
on a real abrouter server (real gRPC channel, SQLite store, export to a Parquet directory) answers as the in-memory
analysis, catches up with observations recorded after an earlier call (an export round of each table runs
first), reports a corrupt file of either table as UNAVAILABLE naming the table, refuses the request while
export is off (FAILED_PRECONDITION naming abrouter.export_url) and past DuckDB's memory limit
(RESOURCE_EXHAUSTED naming warehouse.MEMORY_LIMIT); ``guardmesh abrouter report --from-table`` reaches it.

Tolerance as in tests/test_abrouter_warehouse_analysis.py: DuckDB sums per unit and day in another order than
numpy, so a value may differ in its last bit; rel 1e-9 is far above that and far below what a lost, doubled or
misdated observation moves."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from typer.testing import CliRunner

from bench.exposure_table import write_exposure_table
from guardmesh.cli import app
from guardmesh.client import open_channel
from guardmesh.config import MeshConfig
from guardmesh.runtime import RunningService, load_definition, start_service
from guardmesh.sdk.abrouter import ABRouterClient, Observation
from guardmesh.v1 import abrouter_pb2 as pb
from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
from services.abrouter import warehouse
from services.abrouter.export import exposure_files
from services.abrouter.warehouse_analysis import observation_files, observation_table_url

from .conftest import make_config

KEY = "rank"
START = 1_760_000_000.0
DAY_S = 86_400.0


def serve(tmp_path: Path, export_url: str) -> tuple[RunningService, MeshConfig]:
    """A real abrouter on an ephemeral port exporting to ``export_url`` (empty: export off); continuous rounds
    an hour apart, so the only rounds in a test are the ones its requests run."""
    config = make_config(
        tmp_path,
        **{"services.abrouter.port": 0, "abrouter.export_url": export_url, "abrouter.export_interval_s": 3600.0},
    )
    return start_service(load_definition("abrouter"), config, port=0), config


def record(client: ABRouterClient, units: range, rng: np.random.Generator) -> None:
    """Expose ``units`` (over three days, each with a position) and record clicks (EVENT, with pre-period
    values, a heavy user every 53rd unit) and dwell (CONTINUOUS) on the days after."""
    observations: list[Observation | tuple[str, str, float]] = []
    for i in units:
        unit, at = f"u{i}", START + float(rng.uniform(0, 3 * DAY_S))
        client.assign_one(unit, KEY, log_exposure=True, covariates={"position": str(i % 4)}, timestamp=at)
        heavy = 20.0 if i % 53 == 0 else 1.0
        observations.append(Observation(unit, "clicks", float(rng.poisson(2)), pre_period=True, timestamp=at - DAY_S))
        for _ in range(int(rng.integers(0, 5))):
            later = at + float(rng.uniform(0, 9 * DAY_S))
            observations.append(Observation(unit, "clicks", heavy * float(rng.poisson(1.5)), timestamp=later))
            observations.append(Observation(unit, "dwell", float(rng.gamma(2.0, 7.3)), timestamp=later))
    assert client.record_metrics(KEY, observations) == len(observations)


@pytest.fixture
def abrouter(tmp_path: Path) -> Iterator[tuple[RunningService, MeshConfig, str]]:
    """A real abrouter exporting to a Parquet directory, with experiment ``rank``: 700 exposed units and
    their observations; (server, config, exposure table URL)."""
    table = str(tmp_path / "table")
    running, config = serve(tmp_path, table)
    try:
        with ABRouterClient(config, address=running.address) as client:
            client.create_experiment(
                KEY,
                {"control": 0.5, "new": 0.5},
                metrics=["clicks", "dwell"],
                metric_kinds={"dwell": "continuous"},
            )
            record(client, range(700), np.random.default_rng(3))
        yield running, config, table
    finally:
        running.stop(grace=0.5)


@contextlib.contextmanager
def stub_of(running: RunningService, config: MeshConfig) -> Iterator[pb_grpc.ABRouterServiceStub]:
    """A stub over a real channel to ``running``."""
    with open_channel("abrouter", config, address=running.address) as channel:
        yield pb_grpc.ABRouterServiceStub(channel)


def same(a: Message, b: Message, where: str = "") -> None:
    """Field by field: floats to rel 1e-9 (NaN where NaN), everything else equal."""
    for field in a.DESCRIPTOR.fields:
        x, y, at = getattr(a, field.name), getattr(b, field.name), f"{where}.{field.name}"
        if field.is_repeated:
            assert len(x) == len(y), at
            pairs = list(zip(x, y, strict=True))
        else:
            pairs = [(x, y)]
        for i, (p, q) in enumerate(pairs):
            here = f"{at}[{i}]" if field.is_repeated else at
            if isinstance(p, Message):
                same(p, q, here)
            elif isinstance(p, float) and math.isnan(p):
                assert math.isnan(q), here
            elif isinstance(p, float):
                assert p == pytest.approx(q, rel=1e-9, abs=1e-12), here
            else:
                assert p == q, here


def analyze(stub: pb_grpc.ABRouterServiceStub, from_table: bool, **options: Any) -> pb.AnalyzeExperimentResponse:
    request = pb.AnalyzeExperimentRequest(key=KEY, bootstrap_resamples=300, seed=5, from_table=from_table, **options)
    return stub.AnalyzeExperiment(request, timeout=300)


def test_analysis_from_the_table_over_grpc_gives_the_in_memory_answers(
    abrouter: tuple[RunningService, MeshConfig, str],
) -> None:
    running, config, table = abrouter
    with stub_of(running, config) as stub:
        check_both_paths(stub, config, running, table)


def check_both_paths(
    stub: pb_grpc.ABRouterServiceStub, config: MeshConfig, running: RunningService, table: str
) -> None:
    variants: list[dict[str, Any]] = [
        {},
        {"position_covariate": "position"},
        {"inverse_propensity": True, "metrics": ["dwell"]},
    ]
    for options in variants:
        in_memory = analyze(stub, False, **options)
        from_table = analyze(stub, True, **options)
        assert from_table.exposed_units == in_memory.exposed_units == 700
        assert [m.metric for m in in_memory.metrics] == options.get("metrics", ["clicks", "dwell"])
        same(from_table, in_memory, str(options))
    clicks = analyze(stub, False).metrics[0]
    assert clicks.metric == "clicks" and not math.isnan(clicks.cuped_effect) and len(clicks.daily) >= 3
    assert observation_files(observation_table_url(table))  # the observation table beside the exposures
    # observations and exposures after the first call: the next one exports them first and still agrees
    with ABRouterClient(config, address=running.address) as client:
        record(client, range(700, 900), np.random.default_rng(4))
    in_memory, from_table = analyze(stub, False), analyze(stub, True)
    assert from_table.exposed_units == in_memory.exposed_units == 900
    same(from_table, in_memory, "after more observations")
    # the same rules: an aggregate that contradicts a metric's declared kind is refused on both paths
    for path in (False, True):
        with pytest.raises(grpc.RpcError) as info:
            analyze(stub, path, aggregate="mean", metrics=["clicks"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "aggregate" in str(info.value.details())
    with pytest.raises(grpc.RpcError) as info:
        stub.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="nope", from_table=True))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("table_name", ["observation table", "exposure table"])
def test_a_corrupt_file_of_either_table_is_reported_over_grpc(
    abrouter: tuple[RunningService, MeshConfig, str], table_name: str
) -> None:
    running, config, table = abrouter
    with stub_of(running, config) as stub:
        analyze(stub, True)  # writes both tables
        files = observation_files(observation_table_url(table)) if table_name == "observation table" else None
        victim = Path((files or exposure_files(table))[0])
        victim.write_bytes(victim.read_bytes()[:200])
        with pytest.raises(grpc.RpcError) as info:
            analyze(stub, True)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert table_name in str(info.value.details()), info.value.details()
        assert analyze(stub, False).exposed_units == 700  # the in-memory analysis is untouched


def test_analysis_from_the_table_with_export_off_names_the_setting(tmp_path: Path) -> None:
    running, config = serve(tmp_path, "")
    try:
        with ABRouterClient(config, address=running.address) as client:
            client.create_experiment(KEY, {"control": 0.5, "new": 0.5}, metrics=["clicks"])
        with stub_of(running, config) as stub, pytest.raises(grpc.RpcError) as info:
            analyze(stub, True)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "from_table" in str(info.value.details()) and "abrouter.export_url" in str(info.value.details())
    finally:
        running.stop(grace=0.5)


def test_analysis_from_the_table_past_the_memory_limit_says_so(
    abrouter: tuple[RunningService, MeshConfig, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """300,000 generated exposures of another experiment in the exported table, analysed with 8 MB of DuckDB
    memory: RESOURCE_EXHAUSTED naming the setting, not UNAVAILABLE (the table is not at fault)."""
    running, config, table = abrouter
    with ABRouterClient(config, address=running.address) as client:
        client.create_experiment("big", {"control": 0.5, "treatment": 0.5}, metrics=["clicks"])
    write_exposure_table(table, 300_000, key="big", days=30, first_id=10**9)
    monkeypatch.setattr(warehouse, "MEMORY_LIMIT", "8MB")
    with stub_of(running, config) as stub, pytest.raises(grpc.RpcError) as info:
        stub.AnalyzeExperiment(pb.AnalyzeExperimentRequest(key="big", from_table=True), timeout=300)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "warehouse.MEMORY_LIMIT" in str(info.value.details())


def test_report_command_from_the_table(
    abrouter: tuple[RunningService, MeshConfig, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, _, _ = abrouter
    (tmp_path / "mesh.toml").write_text("")  # the command reads the defaults, not a remembered profile
    monkeypatch.setenv("GUARDMESH_CONFIG", str(tmp_path / "mesh.toml"))
    out = tmp_path / "plots"
    args = ["abrouter", "report", KEY, "--address", running.address, "--out", str(out), "--resamples", "200"]
    result = CliRunner().invoke(app, [*args, "--from-table"], terminal_width=250)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{KEY}: 700 exposed units; SRM p=" in result.output and "A/B analysis" in result.output
    assert observation_files(observation_table_url(abrouter[2]))  # it went through the tables
