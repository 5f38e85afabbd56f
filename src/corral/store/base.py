"""The store interface: read views, atomic updates with optimistic concurrency, typed watch events.

How this works: like swarmkit's memdb, the whole state lives in memory and every update runs
as a *synchronous* function against a write transaction, so nothing else on the event loop can
interleave with it. A backend only has to persist the changes of a committed transaction
(`_persist`) and load everything at start (`_load`). Objects are pydantic models treated as
immutable: change a copy (`model_copy(deep=True)`) and hand it to `tx.update`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from corral.api.errors import Conflict, NotFound, SequenceConflict
from corral.api.types import Cluster, Network, Node, Secret, Service, StoredObject, Task

Obj = TypeVar("Obj", Node, Service, Task, Cluster, Network, Secret)
T = TypeVar("T")

KINDS: dict[str, type[StoredObject]] = {
    "node": Node,
    "service": Service,
    "task": Task,
    "cluster": Cluster,
    "network": Network,
    "secret": Secret,
}


def kind_of(obj: StoredObject | type[StoredObject]) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    for name, k in KINDS.items():
        if k is cls:
            return name
    raise TypeError(f"not a stored object: {cls!r}")


class Action(str, Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class Event:
    """One committed change: the object after it (or before it, for a delete)."""

    action: Action
    kind: str
    obj: StoredObject
    old: StoredObject | None = None


Tables = dict[str, dict[str, StoredObject]]


class ReadTx:
    """A consistent read view of the store."""

    def __init__(self, tables: Tables) -> None:
        self._tables = tables

    def get(self, cls: type[Obj], id: str) -> Obj | None:
        obj = self._tables[kind_of(cls)].get(id)
        return obj  # type: ignore[return-value]

    def must_get(self, cls: type[Obj], id: str) -> Obj:
        obj = self.get(cls, id)
        if obj is None:
            raise NotFound(f"{kind_of(cls)} {id} not found")
        return obj

    def all(self, cls: type[Obj]) -> list[Obj]:
        return list(self._tables[kind_of(cls)].values())  # type: ignore[arg-type]

    # Convenience queries used everywhere; linear scans are fine at lab scale and keep the
    # backend interface tiny.
    def tasks_of_service(self, service_id: str) -> list[Task]:
        return [t for t in self.all(Task) if t.service_id == service_id]

    def tasks_of_node(self, node_id: str) -> list[Task]:
        return [t for t in self.all(Task) if t.node_id == node_id]

    def service_by_name(self, name: str) -> Service | None:
        for s in self.all(Service):
            if s.spec.name == name:
                return s
        return None

    def cluster(self) -> Cluster | None:
        return self.get(Cluster, "default")


class WriteTx(ReadTx):
    """A read view that can also create, update and delete; changes commit together."""

    def __init__(self, tables: Tables) -> None:
        super().__init__(tables)
        self.events: list[Event] = []
        self._copied: set[str] = set()

    def writable(self, kind: str) -> dict[str, StoredObject]:
        """The transaction's own copy of one table, made on its first write: a transaction
        copies only what it changes, and the committed tables stay untouched until commit."""
        if kind not in self._copied:
            self._tables[kind] = dict(self._tables[kind])
            self._copied.add(kind)
        return self._tables[kind]

    def create(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        if obj.id in self._tables[kind]:
            raise Conflict(f"{kind} {obj.id} already exists")
        stored = obj.model_copy(update={"version": 1})
        self.writable(kind)[obj.id] = stored
        self.events.append(Event(Action.CREATE, kind, stored))
        return stored

    def update(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        old = self._tables[kind].get(obj.id)
        if old is None:
            raise NotFound(f"{kind} {obj.id} not found")
        if old.version != obj.version:
            raise SequenceConflict(
                f"update out of sequence: {kind} {obj.id} is at version {old.version}, "
                f"the change was based on {obj.version}"
            )
        stored = obj.model_copy(update={"version": obj.version + 1})
        self.writable(kind)[obj.id] = stored
        self.events.append(Event(Action.UPDATE, kind, stored, old))
        return stored

    def delete(self, cls: type[Obj], id: str) -> None:
        kind = kind_of(cls)
        old = self.writable(kind).pop(id, None) if id in self._tables[kind] else None
        if old is not None:
            self.events.append(Event(Action.DELETE, kind, old, old))


class Watch:
    """An async iterator of committed events; close it when done."""

    def __init__(self, store: Store, kinds: frozenset[str] | None) -> None:
        self._store = store
        self.kinds = kinds
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()

    def drain(self) -> list[Event]:
        """Events already queued, without waiting (used to batch a burst of changes)."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    def close(self) -> None:
        self._store._watches.discard(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store:
    """The one watchable store every manager component reads and writes."""

    def __init__(self) -> None:
        self._tables: Tables = {k: {} for k in KINDS}
        self._watches: set[Watch] = set()
        self.error = ""  # why the last write failed (a replicated store; shown by the API)

    # -- backend hooks ------------------------------------------------------
    def _load(self) -> Iterable[StoredObject]:
        return ()

    def _persist(self, events: list[Event]) -> None:
        pass

    def close(self) -> None:
        pass

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every write made so far is durable (a local store: it already is)."""

    # -- public interface ---------------------------------------------------
    def open(self) -> None:
        for obj in self._load():
            self._tables[kind_of(obj)][obj.id] = obj

    def view(self) -> ReadTx:
        """A read view. Valid until the caller next awaits (the loop is the lock)."""
        return ReadTx(self._tables)

    def update(self, fn: Callable[[WriteTx], T]) -> T:
        """Run `fn` in a write transaction; commit its changes atomically or none of them."""
        staged: Tables = dict(self._tables)  # tables themselves are copied on first write
        tx = WriteTx(staged)
        result = fn(tx)
        if tx.events:
            self._persist(tx.events)
            self._tables = staged
            self._notify(tx.events)
        return result

    def _notify(self, events: list[Event]) -> None:
        for w in list(self._watches):
            for ev in events:
                if w.kinds is None or ev.kind in w.kinds:
                    w.queue.put_nowait(ev)

    def watch(self, *kinds: str) -> Watch:
        """Subscribe to committed events of the given kinds (all kinds if none given)."""
        w = Watch(self, frozenset(kinds) if kinds else None)
        self._watches.add(w)
        return w

    def iter_all(self) -> Iterator[StoredObject]:
        for table in self._tables.values():
            yield from table.values()


class MemoryStore(Store):
    """A store that keeps nothing across restarts (unit tests)."""
