"""How corral runs an etcd member (the lab, the tests): its command line and its health."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def member_argv(name: str, data_dir: Path, client_url: str, peer_url: str,
                initial_cluster: str | None = None, token: str = "") -> list[str]:
    """`etcd` for one member. `initial_cluster` ("name=peer_url,…") and `token` start a new
    cluster; without them the member starts again on its data dir (it rejoins)."""
    argv = ["etcd", "--name", name, "--data-dir", str(data_dir),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            # Quick elections on loopback and lab links (defaults: 100 ms heartbeat, 1 s).
            "--heartbeat-interval", "50", "--election-timeout", "500"]
    if initial_cluster is not None:
        argv += ["--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", token]
    return argv


def healthy(client_url: str, verify: ssl.SSLContext | bool = True) -> bool:
    """Whether the member at `client_url` says it is healthy (it has a leader)."""
    try:
        r = httpx.get(f"{client_url}/health", timeout=1, verify=verify)
        return bool(r.json().get("health") == "true")
    except (httpx.HTTPError, ValueError, ssl.SSLError):
        return False


def wait_healthy(client_url: str, deadline: float, verify: ssl.SSLContext | bool = True,
                 alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll until the member is healthy (True), or until `deadline` (time.monotonic) passes
    or `alive()` says its process is gone (False)."""
    while alive():
        if healthy(client_url, verify):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return False
