"""`corral network`: create, ls, inspect, rm (overlay networks)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from corral.api.errors import InvalidArgument
from corral.api.types import Network
from corral.cli.context import client, echo_json, print_table
from corral.cli.parse import parse_label
from corral.cli.render import to_json_lines

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage overlay networks.")


@app.command()
def create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="NETWORK")],
           driver: Annotated[str, typer.Option("-d", "--driver", help="Driver (overlay)")] = "overlay",
           subnet: Annotated[Optional[str], typer.Option(help="Subnet in CIDR format")] = None,
           attachable: Annotated[bool, typer.Option(help="Allow manual attachment")] = False,
           label: Annotated[Optional[list[str]], typer.Option(help="Network label")] = None) -> None:
    """Create an overlay network."""
    if driver != "overlay":
        raise InvalidArgument(f"invalid driver {driver!r}: corral networks are overlay networks")
    if subnet is None:
        raise InvalidArgument("--subnet is required (e.g. --subnet 10.20.0.0/24)")
    net = client(ctx).post("/v1/networks", {"name": name, "driver": driver, "subnet": subnet,
                                            "attachable": attachable,
                                            "labels": parse_label(label or [])})
    typer.echo(net["id"])


@app.command("ls")
def ls(ctx: typer.Context,
       quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only display IDs")] = False,
       format: Annotated[Optional[str], typer.Option("--format", help="json")] = None) -> None:
    """List networks."""
    nets = sorted((Network.model_validate(n) for n in client(ctx).get("/v1/networks")),
                  key=lambda n: n.spec.name)
    if quiet:
        for n in nets:
            typer.echo(n.id)
    elif format == "json":
        typer.echo(to_json_lines(nets))
    else:
        print_table(["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET"],
                    [[n.id[:12], n.spec.name, n.spec.driver, "swarm", n.spec.subnet] for n in nets])


@app.command()
def inspect(ctx: typer.Context, networks: Annotated[list[str], typer.Argument(help="NETWORK...")]) -> None:
    """Display detailed information on one or more networks."""
    c = client(ctx)
    echo_json([c.get(f"/v1/networks/{n}") for n in networks])


@app.command("rm")
def rm(ctx: typer.Context, networks: Annotated[list[str], typer.Argument(help="NETWORK...")]) -> None:
    """Remove one or more networks."""
    c = client(ctx)
    for n in networks:
        c.delete(f"/v1/networks/{n}")
        typer.echo(n)
