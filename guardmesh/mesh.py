"""The local mesh: start every enabled service as its own process, wait for SERVING, report, stop.

State lives under ``mesh.state_dir`` (``.mesh/`` by default): ``mesh.json`` with pids and addresses, and
one log file per service. ``make up``, ``make status`` and ``make down`` call these functions.

``GUARDMESH_REPLICAS=N`` (``make up REPLICAS=N``) runs N scheduler replicas, replica i on ``port + 100 i``
(one leads, the others stand by) and N active scorer replicas (``port + 100 i``, one shared registry);
``GUARDMESH_STORE=postgres`` (``STORE=postgres``) starts a local PostgreSQL server with its data under the
state folder (guardmesh/localpg.py) and points the scheduler's and the scorer's store at it; ``make down``
stops it after the services.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from guardmesh.config import MeshConfig, load_config
from guardmesh.localpg import LocalPostgres
from guardmesh.runtime import KNOWN_SERVICES
from guardmesh.security import channel_credentials

console = Console()
JAEGER_OTLP = "http://127.0.0.1:4317"
#: The local PostgreSQL server's port for ``make up STORE=postgres`` (``GUARDMESH_POSTGRES_PORT`` overrides it).
POSTGRES_PORT = 55432
#: Port step between scheduler replicas (``port + 100 i``; ``port + i`` are the paramserver's shards).
REPLICA_PORT_STEP = 100


@dataclass
class ProcessRecord:
    """One process of the mesh."""

    service: str
    address: str
    pid: int
    log: str
    #: Where its state lives when it is not the default SQLite file (host and database, no password).
    store: str = ""
    #: Its Prometheus endpoint (``http://host:port/metrics``), empty when it serves none.
    metrics: str = ""


def _state_file(config: MeshConfig) -> Path:
    return Path(config.mesh.state_dir) / "mesh.json"


def read_records(config: MeshConfig) -> list[ProcessRecord]:
    """Processes recorded by the last ``up``."""
    path = _state_file(config)
    if not path.exists():
        return []
    return [ProcessRecord(**r) for r in json.loads(path.read_text())]


def _write_records(config: MeshConfig, records: list[ProcessRecord]) -> None:
    path = _state_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], indent=2))


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (non-zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def health_status(address: str, service: str = "", timeout: float = 1.0, config: MeshConfig | None = None) -> str:
    """The gRPC health status of ``service`` at ``address`` ("SERVING", "NOT_SERVING", "UNREACHABLE"...),
    over TLS when ``config`` says so (health checks need no role)."""
    credentials = channel_credentials(config) if config is not None else None
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return "UNREACHABLE" if err.code() == grpc.StatusCode.UNAVAILABLE else err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def enabled_services(config: MeshConfig) -> list[str]:
    """Services the mesh config enables, in start order."""
    return [s for s in KNOWN_SERVICES if s in config.services and config.services[s].enabled]


def _port_key(service: str) -> str:
    return f"GUARDMESH__SERVICES__{service.upper()}__PORT"


def instances(config: MeshConfig, replicas: int = 1, store_url: str = "") -> list[tuple[str, str, dict[str, str]]]:
    """(service, instance name, environment overrides) of every process the mesh runs.

    The parameter server runs one process per shard, shard i on ``port + i``; with ``replicas`` > 1 the
    scheduler runs that many replicas, replica i on ``port + 100 i``, on ``store_url`` (default: its
    SQLite file, which replicas on one machine can share).
    """
    out = []
    service_env: dict[str, str] = {}
    if config.security.authorization and config.security.mode != "mtls":
        service_env["GUARDMESH__SECURITY__TOKEN_FILE"] = "tokens/app.token"
    if replicas > 1 and "scorer" in enabled_services(config):  # the router (the scorer's caller) finds them all
        scorer = config.services["scorer"]
        service_env["GUARDMESH__SERVICES__SCORER__REPLICAS"] = json.dumps(
            [f"{scorer.host}:{scorer.port + REPLICA_PORT_STEP * i}" for i in range(replicas)]
        )
    for service in enabled_services(config):
        if service == "abrouter" and (replicas > 1 or store_url):
            # N active replicas on one store: a database of its own (its tables are not the scheduler's).
            endpoint = config.services[service]
            for i in range(replicas):
                env = {
                    "GUARDMESH__SECURITY__CLIENT_ROLE": "app",
                    **service_env,
                    _port_key(service): str(endpoint.port + REPLICA_PORT_STEP * i),
                }
                if store_url:
                    env["GUARDMESH__ABROUTER__STORE_URL"] = abrouter_store_url(store_url)
                if endpoint.metrics_port:
                    env["GUARDMESH__SERVICES__ABROUTER__METRICS_PORT"] = str(
                        endpoint.metrics_port + REPLICA_PORT_STEP * i
                    )
                out.append((service, f"abrouter-{i}", env))
        elif service == "abrouter":  # it calls the scorer as an application, never as admin
            out.append((service, service, {"GUARDMESH__SECURITY__CLIENT_ROLE": "app", **service_env}))
        elif service == "paramserver":
            base = config.services[service].port
            for i in range(config.paramserver.shards):
                env = {_port_key(service): str(base + i), "GUARDMESH__PARAMSERVER__SHARD_INDEX": str(i)}
                metrics_port = config.services[service].metrics_port
                if metrics_port:
                    env["GUARDMESH__SERVICES__PARAMSERVER__METRICS_PORT"] = str(metrics_port + i)
                out.append((service, f"paramserver-{i}", env))
        elif service == "scheduler" and (replicas > 1 or store_url):
            endpoint = config.services[service]
            addresses = [f"{endpoint.host}:{endpoint.port + REPLICA_PORT_STEP * i}" for i in range(replicas)]
            for i in range(replicas):
                env = {
                    _port_key(service): str(endpoint.port + REPLICA_PORT_STEP * i),
                    "GUARDMESH__SERVICES__SCHEDULER__REPLICAS": json.dumps(addresses),
                }
                if store_url:
                    env["GUARDMESH__SCHEDULER__STORE_URL"] = store_url
                if endpoint.metrics_port:
                    env["GUARDMESH__SERVICES__SCHEDULER__METRICS_PORT"] = str(
                        endpoint.metrics_port + REPLICA_PORT_STEP * i
                    )
                out.append((service, f"scheduler-{i}", env))
        elif service == "scorer" and (replicas > 1 or store_url):
            # N active replicas on one store (the scheduler's database: the scorer's tables are its own) and
            # the one artefact folder under the shared state dir.
            endpoint = config.services[service]
            for i in range(replicas):
                env = {_port_key(service): str(endpoint.port + REPLICA_PORT_STEP * i)}
                if store_url:
                    env["GUARDMESH__SCORER__STORE_URL"] = store_url
                if endpoint.metrics_port:
                    env["GUARDMESH__SERVICES__SCORER__METRICS_PORT"] = str(
                        endpoint.metrics_port + REPLICA_PORT_STEP * i
                    )
                out.append((service, f"scorer-{i}", env))
        else:
            out.append((service, service, {}))
    return out


#: The mesh's PostgreSQL databases: the scheduler's (the scorer shares it) and the router's.
SCHEDULER_DATABASE = "guardmesh_scheduler"
ABROUTER_DATABASE = "guardmesh_abrouter"


def abrouter_store_url(scheduler_url: str) -> str:
    """The router's database on the mesh's PostgreSQL server, from the scheduler's URL."""
    head, _, tail = scheduler_url.partition(f"/{SCHEDULER_DATABASE}")
    return f"{head}/{ABROUTER_DATABASE}{tail}"


def _local_postgres(config: MeshConfig) -> LocalPostgres:
    port = int(os.environ.get("GUARDMESH_POSTGRES_PORT") or POSTGRES_PORT)
    return LocalPostgres(Path(config.mesh.state_dir).resolve() / "postgres", port)


def _start_postgres(config: MeshConfig) -> tuple[ProcessRecord, str]:
    """Start (creating it the first time) the mesh's PostgreSQL server; its record and the scheduler's URL."""
    server = _local_postgres(config)
    if not server.pid() or not pid_alive(server.pid()):
        server.init()
        server.start()
    url = server.ensure_database(SCHEDULER_DATABASE)
    server.ensure_database(ABROUTER_DATABASE)
    record = ProcessRecord("postgres", f"127.0.0.1:{server.port}", server.pid(), str(server.log), store="postgresql")
    return record, url


def _settled(service: str, address: str, config: MeshConfig) -> bool:
    """Started: SERVING, or a scheduler replica standing by (NOT_SERVING by design, see services/scheduler)."""
    health = health_status(address, service, config=config)
    return health == "SERVING" or (service == "scheduler" and health == "NOT_SERVING")


def _start_jaeger(config: MeshConfig, env: dict[str, str]) -> ProcessRecord | None:
    logs = Path(config.mesh.state_dir) / "logs"
    if shutil.which("jaeger"):
        log = logs / "jaeger.log"
        proc = subprocess.Popen(["jaeger"], stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = JAEGER_OTLP
        return ProcessRecord("jaeger", "http://127.0.0.1:16686", proc.pid, str(log))
    docker = os.environ.get("JAEGER") == "docker" and shutil.which("docker")
    if docker and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--rm",
                "--name",
                "guardmesh-jaeger",
                "-p",
                "16686:16686",
                "-p",
                "4317:4317",
                "jaegertracing/jaeger:latest",
            ],
            check=True,
            capture_output=True,
        )
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = JAEGER_OTLP
        console.print("Jaeger started in Docker: http://127.0.0.1:16686")
        return None
    console.print(
        "[yellow]Jaeger not started[/yellow]: put the `jaeger` all-in-one binary on PATH, or run "
        "`JAEGER=docker make up` with a Docker engine, or `docker compose up jaeger`; then open "
        "http://127.0.0.1:16686 (services export OTLP to OTEL_EXPORTER_OTLP_ENDPOINT)."
    )
    return None


def ensure_certs(config: MeshConfig) -> None:
    """With TLS or authorization on, create the local CA, certificates and tokens unless they exist."""
    sec = config.security
    if sec.mode == "plain" and not sec.authorization:
        return
    folder = config.state_path(sec.certs_dir)
    if (folder / "ca.pem").exists() and (folder / "roles.toml").exists():
        return
    from guardmesh.certs import generate

    generate(folder, KNOWN_SERVICES)
    console.print(f"created a local CA, certificates and role tokens in {folder}")


def up(config: MeshConfig | None = None, timeout: float = 90.0) -> list[ProcessRecord]:
    """Start every enabled service not already running; wait until each is SERVING; print the table."""
    config = config or load_config()
    records = {r.service: r for r in read_records(config) if pid_alive(r.pid)}
    logs = Path(config.mesh.state_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    replicas = int(env.get("GUARDMESH_REPLICAS") or 1)
    store = env.get("GUARDMESH_STORE") or "sqlite"
    if replicas < 1 or store not in ("sqlite", "postgres"):
        raise RuntimeError(f"REPLICAS={replicas} STORE={store}: REPLICAS >= 1, STORE sqlite or postgres")
    store_url = ""
    if store == "postgres":
        records["postgres"], store_url = _start_postgres(config)
    ensure_certs(config)
    if "jaeger" not in records and not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        jaeger = _start_jaeger(config, env)
        if jaeger:
            records["jaeger"] = jaeger
    elif "jaeger" in records:
        env.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", JAEGER_OTLP)
    mesh_instances = instances(config, replicas, store_url)
    for service, instance, extra in mesh_instances:
        if instance in records:
            continue
        log = logs / f"{instance}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**env, **extra},
            start_new_session=True,
        )
        port = extra.get(_port_key(service), str(config.services[service].port))
        address = f"{config.services[service].host}:{port}"
        where = (
            "postgresql guardmesh_scheduler"
            if "GUARDMESH__SCHEDULER__STORE_URL" in extra or "GUARDMESH__SCORER__STORE_URL" in extra
            else ""
        )
        metrics_port = int(extra.get(f"GUARDMESH__SERVICES__{service.upper()}__METRICS_PORT", 0)) or (
            config.services[service].metrics_port
        )
        metrics = (
            f"http://{config.metrics.host}:{metrics_port}/metrics" if config.metrics.enabled and metrics_port else ""
        )
        records[instance] = ProcessRecord(instance, address, proc.pid, str(log), store=where, metrics=metrics)
    _write_records(config, list(records.values()))
    deadline = time.monotonic() + timeout
    for service, instance, _ in mesh_instances:
        rec = records[instance]
        while not _settled(service, rec.address, config):
            if not pid_alive(rec.pid):
                raise RuntimeError(f"{instance} exited during start; see {rec.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{instance} not SERVING after {timeout:.0f}s; see {rec.log}")
            time.sleep(0.2)
    # Replicas report NOT_SERVING while starting too: wait until one of them leads.
    replicas_of = [records[i].address for s, i, _ in mesh_instances if s == "scheduler"]
    while replicas_of and not any(health_status(a, "scheduler", config=config) == "SERVING" for a in replicas_of):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no scheduler replica leads after {timeout:.0f}s; see {logs}")
        time.sleep(0.2)
    status(config)
    return list(records.values())


def status(config: MeshConfig | None = None) -> list[tuple[ProcessRecord, str]]:
    """Print and return (process, health) for every recorded process."""
    config = config or load_config()
    table = Table(title="guardmesh local mesh")
    for col in ("service", "address", "pid", "health", "role", "store", "metrics", "log file"):
        table.add_column(col)
    rows = []
    for rec in read_records(config):
        if not pid_alive(rec.pid):
            health = "EXITED"
        elif rec.service in ("jaeger", "postgres"):
            health = "RUNNING"
        else:
            health = health_status(rec.address, rec.service.split("-")[0], config=config)
        rows.append((rec, health))
        # A scheduler replica that serves holds the leader lease; the others stand by (NOT_SERVING by design).
        role = ""
        if rec.service.startswith("scheduler"):
            role = "leader" if health == "SERVING" else "standby" if health == "NOT_SERVING" else ""
        color = "green" if health in ("SERVING", "RUNNING") or role == "standby" else "red"
        cells = (rec.service, rec.address, str(rec.pid), f"[{color}]{health}[/{color}]", role, rec.store, rec.metrics)
        table.add_row(*cells, rec.log)
    if not rows:
        console.print("no mesh processes recorded; run `make up`")
    else:
        console.print(table)
    return rows


def down(config: MeshConfig | None = None, timeout: float | None = None) -> None:
    """SIGTERM every recorded process, wait for each to exit (SIGKILL after the grace period)."""
    config = config or load_config()
    timeout = config.grpc.grace_s + 5 if timeout is None else timeout
    records = read_records(config)
    # The store stops last: the services hand their leases back and flush into it while they drain.
    services = [r for r in records if r.service != "postgres"]
    for rec in services:
        if pid_alive(rec.pid):
            os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for rec in services:
        while pid_alive(rec.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(rec.pid):
            console.print(f"[red]{rec.service} (pid {rec.pid}) ignored SIGTERM; sending SIGKILL[/red]")
            os.kill(rec.pid, signal.SIGKILL)
        console.print(f"stopped {rec.service} (pid {rec.pid})")
    for rec in records:
        if rec.service == "postgres" and pid_alive(rec.pid):
            _local_postgres(config).stop("fast")
            console.print(f"stopped postgres (pid {rec.pid})")
    _state_file(config).unlink(missing_ok=True)
