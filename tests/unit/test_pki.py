"""The cluster PKI: roots, node certificates, pinned join tokens, and TLS contexts that use them."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

import pytest

from corral.api.errors import InvalidArgument
from corral.security import pki
from corral.security.nodetls import NodeTLS
from corral.security.pki import JoinToken


def _cert(ca: pki.CertKey, role: pki.Role, node_id: str = "node1",
          **kw: object) -> tuple[bytes, bytes]:
    key = pki.new_key()
    cert = pki.issue(ca, pki.make_csr(key), node_id=node_id, role=role, cluster_id="c1", **kw)  # type: ignore[arg-type]
    return cert, pki.key_to_pem(key)


def test_issued_certificate_says_who_and_what() -> None:
    ca = pki.create_root_ca("c1")
    cert, _ = _cert(ca, "worker", expiry=dt.timedelta(hours=2))
    ident = pki.identity(cert)
    assert (ident.node_id, ident.role, ident.cluster_id) == ("node1", "worker", "c1")
    assert dt.timedelta(hours=1, minutes=59) < ident.remaining() <= dt.timedelta(hours=2)
    assert ident.issuer_key_id == pki.key_id(ca.cert_pem)
    assert pki.signed_by(cert, ca.cert_pem)
    assert not pki.signed_by(cert, pki.create_root_ca("c2").cert_pem)


def test_bad_requests_are_refused() -> None:
    ca = pki.create_root_ca("c1")
    with pytest.raises(InvalidArgument, match="not a PEM CSR"):
        pki.issue(ca, b"garbage", node_id="n", role="worker", cluster_id="c1")
    with pytest.raises(InvalidArgument, match="not a certificate"):
        pki.identity(b"\x30\x03garbage")


def test_token_pins_the_root() -> None:
    ca, other = pki.create_root_ca("c1"), pki.create_root_ca("c1")
    token = JoinToken(pki.ca_digest(ca.cert_pem), pki.new_join_secret())
    parsed = JoinToken.parse(str(token))
    assert parsed == token and str(token).startswith("SWMTKN-1-")
    assert len(token.digest) == 50 and len(token.secret) == 25
    assert parsed.pins(ca.cert_pem) and not parsed.pins(other.cert_pem)
    for bad in ("", "SWMTKN-1-abc", "SWMTKN-2-a-b", "SWMTKN-1--b", "x-y-z-w"):
        with pytest.raises(InvalidArgument, match="invalid join token"):
            JoinToken.parse(bad)


def test_bundle_splits_into_roots() -> None:
    a, b = pki.create_root_ca("c"), pki.create_root_ca("c")
    assert pki.split_bundle(a.cert_pem + b.cert_pem) == [a.cert_pem, b.cert_pem]


def _files(tmp: Path, name: str, cert: bytes, key: bytes) -> tuple[str, str]:
    (tmp / f"{name}.pem").write_bytes(cert)
    (tmp / f"{name}-key.pem").write_bytes(key)
    return str(tmp / f"{name}.pem"), str(tmp / f"{name}-key.pem")


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str:
    """One TLS 1.3 exchange over loopback: the server echoes what it read. Returns the echo,
    or why the client got none (TLS 1.3 reports a refused client certificate only after the
    handshake: the client then reads an empty stream or a reset)."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(5))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=name)
        w.write(b"hello")
        await w.drain()
        try:
            echo = await asyncio.wait_for(r.read(5), 5)
        except (ssl.SSLError, ConnectionError) as exc:
            return f"server refused: {exc.__class__.__name__}"
        w.close()
        return echo.decode() or "server refused: closed"
    except ssl.SSLCertVerificationError as exc:
        return f"client refused: {exc.verify_message}"
    finally:
        srv.close()


async def test_contexts_require_the_role_name_and_the_swarm_ca(tmp_path: Path) -> None:
    ca = pki.create_root_ca("c1")
    manager = _files(tmp_path, "m", *_cert(ca, "manager", "mgr"))
    worker = _files(tmp_path, "w", *_cert(ca, "worker", "wrk"))
    server = pki.server_context(ca.cert_pem, *manager)
    client = pki.client_context(ca.cert_pem, *worker)
    assert await _handshake(server, client, pki.role_name("manager")) == "hello"
    assert await _handshake(server, client, pki.NODE_NAME) == "hello"
    # A worker's certificate does not pass for a manager's.
    worker_server = pki.server_context(ca.cert_pem, *worker)
    assert "client refused" in await _handshake(worker_server, client, pki.role_name("manager"))
    # A server of another CA is refused by the client.
    rogue = pki.create_root_ca("c1")
    rogue_server = pki.server_context(rogue.cert_pem, *_files(tmp_path, "r", *_cert(rogue, "manager")))
    assert "client refused" in await _handshake(rogue_server, client, pki.role_name("manager"))
    # A client certificate of another CA is refused by the server.
    rogue_client = pki.client_context(ca.cert_pem, *_files(tmp_path, "rc", *_cert(rogue, "worker")))
    assert (await _handshake(server, rogue_client, pki.NODE_NAME)).startswith("server refused")
    # So is an expired one from the right CA.
    expired = _cert(ca, "worker", now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2),
                    expiry=dt.timedelta(days=1))
    old_client = pki.client_context(ca.cert_pem, *_files(tmp_path, "old", *expired))
    assert (await _handshake(server, old_client, pki.NODE_NAME)).startswith("server refused")


def test_node_tls_files_and_renewal(tmp_path: Path) -> None:
    ca = pki.create_root_ca("c1")
    tls = NodeTLS(tmp_path / "tls")
    assert not tls.exists()
    cert = pki.issue(ca, tls.new_csr(), node_id="n1", role="worker", cluster_id="c1",
                     expiry=dt.timedelta(hours=1))
    assert tls.trust(ca.cert_pem) and not tls.trust(ca.cert_pem)
    tls.install(cert)
    assert tls.exists() and tls.identity().node_id == "n1"
    assert tls.key_file.stat().st_mode & 0o777 == 0o600
    ctx = tls.server_context()
    assert not tls.needs_renewal()
    assert tls.needs_renewal(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=31))
    renewed = pki.issue(ca, tls.new_csr(), node_id="n1", role="worker", cluster_id="c1")
    tls.install(renewed)
    assert tls.server_context() is ctx, "renewal reloads the live context in place"
    assert tls.identity().serial != pki.identity(cert).serial
    gen = tls.generation
    assert tls.trust(ca.cert_pem + pki.create_root_ca("c1").cert_pem)
    assert tls.generation == gen + 1 and tls.server_context() is not ctx
    with pytest.raises(RuntimeError):
        tls.install(renewed)  # no pending request
    tls.forget()
    assert not tls.exists()
