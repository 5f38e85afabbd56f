"""Control API: what users may ask of the cluster — validated, then written to the store.

Nothing here runs tasks; it only records intent (specs, availability, labels) for the
orchestrator and scheduler to act on.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import time
from pathlib import Path

from pydantic import Field

from corral.api.errors import Conflict, InvalidArgument, NotFound
from corral.api.types import (
    API_PORT,
    MAX_REPLICAS,
    Cluster,
    Model,
    MAX_SECRET_SIZE,
    Network,
    NetworkSpec,
    Node,
    NodeAvailability,
    NodeDescription,
    NodeRole,
    NodeSpec,
    NodeState,
    NodeStatus,
    Secret,
    SecretReference,
    SecretSpec,
    Service,
    ServiceMode,
    ServiceSpec,
    Task,
    TaskState,
    UpdateStatus,
    new_id,
)
from corral.manager.constraints import parse_constraints
from corral.manager.ipam import check_overlap, gateway_of, parse_subnet
from corral.manager.updater import rollback
from corral.manager.ca import CertificateAuthority
from corral.manager.etcdconf import EtcdConfig
from corral.manager.secretbox import SecretBox
from corral.security.pki import DEFAULT_CERT_EXPIRY, JoinToken, Role, new_join_secret
from corral.store.base import ReadTx, Store, WriteTx

INGRESS_SUBNET = "10.0.0.0/24"  # docker's default ingress subnet
FIRST_VNI = 4096


def format_token(cluster: Cluster, role: NodeRole) -> str:
    secret = cluster.manager_secret if role is NodeRole.MANAGER else cluster.worker_secret
    return str(JoinToken(cluster.root_digest, secret))


class JoinRequest(Model):
    token: str
    hostname: str = Field(min_length=1, max_length=253)
    addr: str
    api_port: int = Field(default=API_PORT, ge=1, le=65535)
    engine_version: str = ""
    csr: str = Field(description="PEM certificate request for the node's own key")


class ManagerKeys(Model):
    etcd: EtcdConfig
    ca_cert: str
    ca_key: str
    ca_bundle: str
    ca_cross: str = ""
    box_key: str  # base64


class JoinResponse(Model):
    node_id: str
    role: NodeRole
    heartbeat_period: float
    cert: str  # the node's certificate (PEM), signed by the cluster's root CA
    ca: str  # the roots to trust (PEM bundle)
    manager: ManagerKeys | None = None  # for a node joining as a manager


class CertRequest(Model):
    csr: str


class CertResponse(Model):
    cert: str
    ca: str


class CaStatus(Model):
    digest: str  # of the root that signs now
    rotating: bool
    nodes: int
    rotated: int  # nodes whose certificate the current root signed


CA_SEAL_ID = "swarm-ca"
"""Associated data sealing the CA in the store (a sealed secret cannot pass for it)."""
MIN_CERT_EXPIRY = 5.0  # seconds; docker's minimum is 1h, tests need short-lived certificates


def check_cert_expiry(seconds: float) -> None:
    if seconds < MIN_CERT_EXPIRY:
        raise InvalidArgument(f"--cert-expiry must be at least {MIN_CERT_EXPIRY:g}s")


class NodeUpdate(Model):
    availability: NodeAvailability | None = None
    role: NodeRole | None = None
    label_add: dict[str, str] = Field(default_factory=dict)
    label_rm: list[str] = Field(default_factory=list)


Named = Node | Service | Network | Secret


def resolve(objs: list[Node] | list[Service] | list[Network] | list[Secret], ref: str,
            what: str) -> Named:
    """Find by full ID, by name, then by unique ID prefix — docker's lookup order."""
    def name(o: Named) -> str:
        return o.description.hostname if isinstance(o, Node) else o.spec.name
    for o in objs:
        if o.id == ref:
            return o
    named = [o for o in objs if name(o) == ref]
    if len(named) == 1:
        return named[0]
    prefixed = [o for o in objs if ref and o.id.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1 or len(named) > 1:
        raise InvalidArgument(f"{what} {ref} is ambiguous ({len(prefixed) or len(named)} matches found)")
    raise NotFound(f"{what} {ref} not found")


def _task_changes(old: ServiceSpec, new: ServiceSpec) -> bool:
    """Whether going from `old` to `new` needs new tasks (not just more or fewer)."""
    return (old.task != new.task or old.ports != new.ports
            or old.placement != new.placement or old.endpoint_mode != new.endpoint_mode)


class ControlAPI:
    """Cluster operations on behalf of users and joining nodes."""

    def __init__(self, store: Store, ca_dir: Path | None = None,
                 box: SecretBox | None = None, etcd: EtcdConfig | None = None) -> None:
        self.store = store
        # Where the store lives when several managers share it (None: this manager's SQLite).
        self.etcd = etcd
        self.ca_dir = ca_dir
        self._ca = CertificateAuthority.load(ca_dir)
        # The sealed CA this manager signs with, as the store held it: any other sealed value
        # there (another leader's rotation; or ours, dropped when we stepped down and replaced
        # by the next leader's at the same version number) is loaded before the next use.
        self._ca_sealed = ""
        self.box = box or SecretBox.at(None)

    @property
    def ca(self) -> CertificateAuthority:
        """The swarm's CA as the store has it now (another manager may have rotated it while
        this one followed); kept on disk too, the key 0600."""
        cluster = self.store.view().cluster()
        if cluster is not None and cluster.ca_sealed and cluster.ca_sealed != self._ca_sealed:
            data = self.box.open(cluster.ca_sealed, CA_SEAL_ID)
            self._ca = CertificateAuthority.from_json(self.ca_dir, data)
            self._ca.save()
            self._ca_sealed = cluster.ca_sealed
        if self._ca is None:
            raise NotFound("this manager has no certificate authority (cluster not initialised)")
        return self._ca

    def _publish_ca(self, ca: CertificateAuthority) -> None:
        """Record the CA (sealed) in the store, for every manager; once a rotation is done,
        join tokens pin the new root. This manager signs with it only once it is stored: a
        failed write leaves it on the root every other manager has."""
        sealed = self.box.seal(ca.to_json(), CA_SEAL_ID)

        def write(tx: WriteTx) -> None:
            c = tx.must_get(Cluster, "default")
            tx.update(c.model_copy(update={"ca_sealed": sealed,
                                           "ca_version": c.ca_version + 1,
                                           "root_digest": c.root_digest if ca.rotating
                                           else ca.digest}))
        self.store.update(write)
        ca.save()
        self._ca, self._ca_sealed = ca, sealed

    # -- swarm ---------------------------------------------------------------------------
    def init_cluster(self, *, hostname: str, addr: str, heartbeat_period: float,
                     engine_version: str, csr: str, node_id: str | None = None,
                     api_port: int = API_PORT,
                     cert_expiry: float = Cluster.model_fields["cert_expiry"].default) -> JoinResponse:
        """Create the cluster (with its root CA) and the first node, this manager."""
        if heartbeat_period <= 0:
            raise InvalidArgument("dispatcher heartbeat period must be positive")
        check_cert_expiry(cert_expiry)
        cluster = Cluster(worker_secret=new_join_secret(), manager_secret=new_join_secret(),
                          heartbeat_period=heartbeat_period, cert_expiry=cert_expiry)
        ca = CertificateAuthority.create(self.ca_dir, cluster.cluster_id)
        cluster.root_digest = ca.digest
        cluster.ca_sealed = self.box.seal(ca.to_json(), CA_SEAL_ID)
        cluster.ca_version = 1
        self._ca, self._ca_sealed = ca, cluster.ca_sealed
        node = Node(id=node_id or new_id(), spec=NodeSpec(role=NodeRole.MANAGER),
                    description=NodeDescription(hostname=hostname, addr=addr, api_port=api_port,
                                                engine_version=engine_version),
                    status=NodeStatus(state=NodeState.READY), cert_root=ca.key_id)

        # Swarm's default ingress network: the routing mesh's overlay (used by netns tasks).
        ingress = Network(id=new_id(), spec=NetworkSpec(name="ingress", subnet=INGRESS_SUBNET,
                                                        ingress=True),
                          vni=FIRST_VNI, gateway=gateway_of(INGRESS_SUBNET))

        def write(tx: WriteTx) -> None:
            tx.create(cluster)
            tx.create(node)
            tx.create(ingress)
        self.store.update(write)
        return self._issue_join(node, cluster, csr.encode())

    def _issue_join(self, node: Node, cluster: Cluster, csr: bytes) -> JoinResponse:
        cert = self._sign(csr, node.id, node.spec.role, cluster)
        keys = self.manager_keys() if node.spec.role is NodeRole.MANAGER else None
        return JoinResponse(node_id=node.id, role=node.spec.role,
                            heartbeat_period=cluster.heartbeat_period, cert=cert.decode(),
                            ca=self.ca.bundle_pem.decode(), manager=keys)

    def manager_keys(self) -> ManagerKeys | None:
        """What another manager needs to lead one day: the store's address, the CA's key and
        the key secrets are sealed with (sent only to managers, over mutual TLS)."""
        if self.etcd is None:
            return None
        return ManagerKeys(etcd=self.etcd,
                           ca_cert=self.ca.root.cert_pem.decode(),
                           ca_key=self.ca.root.key_pem.decode(),
                           ca_bundle=self.ca.bundle_pem.decode(), ca_cross=self.ca.cross_pem.decode(),
                           box_key=base64.b64encode(self.box.key).decode())

    def _sign(self, csr: bytes, subject: str, role: NodeRole | Role, cluster: Cluster) -> bytes:
        r: Role = "manager" if role is NodeRole.MANAGER else "worker" if role is NodeRole.WORKER else role
        return self.ca.sign(csr, node_id=subject, role=r, cluster_id=cluster.cluster_id,
                            expiry=dt.timedelta(seconds=cluster.cert_expiry))

    def cluster(self) -> Cluster:
        c = self.store.view().cluster()
        if c is None:
            raise NotFound("cluster not initialised")
        return c

    def join_token(self, role: NodeRole, rotate: bool) -> str:
        if rotate:
            def write(tx: WriteTx) -> None:
                c = tx.must_get(Cluster, "default")
                field = "manager_secret" if role is NodeRole.MANAGER else "worker_secret"
                tx.update(c.model_copy(update={field: new_join_secret()}))
            self.store.update(write)
        return format_token(self.cluster(), role)

    def join(self, req: JoinRequest) -> JoinResponse:
        """Admit a node that shows a valid join token, and certify its key."""
        cluster = self.cluster()
        token = JoinToken.parse(req.token)
        if not hmac.compare_digest(token.digest, cluster.root_digest):
            raise InvalidArgument("invalid join token: it belongs to another swarm")
        if hmac.compare_digest(token.secret, cluster.worker_secret):
            role = NodeRole.WORKER
        elif hmac.compare_digest(token.secret, cluster.manager_secret):
            if self.etcd is None:
                raise InvalidArgument("joining as a manager needs a replicated store (swarm init "
                                      "--store etcd): this swarm keeps its store in one "
                                      "manager's SQLite; join with the worker token")
            role = NodeRole.MANAGER
        else:
            raise InvalidArgument("invalid join token: the token was rotated or is wrong")
        csr = req.csr.encode()
        node_id = new_id()
        self._sign(csr, node_id, role, cluster)  # refuse a bad request before admitting anyone

        def write(tx: WriteTx) -> Node:
            for n in tx.all(Node):
                if n.description.addr == req.addr and n.status.state is not NodeState.DOWN:
                    raise Conflict(f"a node with address {req.addr} is already part of the swarm "
                                   f"({n.hostname}); remove it first")
            node = Node(id=node_id, spec=NodeSpec(role=role),
                        description=NodeDescription(hostname=req.hostname, addr=req.addr,
                                                    api_port=req.api_port,
                                                    engine_version=req.engine_version),
                        status=NodeStatus(state=NodeState.UNKNOWN), cert_root=self.ca.key_id)
            return tx.create(node)
        node = self.store.update(write)
        return self._issue_join(node, cluster, csr)

    def renew(self, node_id: str, csr: bytes) -> CertResponse:
        """A fresh certificate for a node's new key, with its current role."""
        node = self.store.view().get(Node, node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not part of the swarm")
        cert = self._sign(csr, node.id, node.spec.role, self.cluster())
        root = self.ca.key_id

        def write(tx: WriteTx) -> None:
            n = tx.get(Node, node_id)
            if n is not None and n.cert_root != root:
                tx.update(n.model_copy(update={"cert_root": root}))
        self.store.update(write)
        bundle = self.ca.bundle_pem
        self._maybe_finish_rotation()
        return CertResponse(cert=cert.decode(), ca=bundle.decode())

    # -- root rotation (`swarm ca --rotate`) ------------------------------------------------
    def ca_status(self) -> CaStatus:
        nodes = self.nodes()
        root = self.ca.key_id
        return CaStatus(digest=self.ca.digest, rotating=self.ca.rotating, nodes=len(nodes),
                        rotated=sum(n.cert_root == root for n in nodes))

    def rotate_ca(self) -> CaStatus:
        """Start moving every node to a new root: nodes learn it with their heartbeats, renew,
        and once all hold a certificate of the new root, the old one is no longer trusted."""
        if self.ca.rotating:
            s = self.ca_status()
            raise Conflict(f"a root CA rotation is already in progress ({s.rotated} of {s.nodes} "
                           "nodes moved to the new root)")
        self._publish_ca(self.ca.begin_rotation(self.cluster().cluster_id))
        return self.ca_status()

    def _maybe_finish_rotation(self) -> None:
        if not self.ca.rotating:
            return
        root = self.ca.key_id
        if any(n.cert_root != root for n in self.nodes()):
            return
        self._publish_ca(self.ca.finish_rotation())

    def client_cert(self, csr: bytes) -> CertResponse:
        """An admin client certificate (the CLI's, for TLS from another machine)."""
        cluster = self.cluster()
        # Client certificates do not renew by themselves: never shorter-lived than the default.
        expiry = max(dt.timedelta(seconds=cluster.cert_expiry), DEFAULT_CERT_EXPIRY)
        cert = self.ca.sign(csr, node_id=f"client-{new_id()[:12]}", role="client",
                            cluster_id=cluster.cluster_id, expiry=expiry)
        return CertResponse(cert=cert.decode(), ca=self.ca.bundle_pem.decode())

    # -- nodes ---------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        return self.store.view().all(Node)

    def node(self, ref: str) -> Node:
        found = resolve(self.nodes(), ref, "node")
        assert isinstance(found, Node)
        return found

    def update_node(self, ref: str, upd: NodeUpdate) -> Node:
        node = self.node(ref)
        if upd.role is NodeRole.MANAGER and node.spec.role is NodeRole.WORKER \
                and self.etcd is None:
            raise InvalidArgument("promoting a node to manager needs a replicated store (swarm "
                                  "init --store etcd): this swarm keeps its store in one "
                                  "manager's SQLite")
        if upd.role is NodeRole.WORKER and node.spec.role is NodeRole.MANAGER:
            others = [n for n in self.nodes() if n.spec.role is NodeRole.MANAGER
                      and n.id != node.id and n.status.state is not NodeState.DOWN]
            if not others:
                raise InvalidArgument(f"demoting {node.hostname} would leave the swarm without a "
                                      "reachable manager: promote another node first")
        labels = {k: v for k, v in node.spec.labels.items() if k not in upd.label_rm}
        for key in upd.label_rm:
            if key not in node.spec.labels:
                raise InvalidArgument(f"key {key} doesn't exist in node's labels")
        labels.update(upd.label_add)
        spec = node.spec.model_copy(update={
            "availability": upd.availability or node.spec.availability, "labels": labels,
            "role": upd.role or node.spec.role})
        return self.store.update(lambda tx: tx.update(node.model_copy(update={"spec": spec})))

    def remove_node(self, ref: str, force: bool) -> None:
        node = self.node(ref)
        if node.spec.role is NodeRole.MANAGER:
            raise InvalidArgument(f"rejected removal of node {node.hostname}: it is a manager; "
                                  "demote it first (corral node demote)")
        if node.status.state is not NodeState.DOWN and not force:
            raise InvalidArgument(
                f"node {node.hostname} is not down and can't be removed: "
                "use --force, or run `corral swarm leave` on it first")
        self.store.update(lambda tx: tx.delete(Node, node.id))
        self._maybe_finish_rotation()  # a removed node no longer holds a rotation back

    # -- services --------------------------------------------------------------------------
    def services(self) -> list[Service]:
        return self.store.view().all(Service)

    def service(self, ref: str) -> Service:
        found = resolve(self.services(), ref, "service")
        assert isinstance(found, Service)
        return found

    # -- networks ------------------------------------------------------------------------
    def networks(self) -> list[Network]:
        return self.store.view().all(Network)

    def network(self, ref: str) -> Network:
        found = resolve(self.networks(), ref, "network")
        assert isinstance(found, Network)
        return found

    def create_network(self, spec: NetworkSpec) -> Network:
        if spec.ingress:
            raise InvalidArgument("the ingress network is made by `swarm init`; there is only one")
        subnet = parse_subnet(spec.subnet)

        def write(tx: WriteTx) -> Network:
            nets = tx.all(Network)
            if any(n.spec.name == spec.name for n in nets):
                raise Conflict(f"network with name {spec.name} already exists")
            check_overlap(subnet, nets)
            vni = max((n.vni for n in nets), default=FIRST_VNI - 1) + 1
            return tx.create(Network(id=new_id(), spec=spec.model_copy(update={"subnet": str(subnet)}),
                                     vni=vni, gateway=gateway_of(str(subnet))))
        return self.store.update(write)

    def remove_network(self, ref: str) -> Network:
        net = self.network(ref)

        def write(tx: WriteTx) -> None:
            users = [s.spec.name for s in tx.all(Service) if net.id in s.spec.networks
                     or (net.spec.ingress and any(p.publish_mode == "ingress" for p in s.spec.ports))]
            if users:
                raise Conflict(f"network {net.spec.name} is in use by service {', '.join(sorted(users))}")
            if any(a.network_id == net.id for t in tx.all(Task) for a in t.networks
                   if not t.status.state.terminal):
                raise Conflict(f"network {net.spec.name} still has tasks attached; retry shortly")
            tx.delete(Network, net.id)
            for n in tx.all(Node):  # give the nodes' addresses back
                if any(a.network_id == net.id for a in n.attachments):
                    tx.update(n.model_copy(update={
                        "attachments": [a for a in n.attachments if a.network_id != net.id]}))
        self.store.update(write)
        return net

    def _resolve_secrets(self, spec: ServiceSpec, view: ReadTx) -> ServiceSpec:
        """The spec with each secret reference pointing at a secret's ID (refusing unknown
        secrets and two secrets in one file)."""
        refs: list[SecretReference] = []
        files: set[str] = set()
        for ref in spec.task.secrets:
            named = [x for x in view.all(Secret) if x.spec.name == ref.secret_name]
            if not named:
                raise InvalidArgument(f"secret not found: {ref.secret_name}")
            if ref.file_name in files:
                raise InvalidArgument(f"duplicate secret target {ref.file_name}")
            files.add(ref.file_name)
            refs.append(ref.model_copy(update={"secret_id": named[0].id}))
        task = spec.task.model_copy(update={"secrets": refs})
        return spec.model_copy(update={"task": task})

    def _resolve_networks(self, spec: ServiceSpec, view: ReadTx) -> ServiceSpec:
        """The spec with network names turned into IDs (refusing unknown and ingress)."""
        ids: list[str] = []
        for ref in spec.networks:
            found = resolve(view.all(Network), ref, "network")
            assert isinstance(found, Network)
            if found.spec.ingress:
                raise InvalidArgument("the ingress network is attached by publishing a port "
                                      "(-p), not with --network")
            if found.id not in ids:
                ids.append(found.id)
        return spec.model_copy(update={"networks": ids})

    def _validate(self, spec: ServiceSpec, view: ReadTx, own_id: str = "") -> None:
        parse_constraints(spec.placement.constraints)
        if spec.endpoint_mode == "dnsrr" and any(p.publish_mode == "ingress" for p in spec.ports):
            raise InvalidArgument("port published with ingress mode can't be used with dnsrr mode")
        if spec.mode is ServiceMode.GLOBAL and spec.replicas not in (0, 1):
            raise InvalidArgument("replicas can only be used with replicated mode")
        seen: set[tuple[str, int]] = set()
        ingress = {(p.protocol, p.published_port) for p in spec.ports if p.publish_mode == "ingress"}
        for p in spec.ports:
            if p.published_port == API_PORT and p.protocol == "tcp":
                raise InvalidArgument(f"port {API_PORT} is reserved for the corral API on every node")
            key = (p.protocol, p.published_port)
            if key in seen:
                raise InvalidArgument(f"duplicate published port {p.published_port}/{p.protocol}")
            seen.add(key)
        for other in view.all(Service):
            if other.id == own_id:
                continue
            if other.spec.name == spec.name:
                raise Conflict(f"service name {spec.name} is already in use")
            for p in other.spec.ports:
                key = (p.protocol, p.published_port)
                # An ingress port is bound on every node, so it clashes with any use of the
                # port; two host-mode ports only clash per node (the scheduler keeps them apart).
                if key in seen and (p.publish_mode == "ingress" or key in ingress):
                    mode = "an ingress" if p.publish_mode == "ingress" else "a host-mode"
                    raise Conflict(f"port '{p.published_port}' is already in use by service "
                                   f"'{other.spec.name}' ({other.id[:12]}) as {mode} port")

    def create_service(self, spec: ServiceSpec) -> Service:
        def write(tx: WriteTx) -> Service:
            resolved = self._resolve_secrets(self._resolve_networks(spec, tx), tx)
            self._validate(resolved, tx)
            return tx.create(Service(id=new_id(), spec=resolved))
        return self.store.update(write)

    def update_service(self, ref: str, spec: ServiceSpec, force: bool = False) -> Service:
        """Change a service's spec; task-affecting changes roll out as a rolling update."""
        svc = self.service(ref)

        def write(tx: WriteTx) -> Service:
            current = tx.must_get(Service, svc.id)
            resolved = self._resolve_secrets(self._resolve_networks(spec, tx), tx)
            self._validate(resolved, tx, own_id=current.id)
            if resolved.mode is not current.spec.mode:
                raise InvalidArgument("service mode cannot be changed by an update")
            if resolved.networks != current.spec.networks:
                raise InvalidArgument("changing a service's networks needs `service rm` and "
                                      "`service create` (not supported by update yet)")
            rolls = force or _task_changes(current.spec, resolved)
            if not rolls and resolved == current.spec:
                return current
            now = time.time()
            changes: dict[str, object] = {"spec": resolved, "previous_spec": current.spec,
                                          "updated_at": now}
            if rolls:
                version = current.spec_version + 1
                changes.update(spec_version=version,
                               update_status=UpdateStatus(state="updating", started_at=now,
                                                          message="update in progress"))
                if force:
                    changes["force_version"] = version
            return tx.update(current.model_copy(update=changes))
        return self.store.update(write)

    def rollback_service(self, ref: str) -> Service:
        """Go back to the spec before the last update, rolled out like an update."""
        svc = self.service(ref)
        if svc.previous_spec is None:
            raise InvalidArgument(f"service {svc.spec.name} has no previous spec to roll back to")

        def write(tx: WriteTx) -> Service:
            current = tx.must_get(Service, svc.id)
            if current.previous_spec is None:
                raise InvalidArgument(f"service {svc.spec.name} has no previous spec to roll back to")
            return tx.update(rollback(current, time.time()))
        return self.store.update(write)

    def scale(self, ref: str, replicas: int) -> Service:
        if replicas < 0 or replicas > MAX_REPLICAS:
            raise InvalidArgument(f"invalid replicas value {replicas}: must be between 0 and "
                                  f"{MAX_REPLICAS}")
        svc = self.service(ref)
        if svc.spec.mode is not ServiceMode.REPLICATED:
            raise InvalidArgument(f"{svc.spec.name}: scale can only be used with replicated mode")
        spec = svc.spec.model_copy(update={"replicas": replicas})
        return self.store.update(lambda tx: tx.update(
            svc.model_copy(update={"spec": spec, "updated_at": time.time()})))

    def remove_service(self, ref: str) -> Service:
        """Delete the service; its tasks are marked REMOVE here and reaped once stopped."""
        svc = self.service(ref)

        def write(tx: WriteTx) -> None:
            tx.delete(Service, svc.id)
            for t in tx.tasks_of_service(svc.id):
                if t.desired_state < TaskState.REMOVE:
                    tx.update(t.model_copy(update={"desired_state": TaskState.REMOVE}))
        self.store.update(write)
        return svc

    # -- secrets -------------------------------------------------------------------------
    def secrets(self) -> list[Secret]:
        return self.store.view().all(Secret)

    def secret(self, ref: str) -> Secret:
        found = resolve(self.secrets(), ref, "secret")
        assert isinstance(found, Secret)
        return found

    def create_secret(self, spec: SecretSpec, data: bytes) -> Secret:
        if not data:
            raise InvalidArgument("secret data is empty")
        if len(data) > MAX_SECRET_SIZE:
            raise InvalidArgument(f"secret data is too large ({len(data)} bytes; at most "
                                  f"{MAX_SECRET_SIZE // 1024} KB)")
        secret_id = new_id()
        secret = Secret(id=secret_id, spec=spec, sealed=self.box.seal(data, secret_id),
                        size=len(data))

        def write(tx: WriteTx) -> Secret:
            if any(x.spec.name == spec.name for x in tx.all(Secret)):
                raise Conflict(f"secret {spec.name} already exists")
            return tx.create(secret)
        return self.store.update(write)

    def remove_secret(self, ref: str) -> Secret:
        secret = self.secret(ref)

        def write(tx: WriteTx) -> None:
            users = sorted(s.spec.name for s in tx.all(Service)
                           if any(r.secret_id == secret.id for r in s.spec.task.secrets))
            if users:
                raise InvalidArgument(f"secret {secret.spec.name} is in use by the following "
                                      f"service: {', '.join(users)}")
            tx.delete(Secret, secret.id)
        self.store.update(write)
        return secret

    def open_secret(self, secret: Secret) -> bytes:
        return self.box.open(secret.sealed, secret.id)

    def tasks(self, service_ref: str | None = None, node_ref: str | None = None) -> list[Task]:
        view = self.store.view()
        tasks = view.all(Task)
        if service_ref is not None:
            sid = self.service(service_ref).id
            tasks = [t for t in tasks if t.service_id == sid]
        if node_ref is not None:
            nid = self.node(node_ref).id
            tasks = [t for t in tasks if t.node_id == nid]
        return tasks
