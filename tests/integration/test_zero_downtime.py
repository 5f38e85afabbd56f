"""corral's zero-downtime promises, measured under load through the ingress (new connection
per request): rolling updates in both orders, scale-down, node drain, a replica turning
unhealthy, a lost node, and an update whose new tasks fail their health check."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.testing.labs import LabSwarm, lab_swarm, wait_for
from corral.testing.load import Load

BASE = "127.0.0.61"  # this module's lab: 127.0.0.61-63, published ports 19700-19749


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("zdt"), 3, BASE, heartbeat=0.5) as s:
        yield s


def targets(swarm: LabSwarm, port: int) -> list[tuple[str, int]]:
    return [(a, port) for a in swarm.addrs]


def create(swarm: LabSwarm, name: str, port: int, *extra: str) -> None:
    swarm.ok("service", "create", "--name", name, "--replicas", "3", "-p", f"{port}:80",
             "--stop-grace-period", "3s", *extra, "whoami")


@pytest.mark.parametrize("order", ["stop-first", "start-first"])
def test_rolling_update_loses_no_request(swarm: LabSwarm, order: str) -> None:
    port = 19700 if order == "stop-first" else 19701
    name = f"roll-{order}"
    create(swarm, name, port, "--update-order", order, "--update-monitor", "1s")
    before = {t["id"] for t in swarm.running(name)}
    with Load(targets(swarm, port), rate=150) as load:
        time.sleep(0.5)
        r = swarm.ok("service", "update", "--env-add", "VERSION=2", name)
        time.sleep(0.5)
    res = load.result
    print(f"\nrolling update ({order}): {res.summary()}")
    assert "verify: Service converged" in r.out
    after = {t["id"] for t in swarm.running(name)}
    assert len(after) == 3 and not after & before, "every task was replaced"
    assert res.ok > 100
    assert res.failed == 0, res.errors
    swarm.ok("service", "rm", name)


def test_scale_down_loses_no_request(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "shrink", "--replicas", "5", "-p", "19702:80",
             "--stop-grace-period", "3s", "whoami")
    with Load(targets(swarm, 19702), rate=150) as load:
        time.sleep(0.5)
        swarm.ok("service", "scale", "shrink=1")
        time.sleep(0.5)
    print(f"\nscale 5→1: {load.result.summary()}")
    assert load.result.failed == 0, load.result.errors
    assert len(swarm.running("shrink")) == 1
    swarm.ok("service", "rm", "shrink")


def test_node_drain_loses_no_request(swarm: LabSwarm) -> None:
    create(swarm, "drained", 19703)
    node3 = swarm.nodes()["node3"]["id"]
    try:
        with Load(targets(swarm, 19703), rate=150) as load:
            time.sleep(0.5)
            swarm.ok("node", "update", "--availability", "drain", "node3")
            wait_for(lambda: len(swarm.running("drained")) == 3
                     and all(t["node_id"] != node3 for t in swarm.running("drained")),
                     what="tasks to leave the drained node")
            time.sleep(1.0)
        print(f"\nnode drain: {load.result.summary()}")
        assert load.result.failed == 0, load.result.errors
    finally:
        swarm.ok("node", "update", "--availability", "active", "node3")
        swarm.ok("service", "rm", "drained")


def test_unhealthy_replica_leaves_rotation(swarm: LabSwarm, tmp_path: Path) -> None:
    flag = tmp_path / "sick"
    # Healthy while the flag file is absent; the check runs every 0.3 s.
    create(swarm, "sickly", 19704, "--health-cmd", f"test ! -e {flag}.$CORRAL_TASK_SLOT",
           "--health-interval", "300ms", "--health-retries", "1", "--restart-delay", "30s")
    wait_for(lambda: all(t["status"]["health"] == "healthy" for t in swarm.running("sickly"))
             and len(swarm.running("sickly")) == 3, what="3 healthy replicas")
    sick = next(t for t in swarm.running("sickly") if t["slot"] == 2)
    with Load(targets(swarm, 19704), rate=150) as load:
        time.sleep(0.5)
        t0 = time.monotonic()
        Path(f"{flag}.2").touch()
        wait_for(lambda: all(t["id"] != sick["id"] for t in swarm.running("sickly")),
                 interval=0.05, what="the sick task to leave rotation")
        left = time.monotonic() - t0
        time.sleep(1.0)
    print(f"\nunhealthy replica: out of rotation after {left:.2f}s; {load.result.summary()}")
    assert load.result.failed == 0, load.result.errors
    old = next(t for t in swarm.tasks("sickly") if t["id"] == sick["id"])
    assert "unhealthy" in old["status"]["err"]
    swarm.ok("service", "rm", "sickly")


def test_failed_health_check_update_rolls_back_without_loss(swarm: LabSwarm) -> None:
    create(swarm, "guarded", 19705, "--health-http", "/", "--health-interval", "300ms",
           "--health-retries", "2", "--update-failure-action", "rollback",
           "--update-monitor", "2s")
    wait_for(lambda: len([t for t in swarm.running("guarded")
                          if t["status"]["health"] == "healthy"]) == 3, what="3 healthy")
    with Load(targets(swarm, 19705), rate=150) as load:
        time.sleep(0.5)
        # The new version's check can never pass: the update must roll itself back.
        r = swarm.cli("service", "update", "--health-cmd", "false", "guarded")
        time.sleep(0.5)
    print(f"\nupdate with failing health check: {load.result.summary()}")
    assert r.code == 1 and "rolled back" in r.err, r.err
    svc = json.loads(swarm.ok("service", "inspect", "guarded").out)[0]
    assert svc["update_status"]["state"] == "rollback_completed"
    assert svc["spec"]["task"]["healthcheck"]["http_path"] == "/"
    assert load.result.failed == 0, load.result.errors
    swarm.ok("service", "rm", "guarded")


def test_lost_node_fails_requests_only_briefly(tmp_path: Path) -> None:
    with lab_swarm(tmp_path, 3, "127.0.0.64", heartbeat=0.5) as lab:
        lab.ok("service", "create", "--name", "search", "--replicas", "3", "-p", "19710:80",
               "whoami")
        node3 = lab.nodes()["node3"]["id"]
        survivors = [(a, 19710) for a in lab.addrs[:2]]
        with Load(survivors, rate=150) as load:
            time.sleep(0.5)
            t0 = time.monotonic()
            os.killpg(lab.lab.node("node3").pid, signal.SIGKILL)
            wait_for(lambda: lab.nodes()["node3"]["status"]["state"] == "down", timeout=10,
                     what="node3 seen down")
            down = time.monotonic() - t0
            wait_for(lambda: len([t for t in lab.running("search") if t["node_id"] != node3]) == 3,
                     timeout=15, what="3 replicas on the surviving nodes")
            back = time.monotonic() - t0
            time.sleep(1.0)
        res = load.result
        late = [f for f in res.failure_times if f > 0.5 + down]
        print(f"\nlab kill node3: seen down after {down:.2f}s, 3/3 after {back:.2f}s; "
              f"{res.summary()}; failures after detection: {len(late)}")
        assert not late, "no failed request once the node is seen down"


def test_update_bad_input(swarm: LabSwarm) -> None:
    create(swarm, "fixed", 19706)
    cases = [
        (["service", "update", "--image", "x", "nosuch"], "not found"),
        (["service", "update", "--update-parallelism", "-1", "fixed"], "--update-parallelism"),
        (["service", "update", "--update-order", "sideways", "fixed"], "--update-order"),
        (["service", "update", "--health-http", "nope", "fixed"], "--health-http"),
        (["service", "rollback", "fixed"], "no previous spec"),
        (["service", "rollback", "nosuch"], "not found"),
    ]
    for args, words in cases:
        r = swarm.cli(*args)
        assert r.code == 1 and words in r.err and "Traceback" not in r.err, (args, r.err)
    assert len(swarm.running("fixed")) == 3
    swarm.ok("service", "rm", "fixed")


def test_health_command_that_cannot_run_marks_the_task_unhealthy(swarm: LabSwarm) -> None:
    swarm.ok("service", "create", "--name", "nocheck", "-d", "--health-cmd",
             "/nonexistent/probe", "--health-interval", "200ms", "--health-retries", "1",
             "--restart-delay", "30s", "whoami")
    failed = wait_for(lambda: [t for t in swarm.tasks("nocheck")
                               if "unhealthy" in t["status"]["err"]], timeout=15,
                      what="the task to be marked unhealthy")
    assert "not found" in failed[0]["status"]["err"] or "No such file" in failed[0]["status"]["err"]
    swarm.ok("service", "rm", "nocheck")


def test_lab_stop_and_start(swarm: LabSwarm) -> None:
    swarm.ok("lab", "stop", "node2")
    try:
        wait_for(lambda: swarm.nodes()["node2"]["status"]["state"] == "down", timeout=10,
                 what="a stopped node to be seen down")
    finally:
        swarm.ok("lab", "start", "node2")
    wait_for(lambda: swarm.nodes()["node2"]["status"]["state"] == "ready", what="node2 back")


def test_readiness_takes_a_failing_replica_out_before_it_is_restarted(swarm: LabSwarm,
                                                                      tmp_path: Path) -> None:
    flag = tmp_path / "flaky"
    # retries 4 at 1 s: out of rotation after the first failure, restarted after the fourth.
    create(swarm, "ready", 19707, "--health-cmd", f"test ! -e {flag}.$CORRAL_TASK_SLOT",
           "--health-interval", "1s", "--health-retries", "4", "--restart-delay", "30s")
    wait_for(lambda: len([t for t in swarm.running("ready")
                          if t["status"]["health"] == "healthy"]) == 3, what="3 healthy")
    sick = next(t for t in swarm.running("ready") if t["slot"] == 1)
    with Load(targets(swarm, 19707), rate=150) as load:
        time.sleep(0.5)
        t0 = time.monotonic()
        Path(f"{flag}.1").touch()
        wait_for(lambda: next(t for t in swarm.tasks("ready") if t["id"] == sick["id"])
                 ["status"]["health"] == "unhealthy", interval=0.05, what="readiness to fail")
        out = time.monotonic() - t0
        still = next(t for t in swarm.tasks("ready") if t["id"] == sick["id"])
        assert still["status"]["state"] == "running", "readiness acts before liveness"
        wait_for(lambda: next(t for t in swarm.tasks("ready") if t["id"] == sick["id"])
                 ["status"]["state"] == "failed", timeout=10, what="the restart after 3 failures")
        killed = time.monotonic() - t0
        time.sleep(0.5)
    print(f"\nreadiness: out of rotation after {out:.2f}s (task still {still['status']['state']}),"
          f" killed after {killed:.2f}s; {load.result.summary()}")
    assert load.result.failed == 0, load.result.errors
    swarm.ok("service", "rm", "ready")
