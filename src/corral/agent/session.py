"""The agent's connection to the manager's dispatcher: HTTPS with the node's own certificate
(mutual TLS), to a server that must hold a manager's certificate of the same swarm."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

from corral.manager.controlapi import CertResponse, ManagerKeys
from corral.manager.dispatcher import Assignments, StatusUpdate
from corral.security.nodetls import NodeTLS
from corral.security.pki import role_name

log = logging.getLogger(__name__)

MANAGER_NAME = role_name("manager")
"""The name the manager's certificate must carry: a worker's certificate will not do."""


class SessionRefused(Exception):
    """The manager does not accept this node's certificate (removed, or wrong swarm)."""


class ManagerSession:
    """Heartbeats, status reports, assignment polls and certificate renewal, as one node."""

    def __init__(self, manager_addr: str, tls: NodeTLS, managers: list[str] | None = None,
                 on_managers: Callable[[str, list[str]], None] | None = None) -> None:
        self.manager_addr = manager_addr
        # Every manager this node knows of: when its manager stops answering, it tries the
        # next (with several managers, followers send it on to the leader).
        self.managers = list(managers or [manager_addr])
        self._on_managers = on_managers
        self.tls = tls
        self._generation = tls.generation
        self._client = self._make_client()
        # The roots the manager last said to trust (by digest), and a nudge when they change.
        self.roots = ""
        self.roots_changed = asyncio.Event()

    def _make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"https://{self.manager_addr}",
                                 verify=self.tls.client_context(), timeout=httpx.Timeout(5.0))

    def reconnect(self) -> None:
        """New connections from the next request on: a TLS connection keeps the certificate it
        was made with, and a renewed one (maybe with a new role) must show."""
        self._generation = -1

    def set_managers(self, managers: list[str]) -> None:
        """The managers the swarm has now (from assignments)."""
        known = sorted(set(managers) | {self.manager_addr})
        if known != sorted(self.managers):
            self.managers = known
            self._remember()

    def _switch(self, addr: str) -> None:
        if addr != self.manager_addr:
            log.info("manager session: now with %s", addr)
            self.manager_addr = addr
            self._client.base_url = httpx.URL(f"https://{addr}")
            self._remember()

    def _remember(self) -> None:
        if self._on_managers is not None:
            self._on_managers(self.manager_addr, self.managers)

    def _next_manager(self) -> None:
        others = [m for m in self.managers if m != self.manager_addr]
        if others:
            i = self.managers.index(self.manager_addr) if self.manager_addr in self.managers else -1
            self._switch(self.managers[(i + 1) % len(self.managers)])

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if self._generation != self.tls.generation:  # the trusted roots changed: new context
            await self._client.aclose()
            self._client = self._make_client()
            self._generation = self.tls.generation
        tries = len(self.managers) + 1
        for attempt in range(tries):
            try:
                r = await self._client.request(method, path,
                                               extensions={"sni_hostname": MANAGER_NAME}, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if attempt == tries - 1:
                    raise
                self._next_manager()  # this manager is gone: try another
                continue
            if r.status_code == 307 and "location" in r.headers:
                self._switch(httpx.URL(r.headers["location"]).netloc.decode())  # the leader
                continue
            break
        if r.status_code in (401, 403):
            try:
                raise SessionRefused(r.json().get("message", r.text))
            except ValueError:
                raise SessionRefused(r.text) from None
        r.raise_for_status()
        return r

    async def heartbeat(self) -> float:
        """Tell the manager this node is alive; returns the heartbeat period to use."""
        r = await self._request("POST", "/v1/dispatcher/heartbeat", json={})
        body = r.json()
        roots = str(body.get("roots", ""))
        if roots and roots != self.roots:
            self.roots = roots
            self.roots_changed.set()
        return float(body["period"])

    async def send_status(self, updates: list[StatusUpdate]) -> None:
        await self._request("POST", "/v1/dispatcher/status",
                            json=[u.model_dump(mode="json") for u in updates])

    async def assignments(self, since: int, timeout: float) -> Assignments:
        """Long-poll: returns when the cluster state changed after `since`, or at `timeout`."""
        r = await self._request("GET", "/v1/dispatcher/assignments",
                                params={"since": since, "timeout": timeout}, timeout=timeout + 5.0)
        return Assignments.model_validate_json(r.content)

    async def renew(self, csr: bytes) -> CertResponse:
        """A new certificate for a new key (the node's current role, the current root)."""
        r = await self._request("POST", "/v1/ca/renew", json={"csr": csr.decode()})
        return CertResponse.model_validate_json(r.content)

    async def manager_keys(self) -> ManagerKeys:
        """A promoted node's share of the swarm (it must hold a manager certificate)."""
        r = await self._request("GET", "/v1/swarm/manager-keys")
        return ManagerKeys.model_validate_json(r.content)

    async def close(self) -> None:
        await self._client.aclose()
