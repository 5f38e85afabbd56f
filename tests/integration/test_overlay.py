"""Container-like tasks on overlay networks, in a netns lab of 3 real hosts: VXLAN between
nodes, service VIPs (nftables), the embedded DNS, ingress over the overlay, and cleanup."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing.labs import LabSwarm, http_get, lab_swarm, udp_ask, udp_echo_app, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="the netns lab needs root, iproute2 and nftables")

SUBNET = "10.99.8.0/24"  # this module's lab hosts; published ports 19500-19549


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("overlay"), 3, netns=True, subnet=SUBNET) as s:
        s.ok("network", "create", "--driver", "overlay", "--subnet", "10.20.0.0/24", "backend")
        s.ok("service", "create", "--name", "search", "--replicas", "3", "--network", "backend",
             "-p", "19500:9200", "whoami")
        s.ok("service", "create", "--name", "client", "--network", "backend", "whoami")
        yield s


def task_ips(swarm: LabSwarm, service: str, network: str) -> dict[str, str]:
    """task id -> its address on `network` (by name)."""
    net_id = json.loads(swarm.ok("network", "inspect", network).out)[0]["id"]
    return {t["id"]: a["addr"].split("/")[0] for t in swarm.running(service)
            for a in t["networks"] if a["network_id"] == net_id}


def in_client(swarm: LabSwarm, *cmd: str) -> str:
    return swarm.ok("service", "exec", "client", "--", *cmd).out


def test_tasks_get_their_own_address_and_listen_on_the_target_port(swarm: LabSwarm) -> None:
    ips = task_ips(swarm, "search", "backend")
    assert len(ips) == 3 and all(ip.startswith("10.20.0.") for ip in ips.values())
    assert len(set(ips.values())) == 3
    for t in swarm.running("search"):
        assert t["status"]["port"] == 0  # like a container: the target port of its own address


def test_cross_node_task_to_task_over_vxlan(swarm: LabSwarm) -> None:
    client_node = swarm.running("client")[0]["node_id"]
    remote = [t for t in swarm.running("search") if t["node_id"] != client_node]
    assert remote, "3 replicas on 3 nodes: at least two are remote from the client"
    ips = task_ips(swarm, "search", "backend")
    for t in remote:
        out = in_client(swarm, "curl", "-s", "-m", "5", f"http://{ips[t['id']]}:9200/")
        assert json.loads(out)["task_id"] == t["id"]


def test_vip_balances_over_all_replicas(swarm: LabSwarm) -> None:
    svc = json.loads(swarm.ok("service", "inspect", "search").out)[0]
    (vip,) = [a["addr"].split("/")[0] for a in svc["vips"]]
    assert in_client(swarm, "getent", "hosts", "search").split()[0] == vip
    seen = {json.loads(in_client(swarm, "curl", "-s", "-m", "5", "http://search:9200/"))["task_id"]
            for _ in range(6)}
    assert seen == {t["id"] for t in swarm.running("search")}


def test_dns_answers(swarm: LabSwarm) -> None:
    ips = set(task_ips(swarm, "search", "backend").values())
    out = in_client(swarm, "getent", "ahostsv4", "tasks.search")
    assert {line.split()[0] for line in out.splitlines()} == ips
    name_ip = in_client(swarm, "getent", "hosts", "search.2").split()[0]
    assert name_ip in ips
    r = swarm.cli("service", "exec", "client", "--", "getent", "hosts", "nosuchservice")
    assert r.code == 2, "an unknown corral name is NXDOMAIN"


def test_dnsrr_service_resolves_to_task_ips(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "rr", "--replicas", "2", "--network", "backend",
             "--endpoint-mode", "dnsrr", "whoami")
    try:
        svc = json.loads(swarm.ok("service", "inspect", "rr").out)[0]
        assert svc["vips"] == []
        ips = set(task_ips(swarm, "rr", "backend").values())
        out = in_client(swarm, "getent", "ahostsv4", "rr")
        assert {line.split()[0] for line in out.splitlines()} == ips
    finally:
        swarm.ok("service", "rm", "rr")


def test_vip_and_dns_follow_scaling(swarm: LabSwarm) -> None:
    swarm.ok("service", "scale", "-d", "search=5")
    t0 = time.monotonic()
    try:
        wait_for(lambda: len(swarm.running("search")) == 5, what="5 replicas")
        ips = set(task_ips(swarm, "search", "backend").values())

        def dns_sees_all() -> bool:
            out = in_client(swarm, "getent", "ahostsv4", "tasks.search")
            return {line.split()[0] for line in out.splitlines()} == ips
        wait_for(dns_sees_all, timeout=10, what="DNS to list 5 tasks")
        print(f"\nscale 3→5: 5 running and in DNS after {time.monotonic() - t0:.2f}s")
        seen = {json.loads(in_client(swarm, "curl", "-s", "-m", "5", "http://search:9200/"))["task_id"]
                for _ in range(10)}
        assert len(seen) == 5
    finally:
        swarm.ok("service", "scale", "-d", "search=3")
        wait_for(lambda: len(swarm.tasks("search")) == 3, what="scale back to 3")
    out = in_client(swarm, "getent", "ahostsv4", "tasks.search")
    assert len({line.split()[0] for line in out.splitlines()}) == 3


def test_ingress_from_every_host_reaches_all_replicas(swarm: LabSwarm) -> None:
    tasks = {t["id"] for t in swarm.running("search")}
    for addr in swarm.addrs:
        assert {http_get(addr, 19500)["task_id"] for _ in range(6)} == tasks
    out = swarm.exec("node2", "curl", "-s", "-m", "5", f"http://{swarm.addrs[2]}:19500/")
    assert out.code == 0 and json.loads(out.out)["service"] == "search"


def test_network_bad_input(swarm: LabSwarm) -> None:
    cases = [
        (["network", "create", "--subnet", "10.20.0.128/25", "x1"], "overlaps"),
        (["network", "create", "--subnet", "10.30.0.1/24", "x2"], "invalid subnet"),
        (["network", "create", "--subnet", "banana", "x3"], "invalid subnet"),
        (["network", "create", "--subnet", "10.31.0.0/24", "backend"], "already exists"),
        (["network", "rm", "backend"], "in use by service"),
        (["service", "create", "--name", "nonet", "--network", "nosuch", "whoami"], "not found"),
        (["service", "create", "--name", "rrp", "--endpoint-mode", "dnsrr", "-p", "19501:80",
          "whoami"], "dnsrr"),
    ]
    for args, words in cases:
        r = swarm.cli(*args)
        assert r.code == 1 and words in r.err and "Traceback" not in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1


def test_full_subnet_leaves_tasks_waiting_with_the_reason(swarm: LabSwarm) -> None:
    # /29: 6 hosts; .1 is the gateway, 3 go to the nodes, 1 to the VIP: room for 1 task.
    swarm.ok("network", "create", "--subnet", "10.21.0.0/29", "tiny")
    vni = json.loads(swarm.ok("network", "inspect", "tiny").out)[0]["vni"]
    swarm.ok("service", "create", "--name", "crowd", "--replicas", "3", "--network", "tiny",
             "-d", "whoami")
    try:
        wait_for(lambda: len(swarm.running("crowd")) == 1, what="the one task that fits")
        waiting = wait_for(lambda: [t for t in swarm.tasks("crowd")
                                    if "no free address" in t["status"]["err"]],
                           what="tasks waiting for an address")
        assert len(waiting) == 2
    finally:
        swarm.ok("service", "rm", "crowd")
        wait_for(lambda: swarm.cli("network", "rm", "tiny").code == 0, timeout=15,
                 what="the network to be removable once its tasks are gone")
    # Every node takes its bridge and VXLAN device for the network down again.
    for node in ("node1", "node2", "node3"):
        wait_for(lambda: f"cb{vni}" not in swarm.exec(node, "ip", "-br", "link").out, timeout=10,
                 what=f"{node} to delete the network's links")


def test_service_rm_leaves_no_namespace(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "brief", "--replicas", "3", "--network", "backend",
             "whoami")
    ids = [t["id"] for t in swarm.running("brief")]
    prefix = swarm.lab.task_netns_prefix

    def namespaces() -> set[str]:
        return {p.name for p in Path("/run/netns").iterdir()}
    assert all(f"{prefix}{i}" in namespaces() for i in ids)
    swarm.ok("service", "rm", "brief")
    wait_for(lambda: not any(f"{prefix}{i}" in namespaces() for i in ids), timeout=15,
             what="the task namespaces to be deleted")


def test_secrets_live_only_in_the_tasks_own_mount_namespace(swarm: LabSwarm) -> None:
    value = "netns-" + os.urandom(6).hex()
    swarm.ok("secret", "create", "api_key", "-", input=value)
    # Its health command sees the secret too (it runs in the task's namespaces): the service
    # converges only once both tasks are healthy.
    swarm.ok("service", "create", "--name", "vault", "--replicas", "2", "--network", "backend",
             "--secret", "source=api_key,target=key,mode=0400",
             "--health-cmd", "test -s /run/secrets/key", "--health-interval", "1s", "whoami")
    vault = swarm.running("vault")
    assert len(vault) == 2 and all(t["status"]["health"] == "healthy" for t in vault)
    ids = [t["id"] for t in swarm.running("vault")]
    for slot in ("1", "2"):
        r = swarm.ok("service", "exec", f"vault.{slot}", "--", "sh", "-c",
                     'cat /run/secrets/key; echo; stat -c %a /run/secrets/key; '
                     'echo "$CORRAL_SECRETS_DIR"; findmnt -n -o FSTYPE /run/secrets')
        assert r.out.split() == [value, "400", "/run/secrets", "tmpfs"], r.out
    # Outside the tasks' mount namespaces there is no copy: the host's staging directory was
    # emptied by the task itself, and /run/secrets on the nodes is an empty mount point.
    from corral.agent.secrets import secrets_root
    assert not any((secrets_root() / i).exists() for i in ids)
    for node in ("node1", "node2", "node3"):
        assert swarm.exec(node, "sh", "-c", "ls -A /run/secrets").out.strip() == ""
    swarm.ok("service", "rm", "vault")
    swarm.ok("secret", "rm", "api_key")


def vip_backends(swarm: LabSwarm, vip: str) -> set[str]:
    """The backends the client task's nftables table currently sends `vip` to."""
    client = swarm.running("client")[0]
    ns = f"{swarm.lab.task_netns_prefix}{client['id']}"
    import subprocess
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip", "corral"],
                         capture_output=True, text=True, check=True).stdout
    found: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.startswith("10.20.0.") and x != vip:
            found.add(x)
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and vip in json.dumps(rule["expr"]):
            walk(rule["expr"])
    return found


def test_vip_and_dns_follow_task_replacement(swarm: LabSwarm) -> None:
    import signal
    svc = json.loads(swarm.ok("service", "inspect", "search").out)[0]
    (vip,) = [a["addr"].split("/")[0] for a in svc["vips"]]
    before = task_ips(swarm, "search", "backend")
    assert vip_backends(swarm, vip) == set(before.values())
    victim = swarm.running("search")[0]
    # The process runs in its own namespace, so find it by the task's environment.
    pid = victim["status"]["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    gone = before[victim["id"]]
    wait_for(lambda: gone not in vip_backends(swarm, vip), timeout=10, interval=0.02,
             what="the killed task to leave the VIP")
    left = time.monotonic() - t0
    wait_for(lambda: len(swarm.running("search")) == 3, timeout=20, what="a replacement task")
    after = set(task_ips(swarm, "search", "backend").values())
    wait_for(lambda: vip_backends(swarm, vip) == after, timeout=10, interval=0.05,
             what="the replacement to join the VIP")
    joined = time.monotonic() - t0
    print(f"\ntask killed: out of the VIP after {left:.2f}s, replacement in the VIP after "
          f"{joined:.2f}s (restart delay 5s)")
    out = in_client(swarm, "getent", "ahostsv4", "tasks.search")
    assert {line.split()[0] for line in out.splitlines()} == after


def test_restarted_node_sweeps_its_old_task_namespaces(swarm: LabSwarm) -> None:
    node3 = swarm.nodes()["node3"]["id"]
    on3 = [t["id"] for t in swarm.tasks("search") if t["node_id"] == node3
           and t["status"]["state"] == "running"]
    prefix = swarm.lab.task_netns_prefix
    swarm.ok("lab", "kill", "node3")
    try:
        assert all((Path("/run/netns") / f"{prefix}{i}").exists() for i in on3), \
            "a SIGKILLed daemon leaves its task namespaces behind"
    finally:
        swarm.ok("lab", "start", "node3")
    wait_for(lambda: not any((Path("/run/netns") / f"{prefix}{i}").exists() for i in on3),
             timeout=15, what="the restarted daemon to remove its old task namespaces")
    wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "ready", what="node3 back")
    wait_for(lambda: len(swarm.running("search")) == 3, timeout=20, what="3 replicas again")


def test_partitioned_node_is_replaced_and_heals(swarm: LabSwarm) -> None:
    node3 = swarm.nodes()["node3"]["id"]
    swarm.ok("lab", "partition", "node3")
    try:
        wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "down", timeout=15,
                 what="the cut-off node to be seen down")
        wait_for(lambda: len([t for t in swarm.running("search") if t["node_id"] != node3]) == 3,
                 timeout=20, what="3 replicas on the connected nodes")
        tasks = {t["id"] for t in swarm.running("search") if t["node_id"] != node3}
        assert {http_get(swarm.addrs[0], 19500)["task_id"] for _ in range(6)} == tasks
    finally:
        swarm.ok("lab", "heal", "node3")
    wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "ready", timeout=15,
             what="node3 back after healing")
    # Its old tasks were replaced while it was away: the node stops them when it returns.
    wait_for(lambda: not [t for t in swarm.tasks("search") if t["node_id"] == node3
                          and t["status"]["state"] == "running"], timeout=15,
             what="node3's stale tasks to stop")


def test_kernel_mesh_serves_published_ports(swarm: LabSwarm) -> None:
    # The netns lab's daemons run the kernel fast path: nftables DNAT, no userspace listener.
    table = swarm.exec("node1", "nft", "list", "table", "ip", "corral_ingress")
    assert table.code == 0 and "tcp . 19500 : jump p_tcp_19500" in table.out
    assert "numgen inc" in table.out
    listeners = swarm.exec("node1", "ss", "-ltnH", "sport", "= :19500")
    assert listeners.code == 0 and listeners.out.strip() == ""


def test_kernel_mesh_keeps_established_connections_across_rule_changes(swarm: LabSwarm) -> None:
    import http.client
    conn = http.client.HTTPConnection(swarm.addrs[0], 19500, timeout=5)
    try:
        conn.request("GET", "/")
        first = json.loads(conn.getresponse().read())
        swarm.ok("service", "scale", "-d", "search=4")
        wait_for(lambda: len(swarm.running("search")) == 4, what="4 replicas")
        wait_for(lambda: "mod 4" in swarm.exec("node1", "nft", "list", "chain", "ip",
                                               "corral_ingress", "p_tcp_19500").out,
                 what="node1's rules to have the 4 backends")
        conn.request("GET", "/")
        second = json.loads(conn.getresponse().read())
        assert second["task_id"] == first["task_id"], "the connection stayed on its backend"
        new = {json.loads(swarm.exec("node2", "curl", "-s", "-m", "5",
                                     f"http://{swarm.addrs[0]}:19500/").out)["task_id"]
               for _ in range(8)}
        assert len(new) == 4, "new connections use the new rules"
    finally:
        conn.close()
        swarm.ok("service", "scale", "-d", "search=3")
        wait_for(lambda: len(swarm.running("search")) == 3 and not [
            t for t in swarm.tasks("search") if t["desired_state"] == "remove"], what="back to 3")


def test_kernel_and_userspace_balancing_per_port(swarm: LabSwarm) -> None:
    def from_root() -> set[str]:
        return {http_get(swarm.addrs[0], 19500)["task_id"] for _ in range(6)}
    try:
        swarm.ok("service", "update", "--lb", "source-hash", "search")
        wait_for(lambda: "jhash" in swarm.exec("node1", "nft", "list", "table", "ip",
                                               "corral_ingress").out, what="a jhash rule")
        assert len(from_root()) == 1, "one client address, one replica (in the kernel)"
        swarm.ok("service", "update", "--lb", "maglev", "search")
        # nftables has no maglev: the port moves to the userspace proxy on every node.
        wait_for(lambda: swarm.exec("node1", "ss", "-ltnH", "sport", "= :19500").out.strip(),
                 what="a userspace listener for the maglev port")
        assert "19500" not in swarm.exec("node1", "nft", "list", "table", "ip",
                                         "corral_ingress").out
        assert len(from_root()) == 1
        # Round-robin with client-IP affinity: back in the kernel, with a timed set.
        swarm.ok("service", "update", "--lb", "rr", "--lb-affinity", "client-ip:30s", "search")
        wait_for(lambda: "a_tcp_19500_0" in swarm.exec("node1", "nft", "list", "table", "ip",
                                                       "corral_ingress").out,
                 what="the affinity sets")
        assert len(from_root()) == 1
        swarm.ok("service", "update", "--lb-affinity", "none", "search")
    finally:
        swarm.ok("service", "update", "--lb", "rr", "search")
    wait_for(lambda: "numgen inc" in swarm.exec("node1", "nft", "list", "table", "ip",
                                                "corral_ingress").out, what="back in the kernel")
    assert len(from_root()) == 3


def test_host_mode_port_forwards_to_the_local_task_only(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "hostnet", "--replicas", "1",
             "-p", "published=19510,target=80,mode=host", "whoami")
    try:
        (task,) = swarm.running("hostnet")
        nodes = {n["id"]: n["description"]["addr"] for n in swarm.nodes().values()}
        home = nodes[task["node_id"]]
        wait_for(lambda: http_get(home, 19510)["task_id"] == task["id"], timeout=10,
                 what="the node running the task to answer on its host port")
        for addr in swarm.addrs:
            if addr != home:
                r = swarm.exec("node1", "curl", "-s", "-m", "2", f"http://{addr}:19510/")
                assert r.code != 0, f"{addr} runs no task: nothing answers there"
    finally:
        swarm.ok("service", "rm", "hostnet")


def test_udp_ingress_in_the_kernel(swarm: LabSwarm, tmp_path: Path) -> None:
    app = udp_echo_app(tmp_path)
    swarm.ok("service", "create", "--name", "udpk", "--replicas", "2", "-d",
             "-p", "19511:53/udp", str(app))
    try:
        wait_for(lambda: len(swarm.running("udpk")) == 2, what="2 UDP replicas")
        wait_for(lambda: "p_udp_19511" in swarm.exec("node1", "nft", "list", "table", "ip",
                                                         "corral_ingress").out,
                 what="the UDP rule")
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]

        def ask(c: socket.socket) -> bytes:
            got = udp_ask(swarm.addrs[0], 19511, sock=c)
            return got[0].split()[0] if got else b""
        try:
            assert {ask(c) for c in clients} == {b"udpk.1", b"udpk.2"}
            # Removing a replica: its clients' flows are flushed from conntrack, so the same
            # client sockets (same 5-tuple) now reach the remaining replica.
            swarm.ok("service", "scale", "-d", "udpk=1")
            wait_for(lambda: len(swarm.tasks("udpk")) == 1, what="one replica left")
            wait_for(lambda: "numgen" not in swarm.exec("node1", "nft", "list", "chain", "ip",
                                                        "corral_ingress", "p_udp_19511").out,
                     what="node1's rule to have one backend")
            assert {ask(c) for c in clients} == {b"udpk.1"}
        finally:
            for c in clients:
                c.close()
    finally:
        swarm.ok("service", "rm", "udpk")


def test_traffic_local_keeps_the_client_address(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "local", "--mode", "global",
             "-p", "published=19513,target=80,traffic=local", "whoami")
    try:
        nodes = {n["id"]: n["description"]["hostname"] for n in swarm.nodes().values()}
        wait_for(lambda: len(swarm.running("local")) == 3, what="one task per node")
        bridge_ip = swarm.lab.subnet.split("/")[0].rsplit(".", 1)[0] + ".1"
        for i, addr in enumerate(swarm.addrs):
            for _ in range(3):
                seen = http_get(addr, 19513)
                assert seen["node"] == f"node{i + 1}", "each node answers with its own task"
                # No source NAT: the task sees the host's address on the lab bridge.
                assert seen["client"].startswith(f"{bridge_ip}:"), seen["client"]
        del nodes
    finally:
        swarm.ok("service", "rm", "local")
    r = swarm.cli("service", "create", "--name", "tl", "-p",
                  "published=19514,target=80,traffic=nearby", "whoami")
    assert r.code == 1 and "invalid traffic" in r.err
