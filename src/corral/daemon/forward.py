"""With several managers, only the leader writes: what reaches a follower and needs the
leader goes there, and what the leader answers is durable first.

* An agent calling a follower's dispatcher is redirected (307) to the leader: its session
  must be with the manager that writes its heartbeats and task states.
* A user's write (or anything else that must run on the leader) is proxied to it over mutual
  TLS with this manager's certificate; the follower already checked the caller's rights.
* Reads are served from the follower's replica of the store.
* On the leader, a write's response waits until the write is in etcd: an answer means stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from corral.api.errors import CorralError
from corral.security.authz import route_class
from corral.agent.session import MANAGER_NAME

if TYPE_CHECKING:
    from corral.daemon.daemon import Daemon
    from corral.daemon.listeners import ASGIApp

log = logging.getLogger(__name__)

LOCAL_ONLY = ("/v1/swarm/init", "/v1/swarm/join", "/v1/swarm/leave", "/v1/info")
NO_LEADER = ("no manager leads the swarm right now: an election is under way, or etcd has "
             "lost its quorum")


def needs_leader(method: str, path: str) -> bool:
    """Whether a request must be served by the leader rather than this manager's replica."""
    if path in LOCAL_ONLY or path.startswith("/v1/local/") or path.endswith("/exec"):
        return False
    kind = route_class(method, path)
    if kind == "agent" or (method, path) == ("POST", "/v1/swarm/nodes"):  # joining writes too
        return True
    if path.startswith("/v1/swarm/join-token/"):
        return True  # may rotate
    return kind == "admin" and method != "GET"


async def _respond(send: Callable[..., Any], status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": (headers or [(b"content-type", b"application/json")])
                + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(message: str) -> bytes:
    return json.dumps({"message": message}).encode()


def leader_door(app: ASGIApp, daemon: Daemon) -> ASGIApp:
    """Wrap the API: redirect or proxy to the leader on followers; durable answers on it."""

    async def door(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        mgr = daemon.manager
        if scope["type"] != "http" or mgr is None or not mgr.ha:
            await app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if not needs_leader(method, path):
            await app(scope, receive, send)
            return
        if mgr.leading:
            await app(scope, receive, _durable_send(send, mgr.store.flush))
            return
        leader = mgr.leader_addr
        if leader == daemon.api_addr:  # won the election, still catching up with the store
            await _respond(send, 503, _error("this manager is taking over as the leader: "
                                             "try again in a moment"))
            return
        if not leader:
            await _respond(send, 503, _error(NO_LEADER))
            return
        query = scope.get("query_string", b"").decode()
        target = f"https://{leader}{path}" + (f"?{query}" if query else "")
        if route_class(method, path) == "agent":
            await _respond(send, 307, _error(f"the leader is {leader}"),
                           [(b"location", target.encode()), (b"content-type", b"application/json")])
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]
                   if k.lower() in (b"content-type", b"accept")}
        try:
            async with daemon.node_client(timeout=30.0) as client:
                r = await client.request(method, target, content=body, headers=headers,
                                         extensions={"sni_hostname": MANAGER_NAME})
        except httpx.HTTPError as exc:
            log.warning("forwarding %s %s to the leader %s: %r", method, path, leader, exc)
            await _respond(send, 503, _error(
                f"cannot reach the leader at {leader} ({exc.__class__.__name__}): if it is down, "
                "another manager takes over within seconds — unless etcd has lost its quorum"))
            return
        await _respond(send, r.status_code, r.content,
                       [(b"content-type", r.headers.get("content-type", "application/json").encode())])
    return door


def _durable_send(send: Callable[..., Any], durable: Callable[..., Any]) -> Callable[..., Any]:
    """`send`, holding the response back until the leader's writes are stored."""
    failed = False

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal failed
        if message["type"] == "http.response.start" and message["status"] < 400:
            try:
                await durable()
            except CorralError as exc:
                failed = True
                await _respond(send, exc.status, _error(exc.message))
                return
        if failed:
            return  # the refusal was sent instead of this response
        await send(message)
    return wrapped
