"""The daemon's two doors: a unix socket for the local admin (root-only permissions) and the
control port, mutual TLS only, checked by :mod:`corral.security.authz` before any handler.

uvicorn serves both; the TLS door uses an HTTP protocol that hands the client's certificate
to the app (ASGI's ``tls`` extension), and an ASGI wrapper that refuses what the certificate
does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from corral.api.errors import CorralError
from corral.security import authz
from corral.security.authz import Peer, Refusal
from corral.security.pki import Role, identity

log = logging.getLogger(__name__)

PEER = "corral.peer"
"""Scope key carrying the request's :class:`Peer` into the app."""

ASGIApp = Callable[..., Any]
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class TlsHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus the client certificate in ``scope["extensions"]["tls"]``."""

    _peer_der: bytes | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        obj = transport.get_extra_info("ssl_object")
        self._peer_der = obj.getpeercert(binary_form=True) if obj is not None else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"client_cert_der": self._peer_der}}


def _peer_of(scope: dict[str, Any]) -> Peer:
    der = scope.get("extensions", {}).get("tls", {}).get("client_cert_der")
    return _peer_from_cert(der) if der else authz.ANONYMOUS


@functools.lru_cache(maxsize=4096)
def _peer_from_cert(der: bytes) -> Peer:
    """Who a certificate names, parsed once per certificate, not per request (agents keep
    their connections and poll on them). Revocation is checked per request, elsewhere."""
    try:
        return Peer(cert=identity(der))
    except CorralError:  # a certificate of this CA without a corral role: nobody
        return authz.ANONYMOUS


async def _refuse(send: Callable[..., Any], refusal: Refusal) -> None:
    body = json.dumps({"message": refusal.message}).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def control_door(app: ASGIApp, cluster_id: Callable[[], str | None],
                 node_role: Callable[[], Callable[[str], Role | None] | None]) -> ASGIApp:
    """Wrap `app` for the TLS port: every request is authorized from its certificate first."""

    async def door(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        peer = _peer_of(scope)
        refusal = authz.authorize(peer, scope["method"], scope["path"],
                                  cluster_id=cluster_id(), node_role=node_role())
        if refusal is not None:
            who = (f"{peer.cert.role} {peer.cert.node_id}" if peer.cert else "no certificate")
            client = scope.get("client") or ("?", 0)
            log.warning("refused %s %s from %s (%s): %s", scope["method"], scope["path"],
                        client[0], who, refusal.message)
            await _refuse(send, refusal)
            return
        scope[PEER] = peer
        await app(scope, receive, send)
    return door


def local_door(app: ASGIApp) -> ASGIApp:
    """Wrap `app` for the unix socket: whoever can open it is the node's admin."""

    async def door(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        scope[PEER] = authz.LOCAL
        await app(scope, receive, send)
    return door


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:  # absent, refused (stale), not a socket
        return False
    finally:
        probe.close()
    return True


def bind_unix(path: Path) -> socket.socket:
    """Listen on `path`, readable and writable by this user only (root's, on a real node)."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise CorralError(f"socket path too long for a unix socket ({len(str(path))} > "
                          f"{MAX_UNIX_PATH} bytes): {path}; choose a shorter --socket")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _answers(path):
        raise CorralError(f"another daemon is listening on {path}: stop it first, or give "
                          f"this one another --socket")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a daemon that did not exit cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: never briefly open to others
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp(addr: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (several run in one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def server(app: ASGIApp, tls: bool = False) -> uvicorn.Config:
    """The uvicorn settings both doors share (TLS itself is the control listener's job)."""
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                          http=TlsHttpProtocol if tls else "httptools",
                          # Agents hold long-polls open: don't wait for them on shutdown.
                          timeout_graceful_shutdown=1)


_PLAINTEXT_BODY = b"This port speaks TLS only (mutual TLS with a certificate of this swarm).\n"
PLAINTEXT_REFUSAL = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(_PLAINTEXT_BODY), _PLAINTEXT_BODY))
HANDSHAKE_TIMEOUT = 10.0
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello


class ControlListener:
    """The TLS control port, open while this node belongs to a swarm.

    Accepts connections itself rather than through ``create_server(ssl=…)``: it peeks at the
    first byte (plaintext HTTP gets a one-line 400 instead of a silent close) and sees every
    failed handshake (wrong CA, expired certificate, garbage), which it logs in one line.
    """

    def __init__(self, app: ASGIApp, addr: str, port: int, context: ssl.SSLContext) -> None:
        self._server = QuietServer(server(app, tls=True))
        self._sock = bind_tcp(addr, port)
        self._ctx = context
        self._tasks: set[asyncio.Task[None]] = set()
        self._serve: asyncio.Task[None] | None = None
        self._accept: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # uvicorn runs with no sockets of its own: it keeps the connections' shared state.
        self._serve = asyncio.create_task(self._server.serve(sockets=[]), name="control-http")
        while not self._server.started and not self._serve.done():
            await asyncio.sleep(0.01)
        if self._serve.done():
            self._serve.result()  # raises what stopped it
        self._accept = asyncio.create_task(self._accept_loop(), name="control-accept")

    def set_context(self, context: ssl.SSLContext) -> None:
        """Use `context` for new connections (the roots changed); open ones carry on."""
        self._ctx = context

    def _protocol(self) -> asyncio.Protocol:
        cfg = self._server.config
        proto: asyncio.Protocol = cfg.http_protocol_class(  # type: ignore[call-arg]
            config=cfg, server_state=self._server.server_state, app_state={})
        return proto

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: wait a little rather than spin
                log.error("control port: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handshake(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            first = await asyncio.wait_for(_peek(loop, conn), HANDSHAKE_TIMEOUT)
            if not first:
                conn.close()
                return
            if first[0] != TLS_HANDSHAKE:
                log.warning("control port: refused a plaintext connection from %s "
                            "(this port speaks TLS only)", peer[0])
                with contextlib.suppress(OSError):
                    conn.send(PLAINTEXT_REFUSAL)
                conn.close()
                return
            await loop.connect_accepted_socket(self._protocol, conn, ssl=self._ctx,
                                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            log.warning("control port: TLS handshake with %s failed: %s", peer[0],
                        f"{reason}: {exc}" if str(exc) else reason)
            conn.close()

    async def stop(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept
        for t in list(self._tasks):
            t.cancel()
        self._sock.close()
        self._server.should_exit = True
        if self._serve is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._serve


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket for the TLS layer to read."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    try:
        return conn.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return await _peek(loop, conn)
