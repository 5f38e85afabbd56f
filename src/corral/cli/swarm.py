"""`corral swarm`: init, join, join-token, leave."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from corral.api.errors import CorralError, InvalidArgument
from corral.cli.context import State, client
from corral.cli.parse import parse_duration
from corral.client import Client, TlsFiles, default_tls
from corral.security import pki
from corral.security.files import write_private

ROTATION_TIMEOUT = 120.0  # seconds the CLI watches a rotation before handing back

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Manage the swarm.")


def _join_hint(token: str, addr: str, role: str) -> str:
    return (f"To add a {role} to this swarm, run the following command:\n\n"
            f"    corral swarm join --token {token} {addr}\n")


@app.command()
def init(ctx: typer.Context,
         advertise_addr: Annotated[Optional[str], typer.Option(
             help="Address other nodes use to reach this manager (HOST[:PORT])")] = None,
         dispatcher_heartbeat: Annotated[str, typer.Option(
             help="Agent heartbeat period (a node is down after 3 missed)")] = "1s",
         cert_expiry: Annotated[str, typer.Option(
             help="Validity period for node certificates (they renew by themselves)")] = "2160h",
         store: Annotated[str, typer.Option(
             help="Where the store lives: sqlite (this manager) or etcd (several managers)")] = "sqlite",
         etcd_endpoints: Annotated[Optional[str], typer.Option(
             help="With --store etcd: HOST:PORT[,HOST:PORT…] of the etcd cluster")] = None,
         etcd_cacert: Annotated[Optional[Path], typer.Option(
             help="etcd over TLS: the CA of etcd's certificates")] = None,
         etcd_cert: Annotated[Optional[Path], typer.Option(
             help="etcd over TLS: a client certificate (etcd --client-cert-auth)")] = None,
         etcd_key: Annotated[Optional[Path], typer.Option(help="…and its key")] = None,
         ) -> None:
    """Initialize a swarm: this node becomes its manager and its certificate authority."""
    period = parse_duration(dispatcher_heartbeat)
    r = client(ctx).post("/v1/swarm/init", {"advertise_addr": advertise_addr,
                                            "heartbeat_period": period,
                                            "cert_expiry": parse_duration(cert_expiry),
                                            "store": store,
                                            "etcd_endpoints": [e.strip() for e in
                                                               (etcd_endpoints or "").split(",")
                                                               if e.strip()],
                                            "etcd_ca": _read_pem(etcd_cacert),
                                            "etcd_cert": _read_pem(etcd_cert),
                                            "etcd_key": _read_pem(etcd_key)})
    typer.echo(f"Swarm initialized: current node ({r['node_id']}) is now a manager.\n")
    typer.echo(_join_hint(r["worker_token"], r["manager_addr"], "worker"))
    typer.echo("To add a manager to this swarm, run 'corral swarm join-token manager' and "
               "follow the instructions.\n")


def _read_pem(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from None


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


@app.command()
def ca(ctx: typer.Context,
       rotate: Annotated[bool, typer.Option(
           help="Rotate the swarm's root CA: every node moves to a new root, no downtime")] = False,
       detach: Annotated[bool, typer.Option(
           "-d", "--detach", help="With --rotate: do not wait for the rotation to finish")] = False,
       client_cert: Annotated[Optional[Path], typer.Option(
           help="Write an admin client certificate (ca.pem, cert.pem, key.pem) into this "
                "directory, for the CLI over TLS ($CORRAL_CERT_PATH)")] = None) -> None:
    """Display the swarm's root CA certificate, rotate it, or issue an admin client certificate."""
    c = client(ctx)
    if client_cert is not None:
        _issue_client_cert(c, client_cert)
        typer.echo(f"Client certificate written to {client_cert}: use it with "
                   f"CORRAL_CERT_PATH={client_cert} CORRAL_HOST=<manager>:2377")
        return
    if rotate:
        _rotate(ctx, c, detach)
        if detach:
            return
    roots = pki.split_bundle(c.get("/v1/ca")["ca"].encode())
    typer.echo(roots[-1].decode(), nl=False)  # the newest root is the one that signs


def _issue_client_cert(c: Client, directory: Path) -> None:
    key = pki.new_key()
    r = c.post("/v1/ca/client", {"csr": pki.make_csr(key).decode()})
    write_client_tls(directory, r["ca"].encode(), r["cert"].encode(), pki.key_to_pem(key))


def _rotate(ctx: typer.Context, c: Client, detach: bool) -> None:
    status = c.post("/v1/swarm/ca/rotate")
    # The client certificate this CLI uses must outlive the old root: re-issue it now, under
    # the new root (with the cross-signed root, so nodes not yet moved accept it too).
    state = ctx.find_object(State)
    files = (state.tls if state is not None else None) or default_tls()
    if files.cert.exists():
        _issue_client_cert(c, files.cert.parent)
        typer.echo(f"Client certificate in {files.cert.parent} re-issued under the new root.")
    if detach:
        typer.echo("Root CA rotation started; `corral swarm ca` shows the new root once every "
                   "node moved.")
        return
    shown = -1
    deadline = time.monotonic() + ROTATION_TIMEOUT
    while status["rotating"]:
        if status["rotated"] != shown:
            shown = status["rotated"]
            typer.echo(f"rotated TLS certificates: {shown}/{status['nodes']} nodes")
        if time.monotonic() > deadline:
            raise CorralError("the rotation is still in progress (down nodes hold it back until "
                              "they return or are removed): see `corral swarm ca`")
        time.sleep(0.2)
        status = c.get("/v1/swarm/ca")
    typer.echo(f"rotated TLS certificates: {status['nodes']}/{status['nodes']} nodes")
    typer.echo("Root CA rotated: every node trusts only the new root.")


def write_client_tls(directory: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
    """docker's layout: ca.pem, cert.pem and key.pem (the key readable by its owner only)."""
    files = TlsFiles.in_dir(directory)
    write_private(files.key, key_pem)
    files.cert.write_bytes(cert_pem)
    files.ca.write_bytes(ca_pem)
