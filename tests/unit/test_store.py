"""The store: versions, optimistic concurrency, atomic transactions, watches, SQLite persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.api.errors import Conflict, NotFound, SequenceConflict
from corral.api.types import (
    Cluster,
    ContainerSpec,
    Node,
    NodeAvailability,
    NodeDescription,
    NodeRole,
    NodeSpec,
    NodeState,
    NodeStatus,
    PortConfig,
    RestartCondition,
    RestartPolicy,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
)
from corral.store.base import Action, Event, MemoryStore, Store, Watch, WriteTx, kind_of
from corral.store.sqlite import SQLiteStore

Factory = Callable[[], Store]


def mk_node(n: int) -> Node:
    return Node(
        id=f"node{n}",
        description=NodeDescription(hostname=f"host{n}", addr=f"10.0.0.{n}", engine_version="1.0"),
        spec=NodeSpec(role=NodeRole.WORKER if n else NodeRole.MANAGER,
                      availability=NodeAvailability.PAUSE, labels={"zone": f"z{n}"}),
        status=NodeStatus(state=NodeState.READY, message="ok"),
    )


def mk_service(name: str = "web") -> Service:
    return Service(
        id=f"svc-{name}",
        spec=ServiceSpec(
            name=name,
            labels={"tier": "front"},
            task=ContainerSpec(image="whoami", args=["--port", "0"], env=["A=1"]),
            mode=ServiceMode.REPLICATED,
            replicas=3,
            restart_policy=RestartPolicy(condition=RestartCondition.ON_FAILURE, delay=0.25,
                                         max_attempts=4),
            ports=[PortConfig(target_port=80, published_port=8080),
                   PortConfig(protocol="udp", target_port=53, published_port=5353,
                              publish_mode="host")],
        ),
        spec_version=2,
    )


def mk_task(n: int, svc: Service | None = None) -> Task:
    svc = svc or mk_service()
    return Task(
        id=f"task{n}",
        service_id=svc.id,
        service_name=svc.spec.name,
        slot=n,
        node_id="node1",
        spec=svc.spec.task,
        desired_state=TaskState.READY,
        status=TaskStatus(state=TaskState.RUNNING, exit_code=None, addr="10.0.0.1",
                          port=40000 + n, pid=1234, timestamp=1700000000.123456789),
        restart_at=1700000005.5,
        attempt=2,
        ports=svc.spec.ports,
    )


@pytest.fixture(params=["memory", "sqlite"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    opened: list[Store] = []

    def make() -> Store:
        store: Store = MemoryStore() if request.param == "memory" else SQLiteStore(
            tmp_path / "sub" / "store.db")
        store.open()
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(factory: Factory) -> Store:
    return factory()


def sqlite_rows(path: Path) -> list[tuple[str, str, int]]:
    db = sqlite3.connect(str(path))
    try:
        return sorted(db.execute("SELECT kind, id, version FROM objects"))
    finally:
        db.close()


# --------------------------------------------------------------------------- CRUD and versions


def test_create_update_delete_bump_versions(store: Store) -> None:
    created = store.update(lambda tx: tx.create(mk_node(1)))
    assert created.version == 1
    assert store.view().must_get(Node, "node1") == created

    spec = created.spec.model_copy(update={"availability": NodeAvailability.DRAIN})
    v2 = store.update(lambda tx: tx.update(created.model_copy(update={"spec": spec})))
    assert v2.version == 2
    v3 = store.update(lambda tx: tx.update(v2.model_copy(update={"status": NodeStatus()})))
    assert v3.version == 3
    got = store.view().must_get(Node, "node1")
    assert got.version == 3 and got.spec.availability is NodeAvailability.DRAIN

    store.update(lambda tx: tx.delete(Node, "node1"))
    assert store.view().get(Node, "node1") is None
    with pytest.raises(NotFound):
        store.view().must_get(Node, "node1")


def test_create_ignores_given_version(store: Store) -> None:
    stored = store.update(lambda tx: tx.create(mk_node(1).model_copy(update={"version": 42})))
    assert stored.version == 1


@pytest.mark.parametrize(
    ("op", "error"),
    [
        ("create-duplicate", Conflict),
        ("update-stale", SequenceConflict),
        ("update-ahead", SequenceConflict),
        ("update-missing", NotFound),
    ],
)
def test_write_errors(store: Store, op: str, error: type[Exception]) -> None:
    base = store.update(lambda tx: tx.create(mk_node(1)))
    store.update(lambda tx: tx.update(base))  # now at version 2

    def write(tx: WriteTx) -> None:
        if op == "create-duplicate":
            tx.create(mk_node(1))
        elif op == "update-stale":
            tx.update(base)
        elif op == "update-ahead":
            tx.update(base.model_copy(update={"version": 5}))
        else:
            tx.update(mk_node(2).model_copy(update={"version": 1}))

    with pytest.raises(error):
        store.update(write)
    assert store.view().must_get(Node, "node1").version == 2


def test_delete_missing_is_a_no_op(store: Store) -> None:
    with store.watch() as w:
        store.update(lambda tx: tx.delete(Task, "nope"))
        assert w.drain() == []


def test_read_helpers(store: Store) -> None:
    web, api = mk_service("web"), mk_service("api")
    t1, t2 = mk_task(1, web), mk_task(2, api).model_copy(update={"node_id": "node2"})

    def write(tx: WriteTx) -> None:
        for o in (web, api, t1, t2, Cluster(task_history_limit=9)):
            tx.create(o)
    store.update(write)
    view = store.view()
    assert [t.id for t in view.tasks_of_service(web.id)] == ["task1"]
    assert [t.id for t in view.tasks_of_node("node2")] == ["task2"]
    found = view.service_by_name("api")
    assert found is not None and found.id == api.id
    assert view.service_by_name("nope") is None
    cluster = view.cluster()
    assert cluster is not None and cluster.task_history_limit == 9
    assert sorted(kind_of(o) for o in store.iter_all()) == [
        "cluster", "service", "service", "task", "task"]


# --------------------------------------------------------------------------- atomicity


def _half_done(stale: Node) -> Callable[[WriteTx], None]:
    def write(tx: WriteTx) -> None:
        tx.create(mk_service("ghost"))
        tx.create(mk_task(7))
        tx.update(stale)  # fails: stale version
    return write


def test_failed_transaction_leaves_no_trace(store: Store) -> None:
    base = store.update(lambda tx: tx.create(mk_node(1)))
    store.update(lambda tx: tx.update(base))
    with store.watch() as w:
        with pytest.raises(SequenceConflict):
            store.update(_half_done(base))
        assert w.drain() == []
    view = store.view()
    assert view.all(Service) == [] and view.all(Task) == []
    assert view.must_get(Node, "node1").version == 2


def test_failed_transaction_leaves_no_trace_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    store.open()
    base = store.update(lambda tx: tx.create(mk_node(1)))
    store.update(lambda tx: tx.update(base))
    with pytest.raises(SequenceConflict):
        store.update(_half_done(base))

    def raises(tx: WriteTx) -> None:
        tx.create(mk_service("other"))
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        store.update(raises)
    store.close()

    assert sqlite_rows(path) == [("node", "node1", 2)]
    again = SQLiteStore(path)
    again.open()
    try:
        assert again.view().all(Service) == [] and again.view().all(Task) == []
        assert again.view().must_get(Node, "node1").version == 2
    finally:
        again.close()


def test_transaction_sees_its_own_writes_and_commits_together(store: Store) -> None:
    def write(tx: WriteTx) -> int:
        a = tx.create(mk_node(1))
        assert tx.get(Node, "node1") == a
        # The committed view does not see it yet.
        assert store.view().get(Node, "node1") is None
        b = tx.update(a.model_copy(update={"status": NodeStatus(state=NodeState.DOWN)}))
        tx.create(mk_node(2))
        tx.delete(Node, "node2")
        version: int = b.version
        return version
    assert store.update(write) == 2
    assert [n.id for n in store.view().all(Node)] == ["node1"]


# --------------------------------------------------------------------------- watches


def test_watch_events_in_commit_order(store: Store) -> None:
    with store.watch() as w:
        n1 = store.update(lambda tx: tx.create(mk_node(1)))
        svc = mk_service()

        def second(tx: WriteTx) -> None:
            tx.create(svc)
            tx.update(n1.model_copy(update={"status": NodeStatus(state=NodeState.DOWN)}))
            tx.create(mk_task(1, svc))
        store.update(second)
        store.update(lambda tx: tx.delete(Task, "task1"))
        events = w.drain()

    assert all(isinstance(e, Event) for e in events)
    assert [(e.action, e.kind, e.obj.id) for e in events] == [
        (Action.CREATE, "node", "node1"),
        (Action.CREATE, "service", svc.id),
        (Action.UPDATE, "node", "node1"),
        (Action.CREATE, "task", "task1"),
        (Action.DELETE, "task", "task1"),
    ]
    create_n, _, update_n, create_t, delete_t = events
    assert create_n.old is None and create_n.obj.version == 1
    assert isinstance(update_n.obj, Node) and isinstance(update_n.old, Node)
    assert update_n.old == n1 and update_n.obj.version == 2
    assert update_n.obj.status.state is NodeState.DOWN
    assert update_n.old.status.state is NodeState.READY
    assert delete_t.obj == create_t.obj and delete_t.old == create_t.obj


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ((), ["node", "service", "task", "cluster"]),
        (("task",), ["task"]),
        (("node", "cluster"), ["node", "cluster"]),
        (("service",), ["service"]),
    ],
)
def test_watch_filters_by_kind(store: Store, kinds: tuple[str, ...],
                               expected: list[str]) -> None:
    w = store.watch(*kinds)
    try:
        store.update(lambda tx: tx.create(mk_node(1)))
        store.update(lambda tx: tx.create(mk_service()))
        store.update(lambda tx: tx.create(mk_task(1)))
        store.update(lambda tx: tx.create(Cluster()))
        assert [e.kind for e in w.drain()] == expected
    finally:
        w.close()


async def test_watch_async_iteration_and_close(store: Store) -> None:
    w: Watch = store.watch("node")
    other = store.watch("node")
    store.update(lambda tx: tx.create(mk_node(1)))
    ev = await anext(aiter(w))
    assert (ev.action, ev.obj.id) == (Action.CREATE, "node1")

    w.close()
    w.close()  # closing twice is harmless
    store.update(lambda tx: tx.create(mk_node(2)))
    assert w.queue.empty()
    assert [e.obj.id for e in other.drain()] == ["node1", "node2"]
    other.close()


def test_watch_context_manager_closes(store: Store) -> None:
    with store.watch() as w:
        pass
    store.update(lambda tx: tx.create(mk_node(1)))
    assert w.drain() == []


# --------------------------------------------------------------------------- persistence


def test_sqlite_restart_persistence(tmp_path: Path) -> None:
    path = tmp_path / "data" / "manager" / "store.db"
    store = SQLiteStore(path)
    store.open()
    svc = mk_service()

    def seed(tx: WriteTx) -> None:
        tx.create(Cluster(root_digest="r" * 50, worker_secret="w" * 25, manager_secret="m" * 25,
                          heartbeat_period=0.5, task_history_limit=3))
        for n in range(3):
            tx.create(mk_node(n))
        tx.create(svc)
        tx.create(mk_service("api"))
        for n in range(1, 4):
            tx.create(mk_task(n, svc))
    store.update(seed)
    # Updates and deletes must be persisted too.
    t2 = store.view().must_get(Task, "task2")
    store.update(lambda tx: tx.update(t2.model_copy(update={
        "status": t2.status.model_copy(update={"state": TaskState.FAILED, "exit_code": 3})})))
    store.update(lambda tx: tx.delete(Task, "task3"))
    store.update(lambda tx: tx.delete(Service, "svc-api"))
    before = sorted(store.iter_all(), key=lambda o: (kind_of(o), o.id))
    store.close()

    again = SQLiteStore(path)
    again.open()
    try:
        after = sorted(again.iter_all(), key=lambda o: (kind_of(o), o.id))
        assert after == before
        assert [o.id for o in after] == ["default", "node0", "node1", "node2", "svc-web",
                                         "task1", "task2"]
        t2_again = again.view().must_get(Task, "task2")
        assert t2_again.version == 2 and t2_again.status.exit_code == 3
        assert t2_again.status.state is TaskState.FAILED
        # Writes continue from the persisted versions.
        again.update(lambda tx: tx.update(t2_again))
        assert again.view().must_get(Task, "task2").version == 3
        with pytest.raises(SequenceConflict):
            again.update(lambda tx: tx.update(t2_again))
    finally:
        again.close()


def test_memory_store_forgets(factory: Factory) -> None:
    first = factory()
    first.update(lambda tx: tx.create(mk_node(1)))
    first.close()
    second = factory()
    persisted = isinstance(second, SQLiteStore)
    assert (second.view().get(Node, "node1") is not None) is persisted


def test_a_transaction_copies_only_the_tables_it_writes() -> None:
    """Reads stay cheap at scale: an update of one node does not copy every task."""
    store = MemoryStore()
    store.update(lambda tx: [tx.create(mk_node(1)), tx.create(mk_service())])
    services_before, nodes_before = store._tables["service"], store._tables["node"]
    store.update(lambda tx: tx.update(tx.must_get(Node, mk_node(1).id)))
    assert store._tables["service"] is services_before  # untouched: shared, not copied
    assert store._tables["node"] is not nodes_before  # written: a new table was committed
    assert nodes_before[mk_node(1).id].version == 1  # and the old one was never changed
