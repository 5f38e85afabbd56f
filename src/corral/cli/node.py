"""`corral node`: ls, inspect, update, rm."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from corral.api.types import Node
from corral.cli.context import client, echo_json, print_table
from corral.cli.parse import parse_label
from corral.cli.render import node_ls_rows, to_json_lines

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage swarm nodes.")

Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Only display IDs")]
Format = Annotated[Optional[str], typer.Option("--format", help="json: one object per line")]


@app.command("ls")
def ls(ctx: typer.Context, quiet: Quiet = False, format: Format = None) -> None:
    """List nodes in the swarm."""
    c = client(ctx)
    nodes = [Node.model_validate(n) for n in c.get("/v1/nodes")]
    info = c.get("/v1/info")
    nodes.sort(key=lambda n: n.hostname)
    if quiet:
        for n in nodes:
            typer.echo(n.id)
    elif format == "json":
        typer.echo(to_json_lines(nodes))
    else:
        leader = info["swarm"].get("leader_id", "")
        print_table(*node_ls_rows(nodes, info["swarm"]["node_id"], leader))


@app.command()
def inspect(ctx: typer.Context, nodes: Annotated[list[str], typer.Argument(help="NODE...")]) -> None:
    """Display detailed information on one or more nodes."""
    c = client(ctx)
    echo_json([c.get(f"/v1/nodes/{n}") for n in nodes])


@app.command()
def update(ctx: typer.Context, node: Annotated[str, typer.Argument(help="NODE")],
           availability: Annotated[Optional[str], typer.Option(
               help="active, pause or drain")] = None,
           label_add: Annotated[Optional[list[str]], typer.Option(help="Add a node label (key=value)")] = None,
           label_rm: Annotated[Optional[list[str]], typer.Option(help="Remove a node label")] = None) -> None:
    """Update a node's availability or labels."""
    if availability is not None and availability not in ("active", "pause", "drain"):
        raise typer.BadParameter(f"invalid availability {availability!r}: expected active, pause or drain")
    body = {"availability": availability, "label_add": parse_label(label_add or []),
            "label_rm": label_rm or []}
    client(ctx).post(f"/v1/nodes/{node}/update", body)
    typer.echo(node)


def _set_role(ctx: typer.Context, nodes: list[str], role: str) -> None:
    c = client(ctx)
    for n in nodes:
        c.post(f"/v1/nodes/{n}/update", {"role": role})
        typer.echo(f"Node {n} {'promoted to a manager' if role == 'manager' else 'demoted'} in "
                   "the swarm.")


@app.command()
def promote(ctx: typer.Context, nodes: Annotated[list[str], typer.Argument(help="NODE...")]) -> None:
    """Promote one or more nodes to manager in the swarm (the store must be in etcd)."""
    _set_role(ctx, nodes, "manager")


@app.command()
def demote(ctx: typer.Context, nodes: Annotated[list[str], typer.Argument(help="NODE...")]) -> None:
    """Demote one or more nodes from manager in the swarm."""
    _set_role(ctx, nodes, "worker")


@app.command("rm")
def rm(ctx: typer.Context, nodes: Annotated[list[str], typer.Argument(help="NODE...")],
       force: Annotated[bool, typer.Option("-f", "--force", help="Remove a node that is not down")] = False) -> None:
    """Remove one or more nodes from the swarm."""
    c = client(ctx)
    for n in nodes:
        c.delete(f"/v1/nodes/{n}", force=str(force).lower())
        typer.echo(n)
