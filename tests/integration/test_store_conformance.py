"""The same store behaviour on SQLite and on etcd (a real 3-member cluster on 127.0.0.91–93),
plus what only etcd does: followers, fencing, member loss, quorum loss, leader election."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from corral.api.errors import SequenceConflict
from corral.api.types import ContainerSpec, Node, NodeDescription, Service, ServiceSpec
from corral.manager.election import Election
from corral.store.base import Action, Store, WriteTx
from corral.store.etcd import EtcdStore, Fence, LeadershipLost, NotWritable
from corral.store.etcd_client import (
    EtcdClient,
    EtcdUnavailable,
    cmp_absent,
    op_delete,
    op_put,
)
from corral.store.sqlite import SQLiteStore
from corral.testing.polling import until
from corral.testing.etcd import ETCD_MISSING, EtcdCluster, etcd_available

ETCD_ADDRS = ["127.0.0.91", "127.0.0.92", "127.0.0.93"]
needs_etcd = pytest.mark.skipif(not etcd_available(), reason=ETCD_MISSING)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if not etcd_available():
        pytest.skip(ETCD_MISSING)
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), ETCD_ADDRS)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


Opener = Callable[[], Awaitable[Store]]


async def lead(client: EtcdClient, key: str) -> Fence:
    """Become leader by hand: create the election key (no lease), return the fence."""
    ok, revision = await client.txn([cmp_absent(key)], [op_put(key, "me")])
    assert ok
    return Fence(key, revision)


async def leading_store(client: EtcdClient, prefix: str,
                        leader_key: str = "leader") -> tuple[EtcdStore, asyncio.Task[None]]:
    """A store loaded from etcd that leads (fenced by a key of its own) and its writer task."""
    store = EtcdStore(client, prefix)
    await store.load()
    store.lead(await lead(client, prefix + leader_key))
    return store, asyncio.create_task(store.run_writer())


class Backends:
    """Opens (and re-opens) one backend's store (`Store.flush` waits for writes to be stored)."""

    def __init__(self, kind: str, tmp: Path, etcd: EtcdCluster | None) -> None:
        self.kind = kind
        self.tmp = tmp
        self.etcd = etcd
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/"
        self.clients: list[EtcdClient] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stores: list[Store] = []

    async def open(self) -> Store:
        store: Store
        if self.kind == "sqlite":
            store = SQLiteStore(self.tmp / "store.db")
            store.open()
        else:
            assert self.etcd is not None
            client = EtcdClient(self.etcd.endpoints)
            self.clients.append(client)
            store, writer = await leading_store(client, self.prefix, f"leader-{len(self.clients)}")
            self.tasks.append(writer)
        self.stores.append(store)
        return store

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in self.stores:
            s.close()
        for c in self.clients:
            await c.close()


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=needs_etcd)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backends]:
    etcd = request.getfixturevalue("etcd") if request.param == "etcd" else None
    b = Backends(request.param, tmp_path, etcd)
    try:
        yield b
    finally:
        await b.close()


def node(n: int) -> Node:
    return Node(id=f"n{n}", description=NodeDescription(hostname=f"h{n}", addr=f"10.0.0.{n}"))


def service(name: str) -> Service:
    return Service(id=f"s-{name}", spec=ServiceSpec(name=name, task=ContainerSpec(image="whoami")))


# -- conformance: both backends ----------------------------------------------------------------


async def test_writes_survive_reopening(backend: Backends) -> None:
    s = await backend.open()
    s.update(lambda tx: [tx.create(node(i)) for i in range(1, 4)])
    n2 = s.view().must_get(Node, "n2")
    s.update(lambda tx: tx.update(n2.model_copy(update={"description": NodeDescription(
        hostname="renamed", addr="10.0.0.2")})))
    s.update(lambda tx: tx.delete(Node, "n3"))
    await s.flush()
    again = await backend.open()
    nodes = {n.id: n for n in again.view().all(Node)}
    assert set(nodes) == {"n1", "n2"}
    assert nodes["n2"].hostname == "renamed" and nodes["n2"].version == 2


async def test_stale_versions_are_refused_and_change_nothing(backend: Backends) -> None:
    s = await backend.open()
    s.update(lambda tx: tx.create(service("web")))
    stale = s.view().must_get(Service, "s-web")
    s.update(lambda tx: tx.update(stale))
    with pytest.raises(SequenceConflict):
        s.update(lambda tx: tx.update(stale))
    await s.flush()
    assert (await backend.open()).view().must_get(Service, "s-web").version == 2


async def test_a_failed_transaction_leaves_nothing(backend: Backends) -> None:
    s = await backend.open()

    def half(tx: WriteTx) -> None:
        tx.create(node(1))
        raise RuntimeError("changed my mind")
    with pytest.raises(RuntimeError):
        s.update(half)
    s.update(lambda tx: tx.create(node(2)))
    await s.flush()
    assert [n.id for n in (await backend.open()).view().all(Node)] == ["n2"]
    assert [n.id for n in s.view().all(Node)] == ["n2"]


async def test_watches_see_every_change_in_order(backend: Backends) -> None:
    s = await backend.open()
    with s.watch("node") as w:
        s.update(lambda tx: tx.create(node(1)))
        n1 = s.view().must_get(Node, "n1")
        s.update(lambda tx: tx.update(n1))
        s.update(lambda tx: tx.delete(Node, "n1"))
        s.update(lambda tx: tx.create(service("ignored")))
        events = w.drain()
    assert [(e.action, e.obj.id) for e in events] == [
        (Action.CREATE, "n1"), (Action.UPDATE, "n1"), (Action.DELETE, "n1")]


async def test_a_large_transaction_is_stored_whole(backend: Backends) -> None:
    s = await backend.open()
    s.update(lambda tx: [tx.create(node(i)) for i in range(300)])  # > etcd's 128 ops per txn
    await s.flush()
    assert len((await backend.open()).view().all(Node)) == 300


# -- etcd only --------------------------------------------------------------------------------


@needs_etcd
async def test_followers_replay_the_leaders_writes(etcd: EtcdCluster) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    async with _clients(etcd, 2) as (a, b):
        leader, writer = await leading_store(a, prefix)
        follower = EtcdStore(b, prefix)
        leader.update(lambda tx: tx.create(node(1)))
        await leader.flush()
        await follower.load()
        following = asyncio.create_task(follower.follow())
        try:
            with pytest.raises(NotWritable, match="not the leader"):
                follower.update(lambda tx: tx.create(node(9)))
            with follower.watch("node") as w:
                leader.update(lambda tx: tx.create(node(2)))
                leader.update(lambda tx: tx.delete(Node, "n1"))
                await leader.flush()
                got = [await asyncio.wait_for(w.__anext__(), 5) for _ in range(2)]
            assert [(e.action, e.obj.id) for e in got] == [(Action.CREATE, "n2"),
                                                            (Action.DELETE, "n1")]
            assert [n.id for n in follower.view().all(Node)] == ["n2"]
        finally:
            for t in (writer, following):
                t.cancel()
            await asyncio.gather(writer, following, return_exceptions=True)


@needs_etcd
async def test_a_fenced_out_leader_cannot_write(etcd: EtcdCluster) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    async with _clients(etcd, 1) as (a,):
        old, writer = await leading_store(a, prefix)
        old.update(lambda tx: tx.create(node(1)))
        await old.flush()
        # Another manager leads now: the key was deleted and made again.
        await a.txn([], [op_delete(prefix + "leader")])
        await lead(a, prefix + "leader")
        old.update(lambda tx: tx.create(node(2)))
        with pytest.raises(LeadershipLost):
            await asyncio.wait_for(writer, 5)
        with pytest.raises(NotWritable):
            await old.flush()
        with pytest.raises(NotWritable, match="another manager leads"):
            old.update(lambda tx: tx.create(node(3)))
        fresh = EtcdStore(a, prefix)
        await fresh.load()
        assert [n.id for n in fresh.view().all(Node)] == ["n1"]


@needs_etcd
async def test_a_write_dropped_by_stepping_down_is_not_reported_stored(etcd: EtcdCluster) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    async with _clients(etcd, 1) as (a,):
        s, writer = await leading_store(a, prefix)
        writer.cancel()  # the write below stays queued
        await asyncio.gather(writer, return_exceptions=True)
        s.update(lambda tx: tx.create(node(1)))
        waiting = asyncio.create_task(s.flush(timeout=5))
        await s.step_down("lease lost")
        # Told at once, with the reason — not left to time out (that message differs).
        with pytest.raises(NotWritable, match="^lease lost$"):
            await asyncio.wait_for(waiting, 1)
        await s.step_down("this manager is no longer the leader")
        assert s.error == "lease lost"  # the first, specific reason is the one shown


@needs_etcd
async def test_writes_survive_a_member_and_wait_out_a_lost_quorum(etcd: EtcdCluster) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    async with _clients(etcd, 1) as (a,):
        s, writer = await leading_store(a, prefix)
        try:
            first = a.endpoints.index(a.current_endpoint)
            etcd.kill(first)  # the member this client talks to
            s.update(lambda tx: tx.create(node(1)))
            await s.flush()  # another member answers
            etcd.kill((first + 1) % 3)  # 1 of 3 left: no quorum
            s.update(lambda tx: tx.create(node(2)))
            with pytest.raises(NotWritable, match="did not confirm"):
                await s.flush(timeout=2)
            assert {n.id for n in s.view().all(Node)} == {"n1", "n2"}  # reads still served
            await asyncio.to_thread(etcd.restart, first)
            await asyncio.to_thread(etcd.restart, (first + 1) % 3)
            await s.flush(timeout=20)  # the queued write lands once the quorum is back
            fresh = EtcdStore(a, prefix)
            await fresh.load()
            assert {n.id for n in fresh.view().all(Node)} == {"n1", "n2"}
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            for i in range(3):
                await asyncio.to_thread(etcd.restart, i)


@needs_etcd
async def test_a_watch_on_a_member_that_lost_its_leader_ends(etcd: EtcdCluster) -> None:
    # Without etcd's require-leader a watch on a cut-off member just goes quiet, and a
    # follower would miss every write from then on without knowing.
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    async with _clients(etcd, 1) as (a,):
        survivor = a.endpoints.index(a.current_endpoint)
        others = [i for i in range(3) if i != survivor]

        seen: list[str] = []

        async def follow() -> None:
            async for batch in a.watch(prefix, 1):
                seen.extend(ev.kv.key for ev in batch)

        watching = asyncio.create_task(follow())
        try:
            # The watch is live: it sees a write.
            await a.txn([], [op_put(prefix + "probe", "x")])
            await until(lambda: seen == [prefix + "probe"], what="the watch to see the write")
            assert not watching.done()
            for i in others:
                etcd.kill(i)
            with pytest.raises(EtcdUnavailable, match="no leader"):
                await asyncio.wait_for(watching, 20)
            assert a.current_endpoint != a.endpoints[survivor]  # the next try goes elsewhere
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            for i in others:
                await asyncio.to_thread(etcd.restart, i)


@needs_etcd
async def test_election_one_leader_then_the_next(etcd: EtcdCluster) -> None:
    key = f"/t-{uuid.uuid4().hex[:8]}/leader"
    async with _clients(etcd, 2) as (a, b):
        first, second = Election(a, "m1:2377", ttl=2, key=key), Election(b, "m2:2377", ttl=2, key=key)
        fence1 = await asyncio.wait_for(first.campaign(), 5)
        waiting = asyncio.create_task(second.campaign())
        holding = asyncio.create_task(first.hold())
        try:
            await asyncio.sleep(2.5)  # longer than the lease: the holder keeps it alive
            assert not waiting.done() and await first.leader() == "m1:2377"
            holding.cancel()
            await asyncio.gather(holding, return_exceptions=True)
            await first.resign()
            fence2 = await asyncio.wait_for(waiting, 5)
            assert await second.leader() == "m2:2377"
            assert fence2.create_revision > fence1.create_revision
        finally:
            for t in (waiting, holding):
                t.cancel()
            await asyncio.gather(waiting, holding, return_exceptions=True)
            await first.resign()
            await second.resign()


@needs_etcd
async def test_resigning_an_expired_lease_is_no_error(etcd: EtcdCluster) -> None:
    # The lease ran out (the holder found out from hold()): resigning must still just end
    # the term — before, etcd's "lease not found" escaped and ended the manager's HA loop.
    key = f"/t-{uuid.uuid4().hex[:8]}/leader"
    async with _clients(etcd, 1) as (a,):
        election = Election(a, "m1:2377", ttl=2, key=key)
        await asyncio.wait_for(election.campaign(), 5)
        await a.lease_revoke(election.lease)  # gone, as if it had expired
        await election.resign()
        assert election.lease == 0
        assert await election.leader() is None


class _clients:
    """`n` etcd clients over all members, closed afterwards."""

    def __init__(self, etcd: EtcdCluster, n: int) -> None:
        self.clients = [EtcdClient(etcd.endpoints) for _ in range(n)]

    async def __aenter__(self) -> tuple[EtcdClient, ...]:
        return tuple(self.clients)

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            await c.close()
