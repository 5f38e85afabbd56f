"""The shape every manager component shares: reconcile from a snapshot, then wait for changes."""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod

from corral.api.errors import SequenceConflict
from corral.store.base import Store

log = logging.getLogger(__name__)


class Component(ABC):
    """A manager component: a loop over the store that never calls another component."""

    #: the object kinds whose changes wake this component
    kinds: tuple[str, ...] = ()
    name = "component"

    def __init__(self, store: Store) -> None:
        self.store = store

    @abstractmethod
    def tick(self, now: float) -> float | None:
        """Reconcile once; return when to run again even if nothing changes (or None)."""

    async def run(self) -> None:
        """Tick on every burst of store changes and at the times `tick` asks for."""
        with self.store.watch(*self.kinds) as watch:
            while True:
                wake_at: float | None
                try:
                    wake_at = self.tick(time.time())
                except SequenceConflict:
                    # Someone else wrote the same object first: reconcile again from fresh state.
                    wake_at = time.time() + 0.01
                except Exception:  # a bug must not kill the manager; log it and retry shortly
                    log.exception("%s: reconcile failed", self.name)
                    wake_at = time.time() + 1.0
                timeout = None if wake_at is None else max(0.0, wake_at - time.time())
                try:
                    await asyncio.wait_for(watch.queue.get(), timeout)
                except TimeoutError:
                    pass
                # Let a burst of writes land, then reconcile them all at once.
                await asyncio.sleep(0.005)
                watch.drain()
