"""Orchestrator: turns service specs into tasks — creates, restarts, scales and reaps them."""

from __future__ import annotations

from corral.api.types import Node, Service, ServiceMode, Task
from corral.manager.constraints import parse_constraints
from corral.manager.loop import Component
from corral.manager.reconcile import (
    Plan,
    apply_plan,
    next_restart,
    promote_delayed,
    reap_orphans,
    reconcile_global,
    reconcile_replicated,
)
from corral.store.base import WriteTx


class Orchestrator(Component):
    """Reconciles every service against its tasks (replicated and global modes)."""

    kinds = ("service", "task", "node", "cluster")
    name = "orchestrator"

    def plan(self, now: float) -> tuple[Plan, float | None]:
        """Everything that should change now, and when to look again for delayed restarts."""
        view = self.store.view()
        cluster = view.cluster()
        history = cluster.task_history_limit if cluster else 5
        nodes = {n.id: n for n in view.all(Node)}
        by_service: dict[str, list[Task]] = {}
        for t in view.all(Task):
            by_service.setdefault(t.service_id, []).append(t)
        plan = Plan()
        for svc in view.all(Service):
            tasks = by_service.pop(svc.id, [])
            # Promote first and reconcile the promoted tasks, so one pass never holds two
            # different updates of the same task.
            promoted = promote_delayed(tasks, now, nodes)
            tasks = apply_plan(tasks, promoted)
            if svc.spec.mode is ServiceMode.GLOBAL:
                cons = parse_constraints(svc.spec.placement.constraints)
                step = reconcile_global(
                    svc, tasks, nodes, now, lambda n: all(c.matches(n) for c in cons), history)
            else:
                step = reconcile_replicated(svc, tasks, nodes, now, history)
            plan.merge(promoted)
            plan.merge(step)
        for orphans in by_service.values():  # tasks whose service was removed
            plan.merge(reap_orphans(orphans, nodes))
        return plan, next_restart(apply_plan(view.all(Task), plan))

    def tick(self, now: float) -> float | None:
        plan, wake = self.plan(now)
        if plan:
            self.store.update(lambda tx: commit(tx, plan))
        return wake


def commit(tx: WriteTx, plan: Plan) -> None:
    """Write a plan in one transaction (a stale task version aborts it all; we then retry)."""
    for t in plan.update:
        tx.update(t)
    for t in plan.create:
        tx.create(t)
    for task_id in plan.delete:
        tx.delete(Task, task_id)
