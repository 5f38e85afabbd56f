"""Bad input, end to end: every mistake a user can make gets a non-zero exit, a one-line error
that names the problem, no traceback — and changes nothing in the swarm.

Addresses: the shared lab is node1..3 on 127.0.0.31..33; 127.0.0.35 is a standalone daemon
(not in any swarm), 127.0.0.36 the manager of a second swarm, 127.0.0.37 a throw-away
single-node swarm for inputs that hurt a manager; nothing listens on 127.0.0.39.
Published ports: 19100..19199.

Each `corral` run costs ~1 s of CPU (imports), so set-up and checks go through the API, and
the simple refusals run concurrently once per module (`refusals`), then are checked one by one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.security.pki import make_csr, new_key
from corral.testing.labs import CLIResult, LabSwarm, http_get, lab_swarm, local_api, wait_for

BASE_ADDR = "127.0.0.31"
MANAGER = "127.0.0.31:2377"
WORKER = "127.0.0.32:2377"
STANDALONE_ADDR = "127.0.0.35"
OTHER_SWARM_ADDR = "127.0.0.36"
ISOLATED_ADDR = "127.0.0.37"
NOBODY = "127.0.0.39:2377"

PORT_A = 19101  # published by svc-a for the whole module

UNREACHABLE = "Error: Cannot connect to the corral daemon at 127.0.0.39:2377. Is the daemon running?"
NOT_MANAGER = ("This node is not a swarm manager. Worker nodes can't be used to view or modify "
               "cluster state.")
NOT_IN_SWARM = ('This node is not a swarm manager. Use "corral swarm init" or "corral swarm join" '
                "to connect this node to swarm and try again.")
NO_SUITABLE = "no suitable node (scheduling constraints not satisfied on 3 nodes)"


# --------------------------------------------------------------------------- helpers


def assert_cli_error(r: CLIResult, *words: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr containing `words`, no traceback."""
    assert r.code != 0, f"expected a failure, got exit 0: out={r.out!r} err={r.err!r}"
    assert "Traceback" not in r.out + r.err, f"traceback printed:\n{r.err}{r.out}"
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{r.err}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in error {lines[0]!r}"
    return str(lines[0])


# "ADDR:2377" → the daemon's local socket: the tests' calls go in as the node's admin, the way
# the CLI on that node would (the control port is mutual TLS: test_security.py covers it).
SOCKETS: dict[str, str] = {}
CLIENT_TLS: dict[str, str] = {}  # CORRAL_CERT_PATH: the lab's admin client certificate


def api(host: str, method: str, path: str, **kw: Any) -> httpx.Response:
    with local_api(SOCKETS[host]) as c:
        return c.request(method, path, **kw)


def api_ok(host: str, method: str, path: str, **kw: Any) -> Any:
    r = api(host, method, path, **kw)
    assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
    return r.json()


def snapshot(host: str = MANAGER) -> dict[str, Any]:
    """What must not change after a refused command: services (specs, versions) and nodes."""
    services = api_ok(host, "GET", "/v1/services")
    nodes = api_ok(host, "GET", "/v1/nodes")
    return {
        "services": sorted((s["id"], s["spec"]["name"], s["version"], repr(s["spec"]))
                           for s in services),
        "nodes": sorted((n["id"], n["description"]["hostname"], repr(n["spec"])) for n in nodes),
    }


def service_names(host: str = MANAGER) -> set[str]:
    return {s["spec"]["name"] for s in api_ok(host, "GET", "/v1/services")}


def node_states(host: str = MANAGER) -> dict[str, str]:
    return {n["description"]["hostname"]: n["status"]["state"]
            for n in api_ok(host, "GET", "/v1/nodes")}


def tasks_of(service: str, host: str = MANAGER) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = api_ok(host, "GET", "/v1/tasks", params={"service": service})
    return tasks


def worker_token(host: str = MANAGER) -> str:
    token: str = api_ok(host, "GET", "/v1/swarm/join-token/worker")["token"]
    return token


def run_cli(host: str, *args: str, timeout: float = 30.0) -> CLIResult:
    env = dict(os.environ, CORRAL_HOST=SOCKETS.get(host, host), COLUMNS="200", **CLIENT_TLS)
    p = subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    return CLIResult(p.returncode, p.stdout, p.stderr)


@contextmanager
def standalone_daemon(addr: str, data_dir: Path, hostname: str,
                      term_wait: float = 8.0) -> Iterator[str]:
    """A daemon on its own (in no swarm), in its own process group; always killed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / f"{hostname}.log", "wb")
    proc = subprocess.Popen(
        # These daemons share the test's own network namespace: plain processes for tasks.
        [sys.executable, "-m", "corral", "daemon", "--addr", addr, "--data-dir", str(data_dir),
         "--hostname", hostname, "--runtime", "process"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    host = f"{addr}:2377"
    SOCKETS[host] = f"unix://{data_dir / 'corral.sock'}"
    try:
        def up() -> bool:
            assert proc.poll() is None, f"daemon {hostname} exited early ({proc.returncode})"
            try:
                return api(host, "GET", "/v1/info").status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout=15, what=f"daemon {hostname} on {addr}")
        yield host
    finally:
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # task processes the daemon may have left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


@contextmanager
def single_node_swarm(addr: str, data_dir: Path, hostname: str,
                      term_wait: float = 8.0) -> Iterator[str]:
    with standalone_daemon(addr, data_dir, hostname, term_wait) as host:
        api_ok(host, "POST", "/v1/swarm/init", json={"heartbeat_period": 0.5})
        yield host


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("bad_input"), 3, BASE_ADDR, heartbeat=0.5) as s:
        for n in s.lab.nodes:
            SOCKETS[n.host] = n.socket
        CLIENT_TLS["CORRAL_CERT_PATH"] = str(s.lab.tls_dir)
        yield s


def _answers(addr: str, port: int) -> bool:
    try:
        return bool(http_get(addr, port)["service"] == "svc-a")
    except (httpx.HTTPError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def svc_a(swarm: LabSwarm) -> str:
    """A healthy service publishing PORT_A, that bad input must never disturb."""
    api_ok(MANAGER, "POST", "/v1/services", json={
        "name": "svc-a", "task": {"image": "whoami"}, "replicas": 2,
        "ports": [{"published_port": PORT_A, "target_port": 80}]})

    def running() -> bool:
        return sum(bool(t["status"]["state"] == "running") for t in tasks_of("svc-a")) == 2
    wait_for(running, timeout=20, what="svc-a running")
    for addr in swarm.addrs:
        wait_for(lambda a=addr: _answers(a, PORT_A), timeout=10, what=f"svc-a behind {addr}:{PORT_A}")
    return "svc-a"


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon in no swarm. test_rotated_token joins it to the lab and makes it leave again."""
    tmp = tmp_path_factory.mktemp("standalone")
    with standalone_daemon(STANDALONE_ADDR, tmp / "data", "bi-standalone") as host:
        yield host


# --------------------------------------------------------------------------- simple refusals

# (case id, CORRAL_HOST, argv, words the one-line error must contain)
BAD_FLAGS: list[tuple[str, list[str], list[str]]] = [
    ("publish-out-of-range", ["-p", "70000:80"], ["70000", "port", "65535"]),
    ("publish-garbage", ["-p", "abc"], ["abc", "publish"]),
    ("publish-twice", ["-p", "19102:80", "-p", "19102:81"], ["duplicate", "19102"]),
    ("replicas-negative", ["--replicas", "-1"], ["replicas", "-1"]),
    ("constraint-unknown-key", ["--constraint", "node.colour==x"], ["constraint", "node.colour"]),
    ("restart-condition", ["--restart-condition", "foo"], ["restart condition", "foo"]),
    ("mode", ["--mode", "foo"], ["mode", "foo"]),
]
UNKNOWN_SERVICE = [["service", "ps", "nosuch"], ["service", "inspect", "nosuch"],
                   ["service", "scale", "nosuch=2", "-d"], ["service", "rm", "nosuch"],
                   ["service", "logs", "nosuch"]]
UNKNOWN_NODE = [["node", "inspect", "nosuch"], ["node", "update", "--availability", "drain", "nosuch"],
                ["node", "rm", "nosuch"]]
SVC = ["service", "create", "--name", "bad-input", "-d", "whoami"]

CASES: dict[str, tuple[str, list[str], list[str]]] = {
    **{f"create {cid}": (MANAGER, [*SVC[:4], *flags, *SVC[4:]], words)
       for cid, flags, words in BAD_FLAGS},
    "create port-in-use": (MANAGER, ["service", "create", "--name", "svc-b", "-p", f"{PORT_A}:80",
                                     "-d", "whoami"], [str(PORT_A), "already in use", "svc-a"]),
    "create name-taken": (MANAGER, ["service", "create", "--name", "svc-a", "-p", "19105:80",
                                    "-d", "whoami"], ["service name svc-a is already in use"]),
    "scale negative": (MANAGER, ["service", "scale", "svc-a=-1", "-d"], ["replicas", "-1"]),
    **{" ".join(a): (MANAGER, a, ["service nosuch not found"]) for a in UNKNOWN_SERVICE},
    **{" ".join(a): (MANAGER, a, ["node nosuch not found"]) for a in UNKNOWN_NODE},
    "node rm manager": (MANAGER, ["node", "rm", "node1"], ["node1", "manager"]),
    "node rm ready": (MANAGER, ["node", "rm", "node2"], ["node2", "not down", "--force"]),
    "unreachable service ls": (NOBODY, ["service", "ls"], [UNREACHABLE]),
    "unreachable service create": (NOBODY, SVC, [UNREACHABLE]),
    "unreachable -H": (MANAGER, ["-H", "127.0.0.39", "node", "ls"], [UNREACHABLE]),
    "worker service ls": (WORKER, ["service", "ls"], [NOT_MANAGER]),
    "worker service create": (WORKER, SVC, [NOT_MANAGER]),
    "manager leave": (MANAGER, ["swarm", "leave"], ["manager", "--force"]),
}


@pytest.fixture(scope="module")
def refusals(swarm: LabSwarm, svc_a: str) -> dict[str, Any]:
    """Run every simple case once, concurrently, between two snapshots of the swarm."""
    before = snapshot()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {cid: pool.submit(run_cli, host, *argv) for cid, (host, argv, _) in CASES.items()}
        results = {cid: f.result() for cid, f in futures.items()}
    return {"before": before, "after": snapshot(), "results": results}


@pytest.mark.parametrize("case", list(CASES))
def test_refused(refusals: dict[str, Any], case: str) -> None:
    _, _, words = CASES[case]
    err = assert_cli_error(refusals["results"][case], *words)
    assert err.startswith("Error")
    assert refusals["results"][case].out == ""  # no ID, no name echoed: nothing was done
    assert refusals["after"] == refusals["before"]


def test_refusals_harmed_nothing(swarm: LabSwarm, refusals: dict[str, Any]) -> None:
    assert not {"bad-input", "svc-b"} & service_names()
    assert node_states() == {"node1": "ready", "node2": "ready", "node3": "ready"}
    assert sum(t["status"]["state"] == "running" and t["desired_state"] == "running"
               for t in tasks_of("svc-a")) == 2
    info = api_ok(MANAGER, "GET", "/v1/info")["swarm"]
    assert info["state"] == "active" and info["is_manager"]  # `swarm leave` did not happen
    for addr in swarm.addrs:  # svc-a still answers on its port through every node's mesh
        assert http_get(addr, PORT_A)["service"] == "svc-a"


def test_non_integer_replicas_is_a_usage_error(swarm: LabSwarm) -> None:
    # A flag of the wrong type is caught by the option parser (usage + boxed message, exit 2),
    # like docker's `invalid argument "abc" for "--replicas" flag`: not one line, no traceback.
    r = swarm.cli(*SVC[:4], "--replicas", "abc", *SVC[4:])
    assert r.code == 2
    assert "Traceback" not in r.out + r.err
    assert "--replicas" in r.err
    assert "bad-input" not in service_names()


def test_invalid_service_name(swarm: LabSwarm) -> None:
    r = swarm.cli("service", "create", "--name", "bad/name", "-d", "whoami")
    assert_cli_error(r, "name", "bad/name")


def test_malformed_daemon_address(swarm: LabSwarm) -> None:
    r = swarm.cli("service", "ls", host="127.0.0.39:notaport")
    assert_cli_error(r, "127.0.0.39:notaport")


# --------------------------------------------------------------------------- scheduling


def test_constraint_no_node_satisfies(swarm: LabSwarm) -> None:
    r = swarm.cli("service", "create", "--name", "pinned", "--constraint",
                  "node.hostname==nosuch", "-d", "whoami")
    assert r.code == 0, r.err
    try:
        stuck = wait_for(lambda: [t for t in tasks_of("pinned")
                                  if t["status"]["err"] == NO_SUITABLE],
                         timeout=10, what="the task to be reported unschedulable")
        assert len(stuck) == 1
        t = stuck[0]
        assert (t["status"]["state"], t["desired_state"], t["node_id"]) == ("pending", "running", "")
        time.sleep(1.0)  # ... and it stays so: nothing places it later either
        again = tasks_of("pinned")
        assert [(x["id"], x["status"]["state"]) for x in again] == [(t["id"], "pending")]
        full = swarm.ok("service", "ps", "--no-trunc", "pinned").out
        row = [ln for ln in full.splitlines() if "pinned.1" in ln]
        assert len(row) == 1 and NO_SUITABLE in row[0] and "Pending" in row[0]
    finally:
        api(MANAGER, "DELETE", "/v1/services/pinned")
    assert "pinned" not in service_names()


# --------------------------------------------------------------------------- raw API


def test_api_malformed_json(swarm: LabSwarm, svc_a: str) -> None:
    before = snapshot()
    for headers in ({"content-type": "application/json"}, {}):
        r = api(MANAGER, "POST", "/v1/services", content=b"{not json", headers=headers)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        msg = r.json()["message"]
        assert isinstance(msg, str) and msg and "\n" not in msg
    r = api(MANAGER, "POST", "/v1/services", content=b"{not json",
            headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (400, {"message": "malformed JSON in request body"})
    for raw in (b'{"name":"t","task":{"image":"whoami"}', b"\xff\xfe", b""):
        r = api(MANAGER, "POST", "/v1/services", content=raw,
                headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (raw, r.status_code, r.text)
        assert r.json()["message"]
    assert snapshot() == before


IMG = {"image": "whoami"}


@pytest.mark.parametrize(("body", "words"), [
    ([1, 2], ["invalid request"]),
    ("whoami", ["invalid request"]),
    ({}, ["name", "required"]),
    ({"name": "t1"}, ["task", "required"]),
    ({"name": "t1", "task": IMG, "bogus": 1}, ["bogus"]),
    ({"name": "t1", "task": "whoami"}, ["task"]),
    ({"name": 123, "task": IMG}, ["name"]),
    ({"name": "a b", "task": IMG}, ["name"]),
    ({"name": "t1", "task": IMG, "replicas": "many"}, ["replicas"]),
    ({"name": "t1", "task": IMG, "replicas": 1.5}, ["replicas"]),
    ({"name": "t1", "task": IMG, "replicas": -1}, ["replicas"]),
    ({"name": "t1", "task": IMG, "mode": "foo"}, ["mode"]),
    ({"name": "t1", "task": IMG, "ports": "19106:80"}, ["ports"]),
    ({"name": "t1", "task": IMG, "ports": [{"target_port": "x", "published_port": 19106}]},
     ["ports.0.target_port"]),
    ({"name": "t1", "task": IMG, "ports": [{"target_port": 80, "published_port": 70000}]},
     ["ports.0.published_port"]),
    ({"name": "t1", "task": IMG, "restart_policy": {"condition": "foo"}},
     ["restart_policy.condition"]),
    ({"name": "t1", "task": IMG, "placement": {"constraints": ["node.colour==x"]}},
     ["node.colour"]),
    ({"name": "t1", "task": IMG, "mode": "global", "replicas": 3}, ["replicated mode"]),
    ({"name": "t1", "task": IMG, "ports": [{"target_port": 80, "published_port": 19106},
                                           {"target_port": 81, "published_port": 19106}]},
     ["duplicate", "19106"]),
    ({"name": "t1", "task": IMG, "ports": [{"target_port": 80, "published_port": PORT_A}]},
     ["already in use", "svc-a"]),
    ({"name": "svc-a", "task": IMG}, ["already in use"]),
])
def test_api_wrong_shape_or_types(swarm: LabSwarm, svc_a: str, body: Any,
                                  words: list[str]) -> None:
    before = snapshot()
    r = api(MANAGER, "POST", "/v1/services", json=body)
    assert r.status_code in (400, 409, 422), (r.status_code, r.text)
    msg = r.json()["message"]
    assert isinstance(msg, str) and "\n" not in msg
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert snapshot() == before


@pytest.mark.parametrize(("method", "path", "kw", "status", "word"), [
    ("POST", "/v1/services/svc-a/scale", {"json": {"replicas": "x"}}, 400, "replicas"),
    ("POST", "/v1/services/svc-a/scale", {"json": {}}, 400, "replicas"),
    ("POST", "/v1/services/svc-a/scale", {"json": {"replicas": -3}}, 400, "replicas"),
    ("POST", "/v1/services/svc-a/scale",
     {"content": b"[", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("POST", "/v1/services/nosuch/scale", {"json": {"replicas": 1}}, 404, "not found"),
    ("POST", "/v1/nodes/node2/update", {"json": {"availability": "foo"}}, 400, "availability"),
    ("POST", "/v1/nodes/node2/update", {"json": {"label_add": ["k=v"]}}, 400, "label_add"),
    ("GET", "/v1/swarm/join-token/foo", {}, 400, "role"),
    ("GET", "/v1/services/svc-a/logs", {"params": {"tail": "abc"}}, 400, "tail"),
    ("GET", "/v1/tasks", {"params": {"service": "nosuch"}}, 404, "not found"),
    ("POST", "/v1/swarm/init", {"json": {}}, 400, "already part of a swarm"),
    ("POST", "/v1/swarm/nodes", {"json": {"token": "x", "hostname": "h", "addr": "1.2.3.4",
                                          "csr": "x"}}, 400, "join token"),
    ("POST", "/v1/swarm/nodes", {"json": {"token": "x", "hostname": "h", "addr": "1.2.3.4"}},
     400, "csr"),
    # The local socket is the admin, not a node: the dispatcher wants a node certificate.
    ("POST", "/v1/dispatcher/heartbeat", {}, 403, "node certificate"),
])
def test_api_other_endpoints(swarm: LabSwarm, svc_a: str, method: str, path: str,
                             kw: dict[str, Any], status: int, word: str) -> None:
    before = snapshot()
    r = api(MANAGER, method, path, **kw)
    assert r.status_code == status, (r.status_code, r.text)
    assert word.lower() in r.json()["message"].lower()
    assert snapshot() == before


# --------------------------------------------------------------------------- a daemon in no swarm


def test_daemon_not_in_swarm(swarm: LabSwarm, standalone: str) -> None:
    for args in (["service", "ls"], ["service", "create", "--name", "x", "-d", "whoami"]):
        err = assert_cli_error(swarm.cli(*args, host=SOCKETS[standalone]), NOT_IN_SWARM)
        assert err.startswith("Error response from daemon:")
    r = api(standalone, "GET", "/v1/nodes")
    assert (r.status_code, r.json()["message"]) == (503, NOT_IN_SWARM)
    assert_cli_error(swarm.cli("swarm", "leave", host=SOCKETS[standalone]), "not part of a swarm")
    assert api_ok(standalone, "GET", "/v1/info")["swarm"]["state"] == "inactive"


def test_a_second_daemon_on_the_same_data_dir_or_socket_is_refused(standalone: str,
                                                                   tmp_path: Path) -> None:
    # It would kill the first daemon's tasks as leftovers of a crash and share its store, or
    # take over its socket: refused before it touches anything.
    sock = Path(SOCKETS[standalone].removeprefix("unix://"))
    attempts = [
        (["--data-dir", str(sock.parent)], "another corral daemon (pid"),
        (["--data-dir", str(tmp_path / "other"), "--socket", str(sock)],
         f"another daemon is listening on {sock}"),
    ]
    for args, words in attempts:
        proc = subprocess.run(
            [sys.executable, "-m", "corral", "daemon", "--addr", "127.0.0.38", "--runtime",
             "process", *args], capture_output=True, text=True, timeout=30)
        assert_cli_error(CLIResult(proc.returncode, proc.stdout, proc.stderr), words)
    assert api_ok(standalone, "GET", "/v1/info")["swarm"]["state"] == "inactive"  # untouched
    assert sock.exists()


def _token_parts(token: str) -> tuple[str, str]:
    prefix, one, digest, secret = token.split("-")
    assert (prefix, one) == ("SWMTKN", "1")
    return digest, secret


def _join(swarm: LabSwarm, host: str, token: str, manager: str = MANAGER) -> CLIResult:
    return swarm.cli("swarm", "join", "--token", token, manager, host=SOCKETS.get(host, host))


def _assert_not_joined(host: str, before: dict[str, Any]) -> None:
    assert api_ok(host, "GET", "/v1/info")["swarm"]["state"] == "inactive"
    assert snapshot() == before
    assert "bi-standalone" not in node_states()


def test_join_with_wrong_secret_is_refused(swarm: LabSwarm, standalone: str) -> None:
    before = snapshot()
    digest, secret = _token_parts(worker_token())
    wrong = "z" * len(secret) if secret != "z" * len(secret) else "y" * len(secret)
    assert_cli_error(_join(swarm, standalone, f"SWMTKN-1-{digest}-{wrong}"),
                     "invalid join token", "rotated or is wrong")
    assert_cli_error(_join(swarm, standalone, "garbage"), "invalid join token", "SWMTKN-1")
    assert_cli_error(_join(swarm, standalone, worker_token(), manager=NOBODY),
                     "cannot reach the manager at 127.0.0.39:2377")
    _assert_not_joined(standalone, before)


def test_join_with_token_of_another_swarm_is_refused(swarm: LabSwarm, standalone: str,
                                                     tmp_path: Path) -> None:
    before = snapshot()
    digest, secret = _token_parts(worker_token())
    # A made-up digest with this swarm's secret: refused as well.
    r = api(MANAGER, "POST", "/v1/swarm/nodes", json={
        "token": f"SWMTKN-1-{'a' * len(digest)}-{secret}", "hostname": "h", "addr": "127.0.0.38",
        "csr": make_csr(new_key()).decode()})
    assert (r.status_code, r.json()["message"]) == (
        400, "invalid join token: it belongs to another swarm")
    # The real token of a real other swarm.
    with single_node_swarm(OTHER_SWARM_ADDR, tmp_path / "other", "bi-other") as other:
        foreign = worker_token(other)
        assert _token_parts(foreign)[0] != digest
        # The joining node itself refuses: this manager's CA is not the one the token pins.
        assert_cli_error(_join(swarm, standalone, foreign), "does not match the join token",
                         "another swarm")
    _assert_not_joined(standalone, before)


def test_rotated_token(swarm: LabSwarm, standalone: str) -> None:
    before = snapshot()
    old = worker_token()
    r = swarm.ok("swarm", "join-token", "worker", "--rotate")
    new = worker_token()
    assert "Successfully rotated worker join token." in r.out and new in r.out
    assert new != old
    assert _token_parts(new)[0] == _token_parts(old)[0]  # same swarm, new secret
    assert_cli_error(_join(swarm, standalone, old), "invalid join token", "rotated or is wrong")
    _assert_not_joined(standalone, before)
    try:
        r = _join(swarm, standalone, new)
        assert (r.code, r.out.strip()) == (0, "This node joined a swarm as a worker."), r.err
        wait_for(lambda: node_states().get("bi-standalone") == "ready", timeout=15,
                 what="the joined node to become Ready")
        assert "bi-standalone" in swarm.ok("node", "ls").out
    finally:
        # Leave the shared lab as it was: 3 nodes, and the standalone daemon in no swarm.
        api(standalone, "POST", "/v1/swarm/leave", json={})
        if "bi-standalone" in node_states():
            api_ok(MANAGER, "DELETE", "/v1/nodes/bi-standalone", params={"force": "true"})
    assert set(node_states()) == {"node1", "node2", "node3"}
    assert api_ok(standalone, "GET", "/v1/info")["swarm"]["state"] == "inactive"


# --------------------------------------------------------------------------- inputs that hurt


def test_huge_replica_count_is_refused(tmp_path: Path) -> None:
    # term_wait: a wedged manager does not get to handle SIGTERM; don't wait long for it.
    with single_node_swarm(ISOLATED_ADDR, tmp_path / "iso", "bi-iso", term_wait=1.0) as host:
        r = run_cli(host, "service", "create", "--name", "huge", "--replicas", "1000000000000",
                    "-d", "whoami")
        assert_cli_error(r, "replicas")
        assert api(host, "GET", "/v1/info").status_code == 200


def test_unknown_image_retries_respect_restart_delay(tmp_path: Path) -> None:
    with single_node_swarm(ISOLATED_ADDR, tmp_path / "iso", "bi-iso") as host:
        api_ok(host, "POST", "/v1/services", json={
            "name": "ghost", "task": {"image": "nosuchimage"},
            "restart_policy": {"delay": 5.0}})
        wait_for(lambda: any(t["status"]["err"] == "No such image: nosuchimage"
                             for t in tasks_of("ghost", host)),
                 timeout=10, what="the task to be rejected")
        time.sleep(1.5)
        attempts = max(t["attempt"] for t in tasks_of("ghost", host))
        # First try at t=0, the next not before t=5s.
        assert attempts <= 1, f"{attempts} restarts within ~2 s despite a 5 s restart delay"


# --------------------------------------------------------------------------- afterwards


def test_daemons_logged_no_traceback(swarm: LabSwarm) -> None:
    """Everything above was refused cleanly: no daemon hit an unhandled exception (a 500)."""
    for n in swarm.lab.nodes:
        text = Path(n.log).read_text(errors="replace")
        assert "Traceback" not in text, f"{n.name}'s log has a traceback:\n{text[-3000:]}"
