"""Control-plane timings on a real loopback lab, the idle daemons' memory, and the mesh against
a direct connection.

Prints: time for `service create` (3 replicas) to converge, time from `lab kill` of a node
holding a replica until the node is seen down and 3/3 run again (default 1 s heartbeat), and
requests per second (new connection each) through the mesh as a ratio to direct.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from corral.lab.lab import Lab
from corral.testing.labs import idle_memory_line, local_api

BASE = "127.0.0.41"
PORT = 19300


def running(c: httpx.Client, svc: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in c.get("/v1/tasks", params={"service": svc}).json()
            if t["desired_state"] == "running" and t["status"]["state"] == "running"]


def wait(cond, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        time.sleep(0.01)
    return time.monotonic() - t0


async def load(addr: str, port: int, n: int, conc: int = 8) -> float:
    """Requests per second, one new TCP connection per HTTP request."""
    req = f"GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode()

    async def worker(k: int) -> None:
        for _ in range(k):
            r, w = await asyncio.open_connection(addr, port)
            w.write(req)
            await r.read()
            w.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
    return (n // conc * conc) / (time.perf_counter() - t0)


def main() -> int:
    lab = Lab(Path(tempfile.mkdtemp()) / "lab")
    lab.up(3, BASE, 1.0, progress=lambda _: None)
    try:
        time.sleep(2.0)  # let start-up settle (first heartbeats, certificate checks)
        print(idle_memory_line(lab))
        c = local_api(lab.nodes[0].socket)  # the manager node's own socket: its admin
        creates = []
        for i in range(3):
            name = f"bench{i}"
            t0 = time.monotonic()
            c.post("/v1/services", json={"name": name, "replicas": 3, "task": {"image": "whoami"},
                                         "ports": [{"published_port": PORT + i, "target_port": 80}]})
            wait(lambda: len(running(c, name)) == 3)
            creates.append(time.monotonic() - t0)
        print(f"service create, 3 replicas → 3/3 running: median {statistics.median(creates):.2f}s "
              f"(runs: {', '.join(f'{x:.2f}' for x in creates)})")

        node3 = next(n for n in c.get("/v1/nodes").json() if n["description"]["hostname"] == "node3")
        t0 = time.monotonic()
        lab.kill("node3")
        down = wait(lambda: c.get(f"/v1/nodes/{node3['id']}").json()["status"]["state"] == "down")
        wait(lambda: all(len(running(c, f"bench{i}")) == 3
                         and all(t["node_id"] != node3["id"] for t in running(c, f"bench{i}"))
                         for i in range(3)))
        print(f"lab kill node3 (heartbeat 1s): seen down after {down:.2f}s, "
              f"all services 3/3 again after {time.monotonic() - t0:.2f}s")

        task = running(c, "bench0")[0]
        direct = asyncio.run(load(task["status"]["addr"], task["status"]["port"], 2000))
        mesh = asyncio.run(load(BASE, PORT, 2000))
        print(f"new connection per request: direct {direct:.0f} req/s, "
              f"mesh {mesh:.0f} req/s ({mesh / direct:.2f}x direct)")
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
