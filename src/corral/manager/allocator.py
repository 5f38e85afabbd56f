"""Allocator: gives new tasks the resources they need before scheduling (NEW → PENDING).

With the process runtime a task needs nothing cluster-wide yet (its port is picked by the
agent on its node, published ports are reserved per service by the control API); overlay IPs
and VIPs land here with the network issue.
"""

from __future__ import annotations

from corral.api.types import Task, TaskState, TaskStatus
from corral.manager.loop import Component
from corral.store.base import WriteTx


class Allocator(Component):
    """Moves NEW tasks to PENDING once allocated."""

    kinds = ("task",)
    name = "allocator"

    def tick(self, now: float) -> float | None:
        fresh = [t for t in self.store.view().all(Task) if t.status.state is TaskState.NEW]
        if fresh:
            def allocate(tx: WriteTx) -> None:
                for t in fresh:
                    status = TaskStatus(state=TaskState.PENDING, message="pending task scheduling",
                                        timestamp=now)
                    tx.update(t.model_copy(update={"status": status}))
            self.store.update(allocate)
        return None
