"""Scheduler component: feeds pending tasks and nodes to the pure `schedule` function and
writes its decisions back (PENDING → ASSIGNED, or the reason a task cannot be placed)."""

from __future__ import annotations

from corral.api.types import Node, NodeState, Service, Task, TaskState
from corral.manager.constraints import Constraint, parse_constraints
from corral.manager.loop import Component
from corral.manager.reconcile import RUNNABLE
from corral.manager.scheduler import Decision, schedule
from corral.store.base import WriteTx


class Scheduler(Component):
    """Assigns pending tasks to nodes."""

    kinds = ("task", "node", "service")
    name = "scheduler"

    def tick(self, now: float) -> float | None:
        view = self.store.view()
        services = {s.id: s for s in view.all(Service)}
        nodes = view.all(Node)
        by_id = {n.id: n for n in nodes}
        tasks = view.all(Task)
        pending = [t for t in tasks if t.status.state is TaskState.PENDING
                   and t.desired_state in RUNNABLE and t.service_id in services]
        if not pending:
            return None
        decisions: list[Decision] = []
        # Global tasks come with their node chosen by the orchestrator: just confirm the node.
        for t in (t for t in pending if t.node_id):
            node = by_id.get(t.node_id)
            ok = node is not None and node.status.state is NodeState.READY
            decisions.append(Decision(t.id, t.node_id if ok else None,
                                      "" if ok else "no suitable node (node not ready)"))
        cons_cache: dict[str, list[Constraint]] = {}

        def constraints_of(task: Task) -> list[Constraint]:
            if task.service_id not in cons_cache:
                spec = services[task.service_id].spec
                cons_cache[task.service_id] = parse_constraints(spec.placement.constraints)
            return cons_cache[task.service_id]

        decisions += schedule([t for t in pending if not t.node_id], nodes, tasks,
                              constraints_of=constraints_of,
                              max_replicas_of=lambda t: services[t.service_id].spec.placement.max_replicas)
        current = {t.id: t for t in pending}
        changes: list[Task] = []
        for d in decisions:
            t = current[d.task_id]
            if d.node_id:
                status = t.status.model_copy(update={
                    "state": TaskState.ASSIGNED, "message": "scheduler assigned task to node",
                    "err": "", "timestamp": now})
                changes.append(t.model_copy(update={"node_id": d.node_id, "status": status}))
            elif t.status.err != d.reason:
                # Only write when the explanation changes, or we would wake ourselves forever.
                status = t.status.model_copy(update={"err": d.reason})
                changes.append(t.model_copy(update={"status": status}))
        if changes:
            def write(tx: WriteTx) -> None:
                for c in changes:
                    tx.update(c)
            self.store.update(write)
        return None
