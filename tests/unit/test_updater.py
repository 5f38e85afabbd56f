"""Rolling updates and rollbacks: the pure updater step, stop-first promotion, and the control
API's update/rollback entry points."""

from __future__ import annotations

import itertools

import pytest

from corral.api.errors import InvalidArgument
from corral.api.types import (
    ContainerSpec,
    NetworkSpec,
    Node,
    NodeDescription,
    NodeState,
    NodeStatus,
    Placement,
    RestartPolicy,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
    UpdateConfig,
    UpdateStatus,
)
from corral.manager.controlapi import ControlAPI
from corral.manager.reconcile import (
    Plan,
    apply_plan,
    promote_delayed,
    reconcile_global,
    reconcile_replicated,
)
from corral.manager.updater import UpdateDecision, plan_update, rollback
from corral.store.base import MemoryStore

NOW = 1_000.0
S = TaskState
RUNNABLE = (S.RUNNING, S.READY)
V1 = ContainerSpec(image="app:1")
V2 = ContainerSpec(image="app:2")
from corral.security.pki import make_csr, new_key

CSR = make_csr(new_key()).decode()


# --------------------------------------------------------------------------- helpers


def mk_node(n: int, state: NodeState = NodeState.READY) -> Node:
    return Node(id=f"n{n}", description=NodeDescription(hostname=f"node{n}", addr=f"10.0.0.{n}"),
                status=NodeStatus(state=state))


def nodes_of(*nodes: Node) -> dict[str, Node]:
    return {n.id: n for n in nodes}


THREE = nodes_of(mk_node(1), mk_node(2), mk_node(3))


def mk_spec(task: ContainerSpec = V1, *, replicas: int = 3,
            mode: ServiceMode = ServiceMode.REPLICATED, update: UpdateConfig | None = None,
            rollback_cfg: UpdateConfig | None = None, **kw: object) -> ServiceSpec:
    return ServiceSpec(
        name="web", task=task, mode=mode,
        replicas=replicas if mode is ServiceMode.REPLICATED else 0,
        restart_policy=RestartPolicy(delay=0.0),  # restarts are immediate in these scenarios
        update_config=update or UpdateConfig(),
        rollback_config=rollback_cfg or UpdateConfig(),
        **kw)


def updating(spec: ServiceSpec, previous: ServiceSpec | None = None, *, version: int = 2,
             state: str = "updating", started_at: float = NOW, force_version: int = 0,
             message: str = "update in progress") -> Service:
    """A service whose spec just changed (version `version`) and is rolling out."""
    return Service(id="svc", spec=spec, previous_spec=previous, spec_version=version,
                   force_version=force_version,
                   update_status=UpdateStatus(state=state, started_at=started_at,
                                              message=message))


_ids = itertools.count(1)


def mk_task(slot: int = 1, *, spec: ContainerSpec = V1, version: int = 1, node: str | None = None,
            desired: TaskState = S.RUNNING, state: TaskState = S.RUNNING,
            created_at: float = NOW - 100, started_at: float | None = NOW - 99,
            health: str = "") -> Task:
    return Task(
        id=f"t{next(_ids):04d}", created_at=created_at, service_id="svc", service_name="web",
        slot=slot, node_id=node if node is not None else f"n{(slot - 1) % 3 + 1}",
        spec=spec, spec_version=version, desired_state=desired,
        status=TaskStatus(state=state, timestamp=created_at + 1, started_at=started_at,
                          health=health),
    )


def old_tasks(n: int = 3, spec: ContainerSpec = V1, version: int = 1) -> list[Task]:
    return [mk_task(s, spec=spec, version=version) for s in range(1, n + 1)]


def set_status(t: Task, **kw: object) -> Task:
    return t.model_copy(update={"status": t.status.model_copy(update=kw)})


class Sim:
    """The updater, orchestrator and agents taking turns over one service's task list."""

    def __init__(self, service: Service, tasks: list[Task], nodes: dict[str, Node] | None = None,
                 now: float = NOW) -> None:
        self.service = service
        self.tasks = list(tasks)
        self.nodes = nodes if nodes is not None else THREE
        self.now = now
        self.last: UpdateDecision | None = None

    # -- components
    def step(self) -> UpdateDecision:
        """One updater pass, committed."""
        d = plan_update(self.service, self.tasks, self.nodes, self.now)
        self.tasks = apply_plan(self.tasks, d.plan)
        if d.service is not None:
            self.service = d.service
        self.last = d
        return d

    def orchestrate(self) -> Plan:
        """One orchestrator pass: promote waiting tasks, then reconcile (restarts)."""
        promoted = promote_delayed(self.tasks, self.now, self.nodes)
        self.tasks = apply_plan(self.tasks, promoted)
        if self.service.spec.mode is ServiceMode.GLOBAL:
            step = reconcile_global(self.service, self.tasks, self.nodes, self.now, lambda n: True)
        else:
            step = reconcile_replicated(self.service, self.tasks, self.nodes, self.now)
        self.tasks = apply_plan(self.tasks, step)
        promoted.merge(step)
        return promoted

    def stop_shutdowns(self) -> None:
        """Agents stop every task told to stop."""
        self._map(lambda t: t.desired_state > S.RUNNING and not t.status.state.terminal,
                  lambda t: set_status(t, state=S.SHUTDOWN, timestamp=self.now))

    def run_new(self, health: str = "") -> list[Task]:
        """Scheduler and agents: every new task told to run gets a node and runs from now."""
        started: list[Task] = []

        def run(t: Task) -> Task:
            node = t.node_id or f"n{(t.slot - 1) % len(self.nodes) + 1}"
            out = set_status(t.model_copy(update={"node_id": node}), state=S.RUNNING,
                             timestamp=self.now, started_at=self.now, health=health)
            started.append(out)
            return out
        self._map(lambda t: t.desired_state is S.RUNNING and t.status.state < S.ASSIGNED, run)
        return started

    def settle(self, health: str = "") -> list[Task]:
        self.stop_shutdowns()
        self.orchestrate()
        return self.run_new(health)

    # -- manual changes
    def fail(self, task_id: str, after: float = 1.0) -> None:
        """The task fails `after` seconds after it started."""
        self.now += after
        self._map(lambda t: t.id == task_id,
                  lambda t: set_status(t, state=S.FAILED, timestamp=self.now, exit_code=1))

    def set_health(self, task_id: str, health: str) -> None:
        self._map(lambda t: t.id == task_id, lambda t: set_status(t, health=health))

    def advance(self, dt: float) -> None:
        self.now += dt

    def _map(self, pred, fn) -> None:  # type: ignore[no-untyped-def]
        self.tasks = [fn(t) if pred(t) else t for t in self.tasks]

    # -- views
    def get(self, task_id: str) -> Task:
        return next(t for t in self.tasks if t.id == task_id)

    def live(self) -> list[Task]:
        return [t for t in self.tasks if t.desired_state in RUNNABLE]

    def live_versions(self) -> dict[int, list[int]]:
        """Slot → spec versions of its runnable tasks."""
        out: dict[int, list[int]] = {}
        for t in sorted(self.live(), key=lambda t: t.created_at):
            out.setdefault(t.slot, []).append(t.spec_version)
        return out

    def state(self) -> str:
        assert self.service.update_status is not None
        return str(self.service.update_status.state)


def shutdowns(plan: Plan) -> list[str]:
    return [t.id for t in plan.update if t.desired_state is S.SHUTDOWN]


def run_to_end(sim: Sim, limit: int = 40) -> None:
    """Alternate updater passes and settling until the update stops being active."""
    for _ in range(limit):
        d = sim.step()
        if sim.state() not in ("updating", "rollback_started"):
            return
        sim.settle()
        sim.advance(d.wake_at - sim.now if d.wake_at and d.wake_at > sim.now else 1.0)
    raise AssertionError(f"update did not finish: {sim.state()}")


# --------------------------------------------------------------------------- stop-first walkthrough


def test_stop_first_one_slot_at_a_time_then_completed() -> None:
    tasks = old_tasks(3)
    sim = Sim(updating(mk_spec(V2), mk_spec(V1)), tasks)

    # Pass 1: slot 1's old task is told to stop; its replacement waits for it.
    d = sim.step()
    assert shutdowns(d.plan) == [tasks[0].id] and len(d.plan.update) == 1
    assert len(d.plan.create) == 1 and not d.plan.delete
    new = d.plan.create[0]
    assert new.slot == 1 and new.node_id == ""
    assert new.desired_state is S.READY and new.replaces == tasks[0].id
    assert new.spec == V2 and new.spec_version == 2 and new.ports == []
    assert d.service is None and d.wake_at is None

    # Nothing more while slot 1 is in flight; the replacement waits for the old task to stop.
    assert not sim.step().plan
    sim.orchestrate()
    assert sim.get(new.id).desired_state is S.READY
    sim.stop_shutdowns()
    assert [t.id for t in sim.orchestrate().update] == [new.id]
    assert sim.get(new.id).desired_state is S.RUNNING
    assert not sim.step().plan  # promoted but not running yet: still in flight
    sim.run_new()

    # Slots 2 and 3 follow, one per pass, lowest first.
    for slot, done in ((2, 1), (3, 2)):
        sim.advance(1)
        d = sim.step()
        assert [t.slot for t in d.plan.create] == [slot]
        old = next(t for t in tasks if t.slot == slot)
        assert shutdowns(d.plan) == [old.id]
        assert d.plan.create[0].replaces == old.id
        assert d.service is not None and d.service.update_status is not None
        assert d.service.update_status.updated == done
        assert sim.state() == "updating"
        assert not sim.step().plan
        sim.settle()
    last_start = sim.now
    assert sim.live_versions() == {1: [2], 2: [2], 3: [2]}

    # Everything current and running: completed once the last has run for `monitor`.
    sim.advance(2)
    d = sim.step()
    assert not d.plan and d.wake_at == last_start + 5.0
    assert sim.state() == "updating" and sim.service.update_status.updated == 3
    sim.now = last_start + 5.0
    d = sim.step()
    assert not d.plan and d.wake_at is None
    assert d.service is not None
    st = d.service.update_status
    assert st is not None and st.state == "completed" and st.completed_at == sim.now
    assert st.message == "update completed" and st.failures == 0 and st.updated == 3
    # A completed update is left alone.
    assert plan_update(sim.service, sim.tasks, THREE, sim.now + 100) == UpdateDecision(Plan(), None, None)


def test_wake_at_is_latest_start_plus_monitor() -> None:
    svc = updating(mk_spec(V2, update=UpdateConfig(monitor=30.0)), mk_spec(V1))
    tasks = [mk_task(s, spec=V2, version=2, created_at=NOW + 1, started_at=NOW + s)
             for s in (1, 2, 3)]
    d = plan_update(svc, tasks, THREE, NOW + 10)
    assert not d.plan and d.wake_at == NOW + 3 + 30.0
    d = plan_update(svc, tasks, THREE, NOW + 33)
    assert d.service is not None and d.service.update_status.state == "completed"


def test_slots_are_taken_in_numeric_order() -> None:
    tasks = [mk_task(s) for s in (10, 2, 9)]
    d = plan_update(updating(mk_spec(V2)), tasks, THREE, NOW)
    assert [t.slot for t in d.plan.create] == [2]


# --------------------------------------------------------------------------- start-first


def start_first_service(replicas: int = 3) -> Service:
    return updating(mk_spec(V2, replicas=replicas, update=UpdateConfig(order="start-first")),
                    mk_spec(V1, replicas=replicas))


def test_start_first_creates_beside_old() -> None:
    tasks = old_tasks(3)
    d = plan_update(start_first_service(), tasks, THREE, NOW)
    assert not d.plan.update and not d.plan.delete
    [new] = d.plan.create
    assert new.slot == 1 and new.desired_state is S.RUNNING and new.replaces == ""
    assert new.spec_version == 2


@pytest.mark.parametrize(("state", "health", "stops_old"), [
    (S.NEW, "", False),
    (S.ASSIGNED, "", False),
    (S.STARTING, "", False),
    (S.RUNNING, "", True),
    (S.RUNNING, "starting", False),
    (S.RUNNING, "unhealthy", False),
    (S.RUNNING, "healthy", True),
])
def test_start_first_stops_old_once_new_is_ready(state: TaskState, health: str,
                                                 stops_old: bool) -> None:
    tasks = old_tasks(3)
    new = mk_task(1, spec=V2, version=2, state=state, health=health, created_at=NOW,
                  started_at=NOW if state is S.RUNNING else None)
    d = plan_update(start_first_service(), tasks + [new], THREE, NOW + 1)
    assert shutdowns(d.plan) == ([tasks[0].id] if stops_old else [])
    assert not d.plan.create  # slot 1 is still in flight this pass


def test_start_first_walkthrough_with_health() -> None:
    tasks = old_tasks(2)
    sim = Sim(start_first_service(replicas=2), tasks)
    [new] = sim.step().plan.create
    [started] = sim.settle(health="starting")
    assert started.id == new.id
    assert sim.get(tasks[0].id).desired_state is S.RUNNING  # both run side by side
    assert not sim.step().plan
    sim.set_health(new.id, "healthy")
    d = sim.step()
    assert shutdowns(d.plan) == [tasks[0].id] and not d.plan.create
    sim.settle()
    sim.advance(1)
    d = sim.step()
    assert [t.slot for t in d.plan.create] == [2] and not shutdowns(d.plan)
    run_to_end(sim)
    assert sim.state() == "completed"
    assert sim.live_versions() == {1: [2], 2: [2]}


# --------------------------------------------------------------------------- parallelism and delay


@pytest.mark.parametrize(("replicas", "parallelism", "first"), [
    (3, 1, [1]),
    (3, 2, [1, 2]),
    (3, 0, [1, 2, 3]),
    (5, 2, [1, 2]),
    (2, 5, [1, 2]),
    (4, 0, [1, 2, 3, 4]),
])
@pytest.mark.parametrize("order", ["stop-first", "start-first"])
def test_parallelism_first_batch(replicas: int, parallelism: int, first: list[int],
                                 order: str) -> None:
    svc = updating(mk_spec(V2, replicas=replicas,
                           update=UpdateConfig(parallelism=parallelism, order=order)),
                   mk_spec(V1, replicas=replicas))
    tasks = old_tasks(replicas)
    d = plan_update(svc, tasks, THREE, NOW)
    assert sorted(t.slot for t in d.plan.create) == first
    expected_stops = sorted(t.id for t in tasks if t.slot in first) if order == "stop-first" else []
    assert sorted(shutdowns(d.plan)) == expected_stops


def test_parallelism_two_is_a_sliding_window() -> None:
    tasks = old_tasks(3)
    sim = Sim(updating(mk_spec(V2, update=UpdateConfig(parallelism=2)), mk_spec(V1)), tasks)
    d = sim.step()
    new1, new2 = sorted(d.plan.create, key=lambda t: t.slot)
    sim.stop_shutdowns()
    sim.orchestrate()
    # Only slot 1's replacement runs; slot 2 is still in flight.
    sim._map(lambda t: t.id == new1.id,
             lambda t: set_status(t, state=S.RUNNING, started_at=sim.now, timestamp=sim.now))
    d = sim.step()
    assert [t.slot for t in d.plan.create] == [3]
    assert not sim.step().plan  # two in flight again


def test_parallelism_zero_then_completed() -> None:
    sim = Sim(updating(mk_spec(V2, update=UpdateConfig(parallelism=0)), mk_spec(V1)), old_tasks(3))
    assert len(sim.step().plan.create) == 3
    run_to_end(sim)
    assert sim.state() == "completed"
    assert sim.live_versions() == {1: [2], 2: [2], 3: [2]}


def test_delay_between_batches() -> None:
    sim = Sim(updating(mk_spec(V2, update=UpdateConfig(delay=10.0)), mk_spec(V1)), old_tasks(3))
    d = sim.step()  # the first batch does not wait
    assert [t.slot for t in d.plan.create] == [1]
    sim.settle()
    done = sim.now
    sim.advance(1)
    d = sim.step()
    assert not d.plan and d.wake_at == done + 10.0
    sim.now = done + 9.99
    assert not sim.step().plan
    sim.now = done + 10.0
    d = sim.step()
    assert [t.slot for t in d.plan.create] == [2] and d.wake_at is None


# --------------------------------------------------------------------------- failures


def failing_sim(action: str, *, replicas: int = 3, parallelism: int = 1,
                ratio: float = 0.0, monitor: float = 5.0) -> Sim:
    cfg = UpdateConfig(failure_action=action, parallelism=parallelism,
                       max_failure_ratio=ratio, monitor=monitor)
    svc = updating(mk_spec(V2, replicas=replicas, update=cfg), mk_spec(V1, replicas=replicas))
    return Sim(svc, old_tasks(replicas))


def test_failure_pauses() -> None:
    sim = failing_sim("pause")
    [new] = sim.step().plan.create
    sim.settle()
    sim.fail(new.id, after=1.0)
    d = sim.step()
    assert not d.plan and d.wake_at is None
    st = sim.service.update_status
    assert st is not None and st.state == "paused" and st.failures == 1
    assert new.id in st.message and "paused" in st.message
    assert sim.service.spec.task == V2 and sim.service.spec_version == 2
    # Paused: the updater does nothing more.
    assert plan_update(sim.service, sim.tasks, THREE, sim.now + 60) == UpdateDecision(Plan(), None, None)


def test_failure_after_monitor_is_not_counted() -> None:
    sim = failing_sim("pause", monitor=5.0)
    [new] = sim.step().plan.create
    sim.settle()
    sim.fail(new.id, after=6.0)
    sim.step()
    assert sim.state() == "updating" and sim.service.update_status.failures == 0


def test_failure_before_start_counts() -> None:
    sim = failing_sim("pause")
    [new] = sim.step().plan.create
    sim.stop_shutdowns()
    sim.orchestrate()
    sim._map(lambda t: t.id == new.id,
             lambda t: set_status(t, state=S.REJECTED, timestamp=sim.now, err="no such image"))
    sim.step()
    assert sim.state() == "paused"


def test_failure_of_task_from_before_the_update_is_ignored() -> None:
    # A current-version task that failed before this update started is not this update's fault.
    svc = updating(mk_spec(V2), mk_spec(V1), started_at=NOW)
    stale = mk_task(1, spec=V2, version=2, state=S.FAILED, created_at=NOW - 50)
    d = plan_update(svc, [stale] + old_tasks(3)[1:], THREE, NOW)
    assert d.service is None or d.service.update_status.state == "updating"


def test_failure_continue_keeps_going() -> None:
    sim = failing_sim("continue")
    [new] = sim.step().plan.create
    sim.settle()
    sim.fail(new.id, after=1.0)
    d = sim.step()
    assert sim.state() == "updating" and sim.service.update_status.failures == 1
    assert d.plan.create == []  # slot 1 is still in flight until the orchestrator restarts it
    sim.settle()  # restart policy replaces the failed task with a current one
    assert sim.live_versions()[1] == [2]
    run_to_end(sim)
    assert sim.state() == "completed"
    assert sim.service.update_status.failures == 1
    assert sim.live_versions() == {1: [2], 2: [2], 3: [2]}


def test_failure_rolls_back() -> None:
    sim = failing_sim("rollback")
    before = sim.service
    [new] = sim.step().plan.create
    sim.settle()
    sim.fail(new.id, after=1.0)
    d = sim.step()
    assert d.service is not None and d.wake_at == sim.now
    svc = d.service
    assert svc.spec == before.previous_spec and svc.previous_spec == before.spec
    assert svc.spec_version == before.spec_version + 1
    st = svc.update_status
    assert st is not None and st.state == "rollback_started" and st.started_at == sim.now
    assert new.id in st.message and "rolled back" in st.message

    # The rollback itself: the failed slot is replaced with the old spec, the untouched slots
    # are re-stamped, and it ends as rollback_completed, still saying why.
    sim.settle()
    run_to_end(sim)
    assert sim.state() == "rollback_completed"
    assert new.id in sim.service.update_status.message
    assert all(t.spec == V1 and t.spec_version == 3 for t in sim.live())
    assert sorted(sim.live_versions()) == [1, 2, 3]


def test_failure_rollback_without_previous_spec_pauses() -> None:
    cfg = UpdateConfig(failure_action="rollback")
    svc = updating(mk_spec(V2, update=cfg), None)
    failed = mk_task(1, spec=V2, version=2, state=S.FAILED, created_at=NOW + 1, started_at=NOW + 1)
    d = plan_update(svc, [failed] + old_tasks(3)[1:], THREE, NOW + 2)
    assert d.service is not None and d.service.update_status.state == "paused"


@pytest.mark.parametrize(("ratio", "failed", "stops"), [
    (0.0, 1, True),
    (0.5, 1, False),   # 1 of 3 tolerated
    (0.5, 2, True),
    (0.34, 1, False),
    (0.33, 1, True),
    (1.0, 3, False),
])
def test_max_failure_ratio(ratio: float, failed: int, stops: bool) -> None:
    sim = failing_sim("pause", parallelism=0, ratio=ratio)
    created = sorted(sim.step().plan.create, key=lambda t: t.slot)
    sim.settle()
    sim.advance(1)
    for t in created[:failed]:
        sim.fail(t.id, after=0.0)
    sim.step()
    assert sim.state() == ("paused" if stops else "updating")
    assert sim.service.update_status.failures == failed


# --------------------------------------------------------------------------- rollback


def test_rollback_function() -> None:
    svc = updating(mk_spec(V2), mk_spec(V1), version=4)
    rb = rollback(svc, NOW + 7)
    assert rb.spec == mk_spec(V1) and rb.previous_spec == mk_spec(V2)
    assert rb.spec_version == 5 and rb.updated_at == NOW + 7
    assert rb.update_status == UpdateStatus(state="rollback_started", started_at=NOW + 7,
                                            message="manually requested rollback")
    assert svc.spec == mk_spec(V2)  # the original is untouched


def test_rollback_restamps_untouched_tasks() -> None:
    # Slot 1 was already updated to v2; slots 2 and 3 never were.
    upd = updating(mk_spec(V2), mk_spec(V1))
    t1 = mk_task(1, spec=V2, version=2, created_at=NOW + 1, started_at=NOW + 2)
    t2, t3 = mk_task(2), mk_task(3)
    svc = rollback(upd, NOW + 10)
    assert svc.spec_version == 3
    d = plan_update(svc, [t1, t2, t3], THREE, NOW + 10)
    restamped = {t.id: t for t in d.plan.update if t.desired_state is S.RUNNING}
    assert set(restamped) == {t2.id, t3.id}
    assert all(t.spec_version == 3 and t.spec == V1 for t in restamped.values())
    assert shutdowns(d.plan) == [t1.id]
    [new] = d.plan.create
    assert new.slot == 1 and new.spec == V1 and new.spec_version == 3 and new.replaces == t1.id


def test_rollback_uses_rollback_config_and_completes() -> None:
    upd = updating(mk_spec(V2, update=UpdateConfig(parallelism=1),
                           rollback_cfg=UpdateConfig(parallelism=0, monitor=2.0)),
                   mk_spec(V1, rollback_cfg=UpdateConfig(parallelism=0, monitor=2.0)))
    tasks = [mk_task(s, spec=V2, version=2, created_at=NOW + 1, started_at=NOW + 2)
             for s in (1, 2)] + [mk_task(3)]
    sim = Sim(rollback(upd, NOW + 10, "because"), tasks, now=NOW + 10)
    d = sim.step()
    assert sorted(t.slot for t in d.plan.create) == [1, 2]  # all at once
    sim.settle()
    last = sim.now
    sim.advance(1)
    d = sim.step()
    assert d.wake_at == last + 2.0
    sim.now = last + 2.0
    sim.step()
    st = sim.service.update_status
    assert st is not None and st.state == "rollback_completed" and st.message == "because"
    assert st.completed_at == sim.now
    assert all(t.spec == V1 and t.spec_version == 3 for t in sim.live())


def test_rollback_that_fails_pauses_instead_of_rolling_back_again() -> None:
    cfg = UpdateConfig(failure_action="rollback")
    upd = updating(mk_spec(V2, rollback_cfg=cfg), mk_spec(V1, rollback_cfg=cfg))
    svc = rollback(upd, NOW)
    failed = mk_task(1, spec=V1, version=3, state=S.FAILED, created_at=NOW + 1,
                     started_at=NOW + 1)
    d = plan_update(svc, [failed, mk_task(2, spec=V2, version=2), mk_task(3, spec=V2, version=2)],
                    THREE, NOW + 2)
    assert d.service is not None
    assert d.service.update_status.state == "rollback_paused"
    assert d.service.spec == mk_spec(V1, rollback_cfg=cfg)  # no second rollback


# --------------------------------------------------------------------------- force


def test_force_replaces_tasks_with_identical_spec() -> None:
    svc = updating(mk_spec(V1), mk_spec(V1), version=2, force_version=2)
    tasks = old_tasks(3)
    d = plan_update(svc, tasks, THREE, NOW)
    assert [t.slot for t in d.plan.create] == [1]
    assert shutdowns(d.plan) == [tasks[0].id]
    assert all(t.desired_state is S.SHUTDOWN for t in d.plan.update)  # nothing re-stamped


def test_an_update_replaces_tasks_even_if_only_placement_changed() -> None:
    # Same task spec, new version: what a placement-only update looks like. The tasks must
    # move under the new constraints, so they are replaced, not re-stamped.
    svc = updating(mk_spec(V1), mk_spec(V1), version=2)
    tasks = old_tasks(3)
    d = plan_update(svc, tasks, THREE, NOW)
    assert len(d.plan.create) == 1 and d.plan.create[0].spec_version == 2
    assert [t.desired_state for t in d.plan.update] == [S.SHUTDOWN]


def test_force_walkthrough() -> None:
    sim = Sim(updating(mk_spec(V1, update=UpdateConfig(parallelism=2)), mk_spec(V1),
                       force_version=2), old_tasks(3))
    run_to_end(sim)
    assert sim.state() == "completed"
    assert all(t.spec_version == 2 and t.created_at >= NOW for t in sim.live())


# --------------------------------------------------------------------------- global services


def test_global_slots_keyed_by_node() -> None:
    spec2 = mk_spec(V2, mode=ServiceMode.GLOBAL)
    tasks = [mk_task(0, node=n) for n in ("n2", "n1", "n3")]
    sim = Sim(updating(spec2, mk_spec(V1, mode=ServiceMode.GLOBAL)), tasks)
    d = sim.step()
    [new] = d.plan.create
    assert new.slot == 0 and new.node_id == "n1" and new.desired_state is S.READY
    assert new.replaces == tasks[1].id and shutdowns(d.plan) == [tasks[1].id]
    sim.settle()
    sim.advance(1)
    d = sim.step()
    assert [t.node_id for t in d.plan.create] == ["n2"]
    run_to_end(sim)
    assert sim.state() == "completed"
    live = sim.live()
    assert sorted(t.node_id for t in live) == ["n1", "n2", "n3"]
    assert all(t.spec_version == 2 and t.slot == 0 for t in live)


def test_global_task_on_down_node_is_not_a_slot() -> None:
    nodes = nodes_of(mk_node(1), mk_node(2, NodeState.DOWN))
    spec2 = mk_spec(V2, mode=ServiceMode.GLOBAL, update=UpdateConfig(parallelism=0))
    tasks = [mk_task(0, node="n1"), mk_task(0, node="n2")]
    d = plan_update(updating(spec2, mk_spec(V1, mode=ServiceMode.GLOBAL)), tasks, nodes, NOW)
    assert [t.node_id for t in d.plan.create] == ["n1"]


# --------------------------------------------------------------------------- not updating


@pytest.mark.parametrize("state", [None, "completed", "paused", "rollback_paused",
                                   "rollback_completed"])
def test_not_updating_is_empty_decision(state: str | None) -> None:
    svc = updating(mk_spec(V2), mk_spec(V1), state=state or "completed")
    if state is None:
        svc = svc.model_copy(update={"update_status": None})
    d = plan_update(svc, old_tasks(3), THREE, NOW)
    assert d == UpdateDecision(Plan(), None, None)


# --------------------------------------------------------------------------- promote_delayed


def replacement_for(old: Task | None, **kw: object) -> Task:
    return mk_task(1, spec=V2, version=2, desired=S.READY, state=S.NEW, started_at=None,
                   created_at=NOW).model_copy(update={"replaces": old.id if old else "gone",
                                                      "node_id": "", **kw})


@pytest.mark.parametrize(("old_state", "promoted"), [
    (S.RUNNING, False),
    (S.ASSIGNED, False),
    (S.STARTING, False),
    (S.SHUTDOWN, True),
    (S.FAILED, True),
    (S.COMPLETE, True),
    (S.PENDING, True),  # never reached a node: nothing to wait for
    (S.NEW, True),
])
def test_promote_waits_for_replaced_task(old_state: TaskState, promoted: bool) -> None:
    old = mk_task(1, desired=S.SHUTDOWN, state=old_state)
    new = replacement_for(old)
    plan = promote_delayed([old, new], NOW, THREE)
    assert [(t.id, t.desired_state) for t in plan.update] == ([(new.id, S.RUNNING)] if promoted else [])


def test_promote_when_replaced_task_deleted() -> None:
    new = replacement_for(None)
    plan = promote_delayed([new], NOW, THREE)
    assert [t.id for t in plan.update] == [new.id]


def test_promote_when_replaced_tasks_node_is_down() -> None:
    old = mk_task(1, node="n2", desired=S.SHUTDOWN, state=S.RUNNING)
    new = replacement_for(old)
    down = nodes_of(mk_node(1), mk_node(2, NodeState.DOWN))
    assert [t.id for t in promote_delayed([old, new], NOW, down).update] == [new.id]
    gone = nodes_of(mk_node(1))
    assert [t.id for t in promote_delayed([old, new], NOW, gone).update] == [new.id]
    # Without node information the orchestrator cannot tell: it keeps waiting.
    assert not promote_delayed([old, new], NOW)
    assert not promote_delayed([old, new], NOW, THREE)


def test_promote_respects_restart_delay_even_with_replaces() -> None:
    old = mk_task(1, desired=S.SHUTDOWN, state=S.SHUTDOWN)
    new = replacement_for(old, restart_at=NOW + 5)
    assert not promote_delayed([old, new], NOW, THREE)
    assert promote_delayed([old, new], NOW + 5, THREE).update[0].id == new.id


# --------------------------------------------------------------------------- control API


@pytest.fixture
def api() -> ControlAPI:
    a = ControlAPI(MemoryStore())
    a.init_cluster(hostname="m1", addr="127.0.0.1", heartbeat_period=1.0, engine_version="test", csr=CSR)
    return a


def api_spec(image: str = "app:1", **kw: object) -> ServiceSpec:
    return ServiceSpec(name="web", task=ContainerSpec(image=image), replicas=2, **kw)


def test_update_replicas_only_is_no_rolling_update(api: ControlAPI) -> None:
    svc = api.create_service(api_spec())
    out = api.update_service("web", api_spec().model_copy(update={"replicas": 5}))
    assert out.spec.replicas == 5
    assert out.spec_version == svc.spec_version == 1
    assert out.update_status is None and out.force_version == 0
    assert api.service("web").spec.replicas == 5


def test_update_identical_spec_changes_nothing(api: ControlAPI) -> None:
    svc = api.create_service(api_spec())
    out = api.update_service("web", api_spec())
    assert out == svc


def test_update_image_starts_rolling_update(api: ControlAPI) -> None:
    svc = api.create_service(api_spec())
    out = api.update_service(svc.id, api_spec("app:2"))
    assert out.spec.task.image == "app:2"
    assert out.spec_version == 2 and out.force_version == 0
    assert out.previous_spec == svc.spec
    assert out.update_status is not None and out.update_status.state == "updating"
    assert api.service("web") == out


@pytest.mark.parametrize("change", [
    {"task": ContainerSpec(image="app:1", env=["A=1"])},
    {"placement": Placement(constraints=["node.role==manager"])},
    {"endpoint_mode": "dnsrr"},
])
def test_task_changes_start_rolling_update(api: ControlAPI, change: dict[str, object]) -> None:
    api.create_service(api_spec())
    out = api.update_service("web", api_spec().model_copy(update=change))
    assert out.spec_version == 2 and out.update_status.state == "updating"


def test_update_force_bumps_and_sets_force_version(api: ControlAPI) -> None:
    svc = api.create_service(api_spec())
    out = api.update_service("web", api_spec(), force=True)
    assert out.spec_version == 2 and out.force_version == 2
    assert out.spec == svc.spec and out.previous_spec == svc.spec
    assert out.update_status.state == "updating"
    again = api.update_service("web", api_spec("app:3"), force=True)
    assert again.spec_version == 3 and again.force_version == 3


def test_update_mode_refused(api: ControlAPI) -> None:
    api.create_service(api_spec())
    with pytest.raises(InvalidArgument, match="mode"):
        api.update_service("web", ServiceSpec(name="web", task=ContainerSpec(image="app:1"),
                                              mode=ServiceMode.GLOBAL, replicas=1))
    assert api.service("web").spec.mode is ServiceMode.REPLICATED


def test_update_networks_refused(api: ControlAPI) -> None:
    api.create_network(NetworkSpec(name="backend", subnet="10.1.0.0/24"))
    api.create_network(NetworkSpec(name="front", subnet="10.2.0.0/24"))
    api.create_service(api_spec(networks=["backend"]))
    with pytest.raises(InvalidArgument, match="networks"):
        api.update_service("web", api_spec(networks=["front"]))
    with pytest.raises(InvalidArgument, match="networks"):
        api.update_service("web", api_spec())
    # Naming the same network (by name again) is no change.
    out = api.update_service("web", api_spec("app:2", networks=["backend"]))
    assert out.spec_version == 2


def test_rollback_service_restores_previous(api: ControlAPI) -> None:
    svc = api.create_service(api_spec())
    upd = api.update_service("web", api_spec("app:2"))
    rb = api.rollback_service("web")
    assert rb.spec == svc.spec and rb.previous_spec == upd.spec
    assert rb.spec_version == 3
    assert rb.update_status is not None and rb.update_status.state == "rollback_started"
    assert api.service("web") == rb


def test_rollback_without_previous_spec_refused(api: ControlAPI) -> None:
    api.create_service(api_spec())
    with pytest.raises(InvalidArgument, match="no previous spec"):
        api.rollback_service("web")


# --------------------------------------------------------------------------- known problems

