"""The kernel ingress table's source NAT, with real traffic: what each task sees as its client.

Topology (three throwaway namespaces, unique per run):

    client ns (c0 10.99.53.2/24, default route via the node)
      |
    node ns   (c1 10.99.53.1/24; lo: 10.99.51.1 the node address, 10.99.51.11 a task
      |        listening on one of the node's own addresses, as process tasks do;
      |        n0 10.99.52.1/24; corral's ingress table for 10.99.51.1:8080)
    remote ns (n1 10.99.52.11/24: a task behind a link, as a task on the overlay is;
               no route back to the client or to the node address)

A task on another link must see the node as its client (masquerade): it has no route back to
anyone else. A task on one of the node's own addresses answers from the node anyway, so it
sees the real client: from another host (delivered locally, so never through postrouting)
and from the node itself (sent locally: postrouting leaves a local destination alone).
"""

from __future__ import annotations

import os
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

NODE, LOCAL_TASK, REMOTE_TASK = "10.99.51.1", "10.99.51.11", "10.99.52.11"
CLIENT_ADDR, NODE_LINK = "10.99.53.2", "10.99.52.1"
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
        print(s.makefile().readline().strip(), s.getsockname()[0], flush=True)
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
        self.client, self.node, self.remote = (f"corral-snat-{k}-{suffix}" for k in "cnr")

    def connect_from(self, ns: str, n: int) -> list[tuple[str, str, str]]:
        """(task that answered, client address the task saw, client's own address) per try."""
        out = subprocess.run(in_ns(ns, sys.executable, "-c", CLIENT, NODE, str(PORT), str(n)),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [tuple(line.split()) for line in out.splitlines()]  # type: ignore[misc]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology()
    created: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for ns in (t.client, t.node, t.remote):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", t.client, "link", "add", "c0", "type", "veth",
           "peer", "name", "c1", "netns", t.node)
        sh("ip", "-n", t.node, "link", "add", "n0", "type", "veth",
           "peer", "name", "n1", "netns", t.remote)
        for ns, dev, addr in ((t.client, "c0", f"{CLIENT_ADDR}/24"),
                              (t.node, "c1", "10.99.53.1/24"), (t.node, "lo", f"{NODE}/32"),
                              (t.node, "lo", f"{LOCAL_TASK}/32"),
                              (t.node, "n0", f"{NODE_LINK}/24"),
                              (t.remote, "n1", f"{REMOTE_TASK}/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", t.client, "route", "add", "default", "via", "10.99.53.1")
        sh(*in_ns(t.node, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        for ns, addr in ((t.node, LOCAL_TASK), (t.remote, REMOTE_TASK)):
            proc = subprocess.Popen(in_ns(ns, sys.executable, "-c", SERVER, str(PORT), addr),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            servers.append(proc)
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        apply(render_ingress_table(NODE, [IngressRule(PORT, "tcp", (
            (LOCAL_TASK, PORT), (REMOTE_TASK, PORT)))]), netns=t.node)
        yield t
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for ns in reversed(created):  # takes the table and its conntrack entries along
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_from_another_host_the_local_task_sees_the_client(topo: Topology) -> None:
    seen = {(task, peer) for task, peer, _ in topo.connect_from(topo.client, 4)}
    assert seen == {(LOCAL_TASK, CLIENT_ADDR), (REMOTE_TASK, NODE_LINK)}


def test_from_the_node_itself_the_local_task_sees_the_client(topo: Topology) -> None:
    runs = topo.connect_from(topo.node, 4)
    assert {task for task, _, _ in runs} == {LOCAL_TASK, REMOTE_TASK}
    for task, peer, own in runs:
        assert peer == (own if task == LOCAL_TASK else NODE_LINK), runs
