"""The lab: N daemons on one machine, formed into a swarm.

The loopback lab puts node daemons on 127.0.0.11, .12, …; the netns lab (`--netns`, root only)
makes each node a "real host": its own network namespace with its own address on a lab bridge
(`corral.lab.hosts` does the plumbing), with the node's daemon running inside it.

Each node's daemon runs in its own session (process group), so `kill` can take a node down
with all its task processes at once, as pulling a host's plug would.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from corral.api.errors import CorralError, InvalidArgument, NotFound
from corral.api.types import API_PORT
from corral.client import SOCKET_NAME, Client, DaemonUnreachable, TlsFiles
from corral.security import pki
from corral.security.files import write_private
from corral.store.etcd_member import member_argv, wait_healthy
from corral.lab.hosts import Host, NetnsHosts, used_networks

DEFAULT_BASE_ADDR = "127.0.0.11"
DEFAULT_SUBNET = "10.99.0.0/24"
NETNS_PREFIX = "crl"
"""Every netns lab's names start with `crl<id>` (bridge), `crl<id>-` (namespaces)."""
NODE_HOST_OFFSET = 10
"""In the netns lab node I gets the subnet's address 10+I (node1 = .11); the bridge gets .1."""
ETCD_PORTS = (2379, 2380)
"""An etcd member's client and peer ports, on its node's address."""
TASK_NETNS_OPTION = "--task-netns-prefix"
"""Daemon option naming the prefix of the namespaces it makes for its tasks."""
NEEDS_ROOT = "the netns lab needs root (network namespaces)"


def default_lab_dir() -> Path:
    env = os.environ.get("CORRAL_LAB_DIR")
    return Path(env) if env else Path.home() / ".corral" / "lab"


@dataclass
class LabNode:
    """One lab host: a daemon process on its own address (and namespace, in the netns lab)."""

    name: str
    addr: str
    data_dir: str
    log: str
    pid: int = 0
    netns: str = ""
    veth: str = ""
    etcd: bool = False  # runs an etcd member next to its daemon (--store etcd)

    @property
    def host(self) -> str:
        """The node's control port (mutual TLS; the lab's client certificate is in DIR/tls)."""
        return f"{self.addr}:{API_PORT}"

    @property
    def socket(self) -> str:
        """The node daemon's local socket (owner-only): how the lab itself talks to it."""
        return f"unix://{Path(self.data_dir) / SOCKET_NAME}"


def lab_id(lab_dir: Path) -> str:
    """A short id, stable per lab directory, that keeps two labs' names apart."""
    return hashlib.sha1(str(lab_dir.resolve()).encode()).hexdigest()[:4]


def check_root(euid: int | None = None) -> None:
    """Refuse the netns lab to anyone but root."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise CorralError(NEEDS_ROOT)


def parse_subnet(subnet: str, count: int) -> ipaddress.IPv4Network:
    """Check that `subnet` can hold the bridge and `count` nodes at .11, .12, …"""
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid --subnet {subnet!r}: {exc}") from None
    if not net.is_private or net.is_loopback or net.is_link_local or net.is_multicast:
        raise InvalidArgument(f"invalid --subnet {subnet}: the lab needs a private IPv4 subnet "
                              "(e.g. 10.99.0.0/24)")
    if net.num_addresses - 2 < NODE_HOST_OFFSET + count:
        raise InvalidArgument(f"--subnet {subnet} has too few addresses for {count} nodes: "
                              f"the lab uses .1 and .{NODE_HOST_OFFSET + 1}-"
                              f".{NODE_HOST_OFFSET + count} (use a /24 or larger)")
    return net


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Lab:
    """A lab recorded in `dir/lab.json`."""

    def __init__(self, dir: Path | None = None) -> None:
        self.dir = dir or default_lab_dir()
        self.nodes: list[LabNode] = []
        self.heartbeat = 1.0
        self.netns = False
        self.subnet = ""
        self.bridge = ""
        self.prefix = ""
        self.store = "sqlite"

    @property
    def hosts(self) -> NetnsHosts:
        """The netns plumbing of this lab (its recorded names, or those its dir implies)."""
        prefix = self.prefix or f"{NETNS_PREFIX}{lab_id(self.dir)}"
        net = ipaddress.IPv4Network(self.subnet or DEFAULT_SUBNET)
        return NetnsHosts(prefix, f"{net.network_address + 1}/{net.prefixlen}")

    @property
    def task_netns_prefix(self) -> str:
        return f"{self.prefix}-t-"

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    def load(self) -> Lab:
        if not self.state_file.exists():
            raise NotFound(f"no lab in {self.dir}: run `corral lab up` first")
        data = json.loads(self.state_file.read_text())
        self.nodes = [LabNode(**n) for n in data["nodes"]]
        self.heartbeat = data.get("heartbeat", 1.0)
        self.netns = bool(data.get("netns", False))
        self.subnet = data.get("subnet", "")
        self.bridge = data.get("bridge", "")
        self.prefix = data.get("prefix", "")
        self.store = data.get("store", "sqlite")
        return self

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"nodes": [_node_dict(n) for n in self.nodes],
                                "heartbeat": self.heartbeat, "store": self.store}
        if self.netns:
            data.update(netns=True, subnet=self.subnet, bridge=self.bridge, prefix=self.prefix,
                        namespaces=[n.netns for n in self.nodes],
                        task_netns_prefix=self.task_netns_prefix)
        self.state_file.write_text(json.dumps(data, indent=2))

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name or n.addr == name:
                return n
        raise NotFound(f"no lab node {name} (nodes: {', '.join(n.name for n in self.nodes)})")

    # -- up / down ------------------------------------------------------------------------
    def up(self, count: int, base_addr: str = DEFAULT_BASE_ADDR, heartbeat: float = 1.0,
           progress: Callable[[str], object] = print, netns: bool = False,
           subnet: str = DEFAULT_SUBNET, cert_expiry: float | None = None,
           managers: int = 1, store: str = "sqlite") -> None:
        """Start `count` daemons and form a swarm: node1 (..node`managers`) its managers.
        With store etcd, each manager node also runs an etcd member (their cluster holds
        the store)."""
        if netns:
            check_root()
        if count < 1 or count > 50:
            raise InvalidArgument(f"invalid --nodes {count}: must be between 1 and 50")
        if store not in ("sqlite", "etcd"):
            raise InvalidArgument(f"invalid --store {store!r}: expected sqlite or etcd")
        if not 1 <= managers <= count:
            raise InvalidArgument(f"invalid --managers {managers}: between 1 and --nodes")
        if managers > 1 and store != "etcd":
            raise InvalidArgument("several managers need --store etcd (one replicated store)")
        if store == "etcd" and shutil.which("etcd") is None:
            raise InvalidArgument("--store etcd needs etcd (Debian: apt-get install etcd-server)")
        net = parse_subnet(subnet, count) if netns else None
        if self.state_file.exists():
            old = Lab(self.dir).load()
            if any(pid_alive(n.pid) for n in old.nodes):
                raise InvalidArgument(f"a lab is already running in {self.dir}: "
                                      "run `corral lab down` first")
            if old.netns and old.hosts.leftovers():
                raise InvalidArgument(f"the network namespaces of the lab in {self.dir} still "
                                      "exist: run `corral lab down` first")
            shutil.rmtree(self.dir)
        self.heartbeat = heartbeat
        self.store = store
        self.nodes = []
        if net is not None:
            self._plan_netns(count, net)
        else:
            self._plan_loopback(count, base_addr)
        if store == "etcd":
            for n in self.nodes[:managers]:
                n.etcd = True
                if not self.netns and not all(port_free(n.addr, p) for p in ETCD_PORTS):
                    raise InvalidArgument(f"{n.addr}: etcd's ports {ETCD_PORTS} are in use")
        self.save()
        try:
            if self.netns:
                self.hosts.create([Host(n.name, n.netns, n.veth, n.addr) for n in self.nodes])
                progress(f"bridge {self.bridge} ({self.hosts.bridge_addr}), namespaces "
                         f"{', '.join(n.netns for n in self.nodes)}")
            for n in self.nodes:
                self._spawn(n)
            self.save()
            for n in self.nodes:
                self._wait_ready(n)
            manager = Client(self.nodes[0].socket)
            body: dict[str, Any] = {"heartbeat_period": heartbeat}
            if cert_expiry is not None:
                body["cert_expiry"] = cert_expiry
            if store == "etcd":
                self._wait_etcd()
                body.update(store="etcd", etcd_endpoints=self.etcd_endpoints)
            init = manager.post("/v1/swarm/init", body)
            progress(f"{self.nodes[0].name}: swarm initialized (node {init['node_id'][:12]}, manager"
                     + (f", store in etcd on {', '.join(self.etcd_endpoints)})" if store == "etcd"
                        else ")"))
            self._client_cert(manager)
            manager_token = (manager.get("/v1/swarm/join-token/manager")["token"]
                             if managers > 1 else "")
            for i, n in enumerate(self.nodes[1:], start=1):
                role = "manager" if i < managers else "worker"
                Client(n.socket).post("/v1/swarm/join", {
                    "token": manager_token if role == "manager" else init["worker_token"],
                    "remote_addr": init["manager_addr"]})
                progress(f"{n.name}: joined as a {role}")
            self._wait_nodes_ready(manager, count)
        except BaseException:
            try:
                self.down()
            except CorralError as exc:  # keep the error that made `up` fail
                progress(f"cleanup after the failed `lab up` was incomplete: {exc.message}")
            raise

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"{n.addr}:{ETCD_PORTS[0]}" for n in self.nodes if n.etcd]

    def _wait_etcd(self, timeout: float = 30.0) -> None:
        """Until every member answers healthy (they elect a leader among themselves first)."""
        deadline = time.monotonic() + timeout
        for endpoint in self.etcd_endpoints:
            if not wait_healthy(f"http://{endpoint}", deadline):
                raise CorralError(f"etcd at {endpoint} did not become healthy; see "
                                  f"{self.dir}/*/etcd.log")

    @property
    def tls_dir(self) -> Path:
        """The lab user's admin client certificate (docker's ca.pem/cert.pem/key.pem)."""
        return self.dir / "tls"

    def _client_cert(self, manager: Client) -> None:
        key = pki.new_key()
        r = manager.post("/v1/ca/client", {"csr": pki.make_csr(key).decode()})
        files = TlsFiles.in_dir(self.tls_dir)
        write_private(files.key, pki.key_to_pem(key))
        files.cert.write_bytes(r["cert"].encode())
        files.ca.write_bytes(r["ca"].encode())

    def env(self, node: str) -> str:
        """Shell lines pointing the CLI at a node's control port with the lab's certificate."""
        return (f"export CORRAL_HOST={self.node(node).host}\n"
                f"export CORRAL_CERT_PATH={self.tls_dir}")

    def _plan_loopback(self, count: int, base_addr: str) -> None:
        try:
            base = ipaddress.IPv4Address(base_addr)
        except ValueError:
            raise InvalidArgument(f"invalid --base-addr {base_addr!r}") from None
        if not base.is_loopback:
            raise InvalidArgument("the loopback lab needs addresses in 127.0.0.0/8")
        for i in range(count):
            addr = str(base + i)
            name = f"node{i + 1}"
            if not port_free(addr, API_PORT):
                raise InvalidArgument(f"{addr}:{API_PORT} is already in use: is another lab or daemon "
                                      "running there?")
            d = self.dir / name
            self.nodes.append(LabNode(name=name, addr=addr, data_dir=str(d), log=str(d / "daemon.log")))

    def _plan_netns(self, count: int, net: ipaddress.IPv4Network) -> None:
        """Decide the netns lab's names and addresses; refuse if they clash with what exists."""
        self.netns = True
        self.subnet = str(net)
        self.prefix = f"{NETNS_PREFIX}{lab_id(self.dir)}"
        hosts = self.hosts
        self.bridge = hosts.bridge
        existing = hosts.leftovers()
        if existing:
            raise InvalidArgument(f"the bridge/namespaces of lab {self.prefix} already exist "
                                  f"({', '.join(existing[:4])}{', …' if len(existing) > 4 else ''}): "
                                  f"run `corral lab down --dir {self.dir}` first")
        for what, used in used_networks():
            if used.overlaps(net):
                raise InvalidArgument(f"--subnet {net} overlaps {what}: pick another subnet")
        for i in range(1, count + 1):
            name = f"node{i}"
            d = self.dir / name
            self.nodes.append(LabNode(
                name=name, addr=str(net.network_address + NODE_HOST_OFFSET + i), data_dir=str(d),
                log=str(d / "daemon.log"), netns=f"{self.prefix}-{name}",
                veth=f"{self.prefix}n{i}"))

    def down(self) -> None:
        """Stop every daemon (and its tasks) and remove everything the lab made."""
        if self.state_file.exists():
            # Another process (`corral lab start`) may have restarted a node since we loaded.
            try:
                self.load()
            except (OSError, ValueError, KeyError):
                pass
        for n in self.nodes:
            self._terminate(n)
        # Belt and braces: any daemon still running on one of this lab's data dirs.
        for pid in _daemons_under(self.dir):
            _killpg(pid, signal.SIGKILL)
            _wait_gone(pid, 3.0)
        if self.netns:
            left = self.hosts.destroy()
            if left:
                raise CorralError(f"could not remove {', '.join(left)} of lab {self.prefix}; "
                                  f"the lab state stays in {self.dir}")
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftover_hosts(self) -> list[str]:
        """Namespaces/links a netns lab in this dir left behind (root only; else nothing)."""
        if os.geteuid() != 0:
            return []
        return self.hosts.leftovers()

    def exec_argv(self, name: str, cmd: Sequence[str]) -> list[str]:
        """The argv that runs `cmd` on a node: inside its namespace, or as is on loopback."""
        n = self.node(name)
        if not cmd:
            raise InvalidArgument("lab exec needs a command: corral lab exec NODE -- CMD [ARG...]")
        if not self.netns:
            return list(cmd)
        check_root()
        return self.hosts.exec_argv(n.netns, cmd)

    # -- chaos ----------------------------------------------------------------------------
    def kill(self, name: str) -> LabNode:
        """SIGKILL a node's daemon and every task process it started."""
        n = self.node(name)
        if not pid_alive(n.pid):
            raise InvalidArgument(f"{n.name} is not running")
        _killpg(n.pid, signal.SIGKILL)
        _wait_gone(n.pid, 5.0)
        n.pid = 0
        self.save()
        return n

    def stop(self, name: str) -> LabNode:
        """Stop a node's daemon cleanly (SIGTERM: it stops its tasks first)."""
        n = self.node(name)
        if not pid_alive(n.pid):
            raise InvalidArgument(f"{n.name} is not running")
        self._terminate(n)
        n.pid = 0
        self.save()
        return n

    def partition(self, name: str, cut: bool = True) -> LabNode:
        """Cut a netns lab node off the lab network (its link goes down), or heal it."""
        n = self.node(name)
        if not self.netns:
            raise InvalidArgument("partition and heal need the netns lab (corral lab up --netns): "
                                  "loopback nodes share one network")
        check_root()
        subprocess.run(["ip", "link", "set", n.veth, "down" if cut else "up"], check=True,
                       capture_output=True)
        return n

    def start(self, name: str) -> LabNode:
        """Start a stopped node's daemon again; it rejoins the swarm by itself."""
        n = self.node(name)
        if pid_alive(n.pid):
            raise InvalidArgument(f"{n.name} is already running")
        self._spawn(n)
        self.save()
        self._wait_ready(n)
        return n

    # -- helpers --------------------------------------------------------------------------
    def _spawn(self, n: LabNode) -> None:
        Path(n.data_dir).mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "corral", "daemon", "--addr", n.addr,
                "--data-dir", n.data_dir, "--hostname", n.name]
        # The lab's nodes share this machine's cores: one userspace mesh process each.
        argv += ["--mesh-workers", "1"]
        if self.netns:
            # Each node runs container-like tasks: its own namespace per task.
            # ...and the kernel fast path: forwarding is switched on in the node's own
            # namespace only (a daemon cannot always tell it is not in the host's).
            argv += ["--runtime", "netns", "--mesh", "kernel",
                     TASK_NETNS_OPTION, self.task_netns_prefix]
        else:
            # All loopback nodes share one network namespace: task namespaces would collide
            # (one bridge per network for all of them), so tasks stay plain processes.
            argv += ["--runtime", "process"]
        if n.etcd:
            # The node's etcd member shares its process group: killing the node kills both,
            # as a host dying would; starting it again restarts the member on its data.
            etcd_log = shlex.quote(str(Path(n.data_dir) / "etcd.log"))
            argv = ["sh", "-c", f'{shlex.join(self._etcd_argv(n))} >> {etcd_log} 2>&1 & exec "$@"',
                    "sh", *argv]
        if self.netns:
            argv = self.hosts.daemon_argv(n.netns, argv)
        with open(n.log, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        n.pid = proc.pid

    def _etcd_argv(self, n: LabNode) -> list[str]:
        client, peer = (f"http://{n.addr}:{p}" for p in ETCD_PORTS)
        members = ",".join(f"{m.name}=http://{m.addr}:{ETCD_PORTS[1]}" for m in self.nodes if m.etcd)
        # The initial-cluster flags only count the first time; a restart uses the data dir.
        return member_argv(n.name, Path(n.data_dir) / "etcd", client, peer, members,
                           f"corral-lab-{lab_id(self.dir)}")

    def _wait_ready(self, n: LabNode, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        client = Client(n.socket, timeout=2.0)
        while time.monotonic() < deadline:
            if not pid_alive(n.pid):
                raise CorralError(f"{n.name}'s daemon exited at start; see {n.log}:\n"
                                  + tail(Path(n.log), 5))
            try:
                client.get("/v1/info")
                return
            except DaemonUnreachable:
                time.sleep(0.05)
        raise CorralError(f"{n.name}'s daemon did not answer within {timeout:.0f}s; see {n.log}")

    def _wait_nodes_ready(self, manager: Client, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = manager.get("/v1/nodes")
            if sum(1 for x in nodes if x["status"]["state"] == "ready") >= count:
                return
            time.sleep(0.05)
        raise CorralError("the lab's nodes did not all become ready in time")

    def _terminate(self, n: LabNode) -> None:
        if not pid_alive(n.pid):
            return
        _killpg(n.pid, signal.SIGTERM)
        if not _wait_gone(n.pid, 8.0):
            _killpg(n.pid, signal.SIGKILL)
            _wait_gone(n.pid, 3.0)
        else:
            # Tasks are stopped by the daemon; kill any straggler of its group.
            _killpg(n.pid, signal.SIGKILL)


def _node_dict(n: LabNode) -> dict[str, Any]:
    """A node as lab.json records it (the loopback lab's without the netns fields)."""
    d = asdict(n)
    if not n.netns:
        del d["netns"], d["veth"]
    return d


def _daemons_under(lab_dir: Path) -> list[int]:
    """PIDs of corral daemons whose data dir lies in `lab_dir`."""
    prefix = str(lab_dir.resolve()) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "daemon" in args and "--data-dir" in args:
            i = args.index("--data-dir")
            if i + 1 < len(args) and str(Path(args[i + 1]).resolve()).startswith(prefix):
                found.append(int(entry.name))
    return found


def _killpg(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child (lab up/start in this process).
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def port_free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
