"""`corral lab`: a local multi-node swarm on loopback addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.cli.context import print_table
from corral.cli.parse import parse_duration
from corral.lab.lab import DEFAULT_BASE_ADDR, Lab, pid_alive

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Run a local lab swarm.")

LabDir = Annotated[Optional[Path], typer.Option("--dir", help="Lab directory (default $CORRAL_LAB_DIR or ~/.corral/lab)")]


@app.command()
def up(nodes: Annotated[int, typer.Option(help="Number of nodes")] = 3,
       base_addr: Annotated[str, typer.Option(help="Address of node1; node2 gets the next one…")] = DEFAULT_BASE_ADDR,
       heartbeat: Annotated[str, typer.Option(help="Dispatcher heartbeat period")] = "1s",
       dir: LabDir = None) -> None:
    """Start N daemons on loopback addresses and form a swarm."""
    lab = Lab(dir)
    lab.up(nodes, base_addr, parse_duration(heartbeat), progress=typer.echo)
    first = lab.nodes[0]
    typer.echo(f"Lab swarm up: {len(lab.nodes)} nodes ({', '.join(n.addr for n in lab.nodes)}).")
    typer.echo(f"Talk to it with:  export CORRAL_HOST={first.host}   (or: eval \"$(corral lab env {first.name})\")")


@app.command()
def down(dir: LabDir = None) -> None:
    """Stop every lab daemon and task, and remove the lab."""
    lab = Lab(dir).load()
    lab.down()
    typer.echo("Lab removed.")


@app.command()
def env(node: Annotated[str, typer.Argument(help="NODE")] = "node1", dir: LabDir = None) -> None:
    """Print the export line that points the CLI at a lab node."""
    typer.echo(f"export CORRAL_HOST={Lab(dir).load().node(node).host}")


@app.command()
def ps(dir: LabDir = None) -> None:
    """List the lab's nodes and whether their daemons run."""
    lab = Lab(dir).load()
    rows = [[n.name, n.addr, str(n.pid or ""), "running" if pid_alive(n.pid) else "stopped", n.log]
            for n in lab.nodes]
    print_table(["NAME", "ADDRESS", "PID", "STATUS", "LOG"], rows)


@app.command()
def kill(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """SIGKILL a node's daemon and its tasks (to watch the swarm heal)."""
    n = Lab(dir).load().kill(node)
    typer.echo(f"{n.name} killed")


@app.command()
def start(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """Start a killed node's daemon again."""
    n = Lab(dir).load().start(node)
    typer.echo(f"{n.name} started")
