"""The ``guardmesh`` command: serve a service, run a node agent, manage the local mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="guardmesh: gRPC services guarding the ML iteration chain.", no_args_is_help=True)
mesh_app = typer.Typer(help="The local mesh (make up / status / down).", no_args_is_help=True)
app.add_typer(mesh_app, name="mesh")

ConfigOpt = Annotated[str | None, typer.Option("--config", help="Mesh config TOML (else GUARDMESH_CONFIG).")]


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
    from guardmesh.config import load_config
    from services.scheduler.agent import run_agent

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


@mesh_app.command()
def up(config: ConfigOpt = None) -> None:
    """Start every enabled service as its own process and wait until each is SERVING."""
    from guardmesh import mesh
    from guardmesh.config import load_config

    try:
        mesh.up(load_config(config))
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


@mesh_app.command()
def status(config: ConfigOpt = None) -> None:
    """Print service, address, pid, health and log file of each mesh process."""
    from guardmesh import mesh
    from guardmesh.config import load_config

    rows = mesh.status(load_config(config))
    raise typer.Exit(0 if all(h in ("SERVING", "RUNNING") for _, h in rows) else 1)


@mesh_app.command()
def down(config: ConfigOpt = None) -> None:
    """Stop the mesh with SIGTERM and wait."""
    from guardmesh import mesh
    from guardmesh.config import load_config

    mesh.down(load_config(config))


abrouter_app = typer.Typer(help="A/B router reports.", no_args_is_help=True)
app.add_typer(abrouter_app, name="abrouter")


@abrouter_app.command()
def report(
    key: str,
    out: Annotated[Path, typer.Option(help="Folder for the PNG plots.")] = Path("abrouter-report"),
    address: Annotated[str | None, typer.Option(help="abrouter host:port (default: discovery).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    reweight: Annotated[list[str] | None, typer.Option(help="Covariate to reweight on (repeatable).")] = None,
    ipw: Annotated[bool, typer.Option(help="Inverse-propensity weights (bandits).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Audit and analyse experiment KEY: the audit summary, the multi-metric table, and PNG plots."""
    import grpc
    from rich.console import Console

    from guardmesh.client import open_channel
    from guardmesh.config import load_config
    from guardmesh.sdk.abrouter import analysis_from_pb
    from guardmesh.v1 import abrouter_pb2 as pb
    from guardmesh.v1 import abrouter_pb2_grpc as pb_grpc
    from services.abrouter.report import analysis_table, plot_analysis

    console = Console()
    channel = open_channel("abrouter", load_config(config), address=address)
    stub = pb_grpc.ABRouterServiceStub(channel)
    try:
        audit = stub.AuditExperiment(pb.AuditExperimentRequest(key=key))
        resp = stub.AnalyzeExperiment(
            pb.AnalyzeExperimentRequest(
                key=key, bootstrap_resamples=resamples, reweight_covariates=reweight or [], inverse_propensity=ipw
            )
        )
    except grpc.RpcError as err:
        typer.echo(f"abrouter: {err.code().name}: {err.details()}", err=True)
        raise typer.Exit(1) from None
    finally:
        channel.close()
    srm = audit.srm
    console.print(
        f"[bold]{key}[/bold]: {audit.exposures:,} exposed units; SRM p={srm.p_value:.3g} "
        f"({'ALERT' if srm.alert else 'ok'}: {srm.reason}); "
        f"{len(audit.imbalances)} covariate imbalances; audit {audit.seconds * 1000:.0f} ms"
    )
    for b in audit.imbalances[:10]:
        console.print(
            f"  imbalance: {b.covariate} [{b.window}] arms {b.arm_a} vs {b.arm_b}: {b.test} p={b.p_value:.2g}, "
            f"effect size {b.effect_size:.3f}"
        )
    results = [analysis_from_pb(m, list(resp.arms)) for m in resp.metrics]
    console.print(analysis_table(results, list(resp.arms)))
    for path in plot_analysis(results, list(resp.arms), out, title=key):
        console.print(f"wrote {path}")
