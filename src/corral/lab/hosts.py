"""The netns lab's "hosts": one network namespace per node, wired to a bridge in the root namespace.

Everything here has side effects (it runs `ip`); what to build is decided by `corral.lab.lab`.
Every name the lab makes starts with its prefix (`crl<id>`): the bridge is the prefix itself,
the root-side veths are `<prefix>n<i>`, and namespaces (the nodes' and any the daemons make for
their tasks) start with `<prefix>-`, so `destroy` can find and remove all of them, even after a
crash or a half-finished `create`.

The root namespace only gets the bridge and its address (so a connected route to the lab
subnet); nodes get no default route, and nothing here touches forwarding or NAT.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.api.errors import CorralError

NODE_IFNAME = "eth0"
MTU = 1500
IFNAMSIZ = 15  # the longest interface name Linux takes
_NETNS_DIR = Path("/run/netns")


class HostsError(CorralError):
    """An `ip` command of the netns lab failed."""


@dataclass(frozen=True)
class Host:
    """One node's namespace: its name, the root-side veth, and its address on the bridge."""

    name: str
    namespace: str
    veth: str
    addr: str


def _ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS` and return its output; raise HostsError if it fails and `check`."""
    try:
        p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise HostsError("the netns lab needs iproute2 (`ip`) on PATH") from None
    if check and p.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def list_namespaces() -> list[str]:
    """Names of every named network namespace (`ip netns list` and /run/netns)."""
    names = {line.split()[0] for line in _ip("netns", "list", check=False).splitlines()
             if line.strip()}
    try:
        names.update(p.name for p in _NETNS_DIR.iterdir())
    except OSError:
        pass
    return sorted(names)


def list_links() -> list[str]:
    """Names of the root namespace's network interfaces."""
    return [str(link["ifname"]) for link in json.loads(_ip("-j", "link", "show") or "[]")]


def used_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """Root-namespace IPv4 routes (main table, no default) and interface networks."""
    found: list[tuple[str, ipaddress.IPv4Network]] = []
    for route in json.loads(_ip("-j", "-4", "route", "show") or "[]"):
        dst = str(route.get("dst", ""))
        if dst and dst != "default":
            try:
                found.append((f"route {dst} dev {route.get('dev', '?')}",
                              ipaddress.IPv4Network(dst, strict=False)))
            except ValueError:
                pass
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        for a in link.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
            found.append((f"address {a['local']}/{a['prefixlen']} on {link['ifname']}", net))
    return found


class NetnsHosts:
    """Creates and destroys one lab's bridge, node namespaces and veths (all named `prefix…`)."""

    def __init__(self, prefix: str, bridge_addr: str) -> None:
        if len(prefix) > IFNAMSIZ - 3 or "-" in prefix:
            raise ValueError(f"bad netns lab prefix {prefix!r}")
        self.prefix = prefix
        self.bridge = prefix
        self.bridge_addr = ipaddress.IPv4Interface(bridge_addr)

    @property
    def ns_prefix(self) -> str:
        return f"{self.prefix}-"

    def _is_ours_link(self, name: str) -> bool:
        rest = name[len(self.prefix):] if name.startswith(self.prefix) else None
        return rest is not None and (rest == "" or (rest[:1] == "n" and rest[1:].isdigit()))

    def leftovers(self) -> list[str]:
        """What of this lab exists already: its bridge, veths and namespaces."""
        links = [f"link {n}" for n in list_links() if self._is_ours_link(n)]
        spaces = [f"netns {n}" for n in list_namespaces() if n.startswith(self.ns_prefix)]
        return links + spaces

    def create(self, nodes: Sequence[Host]) -> None:
        """Make the bridge and, per node, a namespace with lo and eth0 (its address) up."""
        for h in nodes:
            if not h.namespace.startswith(self.ns_prefix) or not self._is_ours_link(h.veth):
                raise ValueError(f"host {h.name} is not named after {self.prefix}")
        net = self.bridge_addr.network
        _ip("link", "add", self.bridge, "mtu", str(MTU), "type", "bridge",
            "forward_delay", "0", "stp_state", "0")
        _ip("addr", "add", str(self.bridge_addr), "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in nodes:
            _ip("netns", "add", h.namespace)
            _ip("link", "add", h.veth, "mtu", str(MTU), "type", "veth",
                "peer", "name", NODE_IFNAME, "mtu", str(MTU), "netns", h.namespace)
            _ip("link", "set", h.veth, "master", self.bridge, "up")
            _ip("-n", h.namespace, "link", "set", "lo", "up")
            _ip("-n", h.namespace, "addr", "add", f"{h.addr}/{net.prefixlen}", "dev", NODE_IFNAME)
            _ip("-n", h.namespace, "link", "set", NODE_IFNAME, "mtu", str(MTU), "up")

    def destroy(self) -> list[str]:
        """Kill what still runs in the lab's namespaces, delete them, the veths and the bridge."""
        problems: list[str] = []
        spaces = [n for n in list_namespaces() if n.startswith(self.ns_prefix)]
        pids: set[int] = set()
        for ns in spaces:
            out = _ip("netns", "pids", ns, check=False)
            pids.update(int(x) for x in out.split() if x.isdigit() and int(x) != os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _wait_pids_gone(pids, 5.0)
        for ns in spaces:
            if not _delete_netns(ns):
                problems.append(f"netns {ns}")
        for name in list_links():
            if self._is_ours_link(name) and name != self.bridge:
                _ip("link", "del", name, check=False)
        if self.bridge in list_links():
            _ip("link", "del", self.bridge, check=False)
        problems += self.leftovers()
        return problems

    def daemon_argv(self, namespace: str, cmd: Sequence[str]) -> list[str]:
        """The argv that runs a node's daemon inside its namespace.

        `nsenter --net` rather than `ip netns exec`: the latter also gives the process a
        private mount namespace, so the task namespaces the daemon makes (bind mounts under
        /run/netns) would be invisible outside it and vanish with it. nsenter execs the
        daemon, so the pid (and session) stay the daemon's.
        """
        if not namespace.startswith(self.ns_prefix):
            raise ValueError(f"namespace {namespace} is not part of lab {self.prefix}")
        return ["nsenter", f"--net=/run/netns/{namespace}", *cmd]

    def exec_argv(self, namespace: str, cmd: Sequence[str]) -> list[str]:
        """The argv that runs `cmd` inside one of this lab's namespaces."""
        if not namespace.startswith(self.ns_prefix):
            raise ValueError(f"namespace {namespace} is not part of lab {self.prefix}")
        return ["ip", "netns", "exec", namespace, *cmd]


def _delete_netns(ns: str) -> bool:
    """`ip netns del`, retried briefly (a dying process may still hold the mount)."""
    deadline = time.monotonic() + 3.0
    while True:
        _ip("netns", "del", ns, check=False)
        if not (_NETNS_DIR / ns).exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _wait_pids_gone(pids: set[int], timeout: float) -> None:
    """Wait (reaping our own children) until none of `pids` is alive."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    left.discard(pid)
                    continue
            except ChildProcessError:
                pass
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        left.discard(pid)
            except (OSError, IndexError):
                left.discard(pid)
        if left:
            time.sleep(0.02)
