"""The dispatcher: ingress endpoints (pure), status reports, authentication, long-polls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from corral.api.errors import Forbidden
from corral.api.types import (
    Cluster,
    ContainerSpec,
    Node,
    NodeRole,
    NodeDescription,
    NodeState,
    NodeStatus,
    PortConfig,
    Service,
    ServiceSpec,
    Task,
    TaskState,
    TaskStatus,
)
from corral.manager.dispatcher import (
    Dispatcher,
    StatusUpdate,
    ingress_endpoints,
    routable,
)
from corral.store.base import MemoryStore, WriteTx

S = TaskState


def mk_node(n: int, state: NodeState = NodeState.READY) -> Node:
    return Node(id=f"n{n}", description=NodeDescription(hostname=f"h{n}", addr=f"10.0.0.{n}"),
                status=NodeStatus(state=state))


def mk_service(name: str, *ports: PortConfig) -> Service:
    return Service(id=f"svc-{name}",
                   spec=ServiceSpec(name=name, task=ContainerSpec(image="whoami"),
                                    ports=list(ports)))


def mk_task(tid: str, svc: Service, *, node: str = "n1", desired: TaskState = S.RUNNING,
            state: TaskState = S.RUNNING, port: int = 4000) -> Task:
    return Task(id=tid, service_id=svc.id, service_name=svc.spec.name, slot=1, node_id=node,
                spec=svc.spec.task, desired_state=desired,
                status=TaskStatus(state=state, addr=f"10.0.0.{node[1:] or 0}", port=port),
                ports=svc.spec.ports)


INGRESS = PortConfig(target_port=80, published_port=8080)
HOST = PortConfig(target_port=80, published_port=9090, publish_mode="host")
WEB = mk_service("web", INGRESS)
NODES = {n.id: n for n in (mk_node(1), mk_node(2, NodeState.DOWN),
                           mk_node(3, NodeState.DISCONNECTED), mk_node(4, NodeState.UNKNOWN))}


# --------------------------------------------------------------------------- routable / endpoints


@pytest.mark.parametrize(
    ("desired", "state", "port", "node", "expected"),
    [
        (S.RUNNING, S.RUNNING, 4000, "n1", True),
        (S.READY, S.RUNNING, 4000, "n1", False),
        (S.SHUTDOWN, S.RUNNING, 4000, "n1", False),
        (S.REMOVE, S.RUNNING, 4000, "n1", False),
        (S.RUNNING, S.STARTING, 4000, "n1", False),
        (S.RUNNING, S.ASSIGNED, 4000, "n1", False),
        (S.RUNNING, S.FAILED, 4000, "n1", False),
        (S.RUNNING, S.COMPLETE, 4000, "n1", False),
        (S.RUNNING, S.RUNNING, 0, "n1", True),  # a netns task: the target port of its address
        (S.RUNNING, S.RUNNING, 4000, "n2", False),  # down
        (S.RUNNING, S.RUNNING, 4000, "n3", False),  # disconnected
        (S.RUNNING, S.RUNNING, 4000, "n4", False),  # unknown
        (S.RUNNING, S.RUNNING, 4000, "n9", False),  # deleted
        (S.RUNNING, S.RUNNING, 4000, "", False),  # never assigned
    ],
)
def test_routable(desired: TaskState, state: TaskState, port: int, node: str,
                  expected: bool) -> None:
    t = mk_task("t", WEB, node=node, desired=desired, state=state, port=port)
    assert routable(t, NODES) is expected


def test_task_without_an_address_is_not_routable() -> None:
    t = mk_task("t", WEB)
    t = t.model_copy(update={"status": t.status.model_copy(update={"addr": ""})})
    assert routable(t, NODES) is False


def test_netns_backends_use_the_target_port() -> None:
    t = mk_task("t", WEB, port=0)
    (ep,) = ingress_endpoints([WEB], [t], NODES)
    assert ep.backends == [("10.0.0.1", 80, "t")]


def test_ingress_endpoints() -> None:
    web = mk_service("web", INGRESS, HOST, PortConfig(protocol="udp", target_port=53,
                                                      published_port=5353))
    api = mk_service("api", PortConfig(target_port=8000, published_port=8000))
    idle = mk_service("idle", PortConfig(target_port=1, published_port=7000))
    host_only = mk_service("hostonly", HOST)
    internal = mk_service("internal")
    tasks = [
        mk_task("w2", web, port=4002),
        mk_task("w1", web, port=4001),
        mk_task("w3", web, node="n2", port=4003),  # node down
        mk_task("w4", web, desired=S.SHUTDOWN, port=4004),
        mk_task("w5", web, state=S.STARTING, port=4005),
        mk_task("a1", api, port=5001),
        mk_task("h1", host_only, port=6001),
        mk_task("i1", internal, port=6002),
    ]
    eps = ingress_endpoints([web, api, idle, host_only, internal], tasks, NODES)
    # Sorted by service name; host-mode ports and portless services give no endpoint.
    assert [(e.service_name, e.port.published_port, e.port.protocol) for e in eps] == [
        ("api", 8000, "tcp"), ("idle", 7000, "tcp"), ("web", 8080, "tcp"), ("web", 5353, "udp")]
    by = {(e.service_name, e.port.published_port): e.backends for e in eps}
    assert by[("api", 8000)] == [("10.0.0.1", 5001, "a1")]
    assert by[("idle", 7000)] == []  # no tasks: an endpoint without backends
    expected_web = [("10.0.0.1", 4001, "w1"), ("10.0.0.1", 4002, "w2")]
    assert by[("web", 8080)] == expected_web
    assert by[("web", 5353)] == expected_web


def test_ingress_endpoints_empty() -> None:
    assert ingress_endpoints([], [], {}) == []
    assert [e.backends for e in ingress_endpoints([WEB], [], {})] == [[]]


# --------------------------------------------------------------------------- store-backed


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()

    def seed(tx: WriteTx) -> None:
        tx.create(Cluster(heartbeat_period=30.0))
        tx.create(mk_node(1))
        tx.create(mk_node(2))
        tx.create(WEB)
        tx.create(mk_task("t1", WEB, node="n1", state=S.ASSIGNED, port=0))
        tx.create(mk_task("t2", WEB, node="n2", state=S.ASSIGNED, port=0))
        tx.create(mk_task("t0", WEB, node="n1", state=S.PENDING, port=0))
    store.update(seed)
    return store


def node(store: MemoryStore, nid: str) -> Node:
    return store.view().must_get(Node, nid)


def test_authenticate(store: MemoryStore) -> None:
    """The certificate was verified by TLS; a removed node's is refused all the same."""
    d = Dispatcher(store)
    assert d.authenticate("n1") == node(store, "n1")
    store.update(lambda tx: tx.delete(Node, "n1"))
    for nid in ("n1", "n9", ""):
        with pytest.raises(Forbidden):
            d.authenticate(nid)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([S.ACCEPTED, S.PREPARING, S.RUNNING], S.RUNNING),
        ([S.RUNNING, S.STARTING], S.RUNNING),  # backward: ignored
        ([S.RUNNING, S.ASSIGNED], S.RUNNING),
        ([S.FAILED, S.RUNNING], S.FAILED),
        ([S.COMPLETE, S.COMPLETE], S.COMPLETE),
        ([S.PENDING], S.ASSIGNED),
        ([S.ASSIGNED], S.ASSIGNED),
    ],
)
def test_update_status_moves_forward_only(store: MemoryStore, steps: list[TaskState],
                                          expected: TaskState) -> None:
    d = Dispatcher(store)
    for s in steps:
        d.update_status(node(store, "n1"), [StatusUpdate(task_id="t1", state=s)])
    assert store.view().must_get(Task, "t1").status.state is expected


def test_update_status_fields_and_other_nodes(store: MemoryStore) -> None:
    d = Dispatcher(store)
    before_t2 = store.view().must_get(Task, "t2")
    d.update_status(node(store, "n1"), [
        StatusUpdate(task_id="t1", state=S.RUNNING, message="started", addr="10.0.0.1",
                     port=4242, pid=77),
        StatusUpdate(task_id="t2", state=S.FAILED, err="not yours"),  # task of node n2
        StatusUpdate(task_id="ghost", state=S.RUNNING),  # unknown task
    ])
    t1 = store.view().must_get(Task, "t1")
    assert (t1.status.state, t1.status.message, t1.status.port, t1.status.pid) == (
        S.RUNNING, "started", 4242, 77)
    assert store.view().must_get(Task, "t2") == before_t2
    # A later report without addr/port keeps what the agent said before.
    d.update_status(node(store, "n1"), [StatusUpdate(task_id="t1", state=S.FAILED, exit_code=2,
                                                     err="exit status 2")])
    t1 = store.view().must_get(Task, "t1")
    assert (t1.status.state, t1.status.exit_code, t1.status.err) == (S.FAILED, 2, "exit status 2")
    assert (t1.status.addr, t1.status.port, t1.status.pid) == ("10.0.0.1", 4242, 77)


def test_heartbeat_marks_ready(store: MemoryStore) -> None:
    d = Dispatcher(store)
    n2 = node(store, "n2")
    store.update(lambda tx: tx.update(n2.model_copy(update={
        "status": NodeStatus(state=NodeState.DOWN)})))
    assert d.heartbeat(node(store, "n2")) == 30.0
    assert node(store, "n2").status.state is NodeState.READY
    version = node(store, "n2").version
    d.heartbeat(node(store, "n2"))  # already ready: no write
    assert node(store, "n2").version == version


def test_assignments_content(store: MemoryStore) -> None:
    d = Dispatcher(store)
    a = d.assignments("n1")
    assert a.node_id == "n1" and a.version == d.version and a.heartbeat_period == 30.0
    assert [t.id for t in a.tasks] == ["t1"]  # PENDING t0 not yet assigned
    assert [(e.service_name, e.backends) for e in a.endpoints] == [("web", [])]


def test_managers_to_fail_over_to_carry_each_managers_api_port(store: MemoryStore) -> None:
    # Agents reconnect to these when their manager goes: a manager started with --port must
    # be listed on that port, not on the default one.
    def promote(tx: WriteTx) -> None:
        for nid, port in (("n1", 2377), ("n2", 4100)):
            n = tx.must_get(Node, nid)
            tx.update(n.model_copy(update={
                "spec": n.spec.model_copy(update={"role": NodeRole.MANAGER}),
                "description": n.description.model_copy(update={"api_port": port})}))
    store.update(promote)
    assert Dispatcher(store).assignments("n1").managers == ["10.0.0.1:2377", "10.0.0.2:4100"]


# --------------------------------------------------------------------------- long-polls


@pytest.fixture
async def running(store: MemoryStore) -> AsyncIterator[Dispatcher]:
    d = Dispatcher(store)
    task = asyncio.create_task(d.run())
    await asyncio.sleep(0)  # let it subscribe
    try:
        yield d
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_wait_assignments_returns_at_once_when_behind(store: MemoryStore) -> None:
    d = Dispatcher(store)
    d.version = 3
    start = time.monotonic()
    a = await d.wait_assignments(node(store, "n1"), since=2, timeout=5.0)
    assert time.monotonic() - start < 0.1
    assert a.version == 3


async def test_wait_assignments_times_out(store: MemoryStore) -> None:
    d = Dispatcher(store)
    start = time.monotonic()
    a = await d.wait_assignments(node(store, "n1"), since=d.version, timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 1.0
    assert a.version == d.version and [t.id for t in a.tasks] == ["t1"]


async def test_version_bumps_on_store_writes(store: MemoryStore,
                                             running: Dispatcher) -> None:
    d = running
    v0 = d.version
    for _ in range(3):  # a burst of writes coalesces into few wake-ups
        t0 = store.view().must_get(Task, "t0")
        store.update(lambda tx: tx.update(t0))
    deadline = time.monotonic() + 2.0
    while d.version == v0 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert v0 + 1 <= d.version <= v0 + 3


async def test_long_poll_wakes_on_store_write(store: MemoryStore, running: Dispatcher) -> None:
    d = running
    since = d.version
    poll = asyncio.create_task(d.wait_assignments(node(store, "n1"), since=since, timeout=5.0))
    await asyncio.sleep(0.05)
    assert not poll.done()

    start = time.monotonic()
    d.update_status(node(store, "n1"), [StatusUpdate(task_id="t1", state=S.RUNNING,
                                                     addr="10.0.0.1", port=4001)])
    a = await asyncio.wait_for(poll, 2.0)
    assert time.monotonic() - start < 0.5
    assert a.version > since
    [t1] = a.tasks
    assert t1.status.state is S.RUNNING
    assert [e.backends for e in a.endpoints] == [[("10.0.0.1", 4001, "t1")]]


async def test_long_poll_many_waiters(store: MemoryStore, running: Dispatcher) -> None:
    d = running
    polls = [asyncio.create_task(d.wait_assignments(node(store, nid), since=d.version,
                                                    timeout=5.0)) for nid in ("n1", "n2", "n1")]
    await asyncio.sleep(0.02)
    store.update(lambda tx: tx.create(mk_node(3)))
    results = await asyncio.wait_for(asyncio.gather(*polls), 2.0)
    assert [r.node_id for r in results] == ["n1", "n2", "n1"]
    assert all(r.version == d.version >= 1 for r in results)


async def test_long_poll_from_before_a_manager_restart(store: MemoryStore,
                                                       running: Dispatcher) -> None:
    d = running
    poll = asyncio.create_task(d.wait_assignments(node(store, "n1"), since=57, timeout=0.5))
    await asyncio.sleep(0.02)
    store.update(lambda tx: tx.create(mk_node(3)))
    start = time.monotonic()
    await poll
    assert time.monotonic() - start < 0.3
