"""Service VIPs as nftables DNAT inside a task namespace, with real traffic.

Topology (two throwaway namespaces, unique per run, joined by a veth pair):

    task ns  (v0 10.98.0.1/24, the corral table, a client driver process)
      |
    backend ns (v1 10.98.0.11, .12, .13/24; one server process listening on
                each address, port 8080, greeting with its own address)

The VIPs (10.98.0.2 with backends, 10.98.0.3 without) are on-link in the
task namespace's /24, so output routing finds a route before the nat output
hook rewrites the destination. Without the reject rule a SYN to 10.98.0.3
would wait for ARP answers that never come, so "refused quickly" is a real
check.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from corral.dataplane.nft import (
    TABLE,
    NftError,
    VipRule,
    apply,
    apply_async,
    render_delete,
    render_vip_table,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"
)

NFT = shutil.which("nft") or "nft"
PORT = 8080
VIP = "10.98.0.2"
EMPTY_VIP = "10.98.0.3"
BACKENDS = ("10.98.0.11", "10.98.0.12", "10.98.0.13")

SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def serve(conn, me):
    with conn:
        conn.sendall((me + "\n").encode())
        f = conn.makefile("rb")
        for line in f:
            conn.sendall((me + ":" + line.decode()).encode())
def accept(ls, me):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c, me), daemon=True).start()
for me in sys.argv[2:]:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((me, port))
    ls.listen(128)
    threading.Thread(target=accept, args=(ls, me), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# One JSON command per stdin line, one JSON answer per stdout line.
CLIENT = r"""
import json, socket, sys, time
held = {}
def greet(s):
    f = s.makefile("rb")
    return f, f.readline().decode().strip()
for raw in sys.stdin:
    cmd = json.loads(raw)
    op = cmd["op"]
    try:
        if op == "burst":
            seen = []
            for _ in range(cmd["n"]):
                with socket.create_connection((cmd["host"], cmd["port"]), timeout=5) as s:
                    seen.append(greet(s)[1])
            out = {"seen": seen}
        elif op == "open":
            s = socket.create_connection((cmd["host"], cmd["port"]), timeout=5)
            f, me = greet(s)
            held[cmd["id"]] = (s, f)
            out = {"backend": me}
        elif op == "use":
            s, f = held[cmd["id"]]
            s.sendall((cmd["msg"] + "\n").encode())
            out = {"reply": f.readline().decode().strip()}
        elif op == "tcp_probe":
            t = time.monotonic()
            try:
                socket.create_connection((cmd["host"], cmd["port"]), timeout=cmd["timeout"]).close()
                res = "connected"
            except ConnectionRefusedError:
                res = "refused"
            except OSError as e:
                res = type(e).__name__ + ": " + str(e)
            out = {"result": res, "elapsed": time.monotonic() - t}
        elif op == "udp_probe":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(cmd["timeout"])
            s.connect((cmd["host"], cmd["port"]))
            t = time.monotonic()
            try:
                s.send(b"x")
                sent = "ok"
            except OSError as e:
                sent = type(e).__name__
            try:
                s.recv(10)
                res = "answered"
            except ConnectionRefusedError:
                res = "refused"
            except OSError as e:
                res = type(e).__name__ + ": " + str(e)
            s.close()
            out = {"send": sent, "result": res, "elapsed": time.monotonic() - t}
        else:
            out = {"error": "unknown op " + op}
    except Exception as e:
        out = {"error": type(e).__name__ + ": " + str(e)}
    print(json.dumps(out), flush=True)
"""


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def readline(proc: subprocess.Popen[bytes], buf: bytearray, timeout: float) -> str:
    """One line from proc's stdout, or an AssertionError after ``timeout`` s."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no answer from pid {proc.pid} within {timeout} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"pid {proc.pid} exited (rc={proc.poll()})")
        buf.extend(chunk)
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def spawn(ns: str, script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


class Client:
    """A driver process inside the task namespace (our process stays outside)."""

    def __init__(self, ns: str) -> None:
        self.proc = spawn(ns, CLIENT)
        self.buf = bytearray()

    def call(self, wait: float = 15, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(readline(self.proc, self.buf, wait))
        assert "error" not in out, out
        return out

    def burst(self, n: int, host: str = VIP) -> Counter[str]:
        return Counter(self.call(op="burst", n=n, host=host, port=PORT)["seen"])

    def close(self) -> None:
        stop(self.proc)


class Topology:
    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.task = f"corral-nft-t-{suffix}"
        self.back = f"corral-nft-b-{suffix}"


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology()
    server: subprocess.Popen[bytes] | None = None
    created: list[str] = []
    try:
        for ns in (t.task, t.back):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", t.task, "link", "add", "v0", "type", "veth",
           "peer", "name", "v1", "netns", t.back)
        sh("ip", "-n", t.task, "addr", "add", "10.98.0.1/24", "dev", "v0")
        for b in BACKENDS:
            sh("ip", "-n", t.back, "addr", "add", f"{b}/24", "dev", "v1")
        sh("ip", "-n", t.task, "link", "set", "v0", "up")
        sh("ip", "-n", t.back, "link", "set", "v1", "up")
        server = spawn(t.back, SERVER, str(PORT), *BACKENDS)
        assert readline(server, bytearray(), 10) == "ready"
        yield t
    finally:
        if server is not None:
            stop(server)
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def client(topo: Topology) -> Iterator[Client]:
    c = Client(topo.task)
    try:
        yield c
    finally:
        c.close()
        apply(render_delete(), netns=topo.task, nft=NFT)


def listing(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, NFT, "list", "table", "ip", TABLE)


def test_round_robin_update_keeps_established(topo: Topology, client: Client) -> None:
    # The tests never connect to a backend directly on PORT, so balanced
    # connections cannot collide with TIME_WAIT sockets of direct ones.
    apply(render_vip_table([VipRule(VIP, BACKENDS)]), netns=topo.task, nft=NFT)
    assert client.burst(9) == Counter({b: 3 for b in BACKENDS})

    # Long-lived connections, one per backend (the counter is at 9 = 0 mod 3).
    held = {client.call(op="open", id=i, host=VIP, port=PORT)["backend"]: i for i in range(3)}
    assert set(held) == set(BACKENDS)

    removed = BACKENDS[2]
    kept = BACKENDS[:2]
    apply(render_vip_table([VipRule(VIP, kept)]), netns=topo.task, nft=NFT)
    after = client.burst(8)
    assert after == Counter({b: 4 for b in kept})
    assert removed not in after

    # The connection DNATed to the removed backend before the update still works.
    for backend, i in held.items():
        reply = client.call(op="use", id=i, msg=f"ping{i}")["reply"]
        assert reply == f"{backend}:ping{i}"

    # Even with the VIP switched to "no backends" (reject), or removed, so that
    # no dnat rule is left, established connections keep their DNAT (the
    # filter chain sees the backend address). This needs the conntrack pin
    # rule: without it, conntrack switches off in the namespace with the last
    # dnat expression and these connections get reset / hang.
    apply(render_vip_table([VipRule(VIP, ())]), netns=topo.task, nft=NFT)
    assert client.call(op="tcp_probe", host=VIP, port=PORT, timeout=3)["result"] == "refused"
    for backend, i in held.items():
        assert client.call(op="use", id=i, msg="again")["reply"] == f"{backend}:again"
    apply(render_vip_table([]), netns=topo.task, nft=NFT)
    for backend, i in held.items():
        assert client.call(op="use", id=i, msg="more", wait=5)["reply"] == f"{backend}:more"


def test_reapply_is_idempotent(topo: Topology, client: Client) -> None:
    rules = [VipRule(VIP, BACKENDS), VipRule(EMPTY_VIP, ())]
    ruleset = render_vip_table(rules)
    apply(ruleset, netns=topo.task, nft=NFT)
    first = listing(topo.task)
    assert client.burst(3) == Counter({b: 1 for b in BACKENDS})
    apply(ruleset, netns=topo.task, nft=NFT)
    apply(ruleset, netns=topo.task, nft=NFT)
    assert listing(topo.task) == first
    assert first.count("dnat to numgen inc mod 3 map") == 1
    assert client.burst(6) == Counter({b: 2 for b in BACKENDS})


def test_empty_vip_is_refused_quickly(topo: Topology, client: Client) -> None:
    apply(
        render_vip_table([VipRule(VIP, BACKENDS[:1]), VipRule(EMPTY_VIP, ())]),
        netns=topo.task,
        nft=NFT,
    )
    tcp = client.call(op="tcp_probe", host=EMPTY_VIP, port=PORT, timeout=3)
    assert tcp["result"] == "refused", tcp
    assert tcp["elapsed"] < 0.5, tcp
    # UDP: the output-hook reject drops the datagram (send() fails with EPERM)
    # and queues an ICMP port-unreachable, so the next recv() is refused.
    udp = client.call(op="udp_probe", host=EMPTY_VIP, port=PORT, timeout=3)
    assert udp["result"] == "refused", udp
    assert udp["send"] in ("ok", "PermissionError"), udp
    assert udp["elapsed"] < 0.5, udp
    # A single backend is a plain dnat and still works next to the reject.
    assert client.burst(2) == Counter({BACKENDS[0]: 2})

    # Once the VIP gets a backend, it is no longer rejected.
    apply(render_vip_table([VipRule(EMPTY_VIP, BACKENDS[1:2])]), netns=topo.task, nft=NFT)
    assert client.burst(2, host=EMPTY_VIP) == Counter({BACKENDS[1]: 2})


def test_without_table_the_empty_vip_would_hang(topo: Topology, client: Client) -> None:
    """Control for the test above: the refusal comes from the reject rule."""
    apply(render_delete(), netns=topo.task, nft=NFT)
    probe = client.call(op="tcp_probe", host=EMPTY_VIP, port=PORT, timeout=0.5)
    assert probe["result"] != "refused", probe


def test_delete_twice_and_async_apply(topo: Topology, client: Client) -> None:
    asyncio.run(apply_async(render_vip_table([VipRule(VIP, BACKENDS)]), netns=topo.task, nft=NFT))
    assert "numgen inc mod 3" in listing(topo.task)
    asyncio.run(apply_async(render_delete(), netns=topo.task, nft=NFT))
    apply(render_delete(), netns=topo.task, nft=NFT)
    with pytest.raises(RuntimeError):
        listing(topo.task)


def test_malformed_ruleset_raises(topo: Topology) -> None:
    bad: dict[str, Any] = {"nftables": [{"add": {"rule": {"family": "ip", "table": "nope"}}}]}
    with pytest.raises(NftError) as exc:
        apply(bad, netns=topo.task, nft=NFT)
    msg = str(exc.value)
    assert "Error" in msg and "\n" not in msg, msg

    with pytest.raises(NftError) as aexc:
        asyncio.run(apply_async({"nftables": [{"bogus": {}}]}, netns=topo.task, nft=NFT))
    assert "Error" in str(aexc.value)

    # A rule into a missing table fails in the kernel, not in the parser.
    missing = {"nftables": [{"add": {"rule": {
        "family": "ip", "table": "nope", "chain": "x",
        "expr": [{"accept": None}],
    }}}]}
    with pytest.raises(NftError, match="No such file or directory"):
        apply(missing, netns=topo.task, nft=NFT)


def test_failed_apply_leaves_previous_table(topo: Topology, client: Client) -> None:
    good = render_vip_table([VipRule(VIP, BACKENDS)])
    apply(good, netns=topo.task, nft=NFT)
    before = listing(topo.task)
    broken = render_vip_table([VipRule(VIP, BACKENDS[:2])])
    broken["nftables"].append({"add": {"rule": {
        "family": "ip", "table": TABLE, "chain": "missing", "expr": [{"accept": None}],
    }}})
    with pytest.raises(NftError):
        apply(broken, netns=topo.task, nft=NFT)
    assert listing(topo.task) == before
    assert client.burst(3) == Counter({b: 1 for b in BACKENDS})
