"""Who may call what: a pure decision from the caller's certificate and the request's path.

The control port (2377) speaks mutual TLS only; the daemon's unix socket is the local admin's
(root-only permissions). A request on the control port is let through only if its certificate
allows it — before any handler runs:

* joining (fetch the root CA, present a token) needs no certificate: that is how one gets one;
* the dispatcher (heartbeats, status, assignments) and certificate renewal need a node's
  certificate, of a node the manager still knows (``node rm`` revokes);
* a node's local endpoints (task logs, exec) answer managers and admin clients only;
* everything else — the manager's control API, swarm init/join/leave — needs a manager's
  certificate or an admin client certificate (``corral swarm ca --client-cert``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from corral.security.pki import Identity, Role

RouteClass = Literal["public", "agent", "node", "admin"]

PUBLIC = {("GET", "/v1/ca"), ("POST", "/v1/swarm/nodes")}
AGENT_PREFIXES = ("/v1/dispatcher/",)
AGENT_ROUTES = {("POST", "/v1/ca/renew")}
NODE_PREFIXES = ("/v1/local/",)


@dataclass(frozen=True)
class Peer:
    """The caller of one request: the local admin (unix socket) or a TLS client, with or
    without a certificate of this cluster."""

    local: bool = False
    cert: Identity | None = None


LOCAL = Peer(local=True)
ANONYMOUS = Peer()


@dataclass(frozen=True)
class Refusal:
    status: int  # 401: who are you?  403: you may not
    message: str


def route_class(method: str, path: str) -> RouteClass:
    if (method, path) in PUBLIC:
        return "public"
    if (method, path) in AGENT_ROUTES or path.startswith(AGENT_PREFIXES):
        return "agent"
    if path.startswith(NODE_PREFIXES):
        return "node"
    return "admin"


def authorize(peer: Peer, method: str, path: str, *, cluster_id: str | None,
              node_role: Callable[[str], Role | None] | None) -> Refusal | None:
    """None if `peer` may call ``method path``, else why not.

    `cluster_id`: this node's cluster (None before it has one). `node_role`: on a manager, the
    role the store gives a node ID now (None: no such node — it was removed); on a worker,
    which cannot look, None is passed and certificates are taken at their word.
    """
    if peer.local:
        return None
    kind = route_class(method, path)
    if kind == "public":
        return None
    cert = peer.cert
    if cert is None:
        return Refusal(401, f"{method} {path} needs a certificate of this swarm (mutual TLS): "
                            "join the swarm, or use an admin client certificate")
    if cluster_id is not None and cert.cluster_id != cluster_id:
        return Refusal(401, f"the certificate of {cert.node_id} belongs to another swarm")
    role: Role = cert.role
    if role != "client" and node_role is not None:
        current = node_role(cert.node_id)
        if current is None:
            return Refusal(401, f"the certificate of node {cert.node_id} was revoked: the node "
                                "was removed from the swarm")
        if current == "worker":
            role = "worker"  # a demoted manager keeps its old certificate until it renews
    if kind == "agent":
        if role == "client":
            return Refusal(403, f"{method} {path} is for swarm nodes, not client certificates")
        return None
    if role == "worker":
        what = "node-local" if kind == "node" else "manager"
        return Refusal(403, f"permission denied: node {cert.node_id} is a worker; {method} {path} "
                            f"is a {what} API that needs a manager or admin certificate")
    return None
