"""The kernel ingress table's source NAT, with real traffic: what a task sees as its client.

Topology (three throwaway namespaces, unique per run):

    client ns (c0 10.99.53.2/24, default route via the node)
      |
    node ns   (c1 10.99.53.1/24; lo: 10.99.51.1, the node address; n0 10.99.52.1/24;
      |        corral's ingress table for 10.99.51.1:8080)
    task ns   (n1 10.99.52.11/24 and .12: two tasks behind a link, as the netns runtime's
               tasks are behind their bridge; no route back to the client or the node address)

Without the masquerade a task would answer the client directly, which it cannot even reach
here; with it, every connection — from another host (prerouting) and from the node itself
(output) — reaches a task from the node's own address on that link, and comes back.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from corral.dataplane.nft import apply
from corral.dataplane.nft_ingress import IngressRule, render_ingress_table

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"
)

NODE, NODE_LINK, TASKS = "10.99.51.1", "10.99.52.1", ("10.99.52.11", "10.99.52.12")
PORT = 8080

# Answers each connection with "<own address> <client address>".
SERVER = r"""
import socket, sys, threading
def loop(ls, me):
    while True:
        c, peer = ls.accept()
        with c:
            c.sendall(f"{me} {peer[0]}\n".encode())
for me in sys.argv[2:]:
    ls = socket.create_server((me, int(sys.argv[1])))
    threading.Thread(target=loop, args=(ls, me), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# Connects n times and prints what each connection was told, one line each.
CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    with socket.create_connection((host, port), timeout=5) as s:
        print(s.makefile().readline().strip(), flush=True)
"""


def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


class Topology:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.client, self.node, self.tasks = (f"corral-snat-{k}-{suffix}" for k in "cnt")

    def connect_from(self, ns: str, n: int) -> set[tuple[str, str]]:
        """(task that answered, client address it saw) over ``n`` connections."""
        done = subprocess.run(in_ns(ns, sys.executable, "-c", CLIENT, NODE, str(PORT), str(n)),
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, f"no answer through the node: {done.stderr.strip()[-300:]}"
        return {(task, peer) for task, peer in (line.split() for line in done.stdout.splitlines())}


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology()
    created: list[str] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        for ns in (t.client, t.node, t.tasks):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", t.client, "link", "add", "c0", "type", "veth",
           "peer", "name", "c1", "netns", t.node)
        sh("ip", "-n", t.node, "link", "add", "n0", "type", "veth",
           "peer", "name", "n1", "netns", t.tasks)
        for ns, dev, addr in ((t.client, "c0", "10.99.53.2/24"),
                              (t.node, "c1", "10.99.53.1/24"), (t.node, "lo", f"{NODE}/32"),
                              (t.node, "n0", f"{NODE_LINK}/24"),
                              *((t.tasks, "n1", f"{task}/24") for task in TASKS)):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", t.client, "route", "add", "default", "via", "10.99.53.1")
        sh(*in_ns(t.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        server = subprocess.Popen(in_ns(t.tasks, sys.executable, "-c", SERVER, str(PORT), *TASKS),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert server.stdout is not None
        assert select.select([server.stdout], [], [], 10)[0], "the tasks did not start"
        assert server.stdout.readline() == b"ready\n"
        apply(render_ingress_table(NODE, [IngressRule(PORT, "tcp", tuple(
            (task, PORT) for task in TASKS))]), netns=t.node)
        yield t
    finally:
        try:
            if server is not None:
                server.kill()
                server.wait(timeout=5)
                for pipe in (server.stdin, server.stdout):
                    if pipe is not None:
                        pipe.close()
        finally:
            for ns in reversed(created):  # takes the table and its conntrack entries along
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_from_another_host_the_tasks_see_the_node(topo: Topology) -> None:
    assert topo.connect_from(topo.client, 4) == {(task, NODE_LINK) for task in TASKS}


def test_from_the_node_itself_the_tasks_see_the_node(topo: Topology) -> None:
    assert topo.connect_from(topo.node, 4) == {(task, NODE_LINK) for task in TASKS}
