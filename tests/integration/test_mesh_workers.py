"""`--mesh-workers`: several userspace mesh processes share each published port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from corral.lab.lab import pid_alive
from corral.testing.labs import http_get, local_api, wait_for

ADDR = "127.0.0.45"  # this module's daemon; published port 19900


def listeners(port: int) -> set[int]:
    """PIDs with a TCP listener on ADDR:port."""
    out = subprocess.run(["ss", "-ltnpH", "src", f"{ADDR}:{port}"], capture_output=True,
                         text=True).stdout
    return {int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part}


def test_workers_share_the_port_and_follow_their_daemon(tmp_path: Path) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "corral", "daemon", "--addr", ADDR, "--data-dir", str(tmp_path),
         "--hostname", "mw", "--runtime", "process", "--mesh-workers", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = local_api(f"unix://{tmp_path / 'corral.sock'}")
    try:
        wait_for(lambda: _up(api), what="the daemon")
        api.post("/v1/swarm/init", json={"heartbeat_period": 0.5}).raise_for_status()
        # Workers start with the first published TCP port: an idle node runs none.
        assert _workers_of(daemon.pid) == set()
        api.post("/v1/services", json={
            "name": "web", "replicas": 2, "task": {"image": "whoami"},
            "ports": [{"published_port": 19900, "target_port": 80}]}).raise_for_status()
        wait_for(lambda: len(listeners(19900)) == 3, what="3 processes listening on the port")
        wait_for(lambda: len({_task(ADDR, 19900) for _ in range(6)} - {""}) == 2,
                 what="both replicas answering through the mesh")
        assert all(http_get(ADDR, 19900)["service"] == "web" for _ in range(30))
        workers = listeners(19900) - {daemon.pid}
        assert workers == _workers_of(daemon.pid) and len(workers) == 2
        # A worker that dies (a crash, the OOM killer) is replaced, and the replacement is
        # fed the current endpoints before it serves.
        dead = min(workers)
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: len(listeners(19900) - {daemon.pid, dead}) == 2, timeout=15,
                 what="a replacement worker listening on the port")
        workers = listeners(19900) - {daemon.pid}
        assert dead not in workers and workers == _workers_of(daemon.pid)
        assert all(http_get(ADDR, 19900)["service"] == "web" for _ in range(30))
        api.delete("/v1/services/web").raise_for_status()
        wait_for(lambda: not listeners(19900), what="every process to release the port")
        # A daemon killed on its own takes its workers with it (their stdin closes).
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(5)
        wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10,
                 what="the workers to exit with their daemon")
    finally:
        try:
            os.killpg(daemon.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        daemon.wait(5)


def _workers_of(pid: int) -> set[int]:
    """The daemon's mesh worker processes."""
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "corral.dataplane.worker"],
                         capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _task(addr: str, port: int) -> str:
    try:
        return str(http_get(addr, port)["task_id"])
    except httpx.HTTPError:
        return ""  # the replicas are still starting


def _up(api: httpx.Client) -> bool:
    try:
        return api.get("/v1/info").status_code == 200
    except httpx.HTTPError:
        return False

