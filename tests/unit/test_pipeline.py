"""The manager pipeline end to end on a MemoryStore (no HTTP), and the control API's checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from corral.api.errors import Conflict, InvalidArgument, NotFound
from corral.api.types import (
    ContainerSpec,
    Node,
    NodeRole,
    NodeState,
    Placement,
    PortConfig,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
)
from corral.manager.allocator import Allocator
from corral.manager.controlapi import ControlAPI, JoinRequest, JoinResponse
from corral.security.pki import TOKEN_PREFIX
from corral.manager.dispatcher import Dispatcher
from corral.manager.orchestrator import Orchestrator
from corral.manager.scheduling import Scheduler
from corral.store.base import MemoryStore
from corral.security.pki import make_csr, new_key
from corral.testing.polling import until

CSR = make_csr(new_key()).decode()


def spec(name: str, replicas: int = 1, *, ports: list[PortConfig] | None = None,
         constraints: list[str] | None = None,
         mode: ServiceMode = ServiceMode.REPLICATED) -> ServiceSpec:
    return ServiceSpec(name=name, task=ContainerSpec(image="whoami"), replicas=replicas,
                       mode=mode, ports=ports or [],
                       placement=Placement(constraints=constraints or []))


def tcp(published: int, target: int = 80) -> PortConfig:
    return PortConfig(target_port=target, published_port=published)


def init(api: ControlAPI) -> JoinResponse:
    return api.init_cluster(hostname="mgr", addr="10.0.0.1", heartbeat_period=5.0,
                            engine_version="test", csr=CSR)


def join(api: ControlAPI, n: int, token: str | None = None) -> JoinResponse:
    token = token if token is not None else api.join_token(NodeRole.WORKER, rotate=False)
    return api.join(JoinRequest(token=token, hostname=f"worker{n}", addr=f"10.0.0.{n + 1}", csr=CSR))


@pytest.fixture
async def running() -> AsyncIterator[tuple[MemoryStore, ControlAPI]]:
    """A cluster of 3 READY nodes with orchestrator, allocator and scheduler running."""
    store = MemoryStore()
    api = ControlAPI(store)
    init(api)
    dispatcher = Dispatcher(store)
    for n in (1, 2):
        joined = join(api, n)
        node = store.view().must_get(Node, joined.node_id)
        assert node.status.state is NodeState.UNKNOWN
        assert dispatcher.authenticate(joined.node_id) == node
        dispatcher.heartbeat(node)
    assert [n.status.state for n in store.view().all(Node)] == [NodeState.READY] * 3
    tasks = [asyncio.create_task(c.run(), name=c.name)
             for c in (Orchestrator(store), Allocator(store), Scheduler(store))]
    try:
        yield store, api
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            assert t.cancelled(), t  # no component died on its own


async def test_pipeline_places_replicas_and_explains_unplaceable(
        running: tuple[MemoryStore, ControlAPI]) -> None:
    store, api = running
    svc = api.create_service(spec("web", 3))

    def web_tasks() -> list[Task]:
        tasks: list[Task] = store.view().tasks_of_service(svc.id)
        return tasks

    def assigned() -> bool:
        ts = web_tasks()
        return len(ts) == 3 and all(t.status.state is TaskState.ASSIGNED for t in ts)
    await until(assigned)
    ts = web_tasks()
    assert sorted(t.slot for t in ts) == [1, 2, 3]
    assert sorted(t.node_id for t in ts) == sorted(n.id for n in store.view().all(Node))
    assert all(t.desired_state is TaskState.RUNNING for t in ts)

    nowhere = api.create_service(spec("nowhere", 1, constraints=["node.labels.zone==mars"]))

    def explained() -> bool:
        ts = store.view().tasks_of_service(nowhere.id)
        return len(ts) == 1 and ts[0].status.err != ""
    await until(explained)
    [t] = store.view().tasks_of_service(nowhere.id)
    assert t.status.state is TaskState.PENDING
    assert t.node_id == ""
    assert t.status.err.startswith(
        "no suitable node (scheduling constraints not satisfied on 3 nodes)")

    # Scaling down through the control API reaches the tasks as well.
    api.scale("web", 1)
    await until(lambda: sorted(t.slot for t in web_tasks()
                                    if t.desired_state is TaskState.RUNNING) == [1])
    assert {t.desired_state for t in web_tasks() if t.slot != 1} <= {TaskState.REMOVE}


async def test_pipeline_global_service(running: tuple[MemoryStore, ControlAPI]) -> None:
    store, api = running
    svc = api.create_service(spec("agent", 0, mode=ServiceMode.GLOBAL,
                                  constraints=["node.role==worker"]))

    def placed() -> bool:
        ts = store.view().tasks_of_service(svc.id)
        return len(ts) == 2 and all(t.status.state is TaskState.ASSIGNED for t in ts)
    await until(placed)
    workers = {n.id for n in store.view().all(Node) if n.spec.role is NodeRole.WORKER}
    assert {t.node_id for t in store.view().tasks_of_service(svc.id)} == workers


# --------------------------------------------------------------------------- control API


@pytest.fixture
def api() -> ControlAPI:
    api = ControlAPI(MemoryStore())
    init(api)
    return api


def test_duplicate_service_name(api: ControlAPI) -> None:
    api.create_service(spec("web"))
    with pytest.raises(Conflict, match="web"):
        api.create_service(spec("web", 3))
    assert len(api.services()) == 1


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        ([tcp(8080)], [tcp(8080, 81)], True),
        ([tcp(8080), tcp(9090)], [tcp(9090)], True),
        ([tcp(8080)], [tcp(8081)], False),
        ([tcp(8080)], [PortConfig(protocol="udp", target_port=80, published_port=8080)], False),
    ],
)
def test_published_port_in_use(api: ControlAPI, first: list[PortConfig],
                               second: list[PortConfig], conflict: bool) -> None:
    a = api.create_service(spec("a", ports=first))
    if conflict:
        port = second[0].published_port
        with pytest.raises(Conflict) as exc:
            api.create_service(spec("b", ports=second))
        assert str(port) in exc.value.message
        assert "a" in exc.value.message and a.id[:12] in exc.value.message
        assert [s.spec.name for s in api.services()] == ["a"]
    else:
        api.create_service(spec("b", ports=second))
        assert len(api.services()) == 2


def test_duplicate_port_within_one_service(api: ControlAPI) -> None:
    with pytest.raises(InvalidArgument, match="8080"):
        api.create_service(spec("a", ports=[tcp(8080), tcp(8080, 81)]))


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (spec("g", 3, mode=ServiceMode.GLOBAL), InvalidArgument),
        (spec("c", constraints=["node.rank==1"]), InvalidArgument),
        (spec("c", constraints=["node.role==boss"]), InvalidArgument),
    ],
)
def test_invalid_service_spec(api: ControlAPI, bad: ServiceSpec, error: type[Exception]) -> None:
    with pytest.raises(error):
        api.create_service(bad)
    assert api.services() == []


@pytest.mark.parametrize("replicas", [-1, -100])
def test_scale_negative(api: ControlAPI, replicas: int) -> None:
    api.create_service(spec("web", 2))
    with pytest.raises(InvalidArgument, match=str(replicas)):
        api.scale("web", replicas)
    assert api.service("web").spec.replicas == 2


def test_scale_updates_spec_and_refuses_global(api: ControlAPI) -> None:
    s = api.create_service(spec("web", 2))
    scaled = api.scale("web", 0)
    assert scaled.spec.replicas == 0 and scaled.version == s.version + 1
    api.create_service(spec("glob", 0, mode=ServiceMode.GLOBAL))
    with pytest.raises(InvalidArgument, match="replicated mode"):
        api.scale("glob", 2)


def test_join_tokens(api: ControlAPI) -> None:
    worker = api.join_token(NodeRole.WORKER, rotate=False)
    manager = api.join_token(NodeRole.MANAGER, rotate=False)
    assert worker.startswith(TOKEN_PREFIX + "-") and manager.startswith(TOKEN_PREFIX + "-")
    assert worker != manager
    assert api.join_token(NodeRole.WORKER, rotate=False) == worker

    # A token of another swarm: same shape, different root digest.
    other = ControlAPI(MemoryStore())
    init(other)
    foreign = other.join_token(NodeRole.WORKER, rotate=False)

    errors: dict[str, str] = {}
    for label, token in [("malformed", "SWMTKN-1-garbage"), ("foreign", foreign),
                         ("manager", manager)]:
        with pytest.raises(InvalidArgument) as exc:
            join(api, 1, token)
        errors[label] = exc.value.message
    assert "another swarm" in errors["foreign"]
    assert "worker token" in errors["manager"]

    rotated = api.join_token(NodeRole.WORKER, rotate=True)
    assert rotated != worker
    assert rotated.rsplit("-", 1)[0] == worker.rsplit("-", 1)[0]  # same swarm digest
    with pytest.raises(InvalidArgument) as exc:
        join(api, 1, worker)
    errors["rotated"] = exc.value.message
    assert "rotated" in errors["rotated"]
    assert len(set(errors.values())) == len(errors), errors

    ok = join(api, 1, rotated)
    assert ok.role is NodeRole.WORKER and ok.heartbeat_period == 5.0
    # Only worker nodes joined; nobody was admitted by a bad token.
    assert sorted(n.hostname for n in api.nodes()) == ["mgr", "worker1"]


def test_join_same_address_twice(api: ControlAPI) -> None:
    join(api, 1)
    with pytest.raises(Conflict, match="10.0.0.2"):
        join(api, 1)


def test_init_cluster_refuses_bad_period() -> None:
    api = ControlAPI(MemoryStore())
    with pytest.raises(InvalidArgument):
        api.init_cluster(hostname="m", addr="a", heartbeat_period=0, engine_version="", csr=CSR)
    with pytest.raises(NotFound):
        api.cluster()


def test_resolve_services(api: ControlAPI) -> None:
    a = api.create_service(spec("alpha"))
    b = api.create_service(spec("beta"))
    assert api.service("alpha") == a
    assert api.service(b.id) == b
    # The shortest prefix that tells them apart.
    n = next(i for i in range(1, 26) if a.id[:i] != b.id[:i])
    assert api.service(a.id[:n]) == a
    assert api.service(b.id[:n + 2]) == b
    for missing in ("gamma", "zzzzzzzzzzzzzzzzzzzzzzzzzzz", ""):
        with pytest.raises(NotFound):
            api.service(missing)


def test_resolve_ambiguous_prefix(api: ControlAPI) -> None:
    svcs = [api.create_service(spec(f"s{i}")) for i in range(40)]
    # 40 IDs over a 36-letter alphabet: at least two share a first character.
    firsts = [s.id[0] for s in svcs]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(InvalidArgument, match="ambiguous"):
        api.service(shared)


def test_resolve_nodes(api: ControlAPI) -> None:
    joined = join(api, 1)
    assert api.node("worker1").id == joined.node_id
    assert api.node(joined.node_id).hostname == "worker1"
    mgr = api.node("mgr")
    assert mgr.spec.role is NodeRole.MANAGER and mgr.status.state is NodeState.READY
    prefix = next(mgr.id[:i] for i in range(1, 26) if not joined.node_id.startswith(mgr.id[:i]))
    assert api.node(prefix) == mgr
    with pytest.raises(NotFound, match="nope"):
        api.node("nope")


def test_remove_service_marks_tasks(api: ControlAPI) -> None:
    store = api.store
    svc = api.create_service(spec("web", 1))
    orch = Orchestrator(store)
    orch.tick(time.time())
    assert len(store.view().tasks_of_service(svc.id)) == 1
    api.remove_service("web")
    with pytest.raises(NotFound):
        api.service("web")
    assert [t.desired_state for t in store.view().tasks_of_service(svc.id)] == [TaskState.REMOVE]
    orch.tick(time.time())  # never assigned: reaped at once
    assert store.view().tasks_of_service(svc.id) == []
