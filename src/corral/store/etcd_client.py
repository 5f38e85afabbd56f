"""A small async etcd v3 client over etcd's JSON gateway (httpx), with several endpoints.

Only what the store needs: range, transactions (compare-and-swap), leases and watches. Keys and
values travel base64-encoded; int64 fields (revisions, lease IDs) arrive as strings and fields
that are false or zero are omitted — the gateway's protobuf-to-JSON mapping. A request that
cannot reach one endpoint is retried on the next: a client survives the loss of any member
as long as the cluster keeps a quorum.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

log = logging.getLogger(__name__)


class EtcdUnavailable(Exception):
    """No endpoint answered (or the cluster has no quorum): the store cannot be written now."""


class EtcdCompacted(EtcdUnavailable):
    """A watch asked for revisions etcd has compacted away: read everything again."""


class EtcdRefused(Exception):
    """etcd answered and refused the request itself (retrying the same request cannot help)."""


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with `prefix` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KV


def _kv(raw: dict[str, Any]) -> KV:
    return KV(key=unb64(raw["key"]).decode(), value=unb64(raw.get("value", "")),
              mod_revision=int(raw.get("mod_revision", 0)),
              create_revision=int(raw.get("create_revision", 0)))


# -- transaction building blocks (the gateway's JSON shapes) --------------------------------------


def cmp_create_revision(key: str, revision: int) -> dict[str, Any]:
    """True while `key` is the one created at `revision` (a leadership fence)."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(revision)}


def cmp_absent(key: str) -> dict[str, Any]:
    """True while `key` does not exist."""
    return cmp_create_revision(key, 0)


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


# etcd's "require leader" (gRPC metadata through the gateway): a member cut off from its
# leader ends the watch instead of going quiet, so the follower moves to a member that has one.
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdClient:
    """Calls to an etcd cluster through whichever of its endpoints answers."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 3.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls`: etcd's CA (and a client certificate, for --client-cert-auth); endpoints
        then default to https."""
        if not endpoints:
            raise ValueError("no etcd endpoints")
        scheme = "https" if tls is not None else "http"
        self.endpoints = [e if "://" in e else f"{scheme}://{e}" for e in endpoints]
        self._current = 0
        self._http = httpx.AsyncClient(timeout=timeout, verify=tls if tls is not None else True)

    @property
    def current_endpoint(self) -> str:
        """The member this client talks to first (the last one that answered)."""
        return self.endpoints[self._current]

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            idx = (self._current + i) % len(self.endpoints)
            url = f"{self.endpoints[idx]}/v3/{path}"
            try:
                r = await self._http.post(url, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{self.endpoints[idx]}: {exc.__class__.__name__}")
                continue
            if r.status_code >= 500 or r.status_code == 429:
                # No leader / no quorum on this member: another may still have one.
                errors.append(f"{self.endpoints[idx]}: {r.text.strip()[:120]}")
                continue
            if r.status_code != 200:
                raise EtcdRefused(f"etcd refused {path}: {r.text.strip()[:200]}")
            self._current = idx  # stick to a member that works
            out: dict[str, Any] = r.json()
            return out
        raise EtcdUnavailable("no etcd member answers: " + "; ".join(errors))

    async def range_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix`, and the store revision they were read at."""
        r = await self._call("kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return [_kv(k) for k in r.get("kvs", [])], int(r["header"]["revision"])

    async def get(self, key: str) -> KV | None:
        r = await self._call("kv/range", {"key": b64(key)})
        kvs = r.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    async def txn(self, compare: list[dict[str, Any]],
                  success: list[dict[str, Any]]) -> tuple[bool, int]:
        """One atomic transaction: (whether `compare` held, the revision after it)."""
        r = await self._call("kv/txn", {"compare": compare, "success": success})
        return bool(r.get("succeeded", False)), int(r["header"]["revision"])

    async def lease_grant(self, ttl: int) -> int:
        r = await self._call("lease/grant", {"TTL": str(ttl)})
        return int(r["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh `lease`; returns its remaining TTL (0: it expired — whatever it held is gone)."""
        r = await self._call("lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        await self._call("lease/revoke", {"ID": str(lease)})

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Changes under `prefix` from `start_revision` on, one list per message etcd streams
        (a transaction's changes arrive together). Ends (raising EtcdUnavailable) when the
        stream ends: the caller resumes from its last revision."""
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        url = f"{self.endpoints[self._current]}/v3/watch"
        try:
            async with self._http.stream("POST", url, json=body, timeout=None,
                                         headers=REQUIRE_LEADER) as r:
                if r.status_code != 200:
                    reason = f"watch refused by {self.current_endpoint}: HTTP {r.status_code}"
                else:
                    reason = f"{self.current_endpoint} ended the watch"
                    async for line in r.aiter_lines():
                        if not line.strip():
                            continue
                        data = json.loads(line)
                        if "error" in data:  # e.g. this member lost its leader
                            error = data["error"]
                            reason = f"{self.current_endpoint}: {error.get('message', error)}"
                            break
                        msg = data.get("result", {})
                        if msg.get("compact_revision"):
                            raise EtcdCompacted(f"watch start {start_revision} was compacted")
                        if msg.get("canceled"):
                            reason = (f"{self.current_endpoint} cancelled the watch: "
                                      f"{msg.get('cancel_reason', '')}")
                            break
                        if events := msg.get("events"):
                            yield [WatchEvent("delete" if ev.get("type") == "DELETE" else "put",
                                              _kv(ev["kv"])) for ev in events]
        except (httpx.HTTPError, ValueError) as exc:
            reason = f"watch stream broke: {exc.__class__.__name__}"
        # However it ended, the caller waits a moment and resumes, on the next member.
        self._current = (self._current + 1) % len(self.endpoints)
        raise EtcdUnavailable(reason)
