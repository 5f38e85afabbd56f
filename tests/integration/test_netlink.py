"""corral.host.netlink against real namespaces: a two-node VXLAN overlay built in throwaway netns.

Topology (all names carry a random suffix; only 10.97.0.0/16 is used):

    task A (10.97.2.21)                                  task B (10.97.2.22)
        | veth                                               | veth
    node A: br-test 10.97.2.11 + vx-test (VNI 4242)      node B: br-test 10.97.2.12 + vx-test
        underlay 10.97.1.1  <------- veth pair ------->  underlay 10.97.1.2

The Netlink calls run in a helper process placed in the node's namespace with
``nsenter --net=...`` (network namespace only). Not ``ip netns exec``: that also
gives the process a private mount namespace, and the task namespaces it would
create under /run/netns would be invisible to everyone else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.host.netlink import mac_for_ip

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("nsenter") is None,
    reason="needs root for network namespaces",
)

PYTHON = sys.executable
SRC = str(Path(__file__).resolve().parents[2] / "src")
VNI = 4242
BR = "br-test"
VX = "vx-test"
UNDERLAY = {"A": "10.97.1.1", "B": "10.97.1.2"}
NODE_IP = {"A": "10.97.2.11", "B": "10.97.2.12"}
TASK_IP = {"A": "10.97.2.21", "B": "10.97.2.22"}
PORT = 7007

HELPER = textwrap.dedent(
    """
    import json, sys
    from corral.host.netlink import Netlink
    calls = json.loads(sys.argv[1])
    out = []
    nl = Netlink()
    try:
        for name, args in calls:
            out.append(getattr(nl, name)(*args))
    finally:
        nl.close()
    print(json.dumps(out))
    """
)


def sh(*argv: str, check: bool = True, timeout: float = 20) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Lab:
    suffix: str
    helper: Path
    nodes: dict[str, str]
    tasks: dict[str, str]
    host_ifs: dict[str, str]
    created: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def node_call(self, node: str, *calls: tuple[str, list[Any]]) -> list[Any]:
        """Run Netlink methods in a helper process inside node ``node``'s network namespace."""
        env = {**os.environ, "PYTHONPATH": SRC}
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.nodes[node]}", PYTHON, str(self.helper),
             json.dumps([list(c) for c in calls])],
            capture_output=True, text=True, timeout=60, env=env,
        )
        if proc.returncode != 0:
            raise AssertionError(f"helper on node {node} failed: {proc.stderr.strip()}")
        result: list[Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def in_ns(self, ns: str, *argv: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", ns, *argv, check=check)


def _netns_list() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    sfx = secrets.token_hex(3)
    helper = tmp_path / "nl_helper.py"
    helper.write_text(HELPER)
    lab = Lab(
        suffix=sfx,
        helper=helper,
        nodes={"A": f"crl-nA-{sfx}", "B": f"crl-nB-{sfx}"},
        tasks={"A": f"crl-tA-{sfx}", "B": f"crl-tB-{sfx}"},
        host_ifs={"A": f"vtA-{sfx}", "B": f"vtB-{sfx}"},
    )
    try:
        for node in ("A", "B"):
            sh("ip", "netns", "add", lab.nodes[node])
            lab.created.append(lab.nodes[node])
        ua, ub = f"ulA-{sfx}", f"ulB-{sfx}"
        sh("ip", "link", "add", ua, "netns", lab.nodes["A"], "type", "veth",
           "peer", "name", ub, "netns", lab.nodes["B"])
        for node, dev in (("A", ua), ("B", ub)):
            ns = lab.nodes[node]
            sh("ip", "-n", ns, "addr", "add", f"{UNDERLAY[node]}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield lab
    finally:
        for proc in lab.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        # task namespaces may have been created by the code under test, so delete by name
        for ns in [*lab.tasks.values(), *lab.created]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        leftover = _netns_list() & {*lab.tasks.values(), *lab.nodes.values()}
        assert not leftover, f"namespaces left behind: {leftover}"


def build_overlay(lab: Lab) -> dict[str, str]:
    """Bridge + VXLAN + one task on each node; returns the task MACs."""
    macs: dict[str, str] = {}
    for node in ("A", "B"):
        out = lab.node_call(
            node,
            ("ensure_bridge", [BR, [f"{NODE_IP[node]}/24"]]),
            ("ensure_vxlan", [VX, VNI, UNDERLAY[node], BR]),
            ("attach_task", [lab.tasks[node], BR, lab.host_ifs[node], f"{TASK_IP[node]}/24",
                             NODE_IP[node]]),
        )
        macs[node] = out[2]
        assert macs[node] == mac_for_ip(TASK_IP[node])
    return macs


def bridge_mac(lab: Lab, node: str) -> str:
    info = json.loads(sh("ip", "-n", lab.nodes[node], "-j", "link", "show", BR))
    return str(info[0]["address"])


def program_remote(lab: Lab) -> None:
    """Each node learns the other's task and bridge IP (for node -> remote task traffic)."""
    for node, other in (("A", "B"), ("B", "A")):
        task_mac, br_mac = mac_for_ip(TASK_IP[other]), bridge_mac(lab, other)
        lab.node_call(
            node,
            ("set_fdb", [VX, {task_mac: UNDERLAY[other], br_mac: UNDERLAY[other]}]),
            ("set_neighbours", [VX, {TASK_IP[other]: task_mac, NODE_IP[other]: br_mac}]),
        )


ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(sys.argv[2])))
    srv.listen()
    print("ready", flush=True)
    while True:
        conn, peer = srv.accept()
        with conn:
            n = 0
            while chunk := conn.recv(65536):
                n += len(chunk)
            conn.sendall(f"echo {peer[0]} {n}".encode())
    """
)

ECHO_CLIENT = textwrap.dedent(
    """
    import socket, sys
    ip, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(b"x" * size)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(1024):
            reply += chunk
        print(reply.decode())
    """
)


def start_echo(lab: Lab, ns: str, ip: str) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-c", ECHO_SERVER, ip, str(PORT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        err = proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
        raise AssertionError(f"echo server did not start: {line!r} {err}")


def tcp_echo(lab: Lab, ns: str, ip: str, size: int = 5, timeout: float = 5) -> str | None:
    """Send ``size`` bytes from namespace ``ns`` to the echo server at ip:PORT; None if unreachable."""
    proc = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-c", ECHO_CLIENT, ip, str(PORT),
                           str(size), str(timeout)], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else None


def fdb_dst_entries(lab: Lab, node: str) -> set[tuple[str, str]]:
    out = lab.in_ns(lab.nodes[node], "bridge", "fdb", "show", "dev", VX)
    entries = set()
    for line in out.splitlines():
        words = line.split()
        if "dst" in words:
            entries.add((words[0], words[words.index("dst") + 1]))
    return entries


def neigh_entries(lab: Lab, node: str) -> dict[str, tuple[str, str]]:
    out = sh("ip", "-n", lab.nodes[node], "neigh", "show", "dev", VX)
    entries = {}
    for line in out.splitlines():
        words = line.split()
        if "lladdr" in words:
            entries[words[0]] = (words[words.index("lladdr") + 1], words[-1])
    return entries


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("ip", "mac"),
    [("10.97.0.5", "02:42:0a:61:00:05"), ("10.97.2.22", "02:42:0a:61:02:16"),
     ("255.0.128.1", "02:42:ff:00:80:01")],
)
def test_mac_for_ip(ip: str, mac: str) -> None:
    assert mac_for_ip(ip) == mac


@pytest.mark.parametrize("bad", ["10.97.0", "fd00::1", "10.97.0.5/24", ""])
def test_mac_for_ip_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        mac_for_ip(bad)


@needs_root
def test_tcp_between_tasks_over_vxlan(lab: Lab) -> None:
    build_overlay(lab)
    # the task namespaces were created by a process in a node namespace, yet are global names
    assert {lab.tasks["A"], lab.tasks["B"]} <= _netns_list()

    ta, tb = lab.tasks["A"], lab.tasks["B"]
    link = json.loads(sh("ip", "-n", ta, "-j", "link", "show", "eth0"))[0]
    assert link["address"] == mac_for_ip(TASK_IP["A"])
    assert link["mtu"] == 1450
    assert "UP" in link["flags"]
    assert "default via 10.97.2.11 dev eth0" in sh("ip", "-n", ta, "route")
    host = json.loads(sh("ip", "-n", lab.nodes["A"], "-j", "link", "show", lab.host_ifs["A"]))[0]
    assert host["master"] == BR and host["mtu"] == 1450
    vx = json.loads(sh("ip", "-n", lab.nodes["A"], "-d", "-j", "link", "show", VX))[0]
    data = vx["linkinfo"]["info_data"]
    assert (data["id"], data["local"], data["port"], data["learning"], data["proxy"]) == (
        VNI, UNDERLAY["A"], 4789, False, True)
    assert vx["master"] == BR

    program_remote(lab)
    start_echo(lab, tb, TASK_IP["B"])

    assert tcp_echo(lab, ta, TASK_IP["B"]) == f"echo {TASK_IP['A']} 5"
    # node A itself (its bridge IP) reaches the remote task too
    assert tcp_echo(lab, lab.nodes["A"], TASK_IP["B"]) == f"echo {NODE_IP['A']} 5"
    # full-size segments cross the overlay (MTU 1450 leaves room for the VXLAN headers)
    assert tcp_echo(lab, ta, TASK_IP["B"], size=4_000_000) == f"echo {TASK_IP['A']} 4000000"


@needs_root
def test_without_fdb_the_remote_is_unreachable(lab: Lab) -> None:
    build_overlay(lab)
    start_echo(lab, lab.tasks["B"], TASK_IP["B"])
    assert tcp_echo(lab, lab.tasks["A"], TASK_IP["B"], timeout=1) is None
    program_remote(lab)
    assert tcp_echo(lab, lab.tasks["A"], TASK_IP["B"]) == f"echo {TASK_IP['A']} 5"
    # removing the remote again cuts it off
    lab.node_call("A", ("set_fdb", [VX, {}]), ("set_neighbours", [VX, {}]))
    assert fdb_dst_entries(lab, "A") == set()
    assert tcp_echo(lab, lab.tasks["A"], TASK_IP["B"], timeout=1) is None


@needs_root
def test_fdb_and_neighbours_reconcile_exactly(lab: Lab) -> None:
    lab.node_call("A", ("ensure_bridge", [BR, [f"{NODE_IP['A']}/24"]]),
                  ("ensure_vxlan", [VX, VNI, UNDERLAY["A"], BR]))
    m1, m2, m3 = mac_for_ip("10.97.2.31"), mac_for_ip("10.97.2.32"), mac_for_ip("10.97.2.33")
    lab.node_call("A", ("set_fdb", [VX, {m1: "10.97.1.2", m2: "10.97.1.3"}]),
                  ("set_neighbours", [VX, {"10.97.2.31": m1, "10.97.2.32": m2}]))
    assert fdb_dst_entries(lab, "A") == {(m1, "10.97.1.2"), (m2, "10.97.1.3")}
    assert neigh_entries(lab, "A") == {"10.97.2.31": (m1, "PERMANENT"),
                                       "10.97.2.32": (m2, "PERMANENT")}

    # m2 goes away, m1 moves to another node, m3 arrives; neighbour for .32 goes, .31 changes MAC
    lab.node_call("A", ("set_fdb", [VX, {m1: "10.97.1.4", m3: "10.97.1.2"}]),
                  ("set_neighbours", [VX, {"10.97.2.31": m3, "10.97.2.33": m3}]))
    assert fdb_dst_entries(lab, "A") == {(m1, "10.97.1.4"), (m3, "10.97.1.2")}
    assert neigh_entries(lab, "A") == {"10.97.2.31": (m3, "PERMANENT"),
                                       "10.97.2.33": (m3, "PERMANENT")}

    # entries added behind our back are stale too; the kernel's own device entry stays
    sh("ip", "netns", "exec", lab.nodes["A"], "bridge", "fdb", "append", m2, "dev", VX,
       "dst", "10.97.1.9", "self", "permanent")
    sh("ip", "-n", lab.nodes["A"], "neigh", "add", "10.97.2.99", "lladdr", m2, "dev", VX, "nud",
       "permanent")
    lab.node_call("A", ("set_fdb", [VX, {m3: "10.97.1.2"}]),
                  ("set_neighbours", [VX, {"10.97.2.33": m3}]))
    assert fdb_dst_entries(lab, "A") == {(m3, "10.97.1.2")}
    assert neigh_entries(lab, "A") == {"10.97.2.33": (m3, "PERMANENT")}
    vx_mac = json.loads(sh("ip", "-n", lab.nodes["A"], "-j", "link", "show", VX))[0]["address"]
    assert vx_mac in lab.in_ns(lab.nodes["A"], "bridge", "fdb", "show", "dev", VX)

    # idempotent: the same state again changes nothing and does not fail
    lab.node_call("A", ("set_fdb", [VX, {m3: "10.97.1.2"}]),
                  ("set_neighbours", [VX, {"10.97.2.33": m3}]))
    assert fdb_dst_entries(lab, "A") == {(m3, "10.97.1.2")}
    lab.node_call("A", ("set_fdb", [VX, {}]), ("set_neighbours", [VX, {}]))
    assert fdb_dst_entries(lab, "A") == set()
    assert neigh_entries(lab, "A") == {}


@needs_root
def test_ensure_is_idempotent_and_converges(lab: Lab) -> None:
    ns = lab.nodes["A"]
    for _ in range(2):
        lab.node_call("A", ("ensure_bridge", [BR, ["10.97.2.11/24", "10.97.3.11/24"]]),
                      ("ensure_vxlan", [VX, VNI, UNDERLAY["A"], BR]))
    addrs = sh("ip", "-n", ns, "-4", "-br", "addr", "show", "dev", BR).split()[2:]
    assert sorted(addrs) == ["10.97.2.11/24", "10.97.3.11/24"]
    vx_index = json.loads(sh("ip", "-n", ns, "-j", "link", "show", VX))[0]["ifindex"]

    lab.node_call("A", ("ensure_bridge", [BR, ["10.97.2.11/24"]]),
                  ("ensure_vxlan", [VX, VNI, UNDERLAY["A"], BR]))
    assert sh("ip", "-n", ns, "-4", "-br", "addr", "show", "dev", BR).split()[2:] == ["10.97.2.11/24"]
    assert json.loads(sh("ip", "-n", ns, "-j", "link", "show", VX))[0]["ifindex"] == vx_index

    # a different VNI cannot be changed in place: the device is recreated
    lab.node_call("A", ("ensure_vxlan", [VX, VNI + 1, UNDERLAY["A"], BR]))
    vx = json.loads(sh("ip", "-n", ns, "-d", "-j", "link", "show", VX))[0]
    assert vx["linkinfo"]["info_data"]["id"] == VNI + 1
    assert vx["master"] == BR and "UP" in vx["flags"]

    exists = lab.node_call("A", ("link_exists", [VX]), ("delete_link", [VX]), ("link_exists", [VX]),
                           ("delete_link", [VX]))
    assert exists == [True, None, False, None]


@needs_root
def test_attach_again_and_detach(lab: Lab) -> None:
    build_overlay(lab)
    ta, host_if = lab.tasks["A"], lab.host_ifs["A"]
    # attaching again (as after a crash) replaces the veth and keeps the namespace usable
    mac = lab.node_call("A", ("attach_task", [ta, BR, host_if, f"{TASK_IP['A']}/24", NODE_IP["A"]]))
    assert mac == [mac_for_ip(TASK_IP["A"])]
    assert sh("ip", "-n", ta, "-br", "-4", "addr", "show", "dev", "eth0").split()[2:] == [
        f"{TASK_IP['A']}/24"]
    start_echo(lab, lab.nodes["A"], NODE_IP["A"])
    assert tcp_echo(lab, ta, NODE_IP["A"]) == f"echo {TASK_IP['A']} 5"

    out = lab.node_call("A", ("detach_task", [ta, host_if]), ("link_exists", [host_if]),
                        ("detach_task", [ta, host_if]))
    assert out == [None, False, None]
    assert ta not in _netns_list()
    assert not os.path.exists(f"/run/netns/{ta}")
    assert host_if not in sh("ip", "-n", lab.nodes["A"], "-br", "link")
