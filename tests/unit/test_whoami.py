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
from corral.dataplane.proxyproto import encode_v1, encode_v2


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
        stderr=subprocess.PIPE,  # whoami writes nothing there; tests may check
    )
    try:
        line = read_line(proc)
        yield proc, port, line
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


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


# ------------------------------------------------------------- PROXY protocol


class Responses:
    """Reads Content-Length framed HTTP responses off a socket, keeping leftovers."""

    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf = s, b""

    def _more(self, what: str) -> None:
        chunk = self.s.recv(65536)
        assert chunk, f"connection closed {what}: {self.buf!r}"
        self.buf += chunk

    def json(self) -> dict[str, object]:
        """The next response, which must be a 200 with a JSON object body."""
        while b"\r\n\r\n" not in self.buf:
            self._more("before the end of the head")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))  # fmt: skip
        while len(self.buf) < length:
            self._more("mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        doc = json.loads(body)
        assert isinstance(doc, dict)
        return doc


def http_get(s: socket.socket, path: str = "/") -> dict[str, object]:
    """Send one keep-alive GET on ``s`` and return the decoded JSON answer."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return Responses(s).json()


def closed_without_answer(s: socket.socket) -> bool:
    """Whether the server closes ``s`` (EOF or reset) without sending anything."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_sets_client(
    whoami: tuple[subprocess.Popen[bytes], int, str], version: int
) -> None:
    _, port, _ = whoami
    src, dst = ("203.0.113.7", 5555), ("10.0.0.1", port)
    header = encode_v1(src, dst) if version == 1 else encode_v2(src, dst)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # Header and first request in one write, as a proxy typically does.
        s.sendall(header + b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        a = Responses(s).json()
        b = http_get(s, "/two")  # keep-alive: the header is not expected again
        peer = "{}:{}".format(*s.getsockname())
    assert a["client"] == b["client"] == "203.0.113.7:5555"
    assert a["proxy_protocol"] == b["proxy_protocol"] == version
    assert a["peer"] == b["peer"] == peer
    assert (a["path"], b["path"]) == ("/one", "/two")


def test_proxy_header_in_pieces(whoami: tuple[subprocess.Popen[bytes], int, str]) -> None:
    """The header may arrive a few bytes at a time, and IPv6 sources work."""
    _, port, _ = whoami
    header = encode_v2(("2001:db8::7", 4242), ("2001:db8::1", port), tlvs=[(0x02, b"example")])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header), 5):
            s.sendall(header[i : i + 5])
            time.sleep(0.01)
        doc = http_get(s)
    assert doc["client"] == "2001:db8::7:4242" and doc["proxy_protocol"] == 2


def test_proxy_local_keeps_socket_peer(whoami: tuple[subprocess.Popen[bytes], int, str]) -> None:
    _, port, _ = whoami
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PROXY UNKNOWN\r\n")
        doc = http_get(s)
        peer = "{}:{}".format(*s.getsockname())
    assert doc["client"] == doc["peer"] == peer and doc["proxy_protocol"] == 1


def test_no_proxy_header_unchanged(whoami: tuple[subprocess.Popen[bytes], int, str]) -> None:
    _, port, _ = whoami
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # Pipelined: two requests in one write, the first one a POST ("P...").
        s.sendall(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
        r = Responses(s)
        a, b = r.json(), r.json()
        assert r.buf == b""
        peer = "{}:{}".format(*s.getsockname())
    assert a["client"] == b["client"] == peer
    assert "proxy_protocol" not in a and "peer" not in a
    assert (a["method"], b["path"]) == ("POST", "/b")


@pytest.mark.parametrize(
    "garbage",
    [
        b"PROXY garbage\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\nGET / HTTP/1.1\r\n\r\n",
        b"PROXY UNKNOWN " + b"x" * 200,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x99\x00\x00",
    ],
    ids=["v1-garbage", "v1-bad-port", "v1-too-long", "v2-bad-family"],
)
def test_bad_proxy_header_closes(
    whoami: tuple[subprocess.Popen[bytes], int, str], garbage: bytes
) -> None:
    proc, port, _ = whoami
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(garbage)
        assert closed_without_answer(s)
    # The server survived and still answers a normal request.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert http_get(s)["client"] == "{}:{}".format(*s.getsockname())
    assert proc.poll() is None
    # No traceback or "exception never retrieved" noise: stop it and look.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert proc.stderr is not None
    assert proc.stderr.read() == b""
