"""Manager: the store plus the pipeline that runs on it (orchestrator → allocator → scheduler
→ dispatcher) and the control API that records users' intent.

With SQLite there is one manager and it always leads. With etcd there may be several: each
keeps a replica of the store (following etcd's watch stream) and campaigns for leadership;
the leader alone runs the pipeline and writes, fenced by its election key. When it loses the
lease (it died, or lost etcd), the next campaigner takes over within the lease's TTL.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.manager.allocator import Allocator
from corral.manager.ca import CertificateAuthority
from corral.manager.controlapi import ControlAPI, ManagerKeys
from corral.manager.dispatcher import Dispatcher
from corral.manager.election import DEFAULT_TTL, Election
from corral.manager.etcdconf import EtcdConfig
from corral.manager.orchestrator import Orchestrator
from corral.manager.scheduling import Scheduler
from corral.manager.secretbox import SecretBox
from corral.manager.updater import Updater
from corral.security.files import write_private
from corral.security.pki import CertKey
from corral.store.base import Store
from corral.store.etcd import EtcdStore, Fence, LeadershipLost
from corral.store.etcd_client import EtcdRefused, EtcdUnavailable
from corral.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

def install_manager_keys(data_dir: Path, keys: ManagerKeys) -> None:
    """A joining manager's share of the swarm: the CA (key 0600), the secrets key, etcd."""
    mdir = data_dir / "manager"
    CertificateAuthority(mdir / "ca", CertKey(keys.ca_cert.encode(), keys.ca_key.encode()),
                         keys.ca_bundle.encode(), keys.ca_cross.encode()).save()
    write_private(mdir / "secrets.key", base64.b64decode(keys.box_key))
    keys.etcd.save(data_dir)


class Manager:
    """Owns the store and runs every manager component — while it leads."""

    def __init__(self, store: Store, ca_dir: Path | None = None,
                 box: SecretBox | None = None, election: Election | None = None,
                 etcd: EtcdConfig | None = None) -> None:
        self.store = store
        self.control = ControlAPI(store, ca_dir, box, etcd)
        self.dispatcher = Dispatcher(store, self.control.open_secret)
        self.components = [Orchestrator(store), Allocator(store), Scheduler(store), Updater(store)]
        self.election = election
        self.leading = election is None
        self.leader = ""  # the leader's "node_id@addr" as the election key says ("" = unknown)
        self._leading_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, data_dir: Path, me: str = "") -> Manager:
        """This node's manager: on etcd if the swarm keeps its store there, else SQLite.
        `me` ("node_id@host:port") is what the election key says while this one leads."""
        mdir = data_dir / "manager"
        box = SecretBox.at(mdir / "secrets.key")
        etcd = EtcdConfig.load(data_dir)
        if etcd is None:
            store = SQLiteStore(mdir / "store.db")
            store.open()
            return cls(store, mdir / "ca", box)
        client = etcd.client()
        return cls(EtcdStore(client), mdir / "ca", box, Election(client, me), etcd)

    @property
    def ha(self) -> bool:
        return self.election is not None

    @property
    def leader_id(self) -> str:
        return self.leader.partition("@")[0] if self.ha else ""

    @property
    def leader_addr(self) -> str:
        return self.leader.partition("@")[2]

    def start(self) -> None:
        run = self._run_ha() if self.ha else self._run_pipeline()
        self._task = asyncio.create_task(run, name="manager")

    async def wait_leading(self, timeout: float) -> None:
        """Until this manager leads (raises TimeoutError)."""
        async def leading() -> None:
            while not self.leading:
                self._leading_changed.clear()
                await self._leading_changed.wait()
        await asyncio.wait_for(leading(), timeout)

    def store_error(self) -> str:
        return self.store.error or "no etcd member answers"

    async def _run_pipeline(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.dispatcher.run(), name="dispatcher")
            for c in self.components:
                tg.create_task(c.run(), name=c.name)

    async def _run_ha(self) -> None:
        """Follow, campaign, lead until the lease is lost; again, until cancelled."""
        store = self.store
        election = self.election
        assert isinstance(store, EtcdStore) and election is not None
        tracker = asyncio.create_task(self._track_leader(election))
        try:
            while True:
                await self._retry(store.load)
                follower = asyncio.create_task(store.follow(), name="store-follow")
                try:
                    fence = await election.campaign()
                finally:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
                failed = False
                try:
                    await self._lead(store, election, fence)
                except* LeadershipLost:
                    log.warning("manager: lost the leadership; following again")
                except* Exception as group:  # a manager never dies quietly: log, start over
                    log.error("manager: leading failed: %r; following again",
                              group.exceptions[0])
                    failed = True
                finally:
                    # At once: no moment of claiming the lead without running it.
                    await store.step_down("this manager is no longer the leader")
                    self._set_leading(False, "")
                    await election.resign()
                if failed:
                    await asyncio.sleep(DEFAULT_TTL / 3)  # not straight back into the same fault
        finally:
            tracker.cancel()
            await asyncio.gather(tracker, return_exceptions=True)

    async def _lead(self, store: EtcdStore, election: Election, fence: Fence) -> None:
        """Hold the lease from the first moment, load what the old leader wrote last, then
        write and run the pipeline until something fails (a lost lease: LeadershipLost)."""
        async def hold() -> None:
            await election.hold()
            raise LeadershipLost("the election lease is gone")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hold(), name="election-hold")
            await self._retry(store.load)
            store.lead(fence)
            self._set_leading(True, election.me)
            tg.create_task(store.run_writer(), name="store-writer")
            tg.create_task(self._run_pipeline(), name="pipeline")

    def _set_leading(self, leading: bool, leader: str) -> None:
        self.leading = leading
        self.leader = leader  # "" on losing the lead: unknown until etcd says who has it
        self._leading_changed.set()

    async def _track_leader(self, election: Election) -> None:
        """Keep `leader` current on followers (the API points agents and writes there). When
        etcd cannot say for longer than a lease lasts, nobody can be leading any more."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            try:
                self.leader = (await election.leader()) or ""
                last_ok = loop.time()
            except (EtcdUnavailable, EtcdRefused):
                if loop.time() - last_ok > election.ttl and not self.leading:
                    self.leader = ""
            await asyncio.sleep(min(1.0, election.ttl / 3))

    @staticmethod
    async def _retry(op: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await op()
                return
            except (EtcdUnavailable, EtcdRefused) as exc:
                log.warning("manager: etcd unavailable: %s", exc)
                await asyncio.sleep(DEFAULT_TTL / 3)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.election is not None:
            await self.election.resign()
            await self.election.client.close()
        self.store.close()
