"""The scheduler's placement decision, as a pure function (no I/O, no store access).

Mirrors swarmkit (manager/scheduler/filter.go, pipeline.go): for each pending task a pipeline
of filters (ready/active, constraints, max replicas per node) runs over every node; a node is
rejected by the first filter it fails, and that filter's failure count goes up. Among the nodes
that pass, the task goes to the one running the fewest active tasks of the same service, then
the fewest active tasks overall, then the lowest (hostname, id). Tasks placed earlier in the
same call count as active, so a batch spreads evenly. When no node passes, the decision
carries swarmkit's reason, e.g. "no suitable node (scheduling constraints not satisfied on 3
nodes)"; the explanations are listed in pipeline order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from corral.api.types import Node, NodeAvailability, NodeState, Service, Task, TaskState
from corral.manager.constraints import Constraint, node_matches, parse_constraints

NO_SUITABLE_NODE = "no suitable node"


@dataclass(frozen=True)
class Decision:
    """Where one pending task goes: `node_id` None means it cannot be placed (see `reason`)."""

    task_id: str
    node_id: str | None
    reason: str = ""


@dataclass
class NodeInfo:
    """A node plus the counts of active tasks on it (in total and per service ID)."""

    node: Node
    active_total: int = 0
    active_by_service: Counter[str] = field(default_factory=Counter)
    # (protocol, published port) taken by host-mode ports of active tasks on the node
    host_ports: set[tuple[str, int]] = field(default_factory=set)

    def add(self, task: Task) -> None:
        """Count `task` as active on this node."""
        self.active_total += 1
        self.active_by_service[task.service_id] += 1
        self.host_ports |= host_ports(task)


class Filter(Protocol):
    """A pipeline stage: `check` says whether a node can take a task, `explain` why nodes can't."""

    name: str

    def check(self, task: Task, node: NodeInfo) -> bool:
        """Whether `node` passes this filter for `task`."""
        ...

    def explain(self, n_nodes: int) -> str:
        """Why `n_nodes` nodes failed this filter."""
        ...


def _nodes(n: int) -> str:
    """Pluralise: "1 node" or "N nodes"."""
    return "1 node" if n == 1 else f"{n} nodes"


class ReadyFilter:
    """Nodes must be READY and have availability ACTIVE (not paused or drained)."""

    name = "ready"

    def check(self, task: Task, node: NodeInfo) -> bool:
        """Whether the node is ready and active."""
        n = node.node
        return n.status.state == NodeState.READY and n.spec.availability == NodeAvailability.ACTIVE

    def explain(self, n_nodes: int) -> str:
        """swarmkit: "N nodes not available for new tasks"."""
        return f"{_nodes(n_nodes)} not available for new tasks"


class ConstraintFilter:
    """Nodes must satisfy all of the task's placement constraints."""

    name = "constraints"

    def __init__(self, constraints: list[Constraint]) -> None:
        self.constraints = constraints

    def check(self, task: Task, node: NodeInfo) -> bool:
        """Whether the node matches every constraint."""
        return node_matches(self.constraints, node.node)

    def explain(self, n_nodes: int) -> str:
        """swarmkit: "scheduling constraints not satisfied on N nodes"."""
        return f"scheduling constraints not satisfied on {_nodes(n_nodes)}"


class MaxReplicasFilter:
    """Nodes must run fewer than `max_replicas` active tasks of the task's service."""

    name = "max-replicas"

    def __init__(self, max_replicas: int) -> None:
        self.max_replicas = max_replicas

    def check(self, task: Task, node: NodeInfo) -> bool:
        """Whether the node is below the per-node replica limit for this service."""
        return node.active_by_service[task.service_id] < self.max_replicas

    def explain(self, n_nodes: int) -> str:
        """swarmkit's wording (which carries no count)."""
        return "max replicas per node limit exceed"


def host_ports(task: Task) -> set[tuple[str, int]]:
    """The node ports a task binds itself (publish mode host)."""
    return {(p.protocol, p.published_port) for p in task.ports if p.publish_mode == "host"}


class HostPortFilter:
    """A host-mode published port can be bound by one task per node."""

    name = "host-port"

    def check(self, task: Task, node: NodeInfo) -> bool:
        """Whether none of the task's host-mode ports is taken on the node."""
        return not (host_ports(task) & node.host_ports)

    def explain(self, n_nodes: int) -> str:
        """swarmkit's wording."""
        return f"host-mode port already in use on {_nodes(n_nodes)}"


class Pipeline:
    """The filters enabled for one task, with a failure count per filter."""

    def __init__(self, filters: list[Filter]) -> None:
        self.filters = filters
        self.failures = [0] * len(filters)

    def process(self, task: Task, node: NodeInfo) -> bool:
        """Run `node` through the filters, stopping at (and counting) the first failure."""
        for i, f in enumerate(self.filters):
            if not f.check(task, node):
                self.failures[i] += 1
                return False
        return True

    def explain(self) -> str:
        """The failed filters' explanations, in pipeline order, joined with "; "."""
        return "; ".join(
            f.explain(count) for f, count in zip(self.filters, self.failures) if count > 0
        )


def build_pipeline(constraints: list[Constraint], max_replicas: int,
                   uses_host_ports: bool = False) -> Pipeline:
    """A pipeline with the filters that apply: readiness always, the others when configured."""
    filters: list[Filter] = [ReadyFilter()]
    if constraints:
        filters.append(ConstraintFilter(constraints))
    if max_replicas > 0:
        filters.append(MaxReplicasFilter(max_replicas))
    if uses_host_ports:
        filters.append(HostPortFilter())
    return Pipeline(filters)


def is_active(task: Task) -> bool:
    """Whether `task` occupies its node: assigned, meant to run, and not yet stopped."""
    return (
        bool(task.node_id)
        and task.desired_state <= TaskState.RUNNING
        and not task.status.state.terminal
    )


def constraints_for(service: Service) -> list[Constraint]:
    """The parsed placement constraints of `service` (InvalidArgument if malformed)."""
    return parse_constraints(service.spec.placement.constraints)


def max_replicas_for(service: Service) -> int:
    """The per-node replica limit of `service` (0 = no limit)."""
    return service.spec.placement.max_replicas


def placement_of(
    services: Mapping[str, Service],
) -> tuple[Callable[[Task], list[Constraint]], Callable[[Task], int]]:
    """`constraints_of` / `max_replicas_of` callbacks looking tasks' services up by ID.

    Constraints are parsed once per service; a task whose service is missing gets none.
    """
    cache: dict[str, list[Constraint]] = {}

    def constraints_of(task: Task) -> list[Constraint]:
        service = services.get(task.service_id)
        if service is None:
            return []
        if task.service_id not in cache:
            cache[task.service_id] = constraints_for(service)
        return cache[task.service_id]

    def max_replicas_of(task: Task) -> int:
        service = services.get(task.service_id)
        return max_replicas_for(service) if service is not None else 0

    return constraints_of, max_replicas_of


def _no_constraints(task: Task) -> list[Constraint]:
    """Default `constraints_of`: no constraints."""
    return []


def _no_limit(task: Task) -> int:
    """Default `max_replicas_of`: no per-node limit."""
    return 0


def schedule(
    pending: list[Task],
    nodes: list[Node],
    tasks: list[Task],
    constraints_of: Callable[[Task], list[Constraint]] | None = None,
    max_replicas_of: Callable[[Task], int] | None = None,
) -> list[Decision]:
    """Decide a node for each pending task (in `pending` order), spreading by service."""
    constraints_of = constraints_of or _no_constraints
    max_replicas_of = max_replicas_of or _no_limit

    infos = {n.id: NodeInfo(n) for n in sorted(nodes, key=lambda n: (n.hostname, n.id))}
    for t in tasks:
        info = infos.get(t.node_id)
        if info is not None and is_active(t):
            info.add(t)

    decisions: list[Decision] = []
    for task in pending:
        if not infos:
            decisions.append(Decision(task.id, None, NO_SUITABLE_NODE))
            continue
        pipeline = build_pipeline(constraints_of(task), max_replicas_of(task),
                                  bool(host_ports(task)))
        candidates = [info for info in infos.values() if pipeline.process(task, info)]
        if not candidates:
            reason = f"{NO_SUITABLE_NODE} ({pipeline.explain()})"
            decisions.append(Decision(task.id, None, reason))
            continue
        # min() keeps the first of equals; infos is ordered by (hostname, id).
        best = min(
            candidates,
            key=lambda i: (i.active_by_service[task.service_id], i.active_total),
        )
        best.add(task)
        decisions.append(Decision(task.id, best.node.id))
    return decisions
