"""Real etcd members for tests and the lab: a cluster of N on loopback, always cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ETCD_MISSING = "etcd is not installed (Debian: etcd-server; `make test` installs it as root)"


def etcd_available() -> bool:
    return shutil.which("etcd") is not None


@dataclass
class Member:
    name: str
    addr: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.addr}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.addr}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """`size` members on `addrs` (one loopback address each), client port 2379, peer 2380."""

    root: Path
    addrs: list[str]
    token: str = "corral-test"
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.members = [Member(f"etcd{i + 1}", a, 2379, 2380, self.root / f"etcd{i + 1}")
                        for i, a in enumerate(self.addrs)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            self._spawn(m, initial)
        deadline = time.monotonic() + timeout
        for m in self.members:
            self.wait_healthy(m, deadline)

    def _spawn(self, m: Member, initial: str | None) -> None:
        """Start `m`: a new cluster's member (`initial`), or an existing one on its data."""
        m.data_dir.mkdir(parents=True, exist_ok=True)
        argv = ["etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                # Quick elections on loopback (defaults: 100 ms heartbeat, 1 s election).
                "--heartbeat-interval", "50", "--election-timeout", "500"]
        if initial is not None:
            argv += ["--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--initial-cluster-token", self.token]
        with open(m.data_dir.parent / f"{m.name}.log", "ab") as log:
            m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, m: Member, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert m.proc is not None
            if m.proc.poll() is not None:
                raise RuntimeError(f"{m.name} exited ({m.proc.returncode}); see "
                                   f"{m.data_dir.parent / (m.name + '.log')}")
            try:
                if httpx.get(f"{m.endpoint}/health", timeout=1).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{m.name} did not become healthy in time")

    def kill(self, i: int) -> None:
        """SIGKILL member `i` (a host dying)."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(5)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start member `i` again on its data (it rejoins the cluster)."""
        self._spawn(self.members[i], None)
        self.wait_healthy(self.members[i], time.monotonic() + timeout)

    def stop(self) -> None:
        """SIGTERM every member, wait (the last can take seconds), then SIGKILL."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.killpg(m.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait(5)
