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
