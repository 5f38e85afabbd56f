"""Pure reconciliation: replicated and global services, restart supervision, history, reaping."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from corral.api.types import (
    ContainerSpec,
    Node,
    NodeAvailability,
    NodeDescription,
    NodeSpec,
    NodeState,
    NodeStatus,
    Placement,
    RestartCondition,
    RestartPolicy,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
)
from corral.manager.constraints import node_matches, parse_constraints
from corral.manager.orchestrator import Orchestrator
from corral.manager.reconcile import (
    Plan,
    next_restart,
    promote_delayed,
    reap,
    reap_orphans,
    reconcile_global,
    reconcile_replicated,
    supervise,
)
from corral.store.base import MemoryStore, WriteTx

NOW = 1_000.0
S = TaskState


# --------------------------------------------------------------------------- helpers


def mk_node(
    n: int,
    *,
    state: NodeState = NodeState.READY,
    availability: NodeAvailability = NodeAvailability.ACTIVE,
    labels: dict[str, str] | None = None,
) -> Node:
    return Node(
        id=f"n{n}",
        description=NodeDescription(hostname=f"node{n}", addr=f"10.0.0.{n}"),
        spec=NodeSpec(availability=availability, labels=labels or {}),
        status=NodeStatus(state=state),
    )


def nodes_of(*nodes: Node) -> dict[str, Node]:
    return {n.id: n for n in nodes}


def mk_service(
    replicas: int = 3,
    *,
    mode: ServiceMode = ServiceMode.REPLICATED,
    condition: RestartCondition = RestartCondition.ANY,
    delay: float = 5.0,
    max_attempts: int = 0,
    constraints: list[str] | None = None,
) -> Service:
    return Service(
        id="svc",
        spec=ServiceSpec(
            name="web",
            task=ContainerSpec(image="whoami"),
            mode=mode,
            replicas=replicas if mode is ServiceMode.REPLICATED else 0,
            restart_policy=RestartPolicy(condition=condition, delay=delay,
                                         max_attempts=max_attempts),
            placement=Placement(constraints=constraints or []),
        ),
    )


_counter = 0


def mk_task(
    slot: int = 1,
    *,
    node: str = "n1",
    desired: TaskState = S.RUNNING,
    state: TaskState = S.RUNNING,
    attempt: int = 0,
    created_at: float | None = None,
    restart_at: float = 0.0,
    service_id: str = "svc",
) -> Task:
    global _counter
    _counter += 1
    return Task(
        id=f"t{_counter:04d}",
        version=1,
        created_at=created_at if created_at is not None else NOW - 100 + _counter * 1e-3,
        service_id=service_id,
        service_name="web",
        slot=slot,
        node_id=node,
        spec=ContainerSpec(image="whoami"),
        desired_state=desired,
        status=TaskStatus(state=state),
        attempt=attempt,
        restart_at=restart_at,
    )


def apply(tasks: list[Task], plan: Plan) -> list[Task]:
    """The task list after committing `plan` (as the orchestrator's commit would)."""
    by_id = {t.id: t for t in tasks}
    for t in plan.update:
        assert t.id in by_id, f"update of unknown task {t.id}"
        by_id[t.id] = t
    for t in plan.create:
        assert t.id not in by_id
        by_id[t.id] = t
    for tid in plan.delete:
        by_id.pop(tid, None)
    return list(by_id.values())


def all_match(service: Service) -> Callable[[Node], bool]:
    cons = parse_constraints(service.spec.placement.constraints)
    return lambda n: node_matches(cons, n)


def updated(plan: Plan) -> dict[str, TaskState]:
    return {t.id: t.desired_state for t in plan.update}


def live(tasks: list[Task]) -> list[Task]:
    return [t for t in tasks if t.desired_state in (S.RUNNING, S.READY)]


THREE = nodes_of(mk_node(1), mk_node(2), mk_node(3))


# --------------------------------------------------------------------------- replicated: scale


def test_create_three_replicas_from_nothing() -> None:
    plan = reconcile_replicated(mk_service(3), [], THREE, NOW)
    assert not plan.update and not plan.delete
    assert sorted(t.slot for t in plan.create) == [1, 2, 3]
    for t in plan.create:
        assert t.desired_state is S.RUNNING
        assert t.status.state is S.NEW
        assert t.service_id == "svc" and t.service_name == "web"
        assert t.node_id == "" and t.attempt == 0 and t.restart_at == 0.0
    assert len({t.id for t in plan.create}) == 3


@pytest.mark.parametrize(
    ("existing", "want", "created", "removed"),
    [
        ([1, 2, 3, 4, 5], 1, [], [2, 3, 4, 5]),
        ([1, 2, 3], 3, [], []),
        ([1, 2, 3], 0, [], [1, 2, 3]),
        ([1, 3], 4, [2, 4], []),
        ([2, 5], 4, [1, 3], []),
        ([], 2, [1, 2], []),
        ([1, 2, 3, 4], 2, [], [3, 4]),
    ],
)
def test_scale(existing: list[int], want: int, created: list[int], removed: list[int]) -> None:
    tasks = [mk_task(s, node=f"n{(s - 1) % 3 + 1}") for s in existing]
    plan = reconcile_replicated(mk_service(want), tasks, THREE, NOW)
    assert sorted(t.slot for t in plan.create) == created
    by_slot = {t.slot: t for t in tasks}
    marks = updated(plan)
    assert sorted(by_slot[s].slot for s in by_slot if marks.get(by_slot[s].id) is S.REMOVE) == removed
    assert set(marks.values()) <= {S.REMOVE}
    # Running on a live node: marked, not deleted yet.
    assert plan.delete == []
    slots = sorted(t.slot for t in live(apply(tasks, plan)))
    assert slots == sorted(set(existing) - set(removed) | set(created))
    assert len(slots) == want


def test_scale_down_deletes_never_assigned_tasks_at_once() -> None:
    tasks = [mk_task(s, node="", state=S.PENDING) for s in (1, 2, 3)]
    plan = reconcile_replicated(mk_service(1), tasks, THREE, NOW)
    assert updated(plan) == {tasks[1].id: S.REMOVE, tasks[2].id: S.REMOVE}
    assert sorted(plan.delete) == sorted([tasks[1].id, tasks[2].id])
    assert [t.slot for t in apply(tasks, plan)] == [1]


# --------------------------------------------------------------------------- restart supervision


@pytest.mark.parametrize(
    ("condition", "observed", "max_attempts", "attempt", "restarted"),
    [
        (RestartCondition.ANY, S.FAILED, 0, 0, True),
        (RestartCondition.ANY, S.COMPLETE, 0, 0, True),
        (RestartCondition.ANY, S.REJECTED, 0, 7, True),
        (RestartCondition.ON_FAILURE, S.FAILED, 0, 0, True),
        (RestartCondition.ON_FAILURE, S.REJECTED, 0, 0, True),
        (RestartCondition.ON_FAILURE, S.COMPLETE, 0, 0, False),
        (RestartCondition.NONE, S.FAILED, 0, 0, False),
        (RestartCondition.NONE, S.COMPLETE, 0, 0, False),
        (RestartCondition.ANY, S.FAILED, 3, 2, True),
        (RestartCondition.ANY, S.FAILED, 3, 3, False),
        (RestartCondition.ON_FAILURE, S.FAILED, 1, 1, False),
    ],
)
def test_restart_policy(condition: RestartCondition, observed: TaskState, max_attempts: int,
                        attempt: int, restarted: bool) -> None:
    svc = mk_service(1, condition=condition, max_attempts=max_attempts, delay=5.0)
    old = mk_task(1, state=observed, attempt=attempt)
    plan = reconcile_replicated(svc, [old], THREE, NOW)
    if restarted:
        assert updated(plan) == {old.id: S.SHUTDOWN}
        assert len(plan.create) == 1
        new = plan.create[0]
        assert new.slot == 1
        assert new.node_id == ""
        assert new.desired_state is S.READY
        assert new.restart_at == NOW + 5.0
        assert new.attempt == attempt + 1
        assert new.status.state is S.NEW
    else:
        # The slot stays occupied by the stopped task: nothing new, nothing shut down.
        assert not plan, plan


def test_restart_without_delay_is_running_at_once() -> None:
    svc = mk_service(1, delay=0.0)
    old = mk_task(1, state=S.FAILED, attempt=2)
    plan = reconcile_replicated(svc, [old], THREE, NOW)
    assert updated(plan) == {old.id: S.SHUTDOWN}
    [new] = plan.create
    assert new.desired_state is S.RUNNING
    assert new.restart_at == 0.0
    assert new.attempt == 3


def test_not_restarted_slot_is_not_refilled_with_more_replicas() -> None:
    svc = mk_service(2, condition=RestartCondition.NONE)
    done = mk_task(1, state=S.FAILED)
    plan = reconcile_replicated(svc, [done], THREE, NOW)
    assert [t.slot for t in plan.create] == [2]
    assert not plan.update


@pytest.mark.parametrize(
    ("node_state", "availability", "deleted"),
    [
        (NodeState.DOWN, NodeAvailability.ACTIVE, False),
        (NodeState.READY, NodeAvailability.ACTIVE, True),
        (NodeState.READY, NodeAvailability.DRAIN, False),
        (NodeState.DOWN, NodeAvailability.DRAIN, False),
    ],
)
def test_task_moved_off_lost_or_drained_node(node_state: NodeState,
                                              availability: NodeAvailability,
                                              deleted: bool) -> None:
    nodes = nodes_of(mk_node(1, state=node_state, availability=availability), mk_node(2))
    if deleted:
        del nodes["n1"]
    svc = mk_service(2, delay=30.0)
    moved = mk_task(1, node="n1", attempt=4)
    stays = mk_task(2, node="n2")
    plan = reconcile_replicated(svc, [moved, stays], nodes, NOW)
    assert updated(plan) == {moved.id: S.SHUTDOWN}
    [new] = plan.create
    assert new.slot == 1
    assert new.desired_state is S.RUNNING  # no restart delay
    assert new.restart_at == 0.0
    assert new.attempt == 4  # not a failure: attempt unchanged
    assert new.node_id == ""


def test_task_on_ready_pause_node_is_left_alone() -> None:
    nodes = nodes_of(mk_node(1, availability=NodeAvailability.PAUSE))
    t = mk_task(1, node="n1")
    assert not reconcile_replicated(mk_service(1), [t], nodes, NOW)


def test_supervise_ignores_tasks_not_meant_to_run() -> None:
    svc = mk_service(1)
    tasks = [mk_task(1, desired=S.SHUTDOWN, state=S.FAILED),
             mk_task(2, desired=S.REMOVE, state=S.FAILED)]
    assert not supervise(svc, tasks, THREE, NOW, key=lambda t: (t.slot, ""))


# --------------------------------------------------------------------------- delayed restarts


@pytest.mark.parametrize(
    ("restart_at", "now", "promoted"),
    [(NOW + 5, NOW, False), (NOW + 5, NOW + 4.99, False), (NOW + 5, NOW + 5, True),
     (NOW + 5, NOW + 60, True), (0.0, NOW, True)],
)
def test_promote_delayed(restart_at: float, now: float, promoted: bool) -> None:
    t = mk_task(1, desired=S.READY, state=S.NEW, restart_at=restart_at)
    plan = promote_delayed([t], now)
    assert updated(plan) == ({t.id: S.RUNNING} if promoted else {})
    assert not plan.create and not plan.delete


def test_promote_delayed_only_touches_ready_tasks() -> None:
    tasks = [mk_task(1, desired=d, state=S.NEW, restart_at=NOW - 1)
             for d in (S.RUNNING, S.SHUTDOWN, S.REMOVE)]
    assert not promote_delayed(tasks, NOW)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([], None),
        ([(S.RUNNING, 0.0)], None),
        ([(S.READY, NOW + 3), (S.READY, NOW + 1), (S.RUNNING, NOW - 50)], NOW + 1),
        ([(S.READY, 0.0), (S.READY, NOW + 7)], NOW + 7),
        ([(S.SHUTDOWN, NOW + 1)], None),
    ],
)
def test_next_restart(specs: list[tuple[TaskState, float]], expected: float | None) -> None:
    tasks = [mk_task(1, desired=d, restart_at=r) for d, r in specs]
    assert next_restart(tasks) == expected


def test_delayed_restart_end_to_end() -> None:
    svc = mk_service(1, delay=5.0)
    tasks = [mk_task(1, state=S.FAILED)]
    tasks = apply(tasks, reconcile_replicated(svc, tasks, THREE, NOW))
    assert next_restart(tasks) == NOW + 5
    assert not promote_delayed(tasks, NOW + 1)
    assert not reconcile_replicated(svc, tasks, THREE, NOW + 1)
    tasks = apply(tasks, promote_delayed(tasks, NOW + 5))
    assert next_restart(tasks) is None
    assert [t.desired_state for t in tasks if t.slot == 1 and t.attempt == 1] == [S.RUNNING]


# --------------------------------------------------------------------------- history and reaping


@pytest.mark.parametrize(("stopped", "limit", "kept"), [(7, 5, 5), (5, 5, 5), (3, 5, 3),
                                                         (4, 1, 1), (2, 0, 0)])
def test_history_keeps_newest(stopped: int, limit: int, kept: int) -> None:
    old = [mk_task(1, desired=S.SHUTDOWN, state=S.FAILED, created_at=NOW - 100 + i)
           for i in range(stopped)]
    current = mk_task(1, created_at=NOW)
    plan = reconcile_replicated(mk_service(1), [*old, current], THREE, NOW, history_limit=limit)
    assert not plan.create and not plan.update
    oldest_first = [t.id for t in old]
    assert sorted(plan.delete) == sorted(oldest_first[: stopped - kept])


def test_history_is_per_slot_and_ignores_unstopped() -> None:
    slot1 = [mk_task(1, desired=S.SHUTDOWN, state=S.FAILED, created_at=NOW - 50 + i)
             for i in range(3)]
    slot2 = [mk_task(2, desired=S.SHUTDOWN, state=S.COMPLETE, created_at=NOW - 50 + i)
             for i in range(3)]
    # Desired SHUTDOWN but still running on a live node: not history yet.
    stopping = mk_task(1, desired=S.SHUTDOWN, state=S.RUNNING, created_at=NOW - 100)
    plan = reap([*slot1, *slot2, stopping], THREE, 2, key=lambda t: str(t.slot))
    assert sorted(plan.delete) == sorted([slot1[0].id, slot2[0].id])


@pytest.mark.parametrize(
    ("observed", "node", "node_state", "deleted"),
    [
        (S.SHUTDOWN, "n1", NodeState.READY, True),
        (S.FAILED, "n1", NodeState.READY, True),
        (S.COMPLETE, "n1", NodeState.READY, True),
        (S.PENDING, "", NodeState.READY, True),
        (S.NEW, "", NodeState.READY, True),
        (S.RUNNING, "n1", NodeState.DOWN, True),
        (S.RUNNING, "gone", NodeState.READY, True),
        (S.RUNNING, "n1", NodeState.READY, False),
        (S.ASSIGNED, "n1", NodeState.READY, False),
        (S.STARTING, "n1", NodeState.DISCONNECTED, False),
    ],
)
def test_reap_removed(observed: TaskState, node: str, node_state: NodeState,
                      deleted: bool) -> None:
    nodes = nodes_of(mk_node(1, state=node_state))
    t = mk_task(2, node=node, desired=S.REMOVE, state=observed)
    plan = reap([t], nodes, 5, key=lambda t: str(t.slot))
    assert plan.delete == ([t.id] if deleted else [])
    assert not plan.update and not plan.create


def test_reap_orphans_marks_then_deletes() -> None:
    running = mk_task(1, node="n1", state=S.RUNNING)
    done = mk_task(2, node="n1", desired=S.SHUTDOWN, state=S.FAILED)
    unassigned = mk_task(3, node="", state=S.PENDING)
    tasks = [running, done, unassigned]
    first = reap_orphans(tasks, THREE)
    assert updated(first) == {t.id: S.REMOVE for t in tasks}
    assert first.delete == []
    tasks = apply(tasks, first)
    second = reap_orphans(tasks, THREE)
    assert not second.update
    assert sorted(second.delete) == sorted([done.id, unassigned.id])
    tasks = apply(tasks, second)
    # The agent reports the running one stopped: now it goes too.
    [still] = tasks
    stopped = still.model_copy(update={"status": TaskStatus(state=S.SHUTDOWN)})
    assert reap_orphans([stopped], THREE).delete == [still.id]


def test_reap_orphans_on_lost_node() -> None:
    t = mk_task(1, node="n9", desired=S.REMOVE, state=S.RUNNING)
    assert reap_orphans([t], THREE).delete == [t.id]


# --------------------------------------------------------------------------- global services


def test_global_one_task_per_ready_active_matching_node() -> None:
    nodes = nodes_of(
        mk_node(1),
        mk_node(2, labels={"zone": "a"}),
        mk_node(3, availability=NodeAvailability.PAUSE),
        mk_node(4, availability=NodeAvailability.DRAIN),
        mk_node(5, state=NodeState.DOWN),
        mk_node(6, state=NodeState.UNKNOWN),
        mk_node(7, labels={"zone": "a"}),
    )
    svc = mk_service(mode=ServiceMode.GLOBAL)
    plan = reconcile_global(svc, [], nodes, NOW, all_match(svc))
    assert sorted(t.node_id for t in plan.create) == ["n1", "n2", "n7"]
    assert all(t.slot == 0 and t.desired_state is S.RUNNING for t in plan.create)

    svc_c = mk_service(mode=ServiceMode.GLOBAL, constraints=["node.labels.zone==a"])
    plan = reconcile_global(svc_c, [], nodes, NOW, all_match(svc_c))
    assert sorted(t.node_id for t in plan.create) == ["n2", "n7"]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (mk_node(1), None),
        (mk_node(1, availability=NodeAvailability.PAUSE), None),  # existing task kept
        (mk_node(1, availability=NodeAvailability.DRAIN), S.SHUTDOWN),
        (mk_node(1, labels={"zone": "b"}), S.SHUTDOWN),  # stops matching
        (mk_node(1, state=NodeState.DOWN), S.SHUTDOWN),
    ],
)
def test_global_existing_task(node: Node, expected: TaskState | None) -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL, constraints=["node.labels.zone!=b"])
    t = mk_task(0, node="n1")
    plan = reconcile_global(svc, [t], nodes_of(node), NOW, all_match(svc))
    assert updated(plan) == ({} if expected is None else {t.id: expected})
    assert plan.create == []  # never a second task on the node, never a task elsewhere


def test_global_task_on_deleted_node_is_removed() -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL)
    t = mk_task(0, node="n9")
    plan = reconcile_global(svc, [t], THREE, NOW, all_match(svc))
    assert updated(plan).get(t.id) is S.REMOVE
    assert plan.delete == [t.id]  # its node is gone: nothing left to stop


def test_global_task_on_deleted_node_without_restart_is_removed() -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL, condition=RestartCondition.NONE)
    t = mk_task(0, node="n9")
    plan = reconcile_global(svc, [t], nodes_of(mk_node(1)), NOW, all_match(svc))
    assert updated(plan) == {t.id: S.REMOVE}
    assert plan.delete == [t.id]  # its node is gone: nothing left to stop
    assert [c.node_id for c in plan.create] == ["n1"]


def test_global_failed_task_restarts_on_same_node() -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL, delay=2.0)
    t = mk_task(0, node="n2", state=S.FAILED, attempt=1)
    plan = reconcile_global(svc, [t], nodes_of(mk_node(2)), NOW, all_match(svc))
    assert updated(plan) == {t.id: S.SHUTDOWN}
    [new] = plan.create
    assert (new.node_id, new.slot, new.desired_state, new.restart_at, new.attempt) == (
        "n2", 0, S.READY, NOW + 2.0, 2)


def test_global_node_back_up_gets_a_new_task() -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL)
    t = mk_task(0, node="n1")
    tasks = apply([t], reconcile_global(svc, [t], nodes_of(mk_node(1, state=NodeState.DOWN)),
                                        NOW, all_match(svc)))
    assert live(tasks) == []
    plan = reconcile_global(svc, tasks, nodes_of(mk_node(1)), NOW, all_match(svc))
    assert [c.node_id for c in plan.create] == ["n1"]


# --------------------------------------------------------------------------- idempotence


def _replicated_scenarios() -> list[tuple[str, Service, list[Task], dict[str, Node]]]:
    return [
        ("fresh", mk_service(3), [], THREE),
        ("scale-down", mk_service(1), [mk_task(s) for s in range(1, 6)], THREE),
        ("scale-up", mk_service(5), [mk_task(2), mk_task(4)], THREE),
        ("failed", mk_service(2), [mk_task(1, state=S.FAILED), mk_task(2)], THREE),
        ("failed-no-delay", mk_service(1, delay=0), [mk_task(1, state=S.FAILED)], THREE),
        ("on-failure-complete", mk_service(1, condition=RestartCondition.ON_FAILURE),
         [mk_task(1, state=S.COMPLETE)], THREE),
        ("down-node", mk_service(2), [mk_task(1, node="n1"), mk_task(2, node="n2")],
         nodes_of(mk_node(1, state=NodeState.DOWN), mk_node(2))),
        ("drained", mk_service(1), [mk_task(1, node="n1")],
         nodes_of(mk_node(1, availability=NodeAvailability.DRAIN))),
        ("history", mk_service(1),
         [mk_task(1, desired=S.SHUTDOWN, state=S.FAILED) for _ in range(7)], THREE),
        ("removed-pending", mk_service(0), [mk_task(1, node="", state=S.PENDING)], THREE),
    ]


@pytest.mark.parametrize(
    ("name", "svc", "tasks", "nodes"),
    _replicated_scenarios(),
    ids=[s[0] for s in _replicated_scenarios()],
)
def test_replicated_idempotent(name: str, svc: Service, tasks: list[Task],
                               nodes: dict[str, Node]) -> None:
    first = reconcile_replicated(svc, tasks, nodes, NOW)
    after = apply(tasks, first)
    second = reconcile_replicated(svc, after, nodes, NOW)
    assert not second, second


@pytest.mark.parametrize(
    "nodes",
    [
        nodes_of(mk_node(1), mk_node(2), mk_node(3)),
        nodes_of(mk_node(1), mk_node(2, availability=NodeAvailability.DRAIN)),
        nodes_of(mk_node(1), mk_node(2, labels={"zone": "b"})),
        nodes_of(mk_node(1, state=NodeState.DOWN), mk_node(2, availability=NodeAvailability.PAUSE)),
    ],
)
def test_global_idempotent(nodes: dict[str, Node]) -> None:
    svc = mk_service(mode=ServiceMode.GLOBAL, constraints=["node.labels.zone!=b"])
    tasks = [mk_task(0, node="n1"), mk_task(0, node="n2"), mk_task(0, node="n3", state=S.FAILED)]
    after = apply(tasks, reconcile_global(svc, tasks, nodes, NOW, all_match(svc)))
    assert not reconcile_global(svc, after, nodes, NOW, all_match(svc))


# --------------------------------------------------------------------------- orchestrator tick


def _seed(store: MemoryStore, svc: Service, tasks: list[Task], nodes: list[Node]) -> None:
    def write(tx: WriteTx) -> None:
        tx.create(svc)
        for n in nodes:
            tx.create(n)
        for t in tasks:
            tx.create(t.model_copy(update={"version": 0}))
    store.update(write)


def test_orchestrator_tick_commits_plan_and_converges() -> None:
    store = MemoryStore()
    _seed(store, mk_service(3), [mk_task(1, state=S.FAILED)], list(THREE.values()))
    orch = Orchestrator(store)
    orch.tick(NOW)
    tasks = store.view().all(Task)
    assert sorted(t.slot for t in live(tasks)) == [1, 2, 3]
    # The first tick's wake time is computed from the view before its own commit; the commit
    # wakes the component again, and that tick reports the delayed replacement's time.
    plan, wake = orch.plan(NOW)
    assert not plan
    assert wake == NOW + 5.0
    assert orch.tick(NOW) == NOW + 5.0
    orch.tick(NOW + 5.0)
    assert all(t.desired_state is not S.READY for t in store.view().all(Task))


def test_orchestrator_promote_and_scale_down_same_task() -> None:
    store = MemoryStore()
    due = mk_task(2, node="n2", desired=S.READY, state=S.ASSIGNED, restart_at=NOW - 1)
    _seed(store, mk_service(1), [mk_task(1), due], list(THREE.values()))
    Orchestrator(store).tick(NOW)  # raises SequenceConflict today
    assert store.view().must_get(Task, due.id).desired_state is S.REMOVE
