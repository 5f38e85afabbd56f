"""`corral swarm`: init, join, join-token, leave."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from corral.cli.context import client
from corral.cli.parse import parse_duration

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage the swarm.")


def _join_hint(token: str, addr: str, role: str) -> str:
    return (f"To add a {role} to this swarm, run the following command:\n\n"
            f"    corral swarm join --token {token} {addr}\n")


@app.command()
def init(ctx: typer.Context,
         advertise_addr: Annotated[Optional[str], typer.Option(
             help="Address other nodes use to reach this manager (HOST[:PORT])")] = None,
         dispatcher_heartbeat: Annotated[str, typer.Option(
             help="Agent heartbeat period (a node is down after 3 missed)")] = "1s") -> None:
    """Initialize a swarm: this node becomes its manager."""
    period = parse_duration(dispatcher_heartbeat)
    r = client(ctx).post("/v1/swarm/init", {"advertise_addr": advertise_addr,
                                            "heartbeat_period": period})
    typer.echo(f"Swarm initialized: current node ({r['node_id']}) is now a manager.\n")
    typer.echo(_join_hint(r["worker_token"], r["manager_addr"], "worker"))
    typer.echo("To add a manager to this swarm, run 'corral swarm join-token manager' and "
               "follow the instructions.\n")


@app.command()
def join(ctx: typer.Context, remote: Annotated[str, typer.Argument(help="Manager HOST[:PORT]")],
         token: Annotated[str, typer.Option(help="Token for entry into the swarm")]) -> None:
    """Join a swarm as a node."""
    r = client(ctx).post("/v1/swarm/join", {"token": token, "remote_addr": remote})
    typer.echo(f"This node joined a swarm as a {r['role']}.")


@app.command("join-token")
def join_token(ctx: typer.Context,
               role: Annotated[str, typer.Argument(help="worker or manager")],
               quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only display token")] = False,
               rotate: Annotated[bool, typer.Option(help="Rotate join token")] = False) -> None:
    """Manage join tokens."""
    if role not in ("worker", "manager"):
        raise typer.BadParameter(f"unknown role {role}: expected worker or manager")
    r = client(ctx).get(f"/v1/swarm/join-token/{role}", rotate=str(rotate).lower())
    if quiet:
        typer.echo(r["token"])
        return
    if rotate:
        typer.echo(f"Successfully rotated {role} join token.\n")
    typer.echo(_join_hint(r["token"], r["manager_addr"], role))


@app.command()
def leave(ctx: typer.Context,
          force: Annotated[bool, typer.Option("-f", "--force",
                                              help="Force this node to leave the swarm")] = False) -> None:
    """Leave the swarm."""
    client(ctx).post("/v1/swarm/leave", {"force": force})
    typer.echo("Node left the swarm.")
