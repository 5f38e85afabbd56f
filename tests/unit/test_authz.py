"""Who may call what on the control port (pure decisions)."""

from __future__ import annotations

import datetime as dt

import pytest

from corral.security.authz import ANONYMOUS, LOCAL, Peer, authorize, route_class
from corral.security.pki import Identity, Role

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def peer(role: Role, node_id: str = "n1", cluster: str = "c1") -> Peer:
    return Peer(cert=Identity(node_id=node_id, role=role, cluster_id=cluster, serial=1,
                              not_before=NOW, not_after=NOW, issuer_key_id=b""))


STORE: dict[str, Role] = {"n1": "manager", "w1": "worker", "demoted": "worker"}


def decide(p: Peer, method: str, path: str, on_manager: bool = True) -> int:
    r = authorize(p, method, path, cluster_id="c1", node_role=STORE.get if on_manager else None)
    return 200 if r is None else r.status


@pytest.mark.parametrize(("method", "path", "kind"), [
    ("GET", "/v1/ca", "public"), ("POST", "/v1/swarm/nodes", "public"),
    ("GET", "/v1/swarm/nodes", "admin"), ("POST", "/v1/ca/renew", "agent"),
    ("GET", "/v1/dispatcher/assignments", "agent"), ("GET", "/v1/local/tasks/x/logs", "node"),
    ("POST", "/v1/services", "admin"), ("POST", "/v1/swarm/init", "admin"),
    ("POST", "/v1/ca/client", "admin"), ("GET", "/v1/dispatcher", "admin"),
])
def test_route_classes(method: str, path: str, kind: str) -> None:
    assert route_class(method, path) == kind


def test_decisions() -> None:
    worker, manager, client = peer("worker", "w1"), peer("manager", "n1"), peer("client", "client-x")
    assert decide(LOCAL, "POST", "/v1/services") == 200
    assert decide(ANONYMOUS, "GET", "/v1/ca") == 200
    assert decide(ANONYMOUS, "POST", "/v1/dispatcher/heartbeat") == 401
    assert decide(ANONYMOUS, "GET", "/v1/nodes") == 401
    assert decide(worker, "POST", "/v1/dispatcher/heartbeat") == 200
    assert decide(worker, "POST", "/v1/ca/renew") == 200
    assert decide(worker, "POST", "/v1/services") == 403
    assert decide(worker, "GET", "/v1/local/tasks/t/logs") == 403
    assert decide(manager, "POST", "/v1/services") == 200
    assert decide(manager, "GET", "/v1/local/tasks/t/logs", on_manager=False) == 200
    assert decide(client, "POST", "/v1/services") == 200
    assert decide(client, "POST", "/v1/dispatcher/heartbeat") == 403
    # node rm revokes: the manager no longer knows the node.
    assert decide(peer("worker", "gone"), "POST", "/v1/dispatcher/heartbeat") == 401
    # A demoted manager's old certificate counts as a worker's.
    assert decide(peer("manager", "demoted"), "POST", "/v1/services") == 403
    # Another swarm's certificate (same shape) is nobody here.
    assert decide(peer("manager", "n1", cluster="c2"), "POST", "/v1/services") == 401


def test_messages_are_one_clear_line() -> None:
    r = authorize(peer("worker", "w1"), "POST", "/v1/services", cluster_id="c1", node_role=STORE.get)
    assert r is not None and "\n" not in r.message
    assert "worker" in r.message and "manager" in r.message and "/v1/services" in r.message
