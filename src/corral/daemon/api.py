"""The node's HTTP API (JSON; OpenAPI at /openapi.json): local node calls, the manager's
control API, and the dispatcher endpoints agents use."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt

from corral import __version__
from corral.api.errors import CorralError, Forbidden, InvalidArgument, NotFound
from corral.api.types import (
    Cluster,
    Model,
    Network,
    NetworkSpec,
    Node,
    NodeRole,
    Secret,
    SecretSpec,
    Service,
    ServiceSpec,
    Task,
)
from corral.daemon.daemon import Daemon, Info
from corral.daemon.listeners import PEER
from corral.manager.controlapi import (
    MIN_CERT_EXPIRY,
    CaStatus,
    CertRequest,
    CertResponse,
    JoinRequest,
    JoinResponse,
    ManagerKeys,
    NodeUpdate,
)
from corral.manager.dispatcher import Assignments, StatusUpdate
from corral.manager.etcdconf import EtcdConfig
from corral.manager.manager import Manager
from corral.security.authz import Peer
from corral.security.pki import bundle_digest


class InitRequest(Model):
    advertise_addr: str | None = None
    heartbeat_period: float = Field(default=1.0, gt=0, le=600)
    cert_expiry: float = Field(default=Cluster.model_fields["cert_expiry"].default,
                               ge=MIN_CERT_EXPIRY)
    # Where the store lives: this manager's SQLite, or etcd (then more managers can join).
    store: Literal["sqlite", "etcd"] = "sqlite"
    etcd_endpoints: list[str] = Field(default_factory=list)
    etcd_ca: str = ""  # PEM: etcd's CA, a client certificate and its key (etcd over TLS)
    etcd_cert: str = ""
    etcd_key: str = ""


class SecretInfo(Model):
    """A secret as the API shows it: never its value."""

    id: str
    version: int
    created_at: float
    spec: SecretSpec
    size: int

    @classmethod
    def of(cls, s: Secret) -> SecretInfo:
        return cls(id=s.id, version=s.version, created_at=s.created_at, spec=s.spec, size=s.size)


class SecretCreate(Model):
    spec: SecretSpec
    data: str  # base64


class CaResponse(Model):
    ca: str  # PEM bundle of the roots this swarm trusts


class InitResponse(Model):
    node_id: str
    worker_token: str
    manager_addr: str


class JoinSwarmRequest(Model):
    token: str
    remote_addr: str


class JoinSwarmResponse(Model):
    role: NodeRole


class LeaveRequest(Model):
    force: bool = False


class TokenResponse(Model):
    token: str
    manager_addr: str


class UpdateRequest(Model):
    spec: ServiceSpec
    force: bool = False


class ScaleRequest(Model):
    replicas: StrictInt


class Heartbeat(Model):
    period: float
    roots: str = ""  # digest of the roots nodes must trust: a change means "renew now"


class ExecRequest(Model):
    cmd: list[str] = Field(min_length=1)
    timeout: float = Field(default=30.0, gt=0, le=600)


class ExecResult(Model):
    exit_code: int
    stdout: str
    stderr: str


class LogLine(Model):
    task_id: str
    task_name: str
    node: str
    stream: str
    line: str


def node_url(node: Node) -> str:
    """Where another node's API answers (its own address and port)."""
    return f"https://{node.description.addr}:{node.description.api_port}"


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return "malformed JSON in request body"
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    return f"invalid request: {loc}: {e.get('msg', 'invalid')}" if loc else f"invalid request: {e.get('msg')}"


def _daemon(request: Request) -> Daemon:
    d: Daemon = request.app.state.daemon
    return d


def _manager(request: Request) -> Manager:
    return _daemon(request).require_manager()


Mgr = Annotated[Manager, Depends(_manager)]


def _peer(request: Request) -> Peer:
    peer: Peer = request.scope[PEER]  # set by the door the request came in through
    return peer


def _agent_node(request: Request, mgr: Mgr) -> Node:
    """The node an agent request comes from: the one its TLS certificate names."""
    cert = _peer(request).cert
    if cert is None or cert.role == "client":
        raise Forbidden("dispatcher calls need a node certificate")
    return mgr.dispatcher.authenticate(cert.node_id)


AgentNode = Annotated[Node, Depends(_agent_node)]


def make_app(daemon: Daemon) -> FastAPI:
    """Build the API around one daemon."""
    app = FastAPI(title="corral", version=__version__,
                  description="A Swarm-style orchestrator with a routing mesh")

    @app.exception_handler(CorralError)
    async def corral_error(_: Request, exc: CorralError) -> JSONResponse:
        return JSONResponse({"message": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"message": _validation_message(exc)}, status_code=400)

    app.state.daemon = daemon

    # -- this node ------------------------------------------------------------------------
    @app.get("/v1/info")
    async def info() -> Info:
        return daemon.info()

    @app.post("/v1/swarm/init")
    async def swarm_init(req: InitRequest) -> InitResponse:
        if req.store == "sqlite" and (req.etcd_endpoints or req.etcd_ca):
            raise InvalidArgument("--etcd-* options need --store etcd")
        etcd = (EtcdConfig(endpoints=req.etcd_endpoints, ca=req.etcd_ca, cert=req.etcd_cert,
                           key=req.etcd_key) if req.store == "etcd" else None)
        node_id, token = await daemon.init_swarm(req.advertise_addr, req.heartbeat_period,
                                                 req.cert_expiry, etcd)
        assert daemon.identity is not None
        return InitResponse(node_id=node_id, worker_token=token,
                            manager_addr=daemon.identity.manager_addr)

    @app.post("/v1/swarm/join")
    async def swarm_join(req: JoinSwarmRequest) -> JoinSwarmResponse:
        return JoinSwarmResponse(role=await daemon.join_swarm(req.token, req.remote_addr))

    @app.post("/v1/swarm/leave")
    async def swarm_leave(req: LeaveRequest) -> dict[str, str]:
        await daemon.leave_swarm(req.force)
        return {}

    @app.get("/v1/local/tasks/{task_id}/logs")
    async def local_logs(task_id: str, tail: int | None = None) -> list[tuple[str, str]]:
        lines = daemon.executor.logs(task_id, tail) if daemon.executor else None
        if lines is None:
            raise NotFound(f"no logs for task {task_id} on this node")
        return lines

    @app.post("/v1/local/tasks/{task_id}/exec")
    async def local_exec(task_id: str, req: ExecRequest) -> ExecResult:
        code, out, err = await daemon.exec_in_task(task_id, req.cmd, req.timeout)
        return ExecResult(exit_code=code, stdout=out, stderr=err)

    # -- the swarm (manager only) ---------------------------------------------------------------
    @app.get("/v1/ca")
    async def root_ca(mgr: Mgr) -> CaResponse:
        """The roots to trust (public: a joining node checks them against its token)."""
        return CaResponse(ca=mgr.control.ca.bundle_pem.decode())

    @app.post("/v1/ca/renew")
    async def renew_cert(req: CertRequest, node: AgentNode, mgr: Mgr) -> CertResponse:
        return mgr.control.renew(node.id, req.csr.encode())

    @app.get("/v1/swarm/ca")
    async def ca_status(mgr: Mgr) -> CaStatus:
        return mgr.control.ca_status()

    @app.post("/v1/swarm/ca/rotate")
    async def rotate_ca(mgr: Mgr) -> CaStatus:
        return mgr.control.rotate_ca()

    @app.get("/v1/swarm/manager-keys")
    async def manager_keys(request: Request, mgr: Mgr) -> ManagerKeys:
        """For a node just promoted: only a manager node's certificate may ask."""
        cert = _peer(request).cert
        if cert is None or cert.role != "manager":
            raise Forbidden("the swarm's keys go to manager nodes only")
        keys = mgr.control.manager_keys()
        if keys is None:
            raise InvalidArgument("this swarm keeps its store in SQLite: it has one manager")
        return keys

    @app.post("/v1/ca/client")
    async def client_cert(req: CertRequest, mgr: Mgr) -> CertResponse:
        """An admin client certificate, for the CLI over TLS (`swarm ca --client-cert`)."""
        return mgr.control.client_cert(req.csr.encode())

    @app.post("/v1/swarm/nodes")
    async def admit_node(req: JoinRequest, mgr: Mgr) -> JoinResponse:
        return mgr.control.join(req)

    @app.get("/v1/swarm/join-token/{role}")
    async def join_token(role: NodeRole, mgr: Mgr, rotate: bool = False) -> TokenResponse:
        assert daemon.identity is not None
        return TokenResponse(token=mgr.control.join_token(role, rotate),
                             manager_addr=daemon.identity.manager_addr)

    @app.get("/v1/nodes")
    async def nodes(mgr: Mgr) -> list[Node]:
        return mgr.control.nodes()

    @app.get("/v1/nodes/{ref}")
    async def node(ref: str, mgr: Mgr) -> Node:
        return mgr.control.node(ref)

    @app.post("/v1/nodes/{ref}/update")
    async def update_node(ref: str, upd: NodeUpdate, mgr: Mgr) -> Node:
        return mgr.control.update_node(ref, upd)

    @app.delete("/v1/nodes/{ref}")
    async def remove_node(ref: str, mgr: Mgr, force: bool = False) -> dict[str, str]:
        mgr.control.remove_node(ref, force)
        return {}

    @app.get("/v1/networks")
    async def networks(mgr: Mgr) -> list[Network]:
        return mgr.control.networks()

    @app.post("/v1/networks")
    async def create_network(spec: NetworkSpec, mgr: Mgr) -> Network:
        return mgr.control.create_network(spec)

    @app.get("/v1/networks/{ref}")
    async def network(ref: str, mgr: Mgr) -> Network:
        return mgr.control.network(ref)

    @app.delete("/v1/networks/{ref}")
    async def remove_network(ref: str, mgr: Mgr) -> Network:
        return mgr.control.remove_network(ref)

    @app.get("/v1/services")
    async def services(mgr: Mgr) -> list[Service]:
        return mgr.control.services()

    @app.post("/v1/services")
    async def create_service(spec: ServiceSpec, mgr: Mgr) -> Service:
        return mgr.control.create_service(spec)

    @app.get("/v1/services/{ref}")
    async def service(ref: str, mgr: Mgr) -> Service:
        return mgr.control.service(ref)

    @app.post("/v1/services/{ref}/scale")
    async def scale(ref: str, req: ScaleRequest, mgr: Mgr) -> Service:
        return mgr.control.scale(ref, req.replicas)

    @app.post("/v1/services/{ref}/update")
    async def update_service(ref: str, req: UpdateRequest, mgr: Mgr) -> Service:
        return mgr.control.update_service(ref, req.spec, req.force)

    @app.post("/v1/services/{ref}/rollback")
    async def rollback_service(ref: str, mgr: Mgr) -> Service:
        return mgr.control.rollback_service(ref)

    @app.delete("/v1/services/{ref}")
    async def remove_service(ref: str, mgr: Mgr) -> Service:
        return mgr.control.remove_service(ref)

    @app.get("/v1/secrets")
    async def secrets(mgr: Mgr) -> list[SecretInfo]:
        return [SecretInfo.of(x) for x in mgr.control.secrets()]

    @app.post("/v1/secrets")
    async def create_secret(req: SecretCreate, mgr: Mgr) -> SecretInfo:
        try:
            data = base64.b64decode(req.data, validate=True)
        except ValueError:
            raise InvalidArgument("secret data must be base64") from None
        return SecretInfo.of(mgr.control.create_secret(req.spec, data))

    @app.get("/v1/secrets/{ref}")
    async def secret(ref: str, mgr: Mgr) -> SecretInfo:
        return SecretInfo.of(mgr.control.secret(ref))

    @app.delete("/v1/secrets/{ref}")
    async def remove_secret(ref: str, mgr: Mgr) -> SecretInfo:
        return SecretInfo.of(mgr.control.remove_secret(ref))

    @app.get("/v1/tasks")
    async def tasks(mgr: Mgr, service: str | None = None, node: str | None = None) -> list[Task]:
        return mgr.control.tasks(service, node)

    @app.get("/v1/services/{ref}/logs")
    async def service_logs(ref: str, mgr: Mgr, tail: int | None = None) -> list[LogLine]:
        tasks = sorted(mgr.control.tasks(ref), key=lambda t: (t.slot, t.node_id, t.created_at))
        nodes = {n.id: n for n in mgr.control.nodes()}

        async def fetch(client: httpx.AsyncClient, t: Task) -> list[LogLine]:
            node = nodes.get(t.node_id)
            if node is None:
                return []
            try:
                r = await client.get(f"{node_url(node)}/v1/local/tasks/{t.id}/logs",
                                     params={"tail": tail} if tail else {},
                                     extensions={"sni_hostname": node.id})
            except httpx.HTTPError:
                return []  # a node that is down cannot show its logs; docker skips it too
            if r.status_code != 200:
                return []
            return [LogLine(task_id=t.id, task_name=t.name, node=node.hostname, stream=s, line=ln)
                    for s, ln in r.json()]
        async with daemon.node_client() as client:
            parts = await asyncio.gather(*(fetch(client, t) for t in tasks))
        return [line for part in parts for line in part]

    @app.post("/v1/tasks/{task_id}/exec")
    async def task_exec(task_id: str, req: ExecRequest, mgr: Mgr) -> ExecResult:
        """Run a command in a task, on whichever node runs it (forwarded over mutual TLS)."""
        task = mgr.store.view().get(Task, task_id)
        node = mgr.store.view().get(Node, task.node_id) if task is not None else None
        if task is None or node is None:
            raise NotFound(f"task {task_id} is not running on any node")
        try:
            async with daemon.node_client(timeout=req.timeout + 5.0) as client:
                r = await client.post(f"{node_url(node)}/v1/local/tasks/{task.id}/exec",
                                      json=req.model_dump(),
                                      extensions={"sni_hostname": node.id})
        except httpx.HTTPError as exc:
            raise InvalidArgument(f"cannot reach node {node.hostname}: {exc}") from None
        if r.status_code != 200:
            raise InvalidArgument(r.json().get("message", r.text))
        return ExecResult.model_validate_json(r.content)

    # -- dispatcher (agents) ----------------------------------------------------------------
    @app.post("/v1/dispatcher/heartbeat")
    async def heartbeat(node: AgentNode, mgr: Mgr) -> Heartbeat:
        return Heartbeat(period=mgr.dispatcher.heartbeat(node),
                         roots=bundle_digest(mgr.control.ca.bundle_pem))

    @app.post("/v1/dispatcher/status")
    async def status(updates: list[StatusUpdate], node: AgentNode, mgr: Mgr) -> dict[str, str]:
        mgr.dispatcher.update_status(node, updates)
        return {}

    @app.get("/v1/dispatcher/assignments")
    async def assignments(node: AgentNode, mgr: Mgr, since: int = -1,
                          timeout: Annotated[float, Query(ge=0, le=60)] = 10.0) -> Assignments:
        return await mgr.dispatcher.wait_assignments(node, since, timeout)

    return app
