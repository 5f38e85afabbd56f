"""The whoami demo app, run as a real subprocess."""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from corral.apps.whoami import FIRST_NAMES, LAST_NAMES, WhoAmI, random_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    """First stdout line of ``proc``, failing the test instead of hanging."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail("whoami printed nothing")
    return proc.stdout.readline().decode()


@pytest.fixture
def whoami() -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """A running whoami process, its port and its startup line; always killed."""
    port = free_port()
    env = dict(
        os.environ,
        HOST="127.0.0.1",
        PORT=str(port),
        CORRAL_TASK_NAME="search.2",
        CORRAL_TASK_ID="t-abc123",
        CORRAL_SERVICE_NAME="search",
        CORRAL_NODE_NAME="node2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.apps.whoami"],
        env=env,
        stdout=subprocess.PIPE,
    )
    try:
        line = read_line(proc)
        yield proc, port, line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_random_name_shape() -> None:
    rng = random.Random(7)
    names = {random_name(rng) for _ in range(50)}
    assert len(names) > 10
    for n in names:
        first, last = n.split(" ")
        assert first in FIRST_NAMES and last in LAST_NAMES
    assert len(set(FIRST_NAMES)) >= 40 and len(set(LAST_NAMES)) >= 40


def test_body_is_pretty_json() -> None:
    app = WhoAmI("Donald Ritter", env={"CORRAL_TASK_NAME": "web.1"})
    raw = app.body("10.0.0.1:1234", "GET", "/x")
    assert raw.endswith(b"}\n") and b'\n  "name": "Donald Ritter"' in raw
    doc = json.loads(raw)
    assert doc["task"] == "web.1" and doc["node"] == "" and doc["path"] == "/x"


def test_serves_identity_and_stops_on_sigterm(
    whoami: tuple[subprocess.Popen[bytes], int, str],
) -> None:
    proc, port, line = whoami
    assert line.startswith("whoami ") and line.rstrip().endswith(f"listening on 127.0.0.1:{port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        r1 = client.get("/")
        r2 = client.post("/some/path?q=1", content=b"ignored body")
    assert r1.status_code == 200 and r1.headers["content-type"] == "application/json"
    assert int(r1.headers["content-length"]) == len(r1.content)
    assert r1.text.endswith("\n")
    a, b = r1.json(), r2.json()
    assert a["name"] == b["name"] and a["name"] in line
    assert a["task"] == "search.2" and a["task_id"] == "t-abc123"
    assert a["service"] == "search" and a["node"] == "node2"
    assert a["hostname"] == socket.gethostname()
    assert a["client"].startswith("127.0.0.1:")
    assert a["client"] == b["client"]  # keep-alive: one connection, two requests
    assert (a["method"], a["path"]) == ("GET", "/")
    assert (b["method"], b["path"]) == ("POST", "/some/path?q=1")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0


def test_sigint_and_idle_connection(whoami: tuple[subprocess.Popen[bytes], int, str]) -> None:
    proc, port, _ = whoami
    # An idle keep-alive connection must not hold up shutdown.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0


def test_bad_request_gets_400(whoami: tuple[subprocess.Popen[bytes], int, str]) -> None:
    _, port, _ = whoami
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
