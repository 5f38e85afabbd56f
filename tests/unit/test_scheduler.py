"""The pure scheduler: filters, spread, explanations."""

from __future__ import annotations

from collections import Counter

import pytest

from corral.api.types import (
    ContainerSpec,
    Node,
    NodeAvailability,
    NodeDescription,
    NodeRole,
    NodeSpec,
    NodeState,
    NodeStatus,
    Placement,
    Service,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
)
from corral.manager.constraints import Constraint, parse_constraints
from corral.manager.scheduler import (
    Decision,
    constraints_for,
    is_active,
    max_replicas_for,
    placement_of,
    schedule,
)


def node(
    n: int,
    *,
    state: NodeState = NodeState.READY,
    availability: NodeAvailability = NodeAvailability.ACTIVE,
    role: NodeRole = NodeRole.WORKER,
    labels: dict[str, str] | None = None,
) -> Node:
    return Node(
        id=f"id{n}",
        description=NodeDescription(hostname=f"node{n}", addr=f"10.0.0.{n}"),
        spec=NodeSpec(role=role, availability=availability, labels=labels or {}),
        status=NodeStatus(state=state),
    )


def task(
    tid: str,
    service: str = "web",
    *,
    slot: int = 1,
    node_id: str = "",
    state: TaskState = TaskState.PENDING,
    desired: TaskState = TaskState.RUNNING,
) -> Task:
    return Task(
        id=tid,
        service_id=f"svc-{service}",
        service_name=service,
        slot=slot,
        node_id=node_id,
        spec=ContainerSpec(image="whoami"),
        desired_state=desired,
        status=TaskStatus(state=state),
    )


def pending(n: int, service: str = "web") -> list[Task]:
    return [task(f"{service}-{i}", service, slot=i) for i in range(1, n + 1)]


def running(tid: str, node_id: str, service: str = "web") -> Task:
    return task(tid, service, node_id=node_id, state=TaskState.RUNNING)


def per_node(decisions: list[Decision]) -> Counter[str | None]:
    return Counter(d.node_id for d in decisions)


THREE = [node(1), node(2), node(3)]


# --------------------------------------------------------------------------- spread


@pytest.mark.parametrize(
    ("n_tasks", "n_nodes", "expected_counts"),
    [
        (1, 3, [1, 0, 0]),
        (3, 3, [1, 1, 1]),
        (5, 3, [2, 2, 1]),
        (6, 3, [2, 2, 2]),
        (4, 1, [4]),
        (2, 4, [1, 1, 0, 0]),
    ],
)
def test_spread(n_tasks: int, n_nodes: int, expected_counts: list[int]) -> None:
    nodes = [node(i) for i in range(1, n_nodes + 1)]
    decisions = schedule(pending(n_tasks), nodes, [])
    counts = per_node(decisions)
    assert [counts[n.id] for n in nodes] == expected_counts
    assert all(d.reason == "" for d in decisions)


def test_decisions_follow_pending_order_and_are_deterministic() -> None:
    tasks = pending(5)
    first = schedule(tasks, list(reversed(THREE)), [])
    assert [d.task_id for d in first] == [t.id for t in tasks]
    # Ties are broken by hostname, whatever order the nodes come in.
    assert [d.node_id for d in first] == ["id1", "id2", "id3", "id1", "id2"]
    assert schedule(tasks, THREE, []) == first


def test_existing_tasks_of_the_service_are_counted() -> None:
    existing = [running("e1", "id1"), running("e2", "id1"), running("e3", "id2")]
    decisions = schedule(pending(3), THREE, existing)
    assert [d.node_id for d in decisions] == ["id3", "id2", "id3"]


def test_tie_break_by_total_tasks() -> None:
    # node1 and node2 are busy with other services; node3 is idle.
    existing = [
        running("o1", "id1", "other"),
        running("o2", "id1", "other"),
        running("o3", "id2", "other"),
    ]
    decisions = schedule(pending(1), THREE, existing)
    assert decisions == [Decision("web-1", "id3")]
    # The service spread still wins over the total: 3 tasks go one per node.
    assert per_node(schedule(pending(3), THREE, existing)) == Counter({"id1": 1, "id2": 1, "id3": 1})
    # And a 4th goes to the least busy node overall.
    assert schedule(pending(4), THREE, existing)[3].node_id == "id3"


@pytest.mark.parametrize(
    ("state", "desired", "counted"),
    [
        (TaskState.RUNNING, TaskState.RUNNING, True),
        (TaskState.ASSIGNED, TaskState.RUNNING, True),
        (TaskState.STARTING, TaskState.RUNNING, True),
        (TaskState.ASSIGNED, TaskState.READY, True),
        (TaskState.RUNNING, TaskState.SHUTDOWN, False),
        (TaskState.RUNNING, TaskState.REMOVE, False),
        (TaskState.FAILED, TaskState.RUNNING, False),
        (TaskState.COMPLETE, TaskState.RUNNING, False),
        (TaskState.SHUTDOWN, TaskState.SHUTDOWN, False),
        (TaskState.REJECTED, TaskState.RUNNING, False),
    ],
)
def test_which_existing_tasks_count(state: TaskState, desired: TaskState, counted: bool) -> None:
    existing = task("e1", node_id="id1", state=state, desired=desired)
    assert is_active(existing) is counted
    decision = schedule(pending(1), [node(1), node(2)], [existing])[0]
    # With the task counted, node1 has one task of the service and node2 wins.
    assert decision.node_id == ("id2" if counted else "id1")


def test_unassigned_and_unknown_node_tasks_are_ignored() -> None:
    existing = [task("p", node_id=""), running("gone", "no-such-node")]
    assert schedule(pending(2), [node(1), node(2)], existing) == [
        Decision("web-1", "id1"),
        Decision("web-2", "id2"),
    ]


def test_services_spread_independently() -> None:
    batch = pending(2, "a") + pending(2, "b")
    decisions = schedule(batch, [node(1), node(2)], [])
    assert [d.node_id for d in decisions] == ["id1", "id2", "id1", "id2"]


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([node(1), node(2, availability=NodeAvailability.PAUSE)], ["id1", "id1"]),
        ([node(1, availability=NodeAvailability.DRAIN), node(2)], ["id2", "id2"]),
        ([node(1, state=NodeState.DOWN), node(2)], ["id2", "id2"]),
        ([node(1, state=NodeState.UNKNOWN), node(2)], ["id2", "id2"]),
        ([node(1, state=NodeState.DISCONNECTED), node(2)], ["id2", "id2"]),
    ],
)
def test_unavailable_nodes_are_excluded(nodes: list[Node], expected: list[str]) -> None:
    assert [d.node_id for d in schedule(pending(2), nodes, [])] == expected


LABELLED = [
    node(1, role=NodeRole.MANAGER, labels={"zone": "a"}),
    node(2, labels={"zone": "b"}),
    node(3),
]


@pytest.mark.parametrize(
    ("exprs", "expected"),
    [
        (["node.hostname==node2"], ["id2", "id2", "id2"]),
        (["node.hostname!=node2"], ["id1", "id3", "id1"]),
        (["node.role==manager"], ["id1", "id1", "id1"]),
        (["node.role==worker"], ["id2", "id3", "id2"]),
        (["node.labels.zone!=a"], ["id2", "id3", "id2"]),  # node3 has no zone label: passes
        (["node.labels.zone==b"], ["id2", "id2", "id2"]),
        (["node.labels.zone==a", "node.role==manager"], ["id1", "id1", "id1"]),
        (["node.id==id3"], ["id3", "id3", "id3"]),
    ],
)
def test_constraints(exprs: list[str], expected: list[str]) -> None:
    cs = parse_constraints(exprs)
    decisions = schedule(pending(3), LABELLED, [], constraints_of=lambda t: cs)
    assert [d.node_id for d in decisions] == expected


@pytest.mark.parametrize(
    ("max_replicas", "existing", "expected"),
    [
        (1, [], ["id1", "id2", "id3", None]),
        (2, [], ["id1", "id2", "id3", "id1"]),
        (1, [running("e1", "id1")], ["id2", "id3", None, None]),
        (0, [], ["id1", "id2", "id3", "id1"]),  # 0 = no limit
    ],
)
def test_max_replicas(max_replicas: int, existing: list[Task], expected: list[str | None]) -> None:
    decisions = schedule(pending(4), THREE, existing, max_replicas_of=lambda t: max_replicas)
    assert [d.node_id for d in decisions] == expected
    for d in decisions:
        if d.node_id is None:
            assert d.reason == "no suitable node (max replicas per node limit exceed)"


def test_max_replicas_only_counts_the_same_service() -> None:
    existing = [running("o1", "id1", "other"), running("o2", "id1", "other")]
    decisions = schedule(pending(1), [node(1)], existing, max_replicas_of=lambda t: 1)
    assert decisions == [Decision("web-1", "id1")]


# --------------------------------------------------------------------------- explanations


HOSTNAME_NODE9 = parse_constraints(["node.hostname==node9"])


@pytest.mark.parametrize(
    ("nodes", "constraints", "max_replicas", "existing", "reason"),
    [
        ([], [], 0, [], "no suitable node"),
        ([], HOSTNAME_NODE9, 0, [], "no suitable node"),
        (
            THREE,
            HOSTNAME_NODE9,
            0,
            [],
            "no suitable node (scheduling constraints not satisfied on 3 nodes)",
        ),
        (
            [node(1)],
            HOSTNAME_NODE9,
            0,
            [],
            "no suitable node (scheduling constraints not satisfied on 1 node)",
        ),
        (
            [node(1, state=NodeState.DOWN), node(2), node(3)],
            HOSTNAME_NODE9,
            0,
            [],
            "no suitable node (1 node not available for new tasks; "
            "scheduling constraints not satisfied on 2 nodes)",
        ),
        (
            [node(1, availability=NodeAvailability.DRAIN), node(2, state=NodeState.DOWN)],
            [],
            0,
            [],
            "no suitable node (2 nodes not available for new tasks)",
        ),
        (
            [node(1, availability=NodeAvailability.PAUSE)],
            [],
            0,
            [],
            "no suitable node (1 node not available for new tasks)",
        ),
        (
            # node1 fails constraints; node2 and node3 are full.
            [node(1, role=NodeRole.MANAGER), node(2), node(3)],
            parse_constraints(["node.role==worker"]),
            1,
            [running("e2", "id2"), running("e3", "id3")],
            "no suitable node (scheduling constraints not satisfied on 1 node; "
            "max replicas per node limit exceed)",
        ),
        (
            [node(1, state=NodeState.DOWN), node(2, role=NodeRole.MANAGER), node(3)],
            parse_constraints(["node.role==worker"]),
            1,
            [running("e3", "id3")],
            "no suitable node (1 node not available for new tasks; "
            "scheduling constraints not satisfied on 1 node; max replicas per node limit exceed)",
        ),
    ],
)
def test_explanations(
    nodes: list[Node],
    constraints: list[Constraint],
    max_replicas: int,
    existing: list[Task],
    reason: str,
) -> None:
    decisions = schedule(
        pending(2),
        nodes,
        existing,
        constraints_of=lambda t: constraints,
        max_replicas_of=lambda t: max_replicas,
    )
    assert decisions == [Decision("web-1", None, reason), Decision("web-2", None, reason)]


def test_unplaceable_task_does_not_block_others() -> None:
    cs = {"svc-a": parse_constraints(["node.hostname==node9"]), "svc-b": []}
    batch = pending(1, "a") + pending(1, "b")
    decisions = schedule(batch, THREE, [], constraints_of=lambda t: cs[t.service_id])
    assert decisions == [
        Decision("a-1", None, "no suitable node (scheduling constraints not satisfied on 3 nodes)"),
        Decision("b-1", "id1"),
    ]


# --------------------------------------------------------------------------- service helpers


def service(sid: str, constraints: list[str], max_replicas: int = 0) -> Service:
    return Service(
        id=sid,
        spec=ServiceSpec(
            name=sid.removeprefix("svc-"),
            task=ContainerSpec(image="whoami"),
            placement=Placement(constraints=constraints, max_replicas=max_replicas),
        ),
    )


def test_service_helpers() -> None:
    svc = service("svc-web", ["node.role==manager"], max_replicas=2)
    assert constraints_for(svc) == [Constraint("node.role", "==", "manager")]
    assert max_replicas_for(svc) == 2
    assert constraints_for(service("svc-x", [])) == []


def test_placement_of_services() -> None:
    services = {
        "svc-web": service("svc-web", ["node.labels.zone==a"]),
        "svc-api": service("svc-api", [], max_replicas=1),
    }
    constraints_of, max_replicas_of = placement_of(services)
    batch = pending(2, "web") + pending(4, "api") + pending(1, "orphan")
    decisions = schedule(batch, LABELLED, [], constraints_of, max_replicas_of)
    assert [d.node_id for d in decisions] == ["id1", "id1", "id2", "id3", "id1", None, "id2"]
    assert decisions[5].reason == "no suitable node (max replicas per node limit exceed)"
