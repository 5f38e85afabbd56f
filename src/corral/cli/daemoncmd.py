"""`corral daemon`: run a node's daemon (kept apart from the rest of the CLI, see entry.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.cli.parse import parse_duration


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


# `corral daemon …` on its own (corral.cli.entry): the one command, without the other ones.
daemon_app = typer.Typer(rich_markup_mode=None, add_completion=False,
                         pretty_exceptions_enable=False)
daemon_app.command()(daemon)
