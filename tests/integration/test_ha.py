"""Several managers on a real 3-member etcd: the leader dies and the swarm carries on; etcd
loses its quorum and the swarm keeps serving, then recovers.

A loopback lab on 127.0.0.111–115: node1–3 are managers, each with an etcd member in its
process group (so `lab kill` takes both, as a dying host would); node4–5 are workers.
Published port 19650.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.lab.lab import pid_alive
from corral.manager.election import ELECTION_KEY
from corral.security import pki
from corral.store.etcd_client import EtcdClient, EtcdUnavailable
from corral.testing.etcd import ETCD_MISSING, etcd_available
from corral.testing.labs import LabSwarm, http_get, lab_swarm, wait_for
from corral.testing.load import Load

pytestmark = pytest.mark.skipif(not etcd_available(), reason=ETCD_MISSING)

BASE_ADDR = "127.0.0.111"
PORT = 19650


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("ha"), 5, BASE_ADDR, heartbeat=0.5, managers=3,
                   store="etcd") as s:
        # On the workers: a manager failover must leave the data plane entirely alone.
        s.ok("service", "create", "--name", "web", "--replicas", "4", "-p", f"{PORT}:80",
             "--constraint", "node.role==worker", "whoami")
        yield s


@pytest.fixture(autouse=True)
def revive(swarm: LabSwarm) -> Iterator[None]:
    """A test that fails with nodes killed leaves them running again for the next one."""
    yield
    for n in swarm.lab.nodes:
        if not pid_alive(n.pid):
            swarm.lab.start(n.name)


def managers(swarm: LabSwarm, via: str) -> dict[str, str]:
    """hostname -> MANAGER STATUS, as the manager at `via` sees it."""
    rows = swarm.ok("node", "ls", host=via).out.splitlines()[1:]
    out = {}
    for row in rows:
        cols = row.replace(" * ", "   ").split()
        if cols[-2] in ("Leader", "Reachable", "Unreachable"):
            out[cols[1]] = cols[-2]
    return out


def leader(swarm: LabSwarm, via: str) -> str:
    return next((h for h, s in managers(swarm, via).items() if s == "Leader"), "")


async def next_leader(swarm: LabSwarm, old_addr: str) -> float:
    """When (monotonic) the election key names a manager other than the one at `old_addr`."""
    client = EtcdClient(swarm.lab.etcd_endpoints)
    try:
        while True:
            try:
                kv = await client.get(ELECTION_KEY)
                if kv is not None and f"@{old_addr}:" not in kv.value.decode():
                    return time.monotonic()
            except EtcdUnavailable:
                pass
            await asyncio.sleep(0.05)
    finally:
        await client.close()


def test_three_managers_one_leader(swarm: LabSwarm) -> None:
    for n in swarm.lab.nodes[:3]:
        assert managers(swarm, n.host) == {"node1": "Leader", "node2": "Reachable",
                                           "node3": "Reachable"}
    # Any manager takes writes (followers hand them to the leader) and reads its replica.
    swarm.ok("service", "create", "--name", "via-follower", "--replicas", "1", "whoami",
             host=swarm.lab.node("node3").host)
    assert "via-follower" in swarm.ok("service", "ls", host=swarm.lab.node("node2").host).out
    # A worker is not a manager.
    r = swarm.cli("service", "ls", host=swarm.lab.node("node4").host)
    assert r.code != 0 and "not a swarm manager" in r.err


def test_the_leader_dies_and_the_swarm_carries_on(swarm: LabSwarm) -> None:
    n2 = swarm.lab.node("node2").host
    before = sorted(swarm.ok("service", "ls", "-q").out.split())
    tasks = {t["id"] for t in swarm.running("web")}
    survivors = [(n.addr, PORT) for n in swarm.lab.nodes[1:]]
    with Load(survivors, rate=50) as load:
        wait_for(lambda: load.result.ok >= 10, timeout=10, what="the load to flow")
        killed = time.monotonic()
        swarm.lab.kill("node1")  # the leader, with its etcd member
        elected = asyncio.run(asyncio.wait_for(next_leader(swarm, "127.0.0.111"), 20)) - killed
        new = wait_for(lambda: leader(swarm, n2) not in ("", "node1") and leader(swarm, n2),
                       timeout=20, interval=0.2, what="a new leader")
        took = time.monotonic() - killed
        # Writes work again once elected: a new service converges.
        swarm.ok("service", "create", "--name", "after", "--replicas", "2", "whoami", host=n2)
        served = load.result.ok  # and the mesh keeps serving under the new leader
        wait_for(lambda: load.result.ok >= served + 25, timeout=10, what="requests after that")
        result = load.stop()
    print(f"\nleader node1 killed: new leader {new} elected after {elected:.1f}s (seen by the "
          f"CLI after {took:.1f}s); requests to the surviving nodes: {result.summary()}")
    assert elected < 6, f"a new leader took {elected:.1f}s"
    assert result.failed == 0 and result.ok > 50, result.summary()
    # Nothing in the store was lost; the running tasks were left alone.
    after = sorted(swarm.ok("service", "ls", "-q", host=n2).out.split())
    assert set(before) <= set(after) and len(after) == len(before) + 1
    assert {t["id"] for t in swarm.running("web", host=n2)} == tasks
    swarm.lab.start("node1")
    wait_for(lambda: managers(swarm, n2).get("node1") == "Reachable", timeout=20,
             what="node1 back as a follower")


def test_promote_and_demote(swarm: LabSwarm, tmp_path: Path) -> None:
    n2, n4 = swarm.lab.node("node2").host, swarm.lab.node("node4").host
    assert "Node node4 promoted to a manager" in swarm.ok("node", "promote", "node4", host=n2).out
    wait_for(lambda: managers(swarm, n2).get("node4") == "Reachable", timeout=20,
             what="node4 to be a manager")
    # It now serves the manager API itself, from its own replica, with a manager certificate.
    wait_for(lambda: swarm.cli("service", "ls", host=n4).code == 0, timeout=20,
             what="node4's manager API")
    assert "web" in swarm.ok("service", "ls", host=n4).out
    tls4 = Path(swarm.lab.node("node4").data_dir) / "tls"
    wait_for(lambda: pki.identity((tls4 / "node.pem").read_bytes()).role == "manager",
             timeout=10, what="node4's manager certificate")
    kept = tmp_path / "node4-manager"
    shutil.copytree(tls4, kept)  # what a demoted manager might keep
    n5 = swarm.lab.node("node5").addr
    assert old_cert_call(kept, n5) == 404  # a manager may ask a node for a task's logs
    swarm.ok("node", "demote", "node4", host=n2)
    wait_for(lambda: "not a swarm manager" in swarm.cli("service", "ls", host=n4).err,
             timeout=20, what="node4 to be a worker again")
    assert "node4" not in managers(swarm, n2)
    wait_for(lambda: pki.identity((tls4 / "node.pem").read_bytes()).role == "worker",
             timeout=10, what="node4's worker certificate")
    # Its old manager certificate opens nothing on the other nodes any more: they know who
    # the managers are from their assignments.
    wait_for(lambda: old_cert_call(kept, n5) == 403, timeout=10,
             what="node5 to refuse the demoted manager's old certificate")


def old_cert_call(tls: Path, addr: str) -> int:
    """Status of a node-local call to `addr` with the node certificate kept in `tls`."""
    ctx = pki.client_context((tls / "ca.pem").read_bytes(), str(tls / "node.pem"),
                             str(tls / "node-key.pem"))
    with httpx.Client(verify=ctx, timeout=5) as c:
        return c.get(f"https://{addr}:2377/v1/local/tasks/none/logs",
                     extensions={"sni_hostname": pki.NODE_NAME}).status_code


def test_lost_quorum_keeps_serving_then_recovers(swarm: LabSwarm) -> None:
    """Two of three etcd members gone: no leader, a clear error, the mesh still serves."""
    lead = leader(swarm, swarm.lab.node("node3").host)
    down = [n for n in ("node1", "node2", "node3") if n != lead][:1] + [lead]
    up = next(n for n in ("node1", "node2", "node3") if n not in down)
    for name in down:
        swarm.lab.kill(name)
    host = swarm.lab.node(up).host
    r = wait_for(lambda: (lambda x: x if x.code != 0 else None)(
        swarm.cli("service", "create", "--name", "never", "-d", "whoami", host=host)),
        timeout=20, interval=0.5, what="writes to be refused")
    assert "no manager leads" in r.err or "quorum" in r.err, r.err
    assert len([ln for ln in r.err.splitlines() if ln.strip()]) == 1 and "Traceback" not in r.err
    # Running tasks and the routing mesh carry on with what they last knew.
    for n in swarm.lab.nodes[3:]:
        assert http_get(n.addr, PORT)["service"] == "web"
    for name in down:
        swarm.lab.start(name)
    wait_for(lambda: leader(swarm, host) != "", timeout=30, interval=0.5, what="a leader again")
    # Writes work again once the new leader has caught up with the store and took over.
    wait_for(lambda: swarm.cli("service", "create", "--name", "recovered", "--replicas", "1",
                               "whoami", host=host).code == 0
             or "recovered" in swarm.ok("service", "ls", host=host).out,
             timeout=30, interval=0.5, what="writes to work again")
    assert "never" not in swarm.ok("service", "ls", host=host).out
