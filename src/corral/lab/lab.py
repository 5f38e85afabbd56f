"""The loopback lab: N daemons on 127.0.0.11, .12, … of one machine, formed into a swarm.

Each node's daemon runs in its own session (process group), so `kill` can take a node down
with all its task processes at once, as pulling a host's plug would.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.api.errors import CorralError, InvalidArgument, NotFound
from corral.api.types import API_PORT
from corral.client import Client, DaemonUnreachable

DEFAULT_BASE_ADDR = "127.0.0.11"


def default_lab_dir() -> Path:
    env = os.environ.get("CORRAL_LAB_DIR")
    return Path(env) if env else Path.home() / ".corral" / "lab"


@dataclass
class LabNode:
    """One lab host: a daemon process on its own loopback address."""

    name: str
    addr: str
    data_dir: str
    log: str
    pid: int = 0

    @property
    def host(self) -> str:
        return f"{self.addr}:{API_PORT}"


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

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    def load(self) -> Lab:
        if not self.state_file.exists():
            raise NotFound(f"no lab in {self.dir}: run `corral lab up` first")
        data = json.loads(self.state_file.read_text())
        self.nodes = [LabNode(**n) for n in data["nodes"]]
        self.heartbeat = data.get("heartbeat", 1.0)
        return self

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(
            {"nodes": [asdict(n) for n in self.nodes], "heartbeat": self.heartbeat}, indent=2))

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name or n.addr == name:
                return n
        raise NotFound(f"no lab node {name} (nodes: {', '.join(n.name for n in self.nodes)})")

    # -- up / down ------------------------------------------------------------------------
    def up(self, count: int, base_addr: str = DEFAULT_BASE_ADDR, heartbeat: float = 1.0,
           progress: Callable[[str], object] = print) -> None:
        """Start `count` daemons and form a swarm with node1 as its manager."""
        if count < 1 or count > 50:
            raise InvalidArgument(f"invalid --nodes {count}: must be between 1 and 50")
        if self.state_file.exists():
            old = Lab(self.dir).load()
            if any(pid_alive(n.pid) for n in old.nodes):
                raise InvalidArgument(f"a lab is already running in {self.dir}: "
                                      "run `corral lab down` first")
            shutil.rmtree(self.dir)
        try:
            base = ipaddress.IPv4Address(base_addr)
        except ValueError:
            raise InvalidArgument(f"invalid --base-addr {base_addr!r}") from None
        if not base.is_loopback:
            raise InvalidArgument("the loopback lab needs addresses in 127.0.0.0/8")
        self.heartbeat = heartbeat
        self.nodes = []
        for i in range(count):
            addr = str(base + i)
            name = f"node{i + 1}"
            if not port_free(addr, API_PORT):
                raise InvalidArgument(f"{addr}:{API_PORT} is already in use: is another lab or daemon "
                                      "running there?")
            d = self.dir / name
            self.nodes.append(LabNode(name=name, addr=addr, data_dir=str(d), log=str(d / "daemon.log")))
        self.save()
        try:
            for n in self.nodes:
                self._spawn(n)
            self.save()
            for n in self.nodes:
                self._wait_ready(n)
            manager = Client(self.nodes[0].host)
            init = manager.post("/v1/swarm/init", {"heartbeat_period": heartbeat})
            progress(f"{self.nodes[0].name}: swarm initialized (node {init['node_id'][:12]}, manager)")
            for n in self.nodes[1:]:
                Client(n.host).post("/v1/swarm/join", {"token": init["worker_token"],
                                                       "remote_addr": init["manager_addr"]})
                progress(f"{n.name}: joined as a worker")
            self._wait_nodes_ready(manager, count)
        except BaseException:
            self.down()
            raise

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
        shutil.rmtree(self.dir, ignore_errors=True)

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
        with open(n.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "corral", "daemon", "--addr", n.addr,
                 "--data-dir", n.data_dir, "--hostname", n.name],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        n.pid = proc.pid

    def _wait_ready(self, n: LabNode, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        client = Client(n.host, timeout=2.0)
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
