"""Requests lost (and served) while a service changes under load, on a real loopback lab:
rolling update in both orders, scale 5→1, node drain, and a lost node. One new connection per
request, 150 requests/s spread over every node's published port."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from corral.lab.lab import Lab
from corral.testing.labs import local_api
from corral.testing.load import Load

BASE = "127.0.0.71"


def running(c: httpx.Client, svc: str) -> list[dict[str, Any]]:
    return [t for t in c.get("/v1/tasks", params={"service": svc}).json()
            if t["desired_state"] == "running" and t["status"]["state"] == "running"]


def wait(cond: Any, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        time.sleep(0.05)


def create(c: httpx.Client, name: str, port: int, replicas: int = 3, **spec: Any) -> dict[str, Any]:
    body = {"name": name, "replicas": replicas, "task": {"image": "whoami", "stop_grace_period": 3},
            "ports": [{"published_port": port, "target_port": 80}], **spec}
    svc: dict[str, Any] = c.post("/v1/services", json=body).json()
    wait(lambda: len(running(c, name)) == replicas)
    return svc


def main() -> int:
    lab = Lab(Path(tempfile.mkdtemp()) / "lab")
    lab.up(3, BASE, 1.0, progress=lambda _: None)
    c = local_api(lab.nodes[0].socket)  # the manager node's own socket: its admin
    rows = []
    try:
        for i, order in enumerate(("stop-first", "start-first")):
            name, port = f"roll{i}", 19800 + i
            svc = create(c, name, port, update_config={"order": order, "monitor": 1})
            with Load([(n.addr, port) for n in lab.nodes], rate=150) as load:
                time.sleep(0.5)
                spec = svc["spec"]
                spec["task"]["env"] = ["VERSION=2"]
                c.post(f"/v1/services/{name}/update", json={"spec": spec})
                wait(lambda: c.get(f"/v1/services/{name}").json()["update_status"]["state"] == "completed")
                time.sleep(0.5)
            rows.append((f"rolling update of 3 ({order})", load.result.summary()))

        create(c, "shrink", 19802, replicas=5)
        with Load([(n.addr, 19802) for n in lab.nodes], rate=150) as load:
            time.sleep(0.5)
            c.post("/v1/services/shrink/scale", json={"replicas": 1})
            wait(lambda: len(c.get("/v1/tasks", params={"service": "shrink"}).json()) <= 5
                 and len(running(c, "shrink")) == 1)
            time.sleep(1.0)
        rows.append(("scale 5 → 1", load.result.summary()))

        create(c, "drained", 19803)
        node3 = next(n for n in c.get("/v1/nodes").json() if n["description"]["hostname"] == "node3")
        with Load([(n.addr, 19803) for n in lab.nodes], rate=150) as load:
            time.sleep(0.5)
            c.post(f"/v1/nodes/{node3['id']}/update", json={"availability": "drain"})
            wait(lambda: len(running(c, "drained")) == 3
                 and all(t["node_id"] != node3["id"] for t in running(c, "drained")))
            time.sleep(1.0)
        c.post(f"/v1/nodes/{node3['id']}/update", json={"availability": "active"})
        rows.append(("node drain", load.result.summary()))

        create(c, "lost", 19804)
        with Load([(n.addr, 19804) for n in lab.nodes[:2]], rate=150) as load:
            time.sleep(0.5)
            t0 = time.monotonic()
            os.killpg(lab.node("node3").pid, signal.SIGKILL)
            wait(lambda: c.get(f"/v1/nodes/{node3['id']}").json()["status"]["state"] == "down")
            down = time.monotonic() - t0
            wait(lambda: len([t for t in running(c, "lost") if t["node_id"] != node3["id"]]) == 3)
            back = time.monotonic() - t0
            time.sleep(1.0)
        rows.append((f"lab kill node3 (down after {down:.1f}s, 3/3 after {back:.1f}s)",
                     load.result.summary()))
    finally:
        lab.down()
    width = max(len(r[0]) for r in rows)
    print(f"{'operation under load (150 req/s, new connection each)':<{width}}  requests")
    for what, summary in rows:
        print(f"{what:<{width}}  {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
