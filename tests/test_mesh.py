"""The local mesh as operators run it: `guardmesh mesh up/status/down` with real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from guardmesh.config import load_config
from guardmesh.mesh import enabled_services, health_status, instances, pid_alive, read_records
from guardmesh.runtime import KNOWN_SERVICES

from .processes import clean_env, free_port

REPO = Path(__file__).resolve().parent.parent
GUARDMESH = [sys.executable, "-m", "guardmesh.cli"]


def _free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (paramserver shards 0 and 1)."""
    for _ in range(100):
        p = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
    raise RuntimeError("no free port pair")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from guardmesh.cli import app; app()", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # `mesh up` alone may wait 90 s for SERVING
    )


def test_mesh_up_status_down(tmp_path: Path) -> None:
    port = free_port()
    ps_port = _free_port_pair()
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[[nodes]]\nname = "n1"\nmodel = "T4"\ngpus = 2\nmemory_mib = 16384\n')
    config_file = tmp_path / "mesh.toml"
    config_file.write_text(
        f'[mesh]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[services.scheduler]\nport = {port}\n"
        f"[services.paramserver]\nport = {ps_port}\n"
        "[paramserver]\nshards = 2\n"
        f'[scheduler]\ncluster_file = "{cluster}"\n'
        "[grpc]\ndrain_delay_s = 0.1\n"
    )
    env = clean_env({"GUARDMESH_CONFIG": str(config_file), "COLUMNS": "200"})
    config = load_config(env=env)
    try:
        up = _cli("mesh", "up", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "scheduler" in up.stdout and "SERVING" in up.stdout and f"127.0.0.1:{port}" in up.stdout
        records = {r.service: r for r in read_records(config)}
        assert set(records) >= {instance for _, instance, _ in instances(config)}
        assert {"scheduler", "paramserver-0", "paramserver-1"} <= set(records)
        assert records["paramserver-1"].address == f"127.0.0.1:{ps_port + 1}"
        assert health_status(records["paramserver-1"].address, "paramserver") == "SERVING"
        pid = records["scheduler"].pid
        assert pid_alive(pid)
        assert health_status(f"127.0.0.1:{port}", "scheduler") == "SERVING"
        assert Path(records["scheduler"].log).exists()

        status = _cli("mesh", "status", env=env)
        assert status.returncode == 0 and str(pid) in status.stdout and "SERVING" in status.stdout

        # A second `up` leaves the running mesh alone.
        again = _cli("mesh", "up", env=env)
        assert again.returncode == 0
        assert {r.service: r.pid for r in read_records(config)}["scheduler"] == pid
    finally:
        down = _cli("mesh", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not pid_alive(pid)
    assert not any(pid_alive(r.pid) for r in records.values())
    assert read_records(config) == []
    log = (tmp_path / "state" / "logs" / "scheduler.log").read_text()
    assert '"msg": "stopped"' in log  # drained by SIGTERM, not killed
    status = _cli("mesh", "status", env=env)
    assert "no mesh processes" in status.stdout


def test_python_m_entry_point_reports_config_errors(tmp_path: Path) -> None:
    env = clean_env({"GUARDMESH__SCHEDULER__POLICY": "random"})
    proc = subprocess.run(
        [sys.executable, "-m", "services.scheduler"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "scheduler.policy" in proc.stderr


def test_docker_compose_matches_mesh_config() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    config = load_config(env={})
    assert {"jaeger", "consul"} <= set(compose)
    assert compose["jaeger"]["image"].startswith("jaegertracing/jaeger")
    assert compose["consul"]["image"].startswith("hashicorp/consul")
    for service in enabled_services(config):
        entry = compose[service]
        port = config.services[service].port
        assert entry["command"] == ["serve", service]
        assert f"{port}:{port}" in entry["ports"]
        env = entry["environment"]
        assert env[f"GUARDMESH__SERVICES__{service.upper()}__HOST"] == "0.0.0.0"
        assert env[f"GUARDMESH__SERVICES__{service.upper()}__ADVERTISE_HOST"] == service
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["CONSUL_HTTP_ADDR"] == "consul:8500"
    guardmesh_services = {name for name, e in compose.items() if e.get("image", "").startswith("guardmesh")}
    assert guardmesh_services == set(enabled_services(config))
    assert guardmesh_services <= set(KNOWN_SERVICES)


def test_mesh_up_secure_profile_is_mtls_with_roles(tmp_path: Path) -> None:
    """`make up PROFILE=secure`: the profile file turns mTLS and authorization on; certificates are created
    on first use; services answer only mTLS clients, and roles apply (the abrouter calls the scorer as app)."""
    from guardmesh.client import open_channel
    from guardmesh.v1 import abrouter_pb2 as apb
    from guardmesh.v1 import abrouter_pb2_grpc as apb_grpc

    ports = {s: free_port() for s in ("scheduler", "scorer", "abrouter")}
    profile = (REPO / "guardmesh" / "profiles" / "secure.toml").read_text()
    config_file = tmp_path / "secure.toml"
    config_file.write_text(
        profile
        + f'\n[mesh]\nstate_dir = "{tmp_path / "state"}"\n'
        + "".join(f"[services.{s}]\nport = {p}\n" for s, p in ports.items())
        + "[services.paramserver]\nenabled = false\n[grpc]\ndrain_delay_s = 0.1\n"
    )
    env = clean_env({"GUARDMESH_CONFIG": str(config_file), "COLUMNS": "200"})
    config = load_config(env=env)
    assert config.security.mode == "mtls" and config.security.authorization
    try:
        up = _cli("mesh", "up", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert (tmp_path / "state" / "certs" / "ca.pem").exists() and "SERVING" in up.stdout
        address = f"127.0.0.1:{ports['abrouter']}"
        assert health_status(address, "abrouter") == "UNREACHABLE"  # a plain client cannot even connect
        assert health_status(address, "abrouter", config=config) == "SERVING"
        spec = apb.ExperimentSpec(key="e", arms=[apb.Arm(name="a", weight=0.5), apb.Arm(name="b", weight=0.5)])
        with open_channel("abrouter", config) as admin:
            apb_grpc.ABRouterServiceStub(admin).CreateExperiment(apb.CreateExperimentRequest(spec=spec))
        app_config = config.with_overrides({"security.client_role": "app"})
        with open_channel("abrouter", app_config) as app:
            stub = apb_grpc.ABRouterServiceStub(app)
            assert stub.Assign(apb.AssignRequest(unit_id="u", experiment_keys=["e"])).assignments[0].arm
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateExperiment(apb.CreateExperimentRequest(spec=spec))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        status = _cli("mesh", "status", env=env)
        assert status.returncode == 0 and status.stdout.count("SERVING") == 3
    finally:
        down = _cli("mesh", "down", env=env)
    assert down.returncode == 0, down.stderr


def test_mesh_remembers_its_profile_registers_a_simulated_cluster_and_shows_metrics(tmp_path: Path) -> None:
    """`make up` with a TLS profile, then `make status` and the listings with no profile named: they use the
    one the mesh was started with (a plain client could not even connect). The scheduler gets the simulated
    cluster, labelled as such; status shows each process's metrics endpoint."""
    port, metrics_port = free_port(), free_port()
    (tmp_path / "tls.toml").write_text(
        '[mesh]\nstate_dir = ".mesh"\n[security]\nmode = "tls"\n'
        f"[services.scheduler]\nport = {port}\nmetrics_port = {metrics_port}\n"
        "[services.paramserver]\nenabled = false\n[services.scorer]\nenabled = false\n"
        "[services.abrouter]\nenabled = false\n[grpc]\ndrain_delay_s = 0.1\n"
    )
    env = clean_env({"PYTHONPATH": str(REPO)})  # no GUARDMESH_CONFIG, no COLUMNS

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from guardmesh.cli import app; app()", *args],
            cwd=tmp_path,  # the default state folder .mesh is the test's
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    try:
        env["GUARDMESH_CONFIG"] = "tls.toml"  # as `make up PROFILE=...` names the profile
        up = cli("mesh", "up")
        del env["GUARDMESH_CONFIG"]
        assert up.returncode == 0, up.stdout + up.stderr
        assert "simulated" in up.stdout
        assert health_status(f"127.0.0.1:{port}", "scheduler") == "UNREACHABLE"  # TLS only

        status = cli("mesh", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "SERVING" in status.stdout and str(tmp_path / "tls.toml") in status.stdout
        assert f"http://127.0.0.1:{metrics_port}/metrics" in status.stdout

        nodes = cli("nodes", "list", "--output", "json")
        assert nodes.returncode == 0, nodes.stderr
        listed = {n["spec"]["name"]: n["spec"].get("labels", {}) for n in json.loads(nodes.stdout)["nodes"]}
        assert set(listed) == {"sim-dgx-0", "sim-dgx-1", "sim-t4-0"}
        assert all(labels["guardmesh.io/simulated"] == "true" for labels in listed.values())

        again = cli("mesh", "up", "--config", "tls.toml")  # the nodes exist: nothing registered twice
        assert again.returncode == 0 and "simulated" not in again.stdout, again.stdout + again.stderr
    finally:
        down = cli("mesh", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped scheduler" in down.stdout
    assert not (tmp_path / ".mesh" / "profile").exists()
