"""Leader election among managers on etcd: a key bound to a lease, created by exactly one.

The manager whose transaction creates the key (it must not exist) leads for as long as it
keeps the lease alive; the key's create revision is its fence (corral.store.etcd.Fence): every
store write checks that the key is still the one it created. When the leader dies, its lease
expires after `ttl` seconds, the key goes with it, and the next campaigner's transaction wins.
"""

from __future__ import annotations

import asyncio
import logging

from corral.store.etcd import Fence
from corral.store.etcd_client import (
    EtcdClient,
    EtcdRefused,
    EtcdUnavailable,
    cmp_absent,
    op_put,
)

log = logging.getLogger(__name__)

ELECTION_KEY = "/corral-election/leader"
DEFAULT_TTL = 3  # seconds: the longest a dead leader holds the swarm back (swarmkit: ~3 s too)


class Election:
    """One manager's part in the election."""

    def __init__(self, client: EtcdClient, me: str, ttl: int = DEFAULT_TTL,
                 key: str = ELECTION_KEY) -> None:
        self.client = client
        self.me = me
        self.ttl = ttl
        self.key = key
        self.lease = 0

    async def leader(self) -> str | None:
        """Who leads now (the value the leader wrote: its address), if anyone."""
        kv = await self.client.get(self.key)
        return kv.value.decode() if kv is not None else None

    async def campaign(self) -> Fence:
        """Wait until this manager leads; returns its fence."""
        while True:
            try:
                # A lease only when nobody leads: granting and revoking one on every try
                # would add two Raft writes per follower per try, for as long as it follows.
                if await self.leader() is None:
                    lease = await self.client.lease_grant(self.ttl)
                    ok, revision = await self.client.txn(
                        [cmp_absent(self.key)], [op_put(self.key, self.me, lease)])
                    if ok:
                        self.lease = lease
                        log.info("elected leader (fence revision %d)", revision)
                        return Fence(self.key, revision)
                    await self.client.lease_revoke(lease)  # another manager was quicker
            except (EtcdUnavailable, EtcdRefused) as exc:
                log.warning("election: %s", exc)
            await asyncio.sleep(self.ttl / 3)

    async def hold(self) -> None:
        """Keep the lease alive; returns when leadership is lost (lease gone, or etcd
        unreachable for longer than the lease lasts)."""
        interval = self.ttl / 3
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.client.lease_keepalive(self.lease) <= 0:
                    log.warning("election: our lease expired")
                    return
                last_ok = loop.time()
            except EtcdRefused as exc:  # e.g. "requested lease not found": it expired
                log.warning("election: %s", exc)
                return
            except EtcdUnavailable as exc:
                if loop.time() - last_ok >= self.ttl:
                    log.warning("election: cannot reach etcd for %ss: %s", self.ttl, exc)
                    return

    async def resign(self) -> None:
        if self.lease:
            try:
                await self.client.lease_revoke(self.lease)
            except EtcdUnavailable:
                pass  # it expires by itself
            except EtcdRefused:
                pass  # already expired (etcd: lease not found): nothing to give up
            self.lease = 0
