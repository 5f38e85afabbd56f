"""API objects: nodes, services, tasks — the things the store holds and the API serves.

The shapes follow swarmkit's: an object has an immutable ID, a version (bumped by the store
on every write, used for optimistic concurrency), a *spec* written by the user, and a
*status* written by the component that observes it.
"""

from __future__ import annotations

import secrets
import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from corral.api.lb import LbKind

_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

# A bound that keeps one reconcile pass short; a bigger service is a bigger cluster's job.
MAX_REPLICAS = 10_000

# Every daemon serves its API on this port (Swarm's manager port), on its node's address.
API_PORT = 2377


def new_id(length: int = 25) -> str:
    """A random lowercase base-36 ID, like swarmkit's (docker shows the first 12 characters)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now() -> float:
    """Wall-clock time as stored in objects (seconds since the epoch)."""
    return time.time()


class Model(BaseModel):
    """Base for every API object: strict about unknown fields so typos are refused."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- nodes


class NodeRole(str, Enum):
    WORKER = "worker"
    MANAGER = "manager"


class NodeAvailability(str, Enum):
    ACTIVE = "active"
    PAUSE = "pause"
    DRAIN = "drain"


class NodeState(str, Enum):
    UNKNOWN = "unknown"
    DOWN = "down"
    READY = "ready"
    DISCONNECTED = "disconnected"


class NodeSpec(Model):
    role: NodeRole = NodeRole.WORKER
    availability: NodeAvailability = NodeAvailability.ACTIVE
    labels: dict[str, str] = Field(default_factory=dict)


class NodeDescription(Model):
    hostname: str
    addr: str
    # Where its API listens (`corral daemon --port`): the address agents fail over to when the
    # node is a manager, as Swarm's ManagerStatus.Addr carries the port.
    api_port: int = Field(default=API_PORT, ge=1, le=65535)
    os: str = "linux"
    arch: str = "x86_64"
    engine_version: str = ""


class NetworkAttachment(Model):
    """An address on an overlay network (a task's, a node's, or a service's VIP)."""

    network_id: str
    addr: str  # CIDR form, e.g. "10.0.0.5/24"

    @property
    def ip(self) -> str:
        return self.addr.split("/")[0]


class NodeStatus(Model):
    state: NodeState = NodeState.UNKNOWN
    message: str = ""
    updated_at: float = Field(default_factory=now)


class Node(Model):
    id: str
    version: int = 0
    created_at: float = Field(default_factory=now)
    spec: NodeSpec = Field(default_factory=NodeSpec)
    description: NodeDescription
    status: NodeStatus = Field(default_factory=NodeStatus)
    # Key id (hex) of the root that signed the node's latest certificate: a root rotation is
    # done when every node's is the new root's.
    cert_root: str = ""
    # The node's own address on each overlay network (its bridge; also the mesh's source).
    attachments: list[NetworkAttachment] = Field(default_factory=list)

    @property
    def hostname(self) -> str:
        return self.description.hostname


# --------------------------------------------------------------------------- services


class ServiceMode(str, Enum):
    REPLICATED = "replicated"
    GLOBAL = "global"


class RestartCondition(str, Enum):
    ANY = "any"
    ON_FAILURE = "on-failure"
    NONE = "none"


class RestartPolicy(Model):
    condition: RestartCondition = RestartCondition.ANY
    delay: float = Field(default=5.0, ge=0)
    max_attempts: StrictInt = Field(default=0, ge=0)  # 0 = unlimited


class PortConfig(Model):
    protocol: Literal["tcp", "udp"] = "tcp"
    target_port: StrictInt = Field(ge=1, le=65535)
    published_port: StrictInt = Field(ge=1, le=65535)
    publish_mode: Literal["ingress", "host"] = "ingress"
    # Send the task a PROXY protocol header (v1 text, v2 binary) carrying the client's address.
    proxy_protocol: Literal["", "v1", "v2"] = ""
    # "local": each node balances only over its own tasks, without source NAT in the kernel
    # path, so the task sees the client's real address (Kubernetes' externalTrafficPolicy).
    traffic: Literal["cluster", "local"] = "cluster"


class Placement(Model):
    constraints: list[str] = Field(default_factory=list)
    max_replicas: StrictInt = Field(default=0, ge=0)  # per node; 0 = no limit


class HealthConfig(Model):
    """How to tell whether a task is healthy (docker's HEALTHCHECK, plus built-in probes).

    Exactly one kind of probe: `test` (a command run inside the task: argv), `http_path`
    (GET on the task's port; 2xx/3xx is healthy) or `tcp` (the task's port accepts).
    """

    test: list[str] = Field(default_factory=list)
    http_path: str | None = None
    tcp: bool = False
    interval: float = Field(default=30.0, gt=0)
    timeout: float = Field(default=30.0, gt=0)
    retries: StrictInt = Field(default=3, ge=1)
    start_period: float = Field(default=0.0, ge=0)


SECRET_NAME = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"
MAX_SECRET_SIZE = 500 * 1024  # docker's limit


class SecretReference(Model):
    """A secret a service's tasks get as a file (docker's --secret source=…,target=…,mode=…)."""

    secret_name: str = Field(min_length=1, max_length=64, pattern=SECRET_NAME)
    secret_id: str = ""  # resolved by the manager when the service is created or updated
    target: str = Field(default="", max_length=64, pattern=r"^$|^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    mode: int = Field(default=0o444, ge=0, le=0o777)

    @property
    def file_name(self) -> str:
        return self.target or self.secret_name


class ContainerSpec(Model):
    """What a task runs. With the process runtime, `image` names a built-in app or an executable."""

    image: str = Field(min_length=1)
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[Annotated[str, Field(pattern=r"^[^=]+=")]] = Field(default_factory=list)  # "K=V"
    stop_grace_period: float = Field(default=10.0, ge=0)
    healthcheck: HealthConfig | None = None
    secrets: list[SecretReference] = Field(default_factory=list)


class UpdateConfig(Model):
    """How a rolling update (or a rollback) replaces tasks; docker's defaults."""

    parallelism: StrictInt = Field(default=1, ge=0)  # 0 = all at once
    delay: float = Field(default=0.0, ge=0)
    failure_action: Literal["pause", "continue", "rollback"] = "pause"
    monitor: float = Field(default=5.0, ge=0)
    max_failure_ratio: float = Field(default=0.0, ge=0, le=1)
    order: Literal["stop-first", "start-first"] = "stop-first"


class ServiceSpec(Model):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    task: ContainerSpec
    mode: ServiceMode = ServiceMode.REPLICATED
    replicas: StrictInt = Field(default=1, ge=0, le=MAX_REPLICAS)
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)
    placement: Placement = Field(default_factory=Placement)
    ports: list[PortConfig] = Field(default_factory=list)
    # Overlay networks by name or ID (resolved to IDs when the service is created).
    networks: list[str] = Field(default_factory=list)
    endpoint_mode: Literal["vip", "dnsrr"] = "vip"
    update_config: UpdateConfig = Field(default_factory=UpdateConfig)
    rollback_config: UpdateConfig = Field(default_factory=UpdateConfig)
    # How the routing mesh spreads connections over the tasks, and client-IP stickiness.
    lb: LbKind = "rr"
    lb_affinity: float | None = Field(default=None, gt=0)  # seconds


UpdateState = Literal["updating", "paused", "completed", "rollback_started", "rollback_paused",
                      "rollback_completed"]


class UpdateStatus(Model):
    """Where the last rolling update (or rollback) of a service stands."""

    state: UpdateState
    started_at: float = Field(default_factory=now)
    completed_at: float | None = None
    message: str = ""
    failures: int = 0
    # Slots updated so far (start-first and stop-first both finish a slot before counting it).
    updated: int = 0


class Service(Model):
    id: str
    version: int = 0
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    spec: ServiceSpec
    # Bumped on every spec change; tasks remember the spec generation they were made from.
    spec_version: int = 1
    # One virtual IP per attached network (endpoint mode vip), given by the allocator.
    vips: list[NetworkAttachment] = Field(default_factory=list)
    previous_spec: ServiceSpec | None = None
    update_status: UpdateStatus | None = None
    # `service update --force` sets this to the new spec version: older tasks get replaced
    # even when their spec is unchanged.
    force_version: int = 0


# --------------------------------------------------------------------------- tasks


class TaskState(str, Enum):
    """Task lifecycle, in order. A task's observed state only ever moves forward."""

    NEW = "new"
    PENDING = "pending"
    ASSIGNED = "assigned"
    ACCEPTED = "accepted"
    PREPARING = "preparing"
    READY = "ready"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETE = "complete"
    SHUTDOWN = "shutdown"
    FAILED = "failed"
    REJECTED = "rejected"
    REMOVE = "remove"
    ORPHANED = "orphaned"

    @property
    def rank(self) -> int:
        return _STATE_ORDER[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, TaskState):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, TaskState):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, TaskState):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, TaskState):
            return NotImplemented
        return self.rank >= other.rank

    @property
    def terminal(self) -> bool:
        """True once the task has stopped for good (complete, shutdown, failed, …)."""
        return self.rank > _STATE_ORDER[TaskState.RUNNING]


_STATE_ORDER: dict[TaskState, int] = {s: i for i, s in enumerate(TaskState)}


class TaskStatus(Model):
    state: TaskState = TaskState.NEW
    message: str = ""
    err: str = ""
    timestamp: float = Field(default_factory=now)
    exit_code: int | None = None
    # Where the task listens, as reported by the agent (process runtime: node addr + free port).
    addr: str = ""
    port: int = 0
    pid: int = 0
    # When the task started running (set by the dispatcher; the updater's monitor window).
    started_at: float | None = None
    # "" (no health check), "starting", "healthy" or "unhealthy" — docker's health status.
    health: Literal["", "starting", "healthy", "unhealthy"] = ""


class Task(Model):
    id: str
    version: int = 0
    created_at: float = Field(default_factory=now)
    service_id: str
    service_name: str
    slot: int = 0  # replicated services: 1..N; global services: 0 (node_id identifies the task)
    node_id: str = ""
    spec: ContainerSpec
    spec_version: int = 1
    desired_state: TaskState = TaskState.RUNNING
    status: TaskStatus = Field(default_factory=TaskStatus)
    # Restart supervision: a replacement task waits (desired READY) until this time.
    restart_at: float = 0.0
    # How many tasks this slot ran before this one (checked against restart max attempts).
    attempt: int = 0
    # Stop-first updates: this task may only start once the task it replaces has stopped.
    replaces: str = ""
    # Published ports of the service, copied so agents and the mesh need no service lookup.
    ports: list[PortConfig] = Field(default_factory=list)
    # The task's addresses on its networks, given by the allocator before scheduling.
    networks: list[NetworkAttachment] = Field(default_factory=list)

    @property
    def name(self) -> str:
        """Docker's task name: `search.2` for a slot, `search.<node id>` for a global task."""
        if self.slot:
            return f"{self.service_name}.{self.slot}"
        return f"{self.service_name}.{self.node_id}"


# --------------------------------------------------------------------------- networks


class NetworkSpec(Model):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    driver: Literal["overlay"] = "overlay"
    subnet: str
    attachable: bool = False
    ingress: bool = False  # the routing mesh's network, made by `swarm init`
    labels: dict[str, str] = Field(default_factory=dict)


class Network(Model):
    id: str
    version: int = 0
    created_at: float = Field(default_factory=now)
    spec: NetworkSpec
    vni: int  # VXLAN network identifier
    gateway: str = ""  # first host address, reserved (docker shows it as the gateway)


# --------------------------------------------------------------------------- cluster


class Cluster(Model):
    """Swarm-wide settings and secrets (one object, id "default")."""

    id: str = "default"
    version: int = 0
    created_at: float = Field(default_factory=now)
    cluster_id: str = Field(default_factory=new_id)
    # Digest of the root CA certificate, which join tokens pin (the CA's key stays on disk).
    root_digest: str = ""
    cert_expiry: float = 90 * 24 * 3600.0  # node certificates' lifetime, seconds
    # The CA (root, its key, trusted roots, cross-signed root) sealed with the managers' shared
    # key, and its version: how every manager — whichever leads next — signs with the same root.
    ca_sealed: str = ""
    ca_version: int = 0
    worker_secret: str = ""
    manager_secret: str = ""
    heartbeat_period: float = 1.0
    task_history_limit: int = 5


class SecretSpec(Model):
    name: str = Field(min_length=1, max_length=64, pattern=SECRET_NAME)
    labels: dict[str, str] = Field(default_factory=dict)


class Secret(Model):
    """A secret value, sealed with the manager's key (it is never stored or listed in clear)."""

    id: str
    version: int = 0
    created_at: float = Field(default_factory=now)
    spec: SecretSpec
    sealed: str = ""  # base64(nonce + AES-256-GCM ciphertext)
    size: int = 0


StoredObject = Node | Service | Task | Cluster | Network | Secret
