"""Pure reconciliation: given a service, its tasks and the nodes, decide which tasks to create,
which to stop and which to forget.

How this works (swarmkit's replicated/global orchestrators and restart supervisor, condensed):
1. *Restart supervision.* A task that should run but has stopped, or whose node is down or
   drained, gets desired state SHUTDOWN; if the restart policy allows, a replacement is made in
   the same slot (or on the same node, for a global service). A replacement after a failure
   waits for the restart delay with desired state READY; `promote_delayed` flips it to RUNNING.
   A task the policy will not restart keeps its slot (desired RUNNING, observed COMPLETE/FAILED),
   so the slot is not refilled — as in Swarm.
2. *Scale.* Replicated: fill free slots 1..N, and mark slots above N for removal (REMOVE).
   Global: one runnable task per eligible node; tasks on ineligible nodes are shut down.
3. *History.* Each slot keeps at most `history_limit` stopped tasks; tasks marked REMOVE are
   deleted once they have stopped (or never reached a node, or their node is gone).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from corral.api.types import (
    Node,
    NodeAvailability,
    NodeState,
    RestartCondition,
    Service,
    ServiceMode,
    Task,
    TaskState,
    TaskStatus,
    new_id,
)

RUNNABLE = (TaskState.RUNNING, TaskState.READY)


@dataclass
class Plan:
    """Changes to commit: new tasks, updated copies of existing tasks, task IDs to delete."""

    create: list[Task] = field(default_factory=list)
    update: list[Task] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.update or self.delete)

    def extend(self, other: Plan) -> None:
        self.create += other.create
        self.update += other.update
        self.delete += other.delete

    def merge(self, later: Plan) -> None:
        """Add a later step's changes; its update of a task replaces an earlier one."""
        for t in later.update:
            _replace(self, t)
        for t in later.create:
            _replace(self, t) if any(c.id == t.id for c in self.create) else self.create.append(t)
        self.delete += [d for d in later.delete if d not in self.delete]


def new_task(service: Service, *, slot: int = 0, node_id: str = "", attempt: int = 0,
             restart_at: float = 0.0, now: float) -> Task:
    """A fresh task for a service slot (or node, for global services)."""
    return Task(
        id=new_id(),
        created_at=now,
        service_id=service.id,
        service_name=service.spec.name,
        slot=slot,
        node_id=node_id,
        spec=service.spec.task,
        spec_version=service.spec_version,
        desired_state=TaskState.READY if restart_at > now else TaskState.RUNNING,
        status=TaskStatus(state=TaskState.NEW, message="created", timestamp=now),
        restart_at=restart_at,
        attempt=attempt,
        ports=service.spec.ports,
    )


def _with_desired(task: Task, state: TaskState) -> Task:
    return task.model_copy(update={"desired_state": state})


def node_lost(task: Task, nodes: dict[str, Node]) -> bool:
    """The task's node is gone or known to be down."""
    if not task.node_id:
        return False
    node = nodes.get(task.node_id)
    return node is None or node.status.state is NodeState.DOWN


def _should_restart(service: Service, task: Task) -> bool:
    policy = service.spec.restart_policy
    if policy.condition is RestartCondition.NONE:
        return False
    if policy.condition is RestartCondition.ON_FAILURE and task.status.state is TaskState.COMPLETE:
        return False
    return policy.max_attempts == 0 or task.attempt < policy.max_attempts


def supervise(service: Service, tasks: Iterable[Task], nodes: dict[str, Node], now: float,
              key: Callable[[Task], tuple[int, str]]) -> Plan:
    """Step 1: stop tasks that stopped, lost their node or sit on a drained node; replace them."""
    plan = Plan()
    for t in tasks:
        if t.desired_state not in RUNNABLE:
            continue
        node = nodes.get(t.node_id) if t.node_id else None
        drained = node is not None and node.spec.availability is NodeAvailability.DRAIN
        lost = node_lost(t, nodes)
        stopped = t.status.state.terminal
        slot, node_id = key(t)
        if service.spec.mode is ServiceMode.GLOBAL and t.node_id and t.node_id not in nodes:
            # The node was removed from the swarm: nothing will ever run there again.
            plan.update.append(_with_desired(t, TaskState.REMOVE))
        elif drained and service.spec.mode is ServiceMode.GLOBAL:
            plan.update.append(_with_desired(t, TaskState.SHUTDOWN))
        elif drained or (lost and service.spec.restart_policy.condition is not RestartCondition.NONE):
            # Moving a task off a drained or lost node is not a failure: no delay, no attempt.
            plan.update.append(_with_desired(t, TaskState.SHUTDOWN))
            if service.spec.mode is ServiceMode.REPLICATED:
                plan.create.append(new_task(service, slot=slot, attempt=t.attempt, now=now))
        elif stopped and _should_restart(service, t):
            plan.update.append(_with_desired(t, TaskState.SHUTDOWN))
            if service.spec.mode is ServiceMode.GLOBAL and node_lost(t, nodes):
                continue
            delay = service.spec.restart_policy.delay
            plan.create.append(new_task(service, slot=slot, node_id=node_id, attempt=t.attempt + 1,
                                        restart_at=now + delay if delay > 0 else 0.0, now=now))
    return plan


def promote_delayed(tasks: list[Task], now: float, nodes: dict[str, Node] | None = None) -> Plan:
    """Waiting tasks become desired RUNNING: restarts once their delay has passed, stop-first
    update replacements once the task they replace has stopped (or cannot be stopped)."""
    by_id = {t.id: t for t in tasks}
    plan = Plan()
    for t in tasks:
        if t.desired_state is not TaskState.READY or t.restart_at > now:
            continue
        old = by_id.get(t.replaces) if t.replaces else None
        if (old is not None and not old.status.state.terminal
                and old.status.state >= TaskState.ASSIGNED
                and not (nodes is not None and node_lost(old, nodes))):
            continue
        plan.update.append(_with_desired(t, TaskState.RUNNING))
    return plan


def next_restart(tasks: Iterable[Task]) -> float | None:
    """The earliest pending restart time, so the orchestrator knows when to wake up."""
    times = [t.restart_at for t in tasks if t.desired_state is TaskState.READY and t.restart_at
             and not t.replaces]
    return min(times) if times else None


def apply_plan(tasks: list[Task], plan: Plan) -> list[Task]:
    """The task list as it will be after `plan` (used to chain the steps)."""
    changed = {t.id: t for t in plan.update}
    gone = set(plan.delete)
    return [changed.get(t.id, t) for t in tasks if t.id not in gone] + plan.create


def reconcile_replicated(service: Service, tasks: list[Task], nodes: dict[str, Node],
                         now: float, history_limit: int = 5) -> Plan:
    """Bring a replicated service's slots to its replica count, restarting what stopped."""
    plan = supervise(service, tasks, nodes, now, key=lambda t: (t.slot, ""))
    current = apply_plan(tasks, plan)
    occupied = sorted({t.slot for t in current if t.desired_state in RUNNABLE})
    want = service.spec.replicas
    if len(occupied) < want:
        free = (s for s in range(1, want + len(occupied) + 1) if s not in occupied)
        for _ in range(want - len(occupied)):
            plan.create.append(new_task(service, slot=next(free), now=now))
    elif len(occupied) > want:
        # Keep the lowest slots so `service ps` and the progress display stay 1..N.
        extra = set(occupied[want:])
        for t in current:
            if t.slot in extra and t.desired_state in RUNNABLE:
                _replace(plan, _with_desired(t, TaskState.REMOVE))
    plan.extend(reap(apply_plan(tasks, plan), nodes, history_limit, key=lambda t: str(t.slot)))
    return plan


def eligible_for_global(node: Node, matches: Callable[[Node], bool]) -> bool:
    """A node a global service should run on (new tasks go only to ready, active nodes)."""
    return node.spec.availability is not NodeAvailability.DRAIN and matches(node)


def reconcile_global(service: Service, tasks: list[Task], nodes: dict[str, Node], now: float,
                     matches: Callable[[Node], bool], history_limit: int = 5) -> Plan:
    """One running task per eligible node; none on nodes that drained or stopped matching."""
    plan = supervise(service, tasks, nodes, now, key=lambda t: (0, t.node_id))
    current = apply_plan(tasks, plan)
    covered: set[str] = set()
    for t in current:
        if t.desired_state not in RUNNABLE:
            continue
        node = nodes.get(t.node_id)
        if node is None:
            _replace(plan, _with_desired(t, TaskState.REMOVE))
        elif not matches(node):
            _replace(plan, _with_desired(t, TaskState.SHUTDOWN))
        else:
            covered.add(t.node_id)
    for node in nodes.values():
        if (node.id not in covered and eligible_for_global(node, matches)
                and node.spec.availability is NodeAvailability.ACTIVE
                and node.status.state is NodeState.READY):
            plan.create.append(new_task(service, node_id=node.id, now=now))
    plan.extend(reap(apply_plan(tasks, plan), nodes, history_limit, key=lambda t: t.node_id))
    return plan


def _replace(plan: Plan, task: Task) -> None:
    """Record an update, replacing an earlier update of the same task or a not-yet-created one."""
    for i, t in enumerate(plan.create):
        if t.id == task.id:
            plan.create[i] = task
            return
    plan.update = [t for t in plan.update if t.id != task.id] + [task]


def _gone_for_good(t: Task, nodes: dict[str, Node]) -> bool:
    """A stopped task, one that never reached a node, or one whose node is gone."""
    return t.status.state.terminal or not t.node_id or node_lost(t, nodes) or \
        t.status.state < TaskState.ASSIGNED


def reap(tasks: list[Task], nodes: dict[str, Node], history_limit: int,
         key: Callable[[Task], str]) -> Plan:
    """Delete removed tasks once stopped and trim each slot's history to `history_limit`."""
    plan = Plan()
    history: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.desired_state is TaskState.REMOVE:
            if _gone_for_good(t, nodes) and t.id not in {c.id for c in plan.create}:
                plan.delete.append(t.id)
        elif t.desired_state > TaskState.RUNNING and _gone_for_good(t, nodes):
            history[key(t)].append(t)
    for old in history.values():
        old.sort(key=lambda t: t.created_at, reverse=True)
        plan.delete += [t.id for t in old[history_limit:]]
    return plan


def reap_orphans(tasks: list[Task], nodes: dict[str, Node]) -> Plan:
    """Tasks of deleted services: delete each once it has stopped or cannot be stopped."""
    plan = Plan()
    for t in tasks:
        if t.desired_state < TaskState.REMOVE:
            _replace(plan, _with_desired(t, TaskState.REMOVE))
        elif _gone_for_good(t, nodes):
            plan.delete.append(t.id)
    return plan
