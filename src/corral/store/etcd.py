"""etcd backend: the store replicated across managers through a real etcd cluster.

How this works: every manager keeps the whole store in memory, as with SQLite, so views stay
synchronous and cheap. Only the leader writes. A write transaction commits in memory and is
queued; one writer task sends the queue to etcd in order, one etcd transaction per store
transaction, each guarded by the leader's fence (its election key must still be the one it
created) — a manager that lost its leadership cannot write a single key more. User-facing
calls wait for their write to be durable (`flush`) before answering. Followers load the store
and then follow etcd's watch stream, applying each change and raising the same watch events
as a local write would. Objects are JSON under ``/corral/<kind>/<id>``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from corral.api.errors import CorralError
from corral.api.types import StoredObject
from corral.store.base import KINDS, Action, Event, Store, Tables, WriteTx
from corral.store.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdRefused,
    EtcdUnavailable,
    WatchEvent,
    cmp_create_revision,
    op_delete,
    op_put,
)

log = logging.getLogger(__name__)

PREFIX = "/corral/"
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
RETRY = 0.2


class NotWritable(CorralError):
    """This manager may not write the store now (not the leader, or etcd lost its quorum)."""

    status = 503


class LeadershipLost(Exception):
    """This manager leads no more: its fence failed or its election lease is gone."""


@dataclass(frozen=True)
class Fence:
    """The leader's election key and the revision it was created at."""

    key: str
    create_revision: int


def object_key(kind: str, obj_id: str, prefix: str = PREFIX) -> str:
    return f"{prefix}{kind}/{obj_id}"


def parse_key(key: str, prefix: str = PREFIX) -> tuple[str, str] | None:
    """(kind, id) of a store key, or None for a key that is not an object."""
    if not key.startswith(prefix):
        return None
    kind, _, obj_id = key[len(prefix):].partition("/")
    return (kind, obj_id) if kind in KINDS and obj_id else None


class EtcdStore(Store):
    """The in-memory store, loaded from and written through to etcd."""

    def __init__(self, client: EtcdClient, prefix: str = PREFIX) -> None:
        super().__init__()
        self.client = client
        self.prefix = prefix
        self.revision = 0  # the etcd revision the in-memory copy reflects
        self.fence: Fence | None = None  # set while this manager leads: writes allowed
        self._queue: deque[tuple[int, list[Event]]] = deque()
        self._queued = 0  # sequence numbers of store transactions handed to the writer
        self._written = 0
        self._progress = asyncio.Condition()
        self._wake = asyncio.Event()

    # -- loading and following --------------------------------------------------------------
    async def load(self) -> None:
        """Replace the in-memory copy with what etcd holds now."""
        kvs, revision = await self.client.range_prefix(self.prefix)
        tables: dict[str, dict[str, StoredObject]] = {k: {} for k in KINDS}
        for kv in kvs:
            parsed = parse_key(kv.key, self.prefix)
            if parsed is None:
                continue
            kind, obj_id = parsed
            tables[kind][obj_id] = KINDS[kind].model_validate_json(kv.value)
        self._tables = tables
        self.revision = revision

    async def follow(self) -> None:
        """Apply other managers' writes as etcd streams them (until cancelled)."""
        while True:
            try:
                async for batch in self.client.watch(self.prefix, self.revision + 1):
                    self._apply_remote(batch)
            except EtcdUnavailable as exc:
                log.warning("store watch: %s; resuming from revision %d", exc, self.revision)
                await asyncio.sleep(RETRY)
                try:
                    if isinstance(exc, EtcdCompacted):
                        await self.load()  # too far behind: start again from a full read
                except EtcdUnavailable:
                    pass

    def _apply_remote(self, batch: list[WatchEvent]) -> None:
        """Apply one watch message (one etcd transaction, often many objects): each table it
        touches is copied once, by the same copy-on-write as a local transaction."""
        staged: Tables = dict(self._tables)
        tx = WriteTx(staged)  # its copies land in `staged`
        events: list[Event] = []
        for ev in batch:
            self.revision = max(self.revision, ev.kv.mod_revision)
            parsed = parse_key(ev.kv.key, self.prefix)
            if parsed is None:
                continue
            kind, obj_id = parsed
            old = staged[kind].get(obj_id)
            if ev.kind == "delete":
                if old is None:
                    continue
                event = Event(Action.DELETE, kind, old, old)
            else:
                obj = KINDS[kind].model_validate_json(ev.kv.value)
                if old is not None and old.version >= obj.version and old == obj:
                    continue  # our own write coming back
                event = Event(Action.CREATE if old is None else Action.UPDATE, kind, obj, old)
            if event.action is Action.DELETE:
                del tx.writable(kind)[obj_id]
            else:
                tx.writable(kind)[obj_id] = event.obj
            events.append(event)
        if events:
            self._tables = staged
            self._notify(events)

    # -- writing ------------------------------------------------------------------------
    def _persist(self, events: list[Event]) -> None:
        if self.fence is None:
            raise NotWritable(self.error or "this manager is not the leader: it cannot write "
                                            "the store")
        self._queued += 1
        self._queue.append((self._queued, events))
        self._wake.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every write made so far is in etcd (what an API answer promises)."""
        target = self._queued
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self._written >= target or self.fence is None),
                    timeout)
            except TimeoutError:
                raise NotWritable(f"the store did not confirm the write in {timeout:g}s: "
                                  f"{self.error or 'etcd is slow or has lost its quorum'}") from None
        if self._written < target:
            raise NotWritable(self.error or "lost the leadership before the write was stored")

    async def run_writer(self) -> None:
        """Send queued transactions to etcd in order; raise LeadershipLost when fenced out."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                seq, events = self._queue[0]
                try:
                    await self._write(events)
                except EtcdUnavailable as exc:
                    self.error = f"etcd unavailable: {exc}"
                    log.warning("store write %d waits for etcd: %s", seq, exc)
                    await asyncio.sleep(RETRY)
                    continue
                except EtcdRefused as exc:
                    # Memory and etcd would part ways: stop leading; the next leader (maybe
                    # this manager again) starts from what etcd holds.
                    log.error("store write %d refused by etcd: %s", seq, exc)
                    await self.step_down(f"etcd refused a write: {exc}")
                    raise LeadershipLost() from exc
                except LeadershipLost:
                    await self.step_down("another manager leads now")
                    raise
                self.error = ""
                self._queue.popleft()
                self._written = seq
                async with self._progress:
                    self._progress.notify_all()

    async def _write(self, events: list[Event]) -> None:
        fence = self.fence
        if fence is None:
            raise LeadershipLost()
        # etcd refuses a transaction that names a key twice: only each object's final state.
        final: dict[str, Event] = {}
        for ev in events:
            final[object_key(ev.kind, ev.obj.id, self.prefix)] = ev
        ops = [op_delete(key) if ev.action is Action.DELETE else op_put(key, ev.obj.model_dump_json())
               for key, ev in final.items()]
        # etcd caps the operations of one transaction: a very large store transaction (say,
        # a service of 500 replicas) goes in several, each still fenced.
        for i in range(0, len(ops), MAX_TXN_OPS):
            ok, revision = await self.client.txn(
                [cmp_create_revision(fence.key, fence.create_revision)], ops[i:i + MAX_TXN_OPS])
            if not ok:
                raise LeadershipLost()
            self.revision = max(self.revision, revision)

    def lead(self, fence: Fence) -> None:
        """This manager leads from now on (its writes carry `fence`)."""
        self.fence = fence
        self.error = ""
        self._written = self._queued  # what an earlier term dropped is nobody's to wait for

    async def step_down(self, why: str) -> None:
        """Stop writing: unwritten transactions are dropped (the next leader reconciles), and
        whoever waits for them hears that they were not stored. Stepping down again keeps the
        first reason (the writer's own, say, over the manager's general one)."""
        if self.fence is not None:
            self.error = why
        self.fence = None
        self._queue.clear()
        async with self._progress:
            self._progress.notify_all()


async def check_etcd_is_free(client: EtcdClient, prefix: str = PREFIX) -> None:
    """Refuse to start a swarm in an etcd that holds one already (or cannot be reached);
    closes `client`."""
    endpoints = client.endpoints
    try:
        kvs, _ = await client.range_prefix(prefix)
    except (EtcdUnavailable, EtcdRefused) as exc:
        raise NotWritable(f"cannot use etcd at {', '.join(endpoints)}: {exc}") from None
    finally:
        await client.close()
    if kvs:
        raise CorralError(f"etcd at {', '.join(endpoints)} already holds a swarm's store "
                          f"(keys under {prefix}): join that swarm, or use another etcd")
