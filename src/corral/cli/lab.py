"""`corral lab`: a local multi-node swarm on loopback addresses (or in network namespaces)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.api.errors import InvalidArgument, NotFound
from corral.cli.context import print_table
from corral.cli.parse import parse_duration
from corral.lab.lab import DEFAULT_BASE_ADDR, DEFAULT_SUBNET, Lab, pid_alive

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Run a local lab swarm.")

LabDir = Annotated[Optional[Path], typer.Option("--dir", help="Lab directory (default $CORRAL_LAB_DIR or ~/.corral/lab)")]


@app.command()
def up(nodes: Annotated[int, typer.Option(help="Number of nodes")] = 3,
       base_addr: Annotated[Optional[str], typer.Option(
           help=f"Address of node1; node2 gets the next one… [default: {DEFAULT_BASE_ADDR}]")] = None,
       heartbeat: Annotated[str, typer.Option(help="Dispatcher heartbeat period")] = "1s",
       netns: Annotated[bool, typer.Option(
           "--netns", help="Each node in its own network namespace on a lab bridge (root only)")] = False,
       subnet: Annotated[Optional[str], typer.Option(
           help=f"The --netns lab's subnet: bridge .1, node1 .11, … [default: {DEFAULT_SUBNET}]")] = None,
       cert_expiry: Annotated[Optional[str], typer.Option(
           help="Node certificates' lifetime (they renew at half of it) [default: 90 days]")] = None,
       managers: Annotated[int, typer.Option(help="How many nodes are managers (node1…)")] = 1,
       store: Annotated[str, typer.Option(
           help="sqlite (one manager) or etcd (a member on each manager node)")] = "sqlite",
       dir: LabDir = None) -> None:
    """Start N daemons on loopback addresses (or in network namespaces) and form a swarm."""
    if netns and base_addr is not None:
        raise InvalidArgument("--base-addr is for the loopback lab; the --netns lab takes --subnet")
    if subnet is not None and not netns:
        raise InvalidArgument("--subnet needs --netns")
    lab = Lab(dir)
    lab.up(nodes, base_addr or DEFAULT_BASE_ADDR, parse_duration(heartbeat), progress=typer.echo,
           netns=netns, subnet=subnet or DEFAULT_SUBNET,
           cert_expiry=parse_duration(cert_expiry) if cert_expiry else None,
           managers=managers, store=store)
    first = lab.nodes[0]
    where = f" in network namespaces on bridge {lab.bridge}" if lab.netns else ""
    typer.echo(f"Lab swarm up: {len(lab.nodes)} nodes ({', '.join(n.addr for n in lab.nodes)}){where}.")
    typer.echo(f"Talk to it with:  eval \"$(corral lab env {first.name})\"   (CORRAL_HOST={first.host}, "
               f"mutual TLS with the lab's client certificate in {lab.tls_dir})")


@app.command()
def down(dir: LabDir = None) -> None:
    """Stop every lab daemon and task, and remove the lab."""
    lab = Lab(dir)
    try:
        lab.load()
    except NotFound:
        left = lab.leftover_hosts()
        if not left:
            raise
        # lab.json is gone but a netns lab of this dir left namespaces/links behind.
        lab.netns, lab.prefix = True, lab.hosts.prefix
        typer.echo(f"No lab state in {lab.dir}; removing what is left of it: {', '.join(left)}")
    lab.down()
    typer.echo("Lab removed.")


@app.command()
def env(node: Annotated[str, typer.Argument(help="NODE")] = "node1", dir: LabDir = None) -> None:
    """Print the export line that points the CLI at a lab node."""
    typer.echo(Lab(dir).load().env(node))


@app.command()
def ps(dir: LabDir = None) -> None:
    """List the lab's nodes and whether their daemons run."""
    lab = Lab(dir).load()
    if lab.netns:
        print_table(["NAME", "ADDRESS", "PID", "STATUS", "NAMESPACE", "LOG"],
                    [[n.name, n.addr, str(n.pid or ""), "running" if pid_alive(n.pid) else "stopped",
                      n.netns, n.log] for n in lab.nodes])
        return
    rows = [[n.name, n.addr, str(n.pid or ""), "running" if pid_alive(n.pid) else "stopped", n.log]
            for n in lab.nodes]
    print_table(["NAME", "ADDRESS", "PID", "STATUS", "LOG"], rows)


@app.command()
def kill(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """SIGKILL a node's daemon and its tasks (to watch the swarm heal)."""
    n = Lab(dir).load().kill(node)
    typer.echo(f"{n.name} killed")


@app.command()
def stop(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """Stop a node's daemon cleanly (its tasks stop first)."""
    n = Lab(dir).load().stop(node)
    typer.echo(f"{n.name} stopped")


@app.command()
def partition(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """Cut a node off the lab network (netns lab): the swarm sees it go down."""
    n = Lab(dir).load().partition(node, cut=True)
    typer.echo(f"{n.name} cut off")


@app.command()
def heal(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """Reconnect a partitioned node (netns lab)."""
    n = Lab(dir).load().partition(node, cut=False)
    typer.echo(f"{n.name} reconnected")


@app.command()
def start(node: Annotated[str, typer.Argument(help="NODE")], dir: LabDir = None) -> None:
    """Start a killed node's daemon again."""
    n = Lab(dir).load().start(node)
    typer.echo(f"{n.name} started")


@app.command("exec", context_settings={"allow_interspersed_args": False,
                                       "ignore_unknown_options": True})
def exec_(node: Annotated[str, typer.Argument(help="NODE")],
          cmd: Annotated[list[str], typer.Argument(help="CMD [ARG...]", show_default=False)],
          dir: LabDir = None) -> None:
    """Run CMD on a node, inside its namespace in the netns lab (options go before NODE)."""
    # Everything after NODE is the command (options too); a leading `--` only separates it.
    command = cmd[1:] if cmd[:1] == ["--"] else cmd
    argv = Lab(dir).load().exec_argv(node, command)
    if shutil.which(command[0]) is None:  # namespaces share the file system: check it here
        typer.echo(f"Error: {command[0]}: command not found", err=True)
        raise typer.Exit(127)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        typer.echo(f"Error: cannot run {argv[0]}: {exc.strerror}", err=True)
        raise typer.Exit(126) from None
