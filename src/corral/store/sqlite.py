"""SQLite (WAL) backend: the single manager's durable copy of the store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from corral.api.types import StoredObject
from corral.store.base import KINDS, Action, Event, Store


class SQLiteStore(Store):
    """Persists every committed transaction in one SQLite transaction; loads all at open."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only a power cut may lose the last commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS objects ("
            " kind TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, data TEXT NOT NULL,"
            " PRIMARY KEY (kind, id))"
        )

    def _load(self) -> Iterable[StoredObject]:
        for kind, data in self._db.execute("SELECT kind, data FROM objects"):
            cls = KINDS.get(kind)
            if cls is not None:
                yield cls.model_validate_json(data)

    def _persist(self, events: list[Event]) -> None:
        with self._db:  # one transaction: all of the update or none of it
            self._db.execute("BEGIN")
            for ev in events:
                if ev.action is Action.DELETE:
                    self._db.execute(
                        "DELETE FROM objects WHERE kind = ? AND id = ?", (ev.kind, ev.obj.id)
                    )
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO objects (kind, id, version, data) VALUES (?,?,?,?)",
                        (ev.kind, ev.obj.id, ev.obj.version, ev.obj.model_dump_json()),
                    )

    def close(self) -> None:
        self._db.close()
