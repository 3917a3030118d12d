"""The ``guardmesh`` command: serve a service, run a node agent, manage the local mesh, look around.

``guardmesh jobs|nodes|models|experiments list|describe`` print what the services hold, as a table or (``--output
json``) as the RPC's answer in the protobuf JSON mapping, field names as in the .proto files.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from guardmesh import __version__

if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from guardmesh.config import MeshConfig

app = typer.Typer(help="guardmesh: gRPC services guarding the ML iteration chain.", no_args_is_help=True)
mesh_app = typer.Typer(help="The local mesh (make up / status / down).", no_args_is_help=True)
app.add_typer(mesh_app, name="mesh")

ConfigOpt = Annotated[str | None, typer.Option("--config", help="Mesh config TOML (else GUARDMESH_CONFIG).")]
AddressOpt = Annotated[str | None, typer.Option(help="The service's host:port (default: discovery).")]


class Output(enum.StrEnum):
    """How listings are printed."""

    table = "table"
    json = "json"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table, or json (the RPC's answer).")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"guardmesh {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """guardmesh: gRPC services guarding the ML iteration chain."""


@app.command()
def serve(name: str, config: ConfigOpt = None) -> None:
    """Run service NAME (scheduler, ...) until SIGTERM."""
    from guardmesh.runtime import serve as run

    raise typer.Exit(run(name, config))


@app.command()
def agent(
    node: Annotated[str | None, typer.Option(help="Node name (default: host name).")] = None,
    cluster_file: Annotated[
        Path | None, typer.Option(help="Register the nodes of this cluster description instead of NVML GPUs.")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between status reports.")] = 5.0,
    once: Annotated[bool, typer.Option(help="Register and report once, then exit.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Node agent: register this node's GPUs (NVML) with the scheduler and report their usage."""
    from guardmesh.agent import run_agent
    from guardmesh.config import load_config

    run_agent(load_config(config), node=node, cluster_file=cluster_file, interval=interval, once=once)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A scaled-down run (about a minute).")] = False,
    state_dir: Annotated[Path | None, typer.Option(help="Keep the mesh's state and logs here.")] = None,
) -> None:
    """The whole chain on a local mesh: placement, training, publishing, an experiment with shadow traffic,
    drift, a guardrail, the audit and analysis, and trace ids to open in Jaeger. Leaves nothing running."""
    from guardmesh.demo import run_demo

    run_demo(state_dir=state_dir, quick=quick)


@app.command()
def certs(
    out: Annotated[Path | None, typer.Option(help="Folder (default: security.certs_dir under mesh.state_dir).")] = None,
    host: Annotated[list[str] | None, typer.Option(help="Extra DNS name for the service certificates.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a local CA, a certificate per service and per role, role tokens and roles.toml."""
    from guardmesh.certs import generate
    from guardmesh.config import load_config
    from guardmesh.runtime import KNOWN_SERVICES

    cfg = load_config(config)
    folder = out or cfg.state_path(cfg.security.certs_dir)
    generate(folder, KNOWN_SERVICES, hosts=host or ())
    typer.echo(f"wrote the CA, certificates, tokens/ and roles.toml to {folder}")


#: Nodes that ``mesh up`` registers when no ``scheduler.cluster_file`` is configured (labelled simulated).
SIMULATED_CLUSTER = Path(__file__).resolve().parent / "simulated_cluster.toml"
#: Under ``mesh.state_dir``: the config file the mesh was started with, for ``status`` and ``down``.
PROFILE_FILE = "profile"


def _mesh_config(config: str | None) -> tuple[MeshConfig, str | None]:
    """The configuration for a mesh command: ``--config``, else GUARDMESH_CONFIG, else the one ``up`` used."""
    from guardmesh.config import load_config

    if config is None:
        config = os.environ.get("GUARDMESH_CONFIG") or None  # `make up PROFILE=...` names it so
    if config is None:
        remembered = Path(load_config().mesh.state_dir) / PROFILE_FILE
        if remembered.exists():
            config = remembered.read_text().strip() or None
    return load_config(config), config


def _register_simulated_cluster(cfg: MeshConfig) -> None:
    """Register :data:`SIMULATED_CLUSTER` when the scheduler has no node yet and no cluster file is set."""
    from guardmesh import mesh
    from guardmesh.agent import run_agent
    from guardmesh.client import open_channel
    from guardmesh.v1 import scheduler_pb2 as pb
    from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

    if "scheduler" not in mesh.enabled_services(cfg) or cfg.scheduler.cluster_file:
        return
    with open_channel("scheduler", cfg) as channel:
        if pb_grpc.SchedulerServiceStub(channel).ListNodes(pb.ListNodesRequest()).nodes:
            return
    run_agent(cfg, cluster_file=SIMULATED_CLUSTER, once=True)
    mesh.console.print(
        f"registered a [bold]simulated[/bold] cluster ({SIMULATED_CLUSTER.name}: 2 x 4 A100-80GB, 1 x 2 T4; "
        "label guardmesh.io/simulated=true): nothing runs on these GPUs. Real nodes: `guardmesh agent` on each "
        "(`--no-simulated-cluster` to skip)."
    )


@mesh_app.command()
def up(
    config: ConfigOpt = None,
    simulated_cluster: Annotated[
        bool, typer.Option(help="Register a small simulated GPU cluster when the scheduler has no node.")
    ] = True,
) -> None:
    """Start every enabled service as its own process and wait until each is SERVING."""
    from guardmesh import mesh
    from guardmesh.logs import terminal_console

    cfg, path = _mesh_config(config)
    mesh.console = terminal_console()
    if path:  # the service processes read the same file
        os.environ["GUARDMESH_CONFIG"] = str(Path(path).resolve())
    try:
        mesh.up(cfg)
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    remembered = Path(cfg.mesh.state_dir) / PROFILE_FILE
    remembered.write_text(str(Path(path).resolve()) if path else "")
    if simulated_cluster:
        _register_simulated_cluster(cfg)


@mesh_app.command()
def status(config: ConfigOpt = None) -> None:
    """Print service, address, pid, health, metrics endpoint and log file of each mesh process, with the
    configuration the mesh was started with unless ``--config`` or GUARDMESH_CONFIG names another."""
    from guardmesh import mesh
    from guardmesh.logs import terminal_console

    cfg, path = _mesh_config(config)
    mesh.console = terminal_console()
    if path:
        mesh.console.print(f"configuration: {path}")
    rows = mesh.status(cfg)
    raise typer.Exit(0 if all(h in ("SERVING", "RUNNING") for _, h in rows) else 1)


@mesh_app.command()
def down(config: ConfigOpt = None) -> None:
    """Stop the mesh with SIGTERM and wait."""
    from guardmesh import mesh
    from guardmesh.logs import terminal_console

    cfg, _ = _mesh_config(config)
    mesh.console = terminal_console()
    mesh.down(cfg)
    (Path(cfg.mesh.state_dir) / PROFILE_FILE).unlink(missing_ok=True)


abrouter_app = typer.Typer(help="A/B router reports and the exposure table.", no_args_is_help=True)
app.add_typer(abrouter_app, name="abrouter")


@abrouter_app.command("export")
def export_exposures(
    address: Annotated[str | None, typer.Option(help="abrouter host:port (default: discovery).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Export every exposure not in the Parquet exposure table yet, now (the router also does it continuously)."""
    import grpc

    from guardmesh.sdk.abrouter import ABRouterClient

    try:
        with ABRouterClient(_mesh_config(config)[0], address=address) as router:
            done = router.export_exposures()
    except grpc.RpcError as err:
        typer.echo(f"abrouter: {err.code().name}: {err.details()}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"exported {done.exported:,} exposures; the table at {done.table_url} holds ids up to {done.exported_through}"
    )


@abrouter_app.command()
def report(
    key: str,
    out: Annotated[Path, typer.Option(help="Folder for the PNG plots.")] = Path("abrouter-report"),
    address: Annotated[str | None, typer.Option(help="abrouter host:port (default: discovery).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    reweight: Annotated[list[str] | None, typer.Option(help="Covariate to reweight on (repeatable).")] = None,
    ipw: Annotated[bool, typer.Option(help="Inverse-propensity weights (bandits).")] = False,
    from_table: Annotated[
        bool, typer.Option(help="Audit and analyse the Parquet exposure table (DuckDB), not router memory.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Audit and analyse experiment KEY: the audit summary, the multi-metric table, and PNG plots."""
    import grpc

    from guardmesh.logs import terminal_console
    from guardmesh.sdk.abrouter import ABRouterClient, analysis_from_pb
    from guardmesh.sdk.report import analysis_table, plot_analysis

    console = terminal_console()
    try:
        with ABRouterClient(_mesh_config(config)[0], address=address) as router:
            audit = router.audit(key, from_table=from_table)
            analysis = router.analyze(
                key,
                bootstrap_resamples=resamples,
                reweight_covariates=reweight or [],
                inverse_propensity=ipw,
                from_table=from_table,
            )
    except grpc.RpcError as err:
        typer.echo(f"abrouter: {err.code().name}: {err.details()}", err=True)
        raise typer.Exit(1) from None
    srm = audit.srm
    console.print(
        f"[bold]{key}[/bold]: {audit.exposures:,} exposed units; SRM p={srm.p_value:.3g} "
        f"({'ALERT' if srm.alert else 'ok'}: {srm.reason}); "
        f"{len(audit.imbalances)} covariate imbalances; audit {audit.raw.seconds * 1000:.0f} ms"
    )
    for b in audit.imbalances[:10]:
        console.print(
            f"  imbalance: {b.covariate} [{b.window}] arms {b.arm_a} vs {b.arm_b}: {b.test} p={b.p_value:.2g}, "
            f"effect size {b.effect_size:.3f}"
        )
    results = [analysis_from_pb(m, analysis.arms) for m in analysis.raw.metrics]
    console.print(analysis_table(results, analysis.arms))
    for path in plot_analysis(results, analysis.arms, out, title=key):
        console.print(f"wrote {path}")


# -- looking around: jobs, nodes, models, experiments -------------------------------------------------------


def _call(service: str, config: str | None, address: str | None, fn: Callable[[grpc.Channel], Message]) -> Message:
    """Run ``fn`` on a channel to ``service``; an RPC error is printed (service, status, details), exit 1."""
    import grpc

    from guardmesh.client import open_channel

    cfg, _ = _mesh_config(config)
    with open_channel(service, cfg, address=address) as channel:
        try:
            return fn(channel)
        except grpc.RpcError as err:
            typer.echo(f"{service}: {err.code().name}: {err.details()}", err=True)
            raise typer.Exit(1) from None


def _as_dict(message: Message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _emit(
    output: Output, answer: Message, title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]
) -> None:
    """Print ``answer`` as JSON, or ``rows`` as a table under ``title``."""
    if output is Output.json:
        typer.echo(json.dumps(_as_dict(answer), indent=2))
        return
    from rich.table import Table

    from guardmesh.logs import terminal_console

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    terminal_console().print(table)


def _describe(output: Output, message: Message, title: str) -> None:
    """One object: JSON, or a field/value table of its set fields (nested ones as compact JSON)."""
    if output is Output.json:
        typer.echo(json.dumps(_as_dict(message), indent=2))
        return
    fields = _as_dict(message)
    flat = {k: v for k, v in fields.items() if k != "spec"}
    flat = {**fields.get("spec", {}), **flat}
    rows = [(k, v if isinstance(v, str | int | float | bool) else json.dumps(v)) for k, v in flat.items()]
    _emit(output, message, title, ("field", "value"), rows)


def _not_found(what: str, name: str) -> typer.Exit:
    typer.echo(f"no {what} named {name!r}", err=True)
    return typer.Exit(1)


jobs_app = typer.Typer(help="Scheduler jobs.", no_args_is_help=True)
nodes_app = typer.Typer(help="Scheduler nodes and their GPUs.", no_args_is_help=True)
models_app = typer.Typer(help="Scorer models and their versions.", no_args_is_help=True)
experiments_app = typer.Typer(help="A/B router experiments.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(nodes_app, name="nodes")
app.add_typer(models_app, name="models")
app.add_typer(experiments_app, name="experiments")


def _job_state(value: int) -> str:
    from guardmesh.v1 import scheduler_pb2 as pb

    return pb.JobState.Name(value).removeprefix("JOB_STATE_")


def _list_jobs(tenant: str, state: str) -> Callable[[grpc.Channel], Message]:
    from guardmesh.v1 import scheduler_pb2 as pb
    from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

    if state and f"JOB_STATE_{state.upper()}" not in pb.JobState.keys():  # noqa: SIM118 (an enum wrapper)
        names = ", ".join(n.removeprefix("JOB_STATE_") for n in pb.JobState.keys()[1:])
        typer.echo(f"--state: unknown state {state!r} (one of {names})", err=True)
        raise typer.Exit(2)
    wanted = pb.JobState.Value(f"JOB_STATE_{state.upper()}") if state else pb.JOB_STATE_UNSPECIFIED
    request = pb.ListJobsRequest(tenant=tenant, state=wanted)
    return lambda channel: pb_grpc.SchedulerServiceStub(channel).ListJobs(request)


@jobs_app.command("list")
def jobs_list(
    tenant: Annotated[str, typer.Option(help="Only this tenant's jobs.")] = "",
    state: Annotated[str, typer.Option(help="Only jobs in this state (e.g. RUNNING, PENDING).")] = "",
    output: OutputOpt = Output.table,
    address: AddressOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List the scheduler's jobs: state, size and where each replica runs."""
    answer: Any = _call("scheduler", config, address, _list_jobs(tenant, state))
    rows = [
        (
            j.spec.job_id,
            j.spec.tenant,
            _job_state(j.state),
            f"{j.spec.replicas} x {j.spec.gpus_per_replica} GPU",
            j.spec.memory_mib_per_gpu,
            " ".join(f"{p.node}:{','.join(str(g.index) for g in p.gpus)}" for p in j.placements),
            j.pending_reason,
        )
        for j in answer.jobs
    ]
    columns = ("job", "tenant", "state", "replicas", "MiB/GPU", "placement (node:GPUs)", "pending reason")
    _emit(output, answer, f"{len(rows)} jobs", columns, rows)


@jobs_app.command("describe")
def jobs_describe(
    job_id: str, output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None
) -> None:
    """Describe job JOB_ID: its spec, state, placements and lease."""
    from guardmesh.v1 import scheduler_pb2 as pb
    from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

    answer: Any = _call(
        "scheduler",
        config,
        address,
        lambda channel: pb_grpc.SchedulerServiceStub(channel).DescribeJob(pb.DescribeJobRequest(job_id=job_id)),
    )
    _describe(output, answer.job, f"job {job_id}")


def _list_nodes(config: str | None, address: str | None) -> Any:
    from guardmesh.v1 import scheduler_pb2 as pb
    from guardmesh.v1 import scheduler_pb2_grpc as pb_grpc

    return _call(
        "scheduler",
        config,
        address,
        lambda channel: pb_grpc.SchedulerServiceStub(channel).ListNodes(pb.ListNodesRequest()),
    )


@nodes_app.command("list")
def nodes_list(output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None) -> None:
    """List the nodes registered with the scheduler: GPUs, free memory and allocations."""
    answer = _list_nodes(config, address)
    rows = []
    for node in answer.nodes:
        models = sorted({g.device.model for g in node.gpus})
        rows.append(
            (
                node.spec.name,
                f"{len(node.gpus)} x {'/'.join(models)}" if node.gpus else "0",
                sum(g.device.memory_mib for g in node.gpus),
                sum(g.allocatable_mib for g in node.gpus),
                sum(len(g.allocations) for g in node.gpus),
                node.spec.labels.get("guardmesh.io/simulated", ""),
            )
        )
    columns = ("node", "GPUs", "GPU MiB", "allocatable MiB", "allocations", "simulated")
    _emit(output, answer, f"{len(rows)} nodes", columns, rows)


@nodes_app.command("describe")
def nodes_describe(
    name: str, output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None
) -> None:
    """Describe node NAME: its spec and every GPU with its allocations."""
    answer = _list_nodes(config, address)
    node = next((n for n in answer.nodes if n.spec.name == name), None)
    if node is None:
        raise _not_found("node", name)
    _describe(output, node, f"node {name}")


def _list_models(config: str | None, address: str | None) -> Any:
    from guardmesh.v1 import scorer_pb2 as pb
    from guardmesh.v1 import scorer_pb2_grpc as pb_grpc

    return _call(
        "scorer", config, address, lambda channel: pb_grpc.ScorerServiceStub(channel).ListModels(pb.ListModelsRequest())
    )


@models_app.command("list")
def models_list(output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None) -> None:
    """List the scorer's models: active version, versions and features."""
    answer = _list_models(config, address)
    rows = [
        (m.model, m.active_version, " ".join(v.version for v in m.versions), len(m.features)) for m in answer.models
    ]
    _emit(output, answer, f"{len(rows)} models", ("model", "active", "versions", "features"), rows)


@models_app.command("describe")
def models_describe(
    name: str, output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None
) -> None:
    """Describe model NAME: its versions (F1, baseline, labels) and features."""
    answer = _list_models(config, address)
    model = next((m for m in answer.models if m.model == name), None)
    if model is None:
        raise _not_found("model", name)
    _describe(output, model, f"model {name}")


@experiments_app.command("list")
def experiments_list(output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None) -> None:
    """List the A/B router's experiments: state, arms with their weights, exposed units."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    answer: Any = _call(
        "abrouter",
        config,
        address,
        lambda channel: pb_grpc.ABRouterServiceStub(channel).ListExperiments(pb.ListExperimentsRequest()),
    )
    rows = [
        (
            e.spec.key,
            pb.ExperimentState.Name(e.state).removeprefix("EXPERIMENT_STATE_"),
            " ".join(f"{a.name}:{w:g}" for a, w in zip(e.spec.arms, e.weights, strict=False)),
            e.exposed_units,
            e.version,
        )
        for e in answer.experiments
    ]
    columns = ("experiment", "state", "arms (weight)", "exposed units", "version")
    _emit(output, answer, f"{len(rows)} experiments", columns, rows)


@experiments_app.command("describe")
def experiments_describe(
    key: str, output: OutputOpt = Output.table, address: AddressOpt = None, config: ConfigOpt = None
) -> None:
    """Describe experiment KEY: its spec, state, weights and exposures."""
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc

    answer: Any = _call(
        "abrouter",
        config,
        address,
        lambda channel: pb_grpc.ABRouterServiceStub(channel).GetExperiment(pb.GetExperimentRequest(key=key)),
    )
    _describe(output, answer.experiment, f"experiment {key}")
