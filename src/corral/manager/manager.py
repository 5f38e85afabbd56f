"""Manager: the store plus the pipeline that runs on it (orchestrator → allocator → scheduler
→ dispatcher) and the control API that records users' intent."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from corral.manager.allocator import Allocator
from corral.manager.controlapi import ControlAPI
from corral.manager.dispatcher import Dispatcher
from corral.manager.orchestrator import Orchestrator
from corral.manager.secretbox import SecretBox
from corral.manager.scheduling import Scheduler
from corral.manager.updater import Updater
from corral.store.base import Store
from corral.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)


class Manager:
    """Owns the store and runs every manager component as a task of one group."""

    def __init__(self, store: Store, ca_dir: Path | None = None,
                 box: SecretBox | None = None) -> None:
        self.store = store
        self.control = ControlAPI(store, ca_dir, box)
        self.dispatcher = Dispatcher(store, self.control.open_secret)
        self.components = [Orchestrator(store), Allocator(store), Scheduler(store), Updater(store)]
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, data_dir: Path) -> Manager:
        store = SQLiteStore(data_dir / "manager" / "store.db")
        store.open()
        return cls(store, data_dir / "manager" / "ca",
                   SecretBox.at(data_dir / "manager" / "secrets.key"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="manager")

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.dispatcher.run(), name="dispatcher")
            for c in self.components:
                tg.create_task(c.run(), name=c.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.store.close()
