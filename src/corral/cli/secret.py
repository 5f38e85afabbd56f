"""`corral secret`: create, ls, inspect, rm (values sealed in the store, files in tasks)."""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.api.errors import InvalidArgument
from corral.cli.context import client, echo_json, print_table
from corral.cli.parse import parse_label
from corral.cli.render import human_duration

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage secrets.")


def _read(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {source}: {exc.strerror or exc}") from None


@app.command()
def create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="SECRET")],
           file: Annotated[str, typer.Argument(metavar="FILE|-", help="File with the value, or - for stdin")],
           label: Annotated[Optional[list[str]], typer.Option("-l", "--label", help="Secret label")] = None) -> None:
    """Create a secret from a file or standard input."""
    data = _read(file)
    r = client(ctx).post("/v1/secrets", {"spec": {"name": name, "labels": parse_label(label or [])},
                                         "data": base64.b64encode(data).decode()})
    typer.echo(r["id"])


@app.command("ls")
def ls(ctx: typer.Context,
       quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only display IDs")] = False) -> None:
    """List secrets (never their values)."""
    secrets = sorted(client(ctx).get("/v1/secrets"), key=lambda s: s["spec"]["name"])
    if quiet:
        for s in secrets:
            typer.echo(s["id"])
        return
    print_table(["ID", "NAME", "CREATED", "SIZE"],
                [[s["id"][:25], s["spec"]["name"], f"{human_duration(time.time() - s['created_at'])} ago", str(s["size"])]
                 for s in secrets])


@app.command()
def inspect(ctx: typer.Context, secrets: Annotated[list[str], typer.Argument(help="SECRET...")]) -> None:
    """Display detailed information on one or more secrets (never their values)."""
    c = client(ctx)
    echo_json([c.get(f"/v1/secrets/{s}") for s in secrets])


@app.command("rm")
def rm(ctx: typer.Context, secrets: Annotated[list[str], typer.Argument(help="SECRET...")]) -> None:
    """Remove one or more secrets (not while a service uses them)."""
    c = client(ctx)
    for s in secrets:
        c.delete(f"/v1/secrets/{s}")
        typer.echo(s)
