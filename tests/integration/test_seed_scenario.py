"""The seed's scenario on a real 3-node lab: create, spread, mesh round-robin, scale, rm."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing.labs import (
    LabSwarm,
    LineReader,
    http_get,
    lab_swarm,
    udp_ask,
    udp_echo_app,
    wait_for,
)

BASE = "127.0.0.21"  # this module's lab: 127.0.0.21-23, published ports 19000-19019


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("seed"), 3, BASE) as s:
        yield s


def port_bound(addr: str, port: int) -> bool:
    """Something accepts connections on addr:port."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((addr, port)) == 0


def test_node_ls_shows_three_ready_nodes_with_leader(swarm: LabSwarm) -> None:
    out = swarm.ok("node", "ls").out.splitlines()
    assert out[0].split() == ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS",
                              "ENGINE", "VERSION"]
    rows = {line.split()[-4 if "Leader" in line else -3]: line for line in out[1:]}
    assert len(out) == 4
    node1 = next(line for line in out[1:] if " node1 " in line)
    assert " * " in node1 and "Leader" in node1 and "Ready" in node1
    assert all("Ready" in line and "Active" in line for line in out[1:]), rows


def test_seed_scenario(swarm: LabSwarm) -> None:
    r = swarm.ok("service", "create", "--name", "search", "--replicas", "3",
                 "-p", "19000:9200", "whoami")
    lines = r.out.splitlines()
    assert len(lines[0]) == 25  # the service ID comes first, like docker
    assert "overall progress: 3 out of 3 tasks" in r.out
    for slot in (1, 2, 3):
        assert f"{slot}/3: running   [==================================================>]" in r.out
    assert lines[-1] == "verify: Service converged"

    ls = swarm.ok("service", "ls").out.splitlines()
    assert ls[0].split() == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    assert ls[1].split()[1:] == ["search", "replicated", "3/3", "whoami", "*:19000->9200/tcp"]

    ps = swarm.ok("service", "ps", "search").out.splitlines()
    assert ps[0].split()[:4] == ["ID", "NAME", "IMAGE", "NODE"]
    nodes = sorted(line.split()[3] for line in ps[1:])
    assert nodes == ["node1", "node2", "node3"], "3 replicas must spread over the 3 nodes"
    assert all("Running" in line for line in ps[1:])

    # From EVERY node's published port, successive connections reach all three replicas,
    # round-robin — whether or not that node runs a task of its own.
    tasks = {t["id"] for t in swarm.running("search")}
    for addr in swarm.addrs:
        seen = [http_get(addr, 19000) for _ in range(6)]
        assert {s["task_id"] for s in seen} == tasks
        names = [s["name"] for s in seen]
        assert names[:3] == names[3:], "round-robin: the same cycle repeats"
        assert all(s["service"] == "search" for s in seen)

    swarm.ok("service", "rm", "search")


def test_scale_3_5_1(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "scaled", "--replicas", "3", "-p", "19001:80",
             "whoami")
    r = swarm.ok("service", "scale", "scaled=5")
    assert "scaled scaled to 5" in r.out and "overall progress: 5 out of 5 tasks" in r.out
    running = swarm.running("scaled")
    assert sorted(t["slot"] for t in running) == [1, 2, 3, 4, 5]
    per_node: dict[str, int] = {}
    for t in running:
        per_node[t["node_id"]] = per_node.get(t["node_id"], 0) + 1
    assert sorted(per_node.values()) == [1, 2, 2], "spread: 2/2/1 over 3 nodes"
    assert len({http_get(swarm.addrs[1], 19001)["task_id"] for _ in range(10)}) == 5

    r = swarm.ok("service", "scale", "scaled=1")
    assert "overall progress: 1 out of 1 tasks" in r.out
    wait_for(lambda: len(swarm.tasks("scaled")) == 1, what="removed tasks to be reaped")
    (only,) = swarm.running("scaled")
    assert only["slot"] == 1
    assert all(http_get(a, 19001)["task_id"] == only["id"] for a in swarm.addrs)
    swarm.ok("service", "rm", "scaled")


def test_service_rm_frees_port_on_every_node(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "gone", "--replicas", "2", "-p", "19002:80", "whoami")
    assert all(port_bound(a, 19002) for a in swarm.addrs)
    swarm.ok("service", "rm", "gone")
    wait_for(lambda: not any(port_bound(a, 19002) for a in swarm.addrs), timeout=5,
             what="port 19002 to be released on every node")
    wait_for(lambda: "gone" not in swarm.ok("service", "ls").out, timeout=5, what="service gone")
    # The task processes are gone too, and the port can be published again right away.
    swarm.ok("service", "create", "--name", "again", "-p", "19002:80", "whoami")
    assert http_get(swarm.addrs[2], 19002)["service"] == "again"
    swarm.ok("service", "rm", "again")


def test_global_service_runs_one_task_per_node(swarm: LabSwarm) -> None:
    r = swarm.ok("service", "create", "--name", "everywhere", "--mode", "global",
                 "-p", "19003:80", "whoami")
    assert "overall progress: 3 out of 3 tasks" in r.out
    running = swarm.running("everywhere")
    assert len({t["node_id"] for t in running}) == 3
    assert "3/3" in swarm.ok("service", "ls").out
    swarm.ok("service", "rm", "everywhere")


def test_constraints_and_labels_place_tasks(swarm: LabSwarm) -> None:
    swarm.ok("node", "update", "--label-add", "zone=b", "node2")
    swarm.ok("service", "create", "--name", "pinned", "--replicas", "2", "-d",
             "--constraint", "node.labels.zone==b", "whoami")
    wait_for(lambda: len(swarm.running("pinned")) == 2, what="2 pinned tasks")
    node2 = swarm.nodes()["node2"]["id"]
    assert {t["node_id"] for t in swarm.running("pinned")} == {node2}
    swarm.ok("service", "rm", "pinned")
    swarm.ok("node", "update", "--label-rm", "zone", "node2")


def test_drain_moves_tasks_and_pause_stops_placement(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "movers", "--replicas", "3", "-p", "19004:80", "whoami")
    node3 = swarm.nodes()["node3"]["id"]
    try:
        swarm.ok("node", "update", "--availability", "drain", "node3")
        wait_for(lambda: len(swarm.running("movers")) == 3
                 and all(t["node_id"] != node3 for t in swarm.running("movers")),
                 what="tasks to move off the drained node")
        assert "Drain" in swarm.ok("node", "ls").out
        swarm.ok("node", "update", "--availability", "pause", "node3")
        swarm.ok("service", "scale", "-d", "movers=5")
        wait_for(lambda: len(swarm.running("movers")) == 5, what="scale to 5")
        assert all(t["node_id"] != node3 for t in swarm.running("movers")), "paused: no new tasks"
    finally:
        swarm.ok("node", "update", "--availability", "active", "node3")
        swarm.ok("service", "rm", "movers")


def test_service_logs_and_inspect(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "chatty", "--replicas", "2", "-p", "19005:80", "whoami")
    out = swarm.ok("service", "logs", "chatty").out
    assert out.count("listening on") == 2
    assert "chatty.1." in out and "chatty.2." in out
    import json
    (svc,) = json.loads(swarm.ok("service", "inspect", "chatty").out)
    assert svc["spec"]["ports"][0]["published_port"] == 19005
    # --follow: a task that starts later shows up in the same stream, nothing twice.
    import os
    import signal
    import subprocess
    import sys
    follow = subprocess.Popen([sys.executable, "-m", "corral", "service", "logs", "-f", "chatty"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=swarm.env())
    try:
        lines = LineReader(follow.stdout)
        wait_for(lambda: lines.count("listening on") == 2, what="the logs so far")
        swarm.ok("service", "scale", "chatty=3")
        wait_for(lambda: lines.count("chatty.3.") == 1, what="the new task's line")
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=10)
    finally:
        follow.kill()
    out = "".join(lines.lines)
    assert out.count("listening on") == 3, "nothing shown twice"
    assert "Traceback" not in err
    swarm.ok("service", "rm", "chatty")


def test_restart_condition_none_keeps_the_slot(tmp_path: Path, swarm: LabSwarm) -> None:
    script = tmp_path / "once.sh"
    script.write_text("#!/bin/sh\necho done\nexit 0\n")
    script.chmod(0o755)
    swarm.ok("service", "create", "--name", "once", "-d", "--restart-condition", "none",
             str(script))
    wait_for(lambda: [t for t in swarm.tasks("once") if t["status"]["state"] == "complete"],
             what="the task to complete")
    tasks = swarm.tasks("once")
    assert len(tasks) == 1 and tasks[0]["desired_state"] == "running", "no restart, slot kept"
    swarm.ok("service", "rm", "once")


def test_ctrl_c_during_progress_leaves_the_operation_running(swarm: LabSwarm) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    env = swarm.env()
    # A task that can never be placed: the progress display would wait forever.
    p = subprocess.Popen([sys.executable, "-m", "corral", "service", "create", "--name", "waiting",
                          "--constraint", "node.labels.never==here", "whoami"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        assert len(p.stdout.readline().strip()) == 25, "the ID, then the progress display"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert "Operation continuing in background." in out, (out, err)
    assert "Traceback" not in out + err
    (task,) = swarm.tasks("waiting")
    assert task["status"]["state"] == "pending"
    assert task["status"]["err"].startswith("no suitable node (scheduling constraints not satisfied")
    # Making the constraint satisfiable lets the operation that kept running finish.
    swarm.ok("node", "update", "--label-add", "never=here", "node1")
    try:
        wait_for(lambda: len(swarm.running("waiting")) == 1, what="the pending task to run")
    finally:
        swarm.ok("node", "update", "--label-rm", "never", "node1")
        swarm.ok("service", "rm", "waiting")


def test_lab_env_and_ps(swarm: LabSwarm) -> None:
    assert swarm.ok("lab", "env", "node2").out.splitlines() == [
        f"export CORRAL_HOST={swarm.addrs[1]}:2377", f"export CORRAL_CERT_PATH={swarm.lab.tls_dir}"]
    rows = swarm.ok("lab", "ps").out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["node1", "node2", "node3"]
    assert all(r.split()[3] == "running" for r in rows)
    r = swarm.cli("lab", "env", "node9")
    assert r.code == 1 and "no lab node node9" in r.err


def test_balancing_algorithms_and_affinity(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "lbs", "--replicas", "3", "-p", "19010:80",
             "--lb", "source-hash", "whoami")
    try:
        all_tasks = {t["id"] for t in swarm.running("lbs")}
        # One client address: source-hash sends it to one replica, from every node.
        for addr in swarm.addrs:
            assert len({http_get(addr, 19010)["task_id"] for _ in range(6)}) == 1
        swarm.ok("service", "update", "--lb", "maglev", "lbs")
        assert len({http_get(swarm.addrs[0], 19010)["task_id"] for _ in range(6)}) == 1
        swarm.ok("service", "update", "--lb", "rr", "--lb-affinity", "client-ip:30s", "lbs")
        assert len({http_get(swarm.addrs[1], 19010)["task_id"] for _ in range(6)}) == 1
        swarm.ok("service", "update", "--lb", "least-conn", "--lb-affinity", "none", "lbs")
        seen = {http_get(swarm.addrs[2], 19010)["task_id"] for _ in range(9)}
        assert seen == all_tasks, "least-conn with no load spreads over every replica"
        assert {t["id"] for t in swarm.running("lbs")} == all_tasks, "no task was replaced"
        r = swarm.cli("service", "update", "--lb", "fastest", "lbs")
        assert r.code == 1 and "invalid --lb" in r.err
    finally:
        swarm.ok("service", "rm", "lbs")


@pytest.mark.parametrize(("version", "port"), [("v1", 19012), ("v2", 19013)])
def test_proxy_protocol_gives_the_task_the_client_address(swarm: LabSwarm, version: str,
                                                          port: int) -> None:
    name = f"pp{version}"
    swarm.ok("service", "create", "--name", name, "--replicas", "2",
             "-p", f"published={port},target=80,proxy-protocol={version}", "whoami")
    try:
        # The client is 127.0.0.1; the mesh connects to the task from the node's address.
        seen = http_get(swarm.addrs[1], port)
        assert seen["proxy_protocol"] == int(version[1])
        assert seen["client"].startswith("127.0.0.1:")
        assert seen["peer"].startswith(f"{swarm.addrs[1]}:")
    finally:
        swarm.ok("service", "rm", name)
    r = swarm.cli("service", "create", "--name", "ppbad", "-p",
                  "published=19014,target=80,proxy-protocol=v3", "whoami")
    assert r.code == 1 and "invalid proxy-protocol" in r.err


def test_host_mode_publishes_only_where_tasks_run(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "hostp", "--replicas", "2",
             "-p", "published=19015,target=80,mode=host", "whoami")
    try:
        nodes = {n["id"]: n["description"]["addr"] for n in swarm.nodes().values()}
        running = swarm.running("hostp")
        with_task = {nodes[t["node_id"]] for t in running}
        assert len(with_task) == 2, "one task per node: the port can be bound once per node"
        for addr in swarm.addrs:
            if addr in with_task:
                seen = http_get(addr, 19015)
                assert nodes[next(t["node_id"] for t in running if t["id"] == seen["task_id"])] == addr
            else:
                assert not port_bound(addr, 19015), "no mesh for host-mode ports"
        assert "*:19015->80/tcp" in swarm.ok("service", "ps", "hostp").out
        assert "19015" not in swarm.ok("service", "ls").out, "ls shows ingress ports only"
        swarm.ok("service", "scale", "-d", "hostp=4")
        waiting = wait_for(lambda: [t for t in swarm.tasks("hostp")
                                    if "host-mode port already in use" in t["status"]["err"]],
                           what="a task that fits on no node")
        assert "on 3 nodes" in waiting[0]["status"]["err"]
    finally:
        swarm.ok("service", "rm", "hostp")


def test_udp_ingress(swarm: LabSwarm, tmp_path: Path) -> None:
    app = udp_echo_app(tmp_path)
    swarm.ok("service", "create", "--name", "udpsvc", "--replicas", "3", "-d",
             "-p", "19017:53/udp", str(app))
    try:
        tasks = wait_for(lambda: len(r := swarm.running("udpsvc")) == 3 and r, what="3 replicas")
        # UDP tasks report running at once (there is nothing to probe): wait until each one
        # answers on its own port before going through the mesh.
        for t in tasks:
            wait_for(lambda t=t: udp_ask(t["status"]["addr"], t["status"]["port"], tries=1,
                                         timeout=0.2), what=f"{t['id']} to bind its port")
        answers = set()
        for _ in range(6):  # six clients (six source ports): flows spread round-robin
            got = udp_ask(swarm.addrs[1], 19017)
            assert got is not None
            data, peer = got
            assert peer == (swarm.addrs[1], 19017), "replies come from the published address"
            assert data.endswith(b" ping")
            answers.add(data.split()[0])
        assert answers == {b"udpsvc.1", b"udpsvc.2", b"udpsvc.3"}
        assert "*:19017->53/udp" in swarm.ok("service", "ls").out
    finally:
        swarm.ok("service", "rm", "udpsvc")
