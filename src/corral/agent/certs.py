"""Keeps this node's certificate fresh: renews it (with a new key) well before it expires, and
follows the swarm's roots when they rotate — without touching the node's tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from corral.agent.session import ManagerSession
from corral.security.nodetls import NodeTLS
from corral.security.pki import bundle_digest

log = logging.getLogger(__name__)

MAX_CHECK = 30.0  # seconds between looks at the certificate, at most


def check_interval(tls: NodeTLS) -> float:
    """Often enough for short-lived certificates, rarely for the default 90 days."""
    return max(0.5, min(MAX_CHECK, tls.identity().lifetime().total_seconds() / 20))


async def renew(session: ManagerSession, tls: NodeTLS,
                on_trust_changed: Callable[[], Awaitable[None]]) -> None:
    """One renewal: a new key, a certificate for it, and the roots the manager trusts now."""
    async with tls.renewing:
        resp = await session.renew(tls.new_csr())
        if tls.trust(resp.ca.encode()):
            await on_trust_changed()
        tls.install(resp.cert.encode())
        session.reconnect()
    ident = tls.identity()
    log.info("node certificate renewed (%s, serial %x, valid until %s)", ident.role,
             ident.serial, ident.not_after.isoformat(timespec="seconds"))


async def keep_certificate(session: ManagerSession, tls: NodeTLS,
                           on_trust_changed: Callable[[], Awaitable[None]]) -> None:
    """Run until cancelled."""
    while True:
        session.roots_changed.clear()
        try:
            roots_moved = bool(session.roots) and session.roots != bundle_digest(tls.bundle())
            if roots_moved or tls.needs_renewal():
                await renew(session, tls, on_trust_changed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # manager unreachable: try again soon, the old one still works
            if tls.identity().remaining().total_seconds() < 0:
                log.error("this node's certificate expired at %s and no manager accepts it any "
                          "more: run `corral swarm leave` and join again with a token",
                          tls.identity().not_after.isoformat(timespec="seconds"))
            else:
                log.warning("certificate renewal failed, will retry: %r", exc)
        # Wake up early when a heartbeat says the swarm's roots changed (a CA rotation).
        try:
            await asyncio.wait_for(session.roots_changed.wait(), check_interval(tls))
        except TimeoutError:
            pass
