"""Test helpers: real lab swarms, the CLI as a subprocess, and small polling utilities."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from corral.lab.lab import DEFAULT_BASE_ADDR, DEFAULT_SUBNET, Lab

T = TypeVar("T")


@dataclass
class CLIResult:
    """What a `corral …` invocation printed and returned."""

    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class LabSwarm:
    """A running lab plus a CLI pointed at it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.lab.nodes]

    @property
    def manager(self) -> str:
        return self.lab.nodes[0].host

    def env(self, host: str | None = None) -> dict[str, str]:
        """The environment of a CLI pointed at the lab: node1's control port (mutual TLS, the
        lab's client certificate) unless `host` is given."""
        return dict(os.environ, CORRAL_HOST=host or self.manager, CORRAL_LAB_DIR=str(self.lab.dir),
                    CORRAL_CERT_PATH=str(self.lab.tls_dir), COLUMNS="200")

    def cli(self, *args: str, host: str | None = None, timeout: float = 60.0,
            env: dict[str, str] | None = None, input: str | None = None) -> CLIResult:
        """Run `corral ARGS` against the lab (node1 unless `host` is given); `input` is fed
        to its stdin."""
        e = self.env(host)
        e.update(env or {})
        p = subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True,
                           timeout=timeout, env=e, input=input,
                           stdin=subprocess.DEVNULL if input is None else None)
        return CLIResult(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, **kw: Any) -> CLIResult:
        """Run the CLI and insist it succeeded."""
        r = self.cli(*args, **kw)
        assert r.code == 0, f"corral {' '.join(args)} failed ({r.code}): {r.err or r.out}"
        return r

    def tasks(self, service: str, host: str | None = None) -> list[dict[str, Any]]:
        return self.ok("service", "ps", service, "--format", "json", host=host).json_lines()

    def running(self, service: str, host: str | None = None) -> list[dict[str, Any]]:
        """Tasks of `service` that are meant to run and do."""
        return [t for t in self.tasks(service, host) if t["desired_state"] == "running"
                and t["status"]["state"] == "running"]

    def exec(self, node: str, *cmd: str, timeout: float = 30.0) -> CLIResult:
        """Run `cmd` on a lab node (inside its namespace in the netns lab) and capture it."""
        p = subprocess.run(self.lab.exec_argv(node, cmd), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        return CLIResult(p.returncode, p.stdout, p.stderr)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["description"]["hostname"]: n for n in self.ok("node", "ls", "--format", "json").json_lines()}


def free_lab_dir(tmp: Path) -> Path:
    return tmp / "lab"


@contextmanager
def lab_swarm(tmp: Path, nodes: int, base_addr: str = DEFAULT_BASE_ADDR, heartbeat: float = 0.5,
              netns: bool = False, subnet: str = DEFAULT_SUBNET,
              cert_expiry: float | None = None, managers: int = 1,
              store: str = "sqlite") -> Iterator[LabSwarm]:
    """Bring a lab up for a test and always take it down, even when the test fails."""
    lab = Lab(free_lab_dir(tmp))
    lab.up(nodes, base_addr, heartbeat, progress=lambda _: None, netns=netns, subnet=subnet,
           cert_expiry=cert_expiry, managers=managers, store=store)
    try:
        yield LabSwarm(lab)
    finally:
        lab.down()


def rss_kb(pid: int) -> int:
    """Resident memory of a process, from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_memory_line(lab: Lab) -> str:
    """One line with each lab daemon's resident memory (benches: call it before any task;
    node1 is the one manager, as `Lab.up` makes it by default)."""
    parts = [f"{n.name} ({'manager' if i == 0 else 'worker'}) {rss_kb(n.pid) / 1024:.1f} MB"
             for i, n in enumerate(lab.nodes)]
    return "idle daemon RSS (agent + mesh, no tasks; goal under 80 MB): " + ", ".join(parts)


def local_api(socket_url: str, timeout: float = 10.0) -> httpx.Client:
    """Raw HTTP to a daemon's local socket (``unix:///…/corral.sock``), as its node's admin."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=socket_url.removeprefix("unix://")),
                        base_url="http://corral", timeout=timeout)


def http_get(addr: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
    """One request on a fresh connection (as `curl` does) to a whoami behind the mesh."""
    with httpx.Client(timeout=timeout) as c:
        r = c.get(f"http://{addr}:{port}/")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


def wait_for(cond: Callable[[], T], timeout: float = 20.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Poll until `cond()` is truthy; return its value or fail with `what`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


UDP_ECHO = """
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((os.environ["HOST"], int(os.environ["PORT"])))
name = os.environ["CORRAL_TASK_NAME"].encode()
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(name + b" " + data, peer)
"""


def udp_echo_app(directory: Path) -> Path:
    """An executable UDP service for tests: answers each datagram with its task name."""
    import sys
    app = directory / "udp-echo"
    app.write_text(f"#!{sys.executable}\n{UDP_ECHO}")
    app.chmod(0o755)
    return app


def udp_ask(addr: str, port: int, sock: socket.socket | None = None, tries: int = 3,
            timeout: float = 2.0) -> tuple[bytes, tuple[str, int]] | None:
    """Send "ping" over UDP (retrying: a datagram may be lost) and return the answer and who
    sent it, or None. With `sock`, the same client socket (the same flow) is reused."""
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(b"ping", (addr, port))
            try:
                data, peer = s.recvfrom(2048)
                return data, (peer[0], peer[1])
            except (TimeoutError, ConnectionRefusedError):
                continue
        return None
    finally:
        if own:
            s.close()


class LineReader:
    """Collects a subprocess's stdout lines on a thread, so a test can wait for one."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)
