"""`corral`: the command line, shaped like `docker` (one sub-app per noun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.cli import lab as lab_cli
from corral.cli import network as network_cli
from corral.cli import secret as secret_cli
from corral.cli import node as node_cli
from corral.cli import service as service_cli
from corral.cli import swarm as swarm_cli
from corral.cli.context import State
from corral.cli.daemoncmd import daemon
from corral.client import TlsFiles, default_tls

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                  pretty_exceptions_enable=False, help="corral: a Swarm-style orchestrator with a routing mesh.")
app.add_typer(swarm_cli.app, name="swarm")
app.add_typer(node_cli.app, name="node")
app.add_typer(service_cli.app, name="service")
app.add_typer(network_cli.app, name="network")
app.add_typer(secret_cli.app, name="secret")
app.add_typer(lab_cli.app, name="lab")


@app.callback()
def root(ctx: typer.Context,
         host: Annotated[Optional[str], typer.Option(
             "-H", "--host", help="Daemon to talk to: unix:///PATH (its socket) or HOST[:PORT] "
                                 "(mutual TLS); default $CORRAL_HOST")] = None,
         tlscacert: Annotated[Optional[Path], typer.Option(
             help="Trust certs signed only by this CA (default $CORRAL_CERT_PATH/ca.pem)")] = None,
         tlscert: Annotated[Optional[Path], typer.Option(
             help="TLS client certificate (default $CORRAL_CERT_PATH/cert.pem)")] = None,
         tlskey: Annotated[Optional[Path], typer.Option(
             help="TLS client key (default $CORRAL_CERT_PATH/key.pem)")] = None,
         ) -> None:
    tls = None
    if tlscacert or tlscert or tlskey:
        defaults = default_tls()
        tls = TlsFiles(tlscacert or defaults.ca, tlscert or defaults.cert, tlskey or defaults.key)
    ctx.obj = State(host, tls)


app.command()(daemon)


@app.command()
def version() -> None:
    """Show the corral version."""
    from corral import __version__
    typer.echo(f"corral {__version__}")
