"""Overlay timings on a real netns lab (root): service convergence on an overlay network, and
how long a scale-up takes to reach the VIP rules inside a client task's namespace; and the idle
daemons' memory with the netns runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from corral.lab.lab import Lab
from corral.testing.labs import idle_memory_line, local_api

SUBNET = "10.99.41.0/24"


def running(c: httpx.Client, svc: str) -> list[dict[str, Any]]:
    return [t for t in c.get("/v1/tasks", params={"service": svc}).json()
            if t["desired_state"] == "running" and t["status"]["state"] == "running"]


def wait(cond: Any, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        time.sleep(0.005)
    return time.monotonic() - t0


def vip_rule(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "ip", "corral"],
                          capture_output=True, text=True).stdout


def main() -> int:
    if os.geteuid() != 0:
        print("overlay bench: skipped (needs root for network namespaces)")
        return 0
    lab = Lab(Path(tempfile.mkdtemp()) / "lab")
    lab.up(3, heartbeat=1.0, progress=lambda _: None, netns=True, subnet=SUBNET)
    try:
        time.sleep(2.0)  # let start-up settle (first heartbeats, certificate checks)
        print(idle_memory_line(lab))
        c = local_api(lab.nodes[0].socket)  # the manager node's own socket: its admin
        net = c.post("/v1/networks", json={"name": "bench", "subnet": "10.40.0.0/24"}).json()
        t0 = time.monotonic()
        c.post("/v1/services", json={"name": "web", "replicas": 3, "task": {"image": "whoami"},
                                     "networks": [net["id"]]})
        wait(lambda: len(running(c, "web")) == 3)
        print(f"overlay service create, 3 replicas → 3/3 running: {time.monotonic() - t0:.2f}s")
        c.post("/v1/services", json={"name": "client", "task": {"image": "whoami"},
                                     "networks": [net["id"]]})
        wait(lambda: len(running(c, "client")) == 1)
        ns = f"{lab.task_netns_prefix}{running(c, 'client')[0]['id']}"
        c.post("/v1/services/web/scale", json={"replicas": 4})
        t0 = time.monotonic()
        wait(lambda: len(running(c, "web")) == 4)
        ran = time.monotonic() - t0
        ips = [a["addr"].split("/")[0] for t in running(c, "web") for a in t["networks"]]
        wait(lambda: all(ip in vip_rule(ns) for ip in ips))
        print(f"scale 3→4: new task running after {ran:.2f}s, in the client's VIP rules after "
              f"{time.monotonic() - t0:.2f}s")
        json.loads(vip_rule(ns))  # the table is valid JSON nft accepted
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
