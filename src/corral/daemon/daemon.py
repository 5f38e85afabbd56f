"""Daemon: one per node. Serves the node's API, runs the agent and the ingress mesh, and —
after `swarm init` — the manager."""

from __future__ import annotations

import asyncio
import logging
import platform
import shutil
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from corral import __version__
from corral.agent.exec import TaskEnv, in_task_namespaces
from corral.agent.runtimes.process import ProcessExecutor
from corral.agent.certs import keep_certificate, renew
from corral.agent.session import MANAGER_NAME, ManagerSession
from corral.agent.worker import Agent
from corral.api.errors import CorralError, InvalidArgument, NotFound, NotInSwarm, NotManager
from corral.api.types import API_PORT, Model, Node, NodeRole, TaskState, new_id
from corral.daemon.config import DaemonConfig
from corral.daemon.listeners import ASGIApp, ControlListener
from corral.daemon.meshworkers import MeshWorkers
from corral.host.conntrack import flush_udp_flows
from corral.daemon.state import NodeIdentity, forget_identity, load_identity, save_identity
from corral.dataplane.feed import (
    endpoints_to_kernel,
    endpoints_to_mesh,
    kernel_capable,
    policies_of,
)
from corral.dataplane.nft import NftError, apply_async
from corral.dataplane.nft_ingress import (
    IngressRule,
    enable_forwarding,
    render_delete,
    render_ingress_table,
    render_ingress_update,
)
from corral.dataplane.ingress import IngressMesh
from corral.dataplane.worker import encode as encode_update
from corral.manager.controlapi import JoinRequest, JoinResponse
from corral.manager.dispatcher import Assignments, Endpoint
from corral.manager.etcdconf import EtcdConfig
from corral.manager.manager import Manager, install_manager_keys
from corral.store.etcd import check_etcd_is_free
from corral.security.nodetls import NodeTLS
from corral.security.pki import (
    JoinToken,
    Role,
    bootstrap_context,
    client_context,
    split_bundle,
)

if TYPE_CHECKING:  # the overlay (and dnspython) is loaded only by the netns runtime
    from corral.agent.overlay import NodeOverlay

log = logging.getLogger(__name__)


class SwarmInfo(Model):
    """This node's view of its swarm membership."""

    state: str  # inactive | active
    node_id: str = ""
    role: str = ""
    manager_addr: str = ""
    is_manager: bool = False
    is_leader: bool = False
    leader_id: str = ""  # the leading manager's node (with several managers on etcd)
    leader_addr: str = ""


class Info(Model):
    """`GET /v1/info`: who this daemon is."""

    hostname: str
    addr: str
    version: str
    os: str
    arch: str
    swarm: SwarmInfo
    mesh_errors: dict[str, str] = {}


class Daemon:
    """Everything one node runs, wired together."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.addr = config.addr
        self.advertise = config.advertise
        self.data_dir = config.data_dir
        self.hostname = config.hostname
        self.api_port = config.api_port
        # With task namespaces the mesh reaches tasks over the ingress overlay: let the kernel
        # pick the node's address there as the source instead of the node's own address.
        self.mesh = IngressMesh(config.addr, bind_source=config.runtime == "process",
                                idle_timeout=config.mesh_idle_timeout,
                                reuse_port=config.mesh_workers > 1)
        worker_argv = ["--listen", self.addr, "--idle-timeout", str(config.mesh_idle_timeout)]
        if config.runtime == "process":
            worker_argv.append("--bind-source")
        self.workers = MeshWorkers(config.mesh_workers - 1, worker_argv)
        self.overlay: NodeOverlay | None = None
        self._kernel_rules: list[IngressRule] | None = None
        self.mesh_errors: dict[str, str] = {}
        self.identity: NodeIdentity | None = None
        self.manager: Manager | None = None
        self.agent: Agent | None = None
        self.executor: ProcessExecutor | None = None
        self._agent_task: asyncio.Task[None] | None = None
        self._certs_task: asyncio.Task[None] | None = None
        self._role_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.tls = NodeTLS(self.data_dir / "tls")
        # The API wrapped for the TLS port (set by whoever serves the local door: run.serve).
        self.control_app: ASGIApp | None = None
        self._listener: ControlListener | None = None
        self._cluster_id: str | None = None

    @property
    def api_addr(self) -> str:
        return f"{self.advertise}:{self.api_port}"

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Clean up after a crash, then resume the swarm membership saved on disk."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        killed = ProcessExecutor(self.data_dir, TaskEnv(self.hostname, "", self.addr)).cleanup_orphans()
        if self.config.runtime == "netns":
            from corral.agent.runtimes.netns import sweep_namespaces
            sweep_namespaces(self.config.task_netns_prefix)
        if self.config.mesh == "kernel":
            enable_forwarding()  # this node's own namespace only (the netns runtime's rule)
        if killed:
            log.warning("killed %d task processes left by a previous run", len(killed))
        self.identity = load_identity(self.data_dir)
        if self.identity is not None and not self.tls.exists():
            log.error("this node's swarm membership has no certificate (made by an older "
                      "corral?): leaving the swarm; join it again")
            forget_identity(self.data_dir)
            self.identity = None
        if self.identity is not None:
            if self.identity.role is NodeRole.MANAGER:
                self._start_manager(self.identity.node_id)
            await self._open_control()
            self._start_agent(self.identity)

    # -- the control port (mutual TLS) --------------------------------------------------------
    async def _open_control(self) -> None:
        """Listen on the control port with this node's certificate."""
        if self.control_app is None:
            raise RuntimeError("the daemon's control app was not set")
        self._cluster_id = self.tls.identity().cluster_id
        self._listener = ControlListener(self.control_app, self.addr, self.api_port,
                                         self.tls.server_context())
        try:
            await self._listener.start()
        except OSError as exc:
            self._listener = None
            raise CorralError(f"cannot listen on {self.addr}:{self.api_port}: "
                              f"{exc.strerror or exc}") from None

    async def _close_control(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None

    async def _trust_changed(self) -> None:
        """The swarm's roots changed: new connections get a context that trusts the new set."""
        if self._listener is not None:
            self._listener.set_context(self.tls.server_context())

    def cluster_id(self) -> str | None:
        return self._cluster_id

    def node_roles(self) -> Callable[[str], Role | None] | None:
        """On a manager: what the store says a node is now (None: removed). On a worker:
        a manager only if the last assignments named it one."""
        manager = self.manager
        if manager is None:
            agent = self.agent
            if agent is None or not agent.manager_ids:
                return None
            ids = agent.manager_ids
            return lambda node_id: "manager" if node_id in ids else "worker"

        def role(node_id: str) -> Role | None:
            n = manager.store.view().get(Node, node_id)
            return None if n is None else n.spec.role.value
        return role

    def node_client(self, timeout: float = 5.0) -> httpx.AsyncClient:
        """HTTPS to other nodes' control ports, as this node; send requests with
        ``extensions={"sni_hostname": NODE_NAME}`` (any node's certificate will do)."""
        return httpx.AsyncClient(verify=self.tls.client_context(), timeout=timeout)

    def _start_manager(self, node_id: str) -> None:
        """Run this node's manager (with etcd: a follower, until it wins an election)."""
        self.manager = Manager.open(self.data_dir, self._me(node_id))
        self.manager.start()

    async def _drop_manager(self) -> None:
        """Stop this node's manager, if any, and forget its state (keys, CA, store)."""
        manager, self.manager = self.manager, None
        if manager is not None:
            await manager.stop()
        shutil.rmtree(self.data_dir / "manager", ignore_errors=True)

    async def stop(self) -> None:
        await self._stop_agent()
        await self.workers.stop()
        await self._close_control()
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None
        await self.mesh.close()

    def _start_agent(self, ident: NodeIdentity) -> None:
        env = TaskEnv(self.hostname, ident.node_id, self.addr)
        apply_networks = None
        if self.config.runtime == "netns":
            from corral.agent.overlay import NodeOverlay
            from corral.agent.runtimes.netns import NetnsExecutor
            from corral.dataplane.dns import DnsServer, upstreams_from_resolv_conf
            from corral.host.netlink import Netlink
            self.overlay = NodeOverlay(Netlink(), self.advertise,
                                       DnsServer(upstreams_from_resolv_conf()))
            self.executor = NetnsExecutor(self.data_dir, env, self.overlay.host, self.overlay,
                                          self.config.task_netns_prefix)
            overlay = self.overlay

            async def apply_networks(a: Assignments) -> None:
                await overlay.apply(a.networks, a.services)
        else:
            self.executor = ProcessExecutor(self.data_dir, env)
        session = ManagerSession(ident.manager_addr, self.tls, ident.managers,
                                 self._remember_managers)
        self.agent = Agent(session, self.executor, self._apply_endpoints, self.advertise,
                           apply_networks, forward_host_ports=self.config.runtime == "netns",
                           on_role=self._role_said)
        self._agent_task = asyncio.create_task(self.agent.run(), name="agent")
        self._certs_task = asyncio.create_task(
            keep_certificate(session, self.tls, self._trust_changed), name="certificates")

    def _role_said(self, role: NodeRole) -> None:
        """The manager says what this node is; a change (promote/demote) is acted on once."""
        ident = self.identity
        if ident is None or ident.role is role or self._role_task is not None:
            return
        self._role_task = asyncio.create_task(self._change_role(role), name="role-change")

    async def _change_role(self, role: NodeRole) -> None:
        """Promoted: a manager certificate, the swarm's keys, a manager that follows and
        campaigns. Demoted: the manager stops (resigning if it led), a worker certificate."""
        try:
            async with self._lock:
                ident, agent = self.identity, self.agent
                if ident is None or agent is None or ident.role is role:
                    return
                session = agent.session
                await renew(session, self.tls, self._trust_changed)  # the new role's certificate
                if role is NodeRole.MANAGER:
                    install_manager_keys(self.data_dir, await session.manager_keys())
                    self._start_manager(ident.node_id)
                else:
                    await self._drop_manager()
                self.identity = ident.model_copy(update={"role": role})
                save_identity(self.data_dir, self.identity)
                log.info("this node is now a %s", role.value)
        except Exception as exc:  # the next assignments say it again: try again then
            log.warning("changing this node's role to %s failed: %r", role.value, exc)
        finally:
            self._role_task = None

    def _remember_managers(self, current: str, managers: list[str]) -> None:
        """Keep the managers on disk: after a restart the node must find one that lives."""
        if self.identity is not None:
            self.identity = self.identity.model_copy(update={"manager_addr": current,
                                                             "managers": managers})
            save_identity(self.data_dir, self.identity)

    async def _stop_agent(self) -> None:
        if self._role_task is not None:
            self._role_task.cancel()
            await asyncio.gather(self._role_task, return_exceptions=True)
            self._role_task = None
        if self._certs_task is not None:
            self._certs_task.cancel()
            try:
                await self._certs_task
            except asyncio.CancelledError:
                pass
            self._certs_task = None
        if self._agent_task is not None:
            self._agent_task.cancel()
            try:
                await self._agent_task
            except asyncio.CancelledError:
                pass
            self._agent_task = None
        if self.agent is not None:
            await self.agent.session.close()
            self.agent = None
        await self.mesh.apply({})
        await self.workers.feed(encode_update({}, {}))
        if self.config.mesh == "kernel" and self._kernel_rules is not None:
            try:
                await apply_async(render_delete())
            except NftError as exc:
                log.error("kernel mesh: removing the table: %s", exc)
            self._kernel_rules = None
        if self.overlay is not None:
            await self.overlay.close()
            self.overlay = None

    async def _apply_endpoints(self, endpoints: list[Endpoint]) -> None:
        if self.config.mesh == "kernel":
            # The kernel serves what it can; the rest (least-conn, maglev, affinity) keeps a
            # userspace listener on its port.
            await self._apply_kernel_mesh([e for e in endpoints if kernel_capable(e)])
            endpoints = [e for e in endpoints if not kernel_capable(e)]
        mesh, policies = endpoints_to_mesh(endpoints), policies_of(endpoints)
        errors = await self.mesh.apply(mesh, policies)
        # The workers start with the first TCP port the userspace mesh serves: an idle node,
        # or one whose ports are all in the kernel, does not pay for them.
        if self.workers.count:
            if any(p.protocol == "tcp" for p in mesh):
                await self.workers.ensure()
            await self.workers.feed(encode_update(mesh, policies))
        self.mesh_errors = {f"{p.port}/{p.protocol}": e for p, e in errors.items()}
        for port, err in self.mesh_errors.items():
            log.error("cannot publish %s on %s: %s", port, self.addr, err)

    async def exec_in_task(self, task_id: str, cmd: list[str], timeout: float) -> tuple[int, str, str]:
        """Run a command where a running task runs (its namespace, with the netns runtime)."""
        runner = self.agent.runners.get(task_id) if self.agent else None
        if runner is None or runner.state is not TaskState.RUNNING:
            raise NotFound(f"task {task_id} is not running on this node")
        argv = list(cmd)
        if runner.ctl.netns is not None and runner.ctl.pid:
            argv = in_task_namespaces(runner.ctl.pid, argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=runner.ctl.environment())
        except OSError as exc:
            raise InvalidArgument(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise InvalidArgument(f"command timed out after {timeout:g}s") from None
        return (proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def _apply_kernel_mesh(self, endpoints: list[Endpoint]) -> None:
        """Published ports as nftables DNAT in this node's namespace (only when changed)."""
        rules = endpoints_to_kernel(endpoints)
        if rules == self._kernel_rules:
            return
        try:
            old = self._kernel_rules
            if old is None:
                await apply_async(render_ingress_table(self.addr, rules))
            else:
                # Only the ports that changed: other ports keep their state untouched.
                update = render_ingress_update(old, rules)
                if update is not None:
                    try:
                        await apply_async(update)
                    except NftError as exc:
                        log.warning("kernel mesh: incremental update failed (%s); "
                                    "rewriting the table", exc)
                        await apply_async(render_ingress_table(self.addr, rules))
            self._kernel_rules = rules
            self.mesh_errors = {}
            await self._forget_udp_flows(old or [], rules)
        except NftError as exc:
            self._kernel_rules = None  # start from a full table next time
            self.mesh_errors = {"kernel": str(exc)}
            log.error("kernel mesh: %s", exc)

    async def _forget_udp_flows(self, old: list[IngressRule], new: list[IngressRule]) -> None:
        """UDP flows of removed backends would live on in conntrack: flush them."""
        now = {(r.protocol, r.port): {a for a, _ in r.backends} for r in new}
        for r in old:
            if r.protocol != "udp":
                continue
            removed = {a for a, _ in r.backends} - now.get(("udp", r.port), set())
            if removed:
                try:
                    await asyncio.to_thread(flush_udp_flows, self.addr, r.port, removed)
                except Exception as exc:  # best effort: the flows expire by themselves
                    log.warning("kernel mesh: flushing UDP flows of port %d: %s", r.port, exc)

    # -- what the API needs --------------------------------------------------------------
    def info(self) -> Info:
        ident = self.identity
        swarm = SwarmInfo(state="inactive")
        if ident is not None:
            m = self.manager
            leading = m is not None and m.leading
            swarm = SwarmInfo(state="active", node_id=ident.node_id, role=ident.role.value,
                              manager_addr=ident.manager_addr, is_manager=m is not None,
                              is_leader=leading,
                              leader_id=(ident.node_id if leading else m.leader_id) if m else "",
                              leader_addr=(self.api_addr if leading else m.leader_addr) if m else "")
        return Info(hostname=self.hostname, addr=self.advertise, version=__version__,
                    os=platform.system().lower(), arch=platform.machine(), swarm=swarm,
                    mesh_errors=self.mesh_errors)

    def require_manager(self) -> Manager:
        if self.manager is None:
            raise NotManager() if self.identity is not None else NotInSwarm()
        return self.manager

    def _me(self, node_id: str) -> str:
        """What the election key says while this node's manager leads."""
        return f"{node_id}@{self.api_addr}"

    async def init_swarm(self, advertise_addr: str | None, heartbeat_period: float,
                         cert_expiry: float, etcd: EtcdConfig | None = None
                         ) -> tuple[str, str]:
        """Become the manager of a new swarm (and its CA); returns (node id, worker token).
        With `etcd` the store lives in etcd, where more managers can join it."""
        async with self._lock:
            if self.identity is not None:
                raise InvalidArgument("This node is already part of a swarm. Use \"corral swarm "
                                      "leave\" to leave this swarm and join another one.")
            adv = advertise_addr or self.api_addr
            if ":" not in adv:
                adv = f"{adv}:{self.api_port}"
            node_id = new_id()
            if etcd is not None:
                etcd.check()
                await check_etcd_is_free(etcd.client())
                etcd.save(self.data_dir)
            manager = Manager.open(self.data_dir, self._me(node_id))
            try:
                if manager.ha:
                    manager.start()  # it must lead before it writes the cluster
                    try:
                        await manager.wait_leading(15.0)
                    except TimeoutError:
                        raise InvalidArgument("could not become the leader in etcd within 15s: "
                                              f"{manager.store_error()}") from None
                resp = manager.control.init_cluster(hostname=self.hostname, addr=self.advertise,
                                                    heartbeat_period=heartbeat_period,
                                                    engine_version=__version__,
                                                    csr=self.tls.new_csr().decode(),
                                                    cert_expiry=cert_expiry, node_id=node_id,
                                                    api_port=self.api_port)
                await manager.store.flush()
                self.tls.trust(resp.ca.encode())
                self.tls.install(resp.cert.encode())
                self.manager = manager
                await self._open_control()
            except BaseException:
                self.manager = manager
                await self._drop_manager()
                self.tls.forget()
                raise
            if not manager.ha:
                manager.start()
            self.identity = NodeIdentity(node_id=resp.node_id, role=NodeRole.MANAGER,
                                         manager_addr=adv)
            save_identity(self.data_dir, self.identity)
            self._start_agent(self.identity)
            return resp.node_id, manager.control.join_token(NodeRole.WORKER, rotate=False)

    async def join_swarm(self, token: str, remote: str) -> NodeRole:
        """Join the swarm whose manager listens at `remote` (HOST[:PORT])."""
        async with self._lock:
            if self.identity is not None:
                raise InvalidArgument("This node is already part of a swarm. Use \"corral swarm "
                                      "leave\" to leave this swarm and join another one.")
            if ":" not in remote:
                remote = f"{remote}:{API_PORT}"
            pinned = JoinToken.parse(token)
            root = await self._fetch_pinned_root(remote, pinned)
            req = JoinRequest(token=token, hostname=self.hostname, addr=self.advertise,
                              api_port=self.api_port, engine_version=__version__,
                              csr=self.tls.new_csr().decode())
            # From here on the manager must prove it holds a certificate of the pinned root.
            r = await self._call_manager(remote, client_context(root), "POST", "/v1/swarm/nodes",
                                         json=req.model_dump(mode="json"))
            resp = JoinResponse.model_validate_json(r.content)
            self.tls.trust(resp.ca.encode())
            self.tls.install(resp.cert.encode())
            try:
                if resp.manager is not None:
                    install_manager_keys(self.data_dir, resp.manager)
                    self._start_manager(resp.node_id)  # a follower, until it wins an election
                await self._open_control()
            except BaseException:
                await self._drop_manager()
                self.tls.forget()
                raise
            self.identity = NodeIdentity(node_id=resp.node_id, role=resp.role, manager_addr=remote)
            save_identity(self.data_dir, self.identity)
            self._start_agent(self.identity)
            return resp.role

    async def _fetch_pinned_root(self, remote: str, token: JoinToken) -> bytes:
        """The manager's root CA certificate, if it is the one the token pins (nothing is
        trusted before this check: a manager of another CA is refused here)."""
        r = await self._call_manager(remote, bootstrap_context(), "GET", "/v1/ca")
        try:
            roots = split_bundle(r.json()["ca"].encode())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidArgument(f"the manager at {remote} sent no valid CA certificate") from None
        for root in roots:
            if token.pins(root):
                return root
        raise InvalidArgument(
            f"the manager at {remote} presents a CA certificate that does not match the join "
            "token: refusing to join (a token of another swarm, or not the manager you think)")

    @staticmethod
    async def _call_manager(remote: str, ctx: ssl.SSLContext, method: str, path: str,
                            **kw: object) -> httpx.Response:
        try:
            async with httpx.AsyncClient(verify=ctx, timeout=10.0) as client:
                r = await client.request(method, f"https://{remote}{path}",
                                         extensions={"sni_hostname": MANAGER_NAME}, **kw)  # type: ignore[arg-type]
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise InvalidArgument(f"the manager at {remote} does not hold a manager "
                                      f"certificate of the swarm the token pins: {exc}") from None
            raise InvalidArgument(f"cannot reach the manager at {remote}: {exc}") from None
        except httpx.HTTPError as exc:
            raise InvalidArgument(f"cannot reach the manager at {remote}: {exc}") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("message", r.text)
            except ValueError:
                msg = r.text
            raise InvalidArgument(msg)
        return r

    async def leave_swarm(self, force: bool) -> None:
        """Stop taking part in the swarm: tasks stop, ports close, identity is forgotten."""
        async with self._lock:
            if self.identity is None:
                raise InvalidArgument("This node is not part of a swarm")
            if self.manager is not None and not force:
                raise InvalidArgument(
                    "You are attempting to leave the swarm on a node that is participating as a "
                    "manager. Removing the last manager erases all current state of the swarm. "
                    "Use `--force` to ignore this message.")
            await self._stop_agent()
            await self._close_control()
            await self._drop_manager()
            forget_identity(self.data_dir)
            self.tls.forget()
            self.identity = None
            self._cluster_id = None
