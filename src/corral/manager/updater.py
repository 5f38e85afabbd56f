"""Updater: rolls a service's tasks over to a new spec, batch by batch, and rolls back.

How this works (swarmkit's updater, condensed and stateless): a task is *current* when it was
made from the service's current spec version. Each pass looks at every slot (or node, for a
global service) that has a runnable task:
- all current → done; some current, some not → in flight; none current → waiting.
- In flight: start-first shuts the old task down once its replacement runs (and is healthy);
  stop-first made the replacement wait (desired READY, `replaces`) until the old task stopped.
- While fewer than `parallelism` slots are in flight and `delay` has passed since the last
  slot finished, the next waiting slots (lowest first) start: start-first adds a current task
  beside the old one; stop-first shuts the old one down and adds a waiting replacement.
- A current task that fails before it has run for `monitor` seconds is a failure; more than
  `max_failure_ratio` of the slots failing triggers the failure action: pause, continue, or
  rollback (the previous spec becomes the spec again and is rolled out the same way).
- Once every slot is done and the last one has run for `monitor`, the update is completed.
Tasks left untouched by a rollback (their spec equals the restored one) are just re-stamped
with the current version, so they are not replaced.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from corral.api.types import (
    Node,
    Service,
    ServiceMode,
    Task,
    TaskState,
    UpdateConfig,
    UpdateStatus,
)
from corral.manager.loop import Component
from corral.manager.reconcile import RUNNABLE, Plan, new_task, node_lost
from corral.manager.orchestrator import commit
from corral.store.base import WriteTx

ACTIVE = ("updating", "rollback_started")
FAILED_STATES = (TaskState.FAILED, TaskState.REJECTED)


def is_rollback(service: Service) -> bool:
    return service.update_status is not None and service.update_status.state.startswith("rollback")


def config_of(service: Service) -> UpdateConfig:
    return service.spec.rollback_config if is_rollback(service) else service.spec.update_config


def ready(task: Task) -> bool:
    """Running, and healthy if it has a health check: a slot may move on."""
    return task.status.state is TaskState.RUNNING and task.status.health in ("", "healthy")


@dataclass
class UpdateDecision:
    """What one pass over one service decided."""

    plan: Plan
    service: Service | None  # a changed copy of the service (status, spec on rollback)
    wake_at: float | None


def _key(t: Task) -> str:
    return str(t.slot) if t.slot else t.node_id


def plan_update(service: Service, tasks: list[Task], nodes: dict[str, Node],
                now: float) -> UpdateDecision:
    """One step of a service's rolling update (pure)."""
    status = service.update_status
    plan = Plan()
    if status is None or status.state not in ACTIVE:
        return UpdateDecision(plan, None, None)
    cfg = config_of(service)
    version = service.spec_version
    started = status.started_at

    # A rollback leaves alone the tasks the update never reached: same task spec and ports.
    # (An update itself replaces every older task: placement changes are not on the task.)
    for t in tasks if is_rollback(service) else []:
        if (t.spec_version != version and t.spec_version >= service.force_version
                and t.desired_state in RUNNABLE and t.spec == service.spec.task
                and t.ports == service.spec.ports):
            plan.update.append(t.model_copy(update={"spec_version": version}))
    restamped = {t.id for t in plan.update}
    def current(t: Task) -> bool:
        return t.spec_version == version or t.id in restamped

    # Failures: current tasks made by this update that died early.
    failures = 0
    for t in tasks:
        if current(t) and t.created_at >= started and t.status.state in FAILED_STATES:
            ran = (t.status.timestamp - t.status.started_at) if t.status.started_at else 0.0
            if ran <= cfg.monitor:
                failures += 1
    slots: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.desired_state in RUNNABLE and not node_lost(t, nodes):
            slots[_key(t)].append(t)
    total = max(1, len(slots))
    new_status = status.model_copy(update={"failures": failures})

    if failures > cfg.max_failure_ratio * total and cfg.failure_action != "continue":
        failed = next(t for t in tasks if current(t) and t.status.state in FAILED_STATES
                      and t.created_at >= started)
        reason = f"update paused due to failure or early termination of task {failed.id}"
        if cfg.failure_action == "rollback" and not is_rollback(service) and service.previous_spec:
            why = f"update rolled back due to failure or early termination of task {failed.id}"
            return UpdateDecision(plan, rollback(service, now, why), now)
        state = "rollback_paused" if is_rollback(service) else "paused"
        paused = new_status.model_copy(update={"state": state, "message": reason})
        return UpdateDecision(plan, service.model_copy(update={"update_status": paused}), None)

    waiting, in_flight, done_at = [], 0, 0.0
    for key in sorted(slots, key=lambda k: (len(k), k)):
        group = slots[key]
        fresh = [t for t in group if current(t)]
        old = [t for t in group if not current(t)]
        if not fresh:
            waiting.append(old)
            continue
        if old or not all(ready(t) for t in fresh):
            in_flight += 1
            if cfg.order == "start-first" and old and all(ready(t) for t in fresh):
                plan.update += [t.model_copy(update={"desired_state": TaskState.SHUTDOWN})
                                for t in old]
            continue
        done_at = max([done_at] + [t.status.started_at or 0.0 for t in fresh])

    parallelism = cfg.parallelism or len(slots) or 1
    wake: float | None = None
    if waiting and in_flight < parallelism:
        if done_at and now < done_at + cfg.delay:
            wake = done_at + cfg.delay
        else:
            for old in waiting[: parallelism - in_flight]:
                plan.create.append(_replacement(service, old, cfg, now))
                if cfg.order == "stop-first":
                    plan.update += [t.model_copy(update={"desired_state": TaskState.SHUTDOWN})
                                    for t in old]
    elif not waiting and not in_flight:
        if now < done_at + cfg.monitor:
            wake = done_at + cfg.monitor  # failures may still show up
        else:
            state = "rollback_completed" if is_rollback(service) else "completed"
            # A rollback keeps saying why it happened.
            msg = status.message if is_rollback(service) else "update completed"
            new_status = new_status.model_copy(update={"state": state, "completed_at": now,
                                                       "message": msg})
    new_status = new_status.model_copy(update={"updated": len(slots) - len(waiting) - in_flight})
    changed = None if new_status == status else service.model_copy(update={"update_status": new_status})
    return UpdateDecision(plan, changed, wake)


def _replacement(service: Service, old: list[Task], cfg: UpdateConfig, now: float) -> Task:
    """The current-spec task that takes over a slot (or a global service's node)."""
    first = old[0]
    slot = first.slot if service.spec.mode is ServiceMode.REPLICATED else 0
    task = new_task(service, slot=slot, node_id="" if slot else first.node_id, now=now)
    if cfg.order == "stop-first":
        # Wait (desired READY) until the old task has stopped; the orchestrator then starts it.
        return task.model_copy(update={"desired_state": TaskState.READY, "replaces": first.id})
    return task


def rollback(service: Service, now: float, reason: str = "manually requested rollback") -> Service:
    """The service with its previous spec restored, rolling back from now on."""
    assert service.previous_spec is not None
    return service.model_copy(update={
        "spec": service.previous_spec, "previous_spec": service.spec,
        "spec_version": service.spec_version + 1, "updated_at": now,
        "update_status": UpdateStatus(state="rollback_started", started_at=now, message=reason)})


class Updater(Component):
    """Drives every service that is updating or rolling back."""

    kinds = ("service", "task", "node")
    name = "updater"

    def tick(self, now: float) -> float | None:
        view = self.store.view()
        nodes = {n.id: n for n in view.all(Node)}
        wakes: list[float] = []
        for svc in view.all(Service):
            if svc.update_status is None or svc.update_status.state not in ACTIVE:
                continue
            d = plan_update(svc, view.tasks_of_service(svc.id), nodes, now)
            if d.wake_at is not None:
                wakes.append(d.wake_at)
            if d.plan or d.service is not None:
                def write(tx: WriteTx, d: UpdateDecision = d) -> None:
                    commit(tx, d.plan)
                    if d.service is not None:
                        tx.update(d.service)
                self.store.update(write)
        return min(wakes) if wakes else None

