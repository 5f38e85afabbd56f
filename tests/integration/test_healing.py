"""Self-healing on a real lab: a killed task is replaced, a killed node's tasks move, a
restarted manager keeps the whole state."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from corral.testing.labs import http_get, lab_swarm, wait_for

BASE = "127.0.0.24"  # this module's labs: 127.0.0.24-26, published ports 19020-19039


def test_killed_task_is_replaced_per_restart_policy(tmp_path: Path) -> None:
    with lab_swarm(tmp_path, 2, BASE) as swarm:
        swarm.ok("service", "create", "--name", "web", "--replicas", "2", "-p", "19020:80",
                 "--restart-delay", "1s", "whoami")
        victim = next(t for t in swarm.running("web") if t["slot"] == 1)
        os.kill(victim["status"]["pid"], signal.SIGKILL)

        def replaced() -> bool:
            return any(t["slot"] == 1 and t["id"] != victim["id"] for t in swarm.running("web"))
        wait_for(replaced, timeout=15, what="slot 1 to run a replacement task")
        old = next(t for t in swarm.tasks("web") if t["id"] == victim["id"])
        assert old["desired_state"] == "shutdown"
        assert old["status"]["state"] == "failed"
        assert old["status"]["err"] == "task: non-zero exit (-9)"
        ps = swarm.ok("service", "ps", "web").out
        assert " \\_ web.1" in ps, "the failed task shows as slot 1's history"
        assert len({http_get(BASE, 19020)["task_id"] for _ in range(4)}) == 2

        # on-failure with max attempts: a task that keeps failing is restarted twice, then left.
        swarm.ok("service", "create", "--name", "flaky", "-d", "--restart-condition",
                 "on-failure", "--restart-delay", "0s", "--restart-max-attempts", "2",
                 "sh", "-c", "exit 3")
        wait_for(lambda: len(swarm.tasks("flaky")) == 3
                 and all(t["status"]["state"] == "failed" for t in swarm.tasks("flaky")),
                 timeout=15, what="three failed attempts")
        time.sleep(1.0)
        assert len(swarm.tasks("flaky")) == 3, "no fourth attempt after max attempts"


def test_lab_kill_node_moves_tasks_and_mesh_recovers(tmp_path: Path) -> None:
    with lab_swarm(tmp_path, 3, BASE, heartbeat=0.5) as swarm:
        swarm.ok("service", "create", "--name", "search", "--replicas", "3",
                 "-p", "19021:9200", "whoami")
        node3 = swarm.nodes()["node3"]["id"]
        assert any(t["node_id"] == node3 for t in swarm.running("search"))

        t0 = time.monotonic()
        swarm.ok("lab", "kill", "node3")
        wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "down", timeout=10,
                 what="node3 to be seen down")
        down_after = time.monotonic() - t0
        wait_for(lambda: len(swarm.running("search")) == 3
                 and all(t["node_id"] != node3 for t in swarm.running("search")),
                 timeout=15, what="3 replicas on node1/node2")
        recovered_after = time.monotonic() - t0
        print(f"\nlab kill node3: seen down after {down_after:.2f}s, "
              f"3/3 replicas again after {recovered_after:.2f}s (heartbeat 0.5s)")

        # Once the node is seen down, connections through every surviving node stop failing.
        failures = 0
        for addr in swarm.addrs[:2]:
            for _ in range(15):
                try:
                    assert http_get(addr, 19021, timeout=2.0)["node"] in ("node1", "node2")
                except (httpx.HTTPError, OSError):
                    failures += 1
        assert failures == 0

        # The node comes back: its stale task is reported shut down, nothing runs twice.
        swarm.ok("lab", "start", "node3")
        wait_for(lambda: swarm.nodes()["node3"]["status"]["state"] == "ready", what="node3 back")
        wait_for(lambda: all(t["status"]["state"] != "running" for t in swarm.tasks("search")
                             if t["node_id"] == node3), what="node3's old task to stop")
        assert len(swarm.running("search")) == 3


def test_manager_restart_keeps_state(tmp_path: Path) -> None:
    with lab_swarm(tmp_path, 2, BASE, heartbeat=0.5) as swarm:
        swarm.ok("service", "create", "--name", "keep", "--replicas", "2", "-p", "19022:80",
                 "whoami")
        swarm.ok("node", "update", "--label-add", "rack=r1", "node2")
        before_services = swarm.ok("service", "ls", "--format", "json").json_lines()
        before_nodes = {n: v["id"] for n, v in swarm.nodes().items()}

        lab = swarm.lab
        node1 = lab.node("node1")
        os.killpg(node1.pid, signal.SIGTERM)  # a clean manager restart
        wait_for(lambda: os.waitpid(node1.pid, os.WNOHANG)[0] == node1.pid, timeout=15,
                 what="node1's daemon to exit")
        node1.pid = 0
        lab.save()
        # node2 keeps serving through its mesh with the last known endpoints while the
        # manager is away (its own replica at least).
        assert http_get(swarm.addrs[1], 19022)["service"] == "keep"
        lab.start("node1")

        assert swarm.ok("service", "ls", "--format", "json").json_lines() == before_services
        after_nodes = swarm.nodes()
        assert {n: v["id"] for n, v in after_nodes.items()} == before_nodes
        assert after_nodes["node2"]["spec"]["labels"] == {"rack": "r1"}
        wait_for(lambda: len(swarm.running("keep")) == 2, timeout=20,
                 what="2 running replicas after the manager restart")
        wait_for(lambda: all(n["status"]["state"] == "ready" for n in swarm.nodes().values()),
                 what="all nodes ready again")
        assert len({http_get(swarm.addrs[0], 19022)["task_id"] for _ in range(4)}) == 2
