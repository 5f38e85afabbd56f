"""The agent's connection to the manager's dispatcher (HTTP today; mutual TLS later)."""

from __future__ import annotations

import httpx

from corral.manager.dispatcher import Assignments, StatusUpdate


class SessionRefused(Exception):
    """The manager does not accept this node's credential (removed, or wrong swarm)."""


class ManagerSession:
    """Heartbeats, status reports and assignment polls, authenticated as one node."""

    def __init__(self, manager_addr: str, node_id: str, secret: str) -> None:
        self.manager_addr = manager_addr
        self.node_id = node_id
        self._client = httpx.AsyncClient(
            base_url=f"http://{manager_addr}",
            headers={"Authorization": f"Bearer {node_id}:{secret}"},
            timeout=httpx.Timeout(5.0),
        )

    async def _post(self, path: str, json: object, timeout: float | None = None) -> httpx.Response:
        r = await self._client.post(path, json=json, timeout=timeout or 5.0)
        self._check(r)
        return r

    @staticmethod
    def _check(r: httpx.Response) -> None:
        if r.status_code in (401, 403):
            raise SessionRefused(r.json().get("message", r.text))
        r.raise_for_status()

    async def heartbeat(self) -> float:
        """Tell the manager this node is alive; returns the heartbeat period to use."""
        r = await self._post("/v1/dispatcher/heartbeat", {})
        return float(r.json()["period"])

    async def send_status(self, updates: list[StatusUpdate]) -> None:
        await self._post("/v1/dispatcher/status", [u.model_dump(mode="json") for u in updates])

    async def assignments(self, since: int, timeout: float) -> Assignments:
        """Long-poll: returns when the cluster state changed after `since`, or at `timeout`."""
        r = await self._client.get("/v1/dispatcher/assignments",
                                   params={"since": since, "timeout": timeout},
                                   timeout=timeout + 5.0)
        self._check(r)
        return Assignments.model_validate_json(r.content)

    async def close(self) -> None:
        await self._client.aclose()
