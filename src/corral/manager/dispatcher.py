"""Dispatcher: the manager's side of agent sessions — heartbeats, task status, assignments.

How this works: each agent heartbeats every `period`; a node not heard from for
`3 × period` is marked DOWN (the orchestrator then replaces its tasks). Agents long-poll
`assignments(since=version)`: the call returns as soon as anything in the store changed after
`version` (or after a timeout), with the node's tasks and the cluster's ingress endpoints, so
a change reaches every agent and every node's mesh within milliseconds, not a heartbeat.
The manager writes desired state; the agent's reports only ever move observed state forward.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from corral.api.errors import Forbidden
from corral.api.lb import LbKind
from corral.api.types import (
    Model,
    Network,
    Node,
    NodeRole,
    NodeState,
    NodeStatus,
    PortConfig,
    Secret,
    Service,
    Task,
    TaskState,
)
from corral.store.base import ReadTx, Store, WriteTx

log = logging.getLogger(__name__)

DOWN_AFTER_MISSED = 3
TAKEOVER_GRACE = 5.0
"""Seconds a manager that starts dispatching (at start, or on winning an election) gives every
node to find it before judging it by heartbeats: agents first have to learn who leads."""


class StatusUpdate(Model):
    """An agent's report about one task's observed state."""

    task_id: str
    state: TaskState
    message: str = ""
    err: str = ""
    exit_code: int | None = None
    addr: str = ""
    port: int = 0
    pid: int = 0
    health: str = ""


class Endpoint(Model):
    """One published port and the running tasks behind it (what every node's mesh needs)."""

    service_name: str
    port: PortConfig
    backends: list[tuple[str, int, str]] = Field(default_factory=list)  # (addr, port, task id)
    lb: LbKind = "rr"
    lb_affinity: float | None = None


class NetworkInfo(Model):
    """An overlay network as one node must program it."""

    network: Network
    node_addr: str = ""  # this node's address on it (CIDR), once allocated
    # (overlay ip, underlay node address) of everything on other nodes: tasks and node bridges
    peers: list[tuple[str, str]] = Field(default_factory=list)


class TaskEndpoint(Model):
    """A running task as service discovery sees it."""

    name: str
    ips: dict[str, str]  # network id -> ip


class ServiceEndpoint(Model):
    """A service as its VIPs and DNS see it: virtual IPs and the tasks behind them."""

    name: str
    endpoint_mode: str
    vips: dict[str, str]  # network id -> vip
    tasks: list[TaskEndpoint]


class TaskSecret(Model):
    id: str
    data: str  # base64


class Assignments(Model):
    """What an agent should run, and what its mesh should route, as of `version`."""

    version: int
    node_id: str
    tasks: list[Task]
    endpoints: list[Endpoint]
    heartbeat_period: float
    networks: list[NetworkInfo] = Field(default_factory=list)
    services: list[ServiceEndpoint] = Field(default_factory=list)
    # Host-mode published ports of this node's own running tasks (no mesh, node-local).
    host_endpoints: list[Endpoint] = Field(default_factory=list)
    # What the node is meant to be now: a promoted node starts a manager, a demoted one stops.
    role: NodeRole | None = None
    # Control addresses of the swarm's managers (agents fail over between them).
    managers: list[str] = Field(default_factory=list)
    # Node IDs of the swarm's managers: a node answers managers' calls (logs, exec) only from
    # these, so a demoted or removed manager's old certificate opens nothing there either.
    manager_ids: list[str] = Field(default_factory=list)
    # The secrets this node's tasks use — only those (swarmkit sends no other), in clear:
    # the session is mutual TLS.
    secrets: list[TaskSecret] = Field(default_factory=list)


@dataclass
class _Session:
    last_seen: float


class Dispatcher:
    """Keeps agent sessions and turns store state into per-node assignments."""

    def __init__(self, store: Store, open_secret: Callable[[Secret], bytes] | None = None) -> None:
        self.store = store
        self._open_secret = open_secret
        # Unique per manager run: an agent still holding a version from before a manager
        # restart must see "changed", not wait for a counter to catch up with it.
        self.version = int(time.time() * 1000)
        self._changed = asyncio.Condition()
        self._sessions: dict[str, _Session] = {}
        self._started = time.time()

    @property
    def period(self) -> float:
        cluster = self.store.view().cluster()
        return cluster.heartbeat_period if cluster else 1.0

    # -- authentication ---------------------------------------------------------------
    def authenticate(self, node_id: str) -> Node:
        """The node a (TLS-verified) certificate names, or Forbidden if it was removed."""
        node = self.store.view().get(Node, node_id)
        if node is None:
            raise Forbidden("node certificate refused: this node is not (or no longer) part of the swarm")
        return node

    # -- heartbeats ---------------------------------------------------------------------
    def heartbeat(self, node: Node) -> float:
        """Record that `node` is alive; mark it READY if it was not. Returns the period."""
        self._sessions[node.id] = _Session(time.time())
        if node.status.state is not NodeState.READY:
            self._set_state(node.id, NodeState.READY, "")
        return self.period

    def _set_state(self, node_id: str, state: NodeState, message: str) -> None:
        def write(tx: WriteTx) -> None:
            n = tx.get(Node, node_id)
            if n is not None and n.status.state is not state:
                tx.update(n.model_copy(update={"status": NodeStatus(state=state, message=message)}))
        self.store.update(write)

    async def run(self) -> None:
        """Watch the store to wake long-polls, and mark silent nodes DOWN."""
        # A new term: no node has a session with this manager yet, whatever came before.
        self._sessions.clear()
        self._started = time.time()
        self.version += 1  # agents holding this manager's old version must see "changed"
        await asyncio.gather(self._watch_changes(), self._check_heartbeats())

    async def _watch_changes(self) -> None:
        with self.store.watch() as watch:
            while True:
                await watch.queue.get()
                await asyncio.sleep(0.002)  # coalesce a burst of writes into one wake-up
                watch.drain()
                async with self._changed:
                    self.version += 1
                    self._changed.notify_all()

    async def _check_heartbeats(self) -> None:
        while True:
            period = self.period
            await asyncio.sleep(period / 4)
            now = time.time()
            for node in self.store.view().all(Node):
                if node.status.state is NodeState.DOWN:
                    continue
                session = self._sessions.get(node.id)
                if session is None:
                    # Not heard from since this manager started dispatching: a grace period.
                    if now - self._started > max(DOWN_AFTER_MISSED * period, TAKEOVER_GRACE):
                        log.warning("node %s has not reached this manager since it took over: "
                                    "marking it down", node.hostname)
                        self._set_state(node.id, NodeState.DOWN, "heartbeat failure")
                    continue
                if now - session.last_seen > DOWN_AFTER_MISSED * period:
                    log.warning("node %s missed %d heartbeats: marking it down",
                                node.hostname, DOWN_AFTER_MISSED)
                    self._set_state(node.id, NodeState.DOWN, "heartbeat failure")

    # -- task status ----------------------------------------------------------------------
    def update_status(self, node: Node, updates: list[StatusUpdate]) -> None:
        """Apply an agent's reports; ignore tasks not on that node and backward moves."""
        def write(tx: WriteTx) -> None:
            for u in updates:
                t = tx.get(Task, u.task_id)
                if t is None or t.node_id != node.id:
                    continue
                health_changed = (u.state is TaskState.RUNNING is t.status.state
                                  and u.health != t.status.health)
                if u.state <= t.status.state and not health_changed:
                    continue  # observed state only moves forward (health may change while running)
                stamp = time.time()
                started = stamp if u.state is TaskState.RUNNING else t.status.started_at
                status = t.status.model_copy(update={
                    "state": u.state, "message": u.message, "err": u.err,
                    "exit_code": u.exit_code, "timestamp": stamp, "started_at": started,
                    "addr": u.addr or t.status.addr, "port": u.port or t.status.port,
                    "pid": u.pid or t.status.pid,
                    "health": u.health if u.health in ("", "starting", "healthy", "unhealthy") else "",
                })
                tx.update(t.model_copy(update={"status": status}))
        self.store.update(write)

    # -- assignments ----------------------------------------------------------------------
    async def wait_assignments(self, node: Node, since: int, timeout: float) -> Assignments:
        """Return as soon as the state is newer than `since`, or after `timeout` seconds."""
        if since == self.version:
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.version != since), timeout)
                except TimeoutError:
                    pass
        return self.assignments(node.id)

    def assignments(self, node_id: str) -> Assignments:
        view = self.store.view()
        tasks = [t for t in view.tasks_of_node(node_id) if t.status.state >= TaskState.ASSIGNED]
        nodes = {n.id: n for n in view.all(Node)}
        all_tasks = view.all(Task)
        services = view.all(Service)
        return Assignments(version=self.version, node_id=node_id, tasks=tasks,
                           endpoints=ingress_endpoints(services, all_tasks, nodes, node_id),
                           heartbeat_period=self.period,
                           networks=network_infos(node_id, view.all(Network), nodes, all_tasks),
                           services=service_endpoints(services, all_tasks, nodes),
                           host_endpoints=host_endpoints(tasks, nodes),
                           role=nodes[node_id].spec.role if node_id in nodes else None,
                           manager_ids=sorted(n.id for n in nodes.values()
                                              if n.spec.role is NodeRole.MANAGER),
                           managers=sorted(f"{n.description.addr}:{n.description.api_port}"
                                           for n in nodes.values()
                                           if n.spec.role is NodeRole.MANAGER
                                           and n.status.state is not NodeState.DOWN),
                           secrets=self._secrets_for(tasks, view))

    def _secrets_for(self, tasks: list[Task], view: ReadTx) -> list[TaskSecret]:
        wanted = {r.secret_id for t in tasks if t.desired_state <= TaskState.RUNNING
                  for r in t.spec.secrets}
        out = []
        for secret_id in sorted(wanted):
            secret = view.get(Secret, secret_id)
            if secret is None or self._open_secret is None:
                continue  # removed meanwhile: the task fails to start and says why
            out.append(TaskSecret(id=secret_id,
                                  data=base64.b64encode(self._open_secret(secret)).decode()))
        return out


def routable(task: Task, nodes: dict[str, Node]) -> bool:
    """A task the mesh may send new connections to: running, meant to run, on a live node."""
    node = nodes.get(task.node_id)
    return (task.desired_state is TaskState.RUNNING and task.status.state is TaskState.RUNNING
            and bool(task.status.addr) and task.status.health in ("", "healthy")
            and node is not None
            and node.status.state is NodeState.READY)


def network_infos(node_id: str, networks: list[Network], nodes: dict[str, Node],
                  tasks: list[Task]) -> list[NetworkInfo]:
    """Each network with this node's address on it and where every remote address lives."""
    me = nodes.get(node_id)
    out = []
    for net in sorted(networks, key=lambda n: n.vni):
        peers: list[tuple[str, str]] = []
        for n in nodes.values():
            if n.id != node_id and n.status.state is not NodeState.DOWN:
                peers += [(a.ip, n.description.addr) for a in n.attachments if a.network_id == net.id]
        for t in tasks:
            node = nodes.get(t.node_id)
            if (node is None or t.node_id == node_id or t.status.state.terminal
                    or node.status.state is NodeState.DOWN):
                continue
            peers += [(a.ip, node.description.addr) for a in t.networks if a.network_id == net.id]
        mine = next((a.addr for a in (me.attachments if me else []) if a.network_id == net.id), "")
        out.append(NetworkInfo(network=net, node_addr=mine, peers=sorted(peers)))
    return out


def service_endpoints(services: list[Service], tasks: list[Task],
                      nodes: dict[str, Node]) -> list[ServiceEndpoint]:
    """Every service with its VIPs and routable tasks (what VIP rules and DNS need)."""
    by_service: dict[str, list[Task]] = {}
    for t in tasks:
        if routable(t, nodes):
            by_service.setdefault(t.service_id, []).append(t)
    return [ServiceEndpoint(
        name=s.spec.name, endpoint_mode=s.spec.endpoint_mode,
        vips={a.network_id: a.ip for a in s.vips},
        tasks=[TaskEndpoint(name=t.name, ips={a.network_id: a.ip for a in t.networks})
               for t in sorted(by_service.get(s.id, []), key=lambda t: (t.slot, t.id))])
        for s in sorted(services, key=lambda s: s.spec.name)]


def backend(task: Task, port: PortConfig) -> tuple[str, int, str]:
    """Where the mesh reaches a task for a published port: a process task on its own port, a
    netns task — like a container — on the target port of its address (it reports port 0)."""
    return (task.status.addr, task.status.port or port.target_port, task.id)


def host_endpoints(tasks: list[Task], nodes: dict[str, Node]) -> list[Endpoint]:
    """Each host-mode port of a routable task on this node, backed by that task alone."""
    out = []
    for t in sorted(tasks, key=lambda t: t.id):
        if routable(t, nodes):
            for p in t.ports:
                if p.publish_mode == "host":
                    out.append(Endpoint(service_name=t.service_name, port=p,
                                        backends=[backend(t, p)]))
    return out


def ingress_endpoints(services: list[Service], tasks: list[Task],
                      nodes: dict[str, Node], node_id: str = "") -> list[Endpoint]:
    """Every ingress-published port in the cluster with its routable backends (pure)."""
    by_service: dict[str, list[Task]] = {}
    for t in tasks:
        if routable(t, nodes):
            by_service.setdefault(t.service_id, []).append(t)
    out = []
    for svc in sorted(services, key=lambda s: s.spec.name):
        running = sorted(by_service.get(svc.id, []), key=lambda t: t.id)
        for p in svc.spec.ports:
            if p.publish_mode == "ingress":
                # traffic=local: this node balances over its own tasks only.
                mine = [t for t in running if p.traffic == "cluster" or t.node_id == node_id]
                backends = [backend(t, p) for t in mine]
                out.append(Endpoint(service_name=svc.spec.name, port=p, backends=backends,
                                    lb=svc.spec.lb, lb_affinity=svc.spec.lb_affinity))
    return out
