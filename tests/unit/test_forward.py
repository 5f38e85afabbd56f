"""Which requests a follower manager hands to the leader."""

from __future__ import annotations

import pytest

from corral.api.types import Node, NodeDescription
from corral.daemon.api import node_url
from corral.daemon.forward import needs_leader


@pytest.mark.parametrize(("method", "path", "leader"), [
    ("GET", "/v1/services", False),              # reads: the replica answers
    ("GET", "/v1/tasks", False),
    ("POST", "/v1/services", True),              # writes go to the leader
    ("DELETE", "/v1/services/web", True),
    ("POST", "/v1/nodes/n1/update", True),
    ("POST", "/v1/swarm/nodes", True),           # a node joining through a follower
    ("GET", "/v1/ca", False),                    # the roots: every manager has them
    ("POST", "/v1/dispatcher/heartbeat", True),  # agents: redirected
    ("GET", "/v1/dispatcher/assignments", True),
    ("POST", "/v1/ca/renew", True),
    ("GET", "/v1/swarm/join-token/worker", True),  # may rotate
    ("POST", "/v1/swarm/leave", False),          # about this node itself
    ("GET", "/v1/info", False),
    ("POST", "/v1/local/tasks/t/exec", False),
    ("POST", "/v1/tasks/t/exec", False),         # any manager proxies it to the task's node
])
def test_needs_leader(method: str, path: str, leader: bool) -> None:
    assert needs_leader(method, path) is leader


def test_another_node_is_called_on_its_own_api_port() -> None:
    # `service logs` and `service exec` reach the node that runs the task: on the port that
    # node's daemon listens on (--port), not on the caller's.
    node = Node(id="n2", description=NodeDescription(hostname="h2", addr="10.0.0.2",
                                                     api_port=4100))
    assert node_url(node) == "https://10.0.0.2:4100"
