"""Secure by default: every control port speaks mutual TLS only, certificates carry roles, a
removed node is revoked, certificates renew by themselves — against a real loopback lab.

127.0.0.81–83 (lab), 127.0.0.85 (a lab with short-lived certificates); published port 19601.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.client import TlsFiles
from corral.security import pki
from corral.testing.labs import CLIResult, LabSwarm, http_get, lab_swarm, wait_for
from corral.testing.load import Load

BASE_ADDR = "127.0.0.81"
RENEW_ADDR = "127.0.0.85"
PORT = 19601


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    with lab_swarm(tmp_path_factory.mktemp("security"), 3, BASE_ADDR, heartbeat=0.5) as s:
        s.ok("service", "create", "--name", "web", "--replicas", "3", "-p", f"{PORT}:80", "whoami")
        yield s


def one_line_error(r: CLIResult, *words: str) -> str:
    assert r.code != 0, r.out
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def node_tls(swarm: LabSwarm, name: str) -> Path:
    return Path(swarm.lab.node(name).data_dir) / "tls"


def tls_client(ca: Path, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
    ctx = pki.client_context(ca.read_bytes(), str(cert) if cert else None, str(key) if key else None)
    return httpx.Client(verify=ctx, timeout=5.0)


def call(client: httpx.Client, addr: str, method: str, path: str, **kw: object) -> httpx.Response:
    return client.request(method, f"https://{addr}:2377{path}",  # type: ignore[arg-type]
                          extensions={"sni_hostname": pki.NODE_NAME}, **kw)


def daemon_logs(swarm: LabSwarm) -> str:
    return "".join(Path(n.log).read_text() for n in swarm.lab.nodes)


def still_serving(swarm: LabSwarm) -> None:
    """The swarm keeps serving: every node answers the published port, node1 lists its nodes."""
    for addr in swarm.addrs:
        wait_for(lambda a=addr: http_get(a, PORT)["service"] == "web", timeout=10,
                 what=f"web behind {addr}")
    assert len(swarm.ok("node", "ls", "-q").out.split()) == 3


def test_control_ports_refuse_plaintext_anonymous_and_garbage(swarm: LabSwarm) -> None:
    ca = node_tls(swarm, "node1") / "ca.pem"
    for addr in swarm.addrs:
        # Plaintext HTTP: a one-line 400 saying why, then the connection is closed.
        r = httpx.get(f"http://{addr}:2377/v1/nodes", timeout=5)
        assert r.status_code == 400 and "TLS only" in r.text
        # TLS without a client certificate reaches no handler but the join endpoints.
        with tls_client(ca) as anon:
            for method, path in [("GET", "/v1/nodes"), ("POST", "/v1/services"),
                                 ("POST", "/v1/dispatcher/heartbeat"), ("GET", "/v1/info"),
                                 ("GET", "/v1/local/tasks/x/logs"), ("POST", "/v1/swarm/leave")]:
                resp = call(anon, addr, method, path, json={})
                assert resp.status_code == 401, (addr, path, resp.text)
                assert "certificate" in resp.json()["message"]
        # Garbage, and a truncated TLS record: closed, nothing else.
        for junk in (os.urandom(4096), b"\x16\x03\x01\x02\x00" + os.urandom(64), b"\x00" * 10):
            with socket.create_connection((addr, 2377), timeout=5) as s:
                try:  # the daemon may close before we are done: that is the point
                    s.sendall(junk)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
    logs = daemon_logs(swarm)
    assert "refused a plaintext connection" in logs and "TLS handshake with" in logs
    assert "needs a certificate of this swarm" in logs
    assert "Traceback" not in logs
    still_serving(swarm)


def test_local_socket_is_owner_only_and_shrugs_off_garbage(swarm: LabSwarm) -> None:
    for n in swarm.lab.nodes:
        path = Path(n.socket.removeprefix("unix://"))
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(os.urandom(2048) + b"\r\n\r\n")
            s.settimeout(5)
            try:
                reply = s.recv(4096)
            except OSError:
                reply = b""
            assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    assert "Traceback" not in daemon_logs(swarm)
    still_serving(swarm)


def test_worker_certificate_cannot_call_manager_apis(swarm: LabSwarm) -> None:
    w = node_tls(swarm, "node2")
    worker_cli = ["--tlscacert", str(w / "ca.pem"), "--tlscert", str(w / "node.pem"),
                  "--tlskey", str(w / "node-key.pem")]
    for args in (["service", "create", "--name", "evil", "whoami"], ["node", "ls"],
                 ["node", "update", "--availability", "drain", "node1"],
                 ["swarm", "join-token", "worker"]):
        one_line_error(swarm.cli(*worker_cli, *args), "permission denied", "is a worker",
                       "manager")
    # Not on another worker's node-local endpoints either (logs, exec are for managers).
    with tls_client(w / "ca.pem", w / "node.pem", w / "node-key.pem") as c:
        r = call(c, swarm.addrs[2], "POST", "/v1/local/tasks/x/exec", json={"cmd": ["id"]})
        assert r.status_code == 403
    assert "evil" not in swarm.ok("service", "ls").out
    assert "refused POST /v1/services" in daemon_logs(swarm)
    # The manager's own certificate may, as may the admin client certificate the lab made.
    m = node_tls(swarm, "node1")
    assert swarm.ok("--tlscacert", str(m / "ca.pem"), "--tlscert", str(m / "node.pem"),
                    "--tlskey", str(m / "node-key.pem"), "node", "ls").code == 0


def test_certificates_of_another_ca_or_expired_are_refused(swarm: LabSwarm, tmp_path: Path) -> None:
    rogue = pki.create_root_ca("rogue")
    key = pki.new_key()
    cert = pki.issue(rogue, pki.make_csr(key), node_id="client-rogue", role="client",
                     cluster_id="rogue")
    bad = tmp_path / "rogue"
    bad.mkdir()
    files = TlsFiles.in_dir(bad)
    files.key.write_bytes(pki.key_to_pem(key))
    files.cert.write_bytes(cert)
    files.ca.write_bytes(swarm.lab.tls_dir.joinpath("ca.pem").read_bytes())
    one_line_error(swarm.cli("node", "ls", env={"CORRAL_CERT_PATH": str(bad)}),
                   "does not accept this client certificate")
    # The right client certificate, but trusting another CA: the daemon is not believed.
    files.ca.write_bytes(rogue.cert_pem)
    files.cert.write_bytes(swarm.lab.tls_dir.joinpath("cert.pem").read_bytes())
    files.key.write_bytes(swarm.lab.tls_dir.joinpath("key.pem").read_bytes())
    one_line_error(swarm.cli("node", "ls", env={"CORRAL_CERT_PATH": str(bad)}),
                   "certificate this client does not trust")
    # Signed by the swarm's own root, but expired.
    ca_dir = Path(swarm.lab.node("node1").data_dir) / "manager" / "ca"
    assert stat.S_IMODE((ca_dir / "root-key.pem").stat().st_mode) == 0o600
    root = pki.CertKey((ca_dir / "root.pem").read_bytes(), (ca_dir / "root-key.pem").read_bytes())
    key = pki.new_key()
    old = pki.issue(root, pki.make_csr(key), node_id="client-old", role="client",
                    cluster_id=pki.identity(swarm.lab.tls_dir.joinpath("cert.pem").read_bytes()).cluster_id,
                    now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3),
                    expiry=dt.timedelta(days=1))
    files.ca.write_bytes(root.cert_pem)
    files.cert.write_bytes(old)
    files.key.write_bytes(pki.key_to_pem(key))
    one_line_error(swarm.cli("node", "ls", env={"CORRAL_CERT_PATH": str(bad)}),
                   "does not accept this client certificate")
    logs = daemon_logs(swarm)
    assert "certificate has expired" in logs or "CERTIFICATE_VERIFY_FAILED" in logs
    assert "Traceback" not in logs
    still_serving(swarm)


def test_join_token_pins_the_ca(swarm: LabSwarm) -> None:
    token = swarm.ok("swarm", "join-token", "worker", "-q").out.strip()
    root = swarm.ok("swarm", "ca").out.encode()
    assert pki.JoinToken.parse(token).pins(root)
    assert pki.identity(node_tls(swarm, "node2").joinpath("node.pem").read_bytes()).role == "worker"
    assert pki.signed_by(node_tls(swarm, "node2").joinpath("node.pem").read_bytes(), root)


def test_root_ca_rotation_moves_every_node_without_downtime(swarm: LabSwarm, tmp_path: Path) -> None:
    ca_dir = Path(swarm.lab.node("node1").data_dir) / "manager" / "ca"
    old_root = pki.CertKey((ca_dir / "root.pem").read_bytes(), (ca_dir / "root-key.pem").read_bytes())
    old_token = swarm.ok("swarm", "join-token", "worker", "-q").out.strip()
    tasks = {t["id"] for t in swarm.running("web")}
    with Load([(a, PORT) for a in swarm.addrs], rate=60) as load:
        r = swarm.ok("swarm", "ca", "--rotate")
        result = load.stop()
    assert "rotated TLS certificates: 3/3 nodes" in r.out and "Root CA rotated" in r.out
    new_root = pki.split_bundle(swarm.ok("swarm", "ca").out.encode())
    assert new_root != [old_root.cert_pem] and len(new_root) == 1
    assert result.failed == 0 and result.ok > 0, result.summary()
    assert {t["id"] for t in swarm.running("web")} == tasks
    # Every node holds a certificate of the new root and, once told, trusts only that root.
    for n in swarm.lab.nodes:
        assert pki.signed_by((node_tls(swarm, n.name) / "node.pem").read_bytes(), new_root[0])
    wait_for(lambda: all((node_tls(swarm, n.name) / "ca.pem").read_bytes() == new_root[0]
                         for n in swarm.lab.nodes), timeout=10, what="nodes to drop the old root")
    # Join tokens pin the new root; the old token is refused for its digest.
    new_token = swarm.ok("swarm", "join-token", "worker", "-q").out.strip()
    assert pki.JoinToken.parse(new_token).pins(new_root[0])
    assert pki.JoinToken.parse(old_token).secret == pki.JoinToken.parse(new_token).secret
    # A certificate the old root signs is worthless now.
    key = pki.new_key()
    files = TlsFiles.in_dir(tmp_path)
    files.cert.write_bytes(pki.issue(old_root, pki.make_csr(key), node_id="client-old",
                                     role="client", cluster_id="x"))
    files.key.write_bytes(pki.key_to_pem(key))
    files.ca.write_bytes(new_root[0])
    one_line_error(swarm.cli("node", "ls", env={"CORRAL_CERT_PATH": str(tmp_path)}),
                   "does not accept this client certificate")
    # The lab's own client certificate was re-issued by the CLI and still works.
    assert pki.signed_by(swarm.lab.tls_dir.joinpath("cert.pem").read_bytes(), new_root[0])
    still_serving(swarm)
    assert "Traceback" not in daemon_logs(swarm)


def test_secrets_reach_only_their_tasks_as_files(swarm: LabSwarm) -> None:
    value = "s3cr3t-" + os.urandom(8).hex()
    secret_id = swarm.ok("secret", "create", "db_password", "-", input=value).out.strip()
    ls = swarm.ok("secret", "ls").out
    assert "db_password" in ls and value not in ls
    assert value not in swarm.ok("secret", "inspect", "db_password").out
    one_line_error(swarm.cli("service", "create", "--name", "nope", "--secret", "missing",
                             "whoami"), "secret not found: missing")
    swarm.ok("service", "create", "--name", "app", "--replicas", "2", "--secret", "db_password",
             "--secret", "source=db_password,target=pw,mode=0400", "whoami")
    for slot in ("1", "2"):
        r = swarm.ok("service", "exec", f"app.{slot}", "--", "sh", "-c",
                     'cat "$CORRAL_SECRETS_DIR/db_password"; echo; '
                     'stat -c %a "$CORRAL_SECRETS_DIR/pw" "$CORRAL_SECRETS_DIR"')
        assert r.out.split() == [value, "400", "700"], r.out
    # Sealed in the store: the manager's database never holds the value in clear.
    db = Path(swarm.lab.node("node1").data_dir) / "manager"
    assert all(value.encode() not in f.read_bytes() for f in db.rglob("*") if f.is_file())
    one_line_error(swarm.cli("secret", "rm", "db_password"), "in use", "app")
    task_ids = [t["id"] for t in swarm.tasks("app")]
    swarm.ok("service", "rm", "app")
    swarm.ok("secret", "rm", secret_id[:12])
    assert "db_password" not in swarm.ok("secret", "ls").out
    from corral.agent.secrets import secrets_root
    wait_for(lambda: not any((secrets_root() / t).exists() for t in task_ids), timeout=15,
             what="the tasks' secret files to go with them")


def test_node_rm_revokes_its_certificate(swarm: LabSwarm) -> None:
    """Last in this module: node3 leaves the swarm for good."""
    n3 = node_tls(swarm, "node3")
    with tls_client(n3 / "ca.pem", n3 / "node.pem", n3 / "node-key.pem") as c:
        ok = c.post(f"https://{BASE_ADDR}:2377/v1/dispatcher/heartbeat", json={},
                    extensions={"sni_hostname": pki.role_name("manager")})
        assert ok.status_code == 200
        swarm.ok("node", "rm", "--force", "node3")
        r = c.post(f"https://{BASE_ADDR}:2377/v1/dispatcher/heartbeat", json={},
                   extensions={"sni_hostname": pki.role_name("manager")})
        assert r.status_code == 401 and "revoked" in r.json()["message"]
    wait_for(lambda: "manager refused this node" in Path(swarm.lab.node("node3").log).read_text(),
             timeout=10, what="node3's agent to be refused")


def test_certificates_renew_by_themselves(tmp_path: Path) -> None:
    """Certificates living 6 s renew at half-life; tasks and published ports are untouched."""
    with lab_swarm(tmp_path, 2, RENEW_ADDR, heartbeat=0.5, cert_expiry=6.0) as swarm:
        swarm.ok("service", "create", "--name", "steady", "--replicas", "2", "-p", "19602:80",
                 "whoami")
        tasks = {t["id"] for t in swarm.running("steady")}
        first = {n.name: pki.identity((node_tls(swarm, n.name) / "node.pem").read_bytes())
                 for n in swarm.lab.nodes}
        assert all(i.lifetime() < dt.timedelta(seconds=8) for i in first.values())

        def renewed_twice() -> bool:
            now = {n: pki.identity((node_tls(swarm, n) / "node.pem").read_bytes()) for n in first}
            return all(now[n].not_before > first[n].not_after - dt.timedelta(seconds=4)
                       and now[n].serial != first[n].serial for n in first)
        # Well past the first certificates' expiry: every node moved on by itself.
        wait_for(renewed_twice, timeout=20, interval=0.5, what="renewed certificates")
        wait_for(lambda: dt.datetime.now(dt.timezone.utc) > max(i.not_after for i in first.values()),
                 timeout=10, what="the first certificates to expire")
        assert {t["id"] for t in swarm.running("steady")} == tasks
        assert swarm.ok("node", "ls").out.count(" Ready ") == 2
        assert http_get(RENEW_ADDR, 19602)["service"] == "steady"
        # The manager's own listener presents its renewed certificate.
        ctx = ssl.create_default_context(cadata=(node_tls(swarm, "node1") / "ca.pem").read_text())
        with socket.create_connection((RENEW_ADDR, 2377)) as raw, \
                ctx.wrap_socket(raw, server_hostname=pki.role_name("manager")) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None and pki.identity(der).serial != first["node1"].serial
