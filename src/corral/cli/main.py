"""`corral`: the command line, shaped like `docker` (one sub-app per noun)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from corral.api.errors import CorralError
from corral.cli import lab as lab_cli
from corral.cli import network as network_cli
from corral.cli import secret as secret_cli
from corral.cli import node as node_cli
from corral.cli import service as service_cli
from corral.cli import swarm as swarm_cli
from corral.cli.context import State
from corral.cli.parse import parse_duration
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


@app.command()
def daemon(addr: Annotated[str, typer.Option(help="Address for the API and published ports")],
           data_dir: Annotated[Optional[Path], typer.Option(help="State directory")] = None,
           hostname: Annotated[Optional[str], typer.Option(help="Node name")] = None,
           port: Annotated[int, typer.Option(help="API port")] = 2377,
           advertise_addr: Annotated[Optional[str], typer.Option(
               help="Address other nodes reach this one at (required with --addr 0.0.0.0)")] = None,
           runtime: Annotated[str, typer.Option(
               help="Task runtime: process, netns (own network namespace per task; root) "
                    "or auto (netns when root on Linux)")] = "auto",
           task_netns_prefix: Annotated[str, typer.Option(
               help="Name prefix of the task network namespaces this daemon makes")] = "corral-t-",
           mesh: Annotated[str, typer.Option(
               help="Routing mesh: kernel (nftables DNAT; needs the netns runtime), userspace "
                    "(a TCP/UDP proxy in the daemon) or auto (kernel when it can)")] = "auto",
           mesh_idle_timeout: Annotated[str, typer.Option(
               help="Close proxied connections idle this long (0 = never)")] = "1h",
           mesh_workers: Annotated[str, typer.Option(
               help="Userspace mesh processes sharing each port: a number, or auto (one per "
                    "core)")] = "auto",
           socket_path: Annotated[Optional[Path], typer.Option(
               "--socket", help="The local CLI's unix socket (owner-only; default "
                                "DATA_DIR/corral.sock)")] = None,
           ) -> None:
    """Run a node's daemon in the foreground."""
    from corral.daemon.config import DaemonConfig
    from corral.daemon.run import run_daemon  # heavy imports only for the daemon
    chosen = DaemonConfig.parse_runtime(runtime)
    config = DaemonConfig(
        addr=addr, data_dir=data_dir or Path.home() / ".corral" / f"daemon-{addr}",
        hostname=hostname or socket.gethostname(), api_port=port, advertise_addr=advertise_addr,
        runtime=chosen, task_netns_prefix=task_netns_prefix,
        mesh=DaemonConfig.parse_mesh(mesh, chosen),
        mesh_idle_timeout=parse_duration(mesh_idle_timeout),
        mesh_workers=DaemonConfig.parse_mesh_workers(mesh_workers),
        socket_path=socket_path)
    raise typer.Exit(run_daemon(config))


@app.command()
def version() -> None:
    """Show the corral version."""
    from corral import __version__
    typer.echo(f"corral {__version__}")


def main() -> None:
    """Console entry point: one-line errors, non-zero exit, never a traceback."""
    try:
        app(prog_name="corral")
    except ValidationError as exc:
        # Values the CLI passed through to an API type (a service name, say) and it refused.
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "value"
        value = err.get("input")
        shown = f" {value!r}" if isinstance(value, (str, int, float)) else ""
        typer.echo(f"Error: invalid {where}{shown}: {err.get('msg', 'invalid')}", err=True)
        sys.exit(1)
    except CorralError as exc:
        msg = exc.message
        typer.echo(msg if msg.startswith("Error") else f"Error: {msg}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `corral service ls | head`: the reader went away, that is fine.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
