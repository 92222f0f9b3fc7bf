"""The ids (and last versions) of every row the detector has reported, per table.

Dataverse forgets deletes when a delta token expires: the only way to find rows
deleted during the gap is to compare what we reported with what exists now. This
file remembers what was reported.

Features
    * Generations: a full read tags every row it sees with a new generation; rows of
      older generations are the ones deleted meanwhile (:meth:`KeySet.missing`), and
      are forgotten (:meth:`KeySet.purge`) once the cursor after them is committed.
    * The last version seen per row gives deletes a version just above it, so a
      delete always wins over the upserts before it and loses to a later re-creation.
    * SQLite in WAL mode; one short transaction per page.

Configuration
    ``path``: the SQLite file (``<state_dir>/<connection>.keys.db``).

Limits
    * Local to one host: when several workers poll the same organisation, a worker
      that takes over a source after an expired token only knows what it reported
      itself (put ``state_dir`` on shared storage, or keep one detector host).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

__all__ = ["KeySet"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (entity TEXT NOT NULL, id TEXT NOT NULL, version INTEGER,
                                 gen INTEGER NOT NULL, PRIMARY KEY (entity, id));
CREATE TABLE IF NOT EXISTS generations (entity TEXT PRIMARY KEY, gen INTEGER NOT NULL);
"""


class KeySet:
    """Reported row ids per table, in a SQLite file.

    Args:
        path: The file (created with its directory when missing).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def generation(self, entity: str) -> int:
        """The table's current generation (0 before the first full read)."""
        with self._lock:
            row = self._db.execute("SELECT gen FROM generations WHERE entity = ?",
                                   (entity,)).fetchone()
        return int(row[0]) if row else 0

    def new_generation(self, entity: str) -> int:
        """Start a full read: a generation above every earlier one."""
        with self._lock, self._db:
            row = self._db.execute("SELECT gen FROM generations WHERE entity = ?",
                                   (entity,)).fetchone()
            gen = (int(row[0]) if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO generations VALUES (?, ?)", (entity, gen))
        return gen

    def seen(self, entity: str, rows: Iterable[tuple[str, int | None]], gen: int) -> None:
        """Record rows reported as existing (id, version) with generation ``gen``."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO keys VALUES (?, ?, ?, ?) ON CONFLICT (entity, id) DO UPDATE "
                "SET version = excluded.version, gen = MAX(gen, excluded.gen)",
                [(entity, row_id, version, gen) for row_id, version in rows])

    def deleted(self, entity: str, ids: Iterable[str]) -> None:
        """Forget rows reported as deleted."""
        with self._lock, self._db:
            self._db.executemany("DELETE FROM keys WHERE entity = ? AND id = ?",
                                 [(entity, i) for i in ids])

    def versions(self, entity: str, ids: list[str]) -> dict[str, int]:
        """The last version seen of each of ``ids`` that is known."""
        out: dict[str, int] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for row_id, version in self._db.execute(
                        f"SELECT id, version FROM keys WHERE entity = ? AND id IN ({marks})",
                        (entity, *chunk)):
                    if version is not None:
                        out[row_id] = int(version)
        return out

    def missing(self, entity: str, gen: int) -> list[tuple[str, int | None]]:
        """Rows not seen by the full read of generation ``gen`` (id, last version)."""
        with self._lock:
            return [(str(r[0]), r[1]) for r in self._db.execute(
                "SELECT id, version FROM keys WHERE entity = ? AND gen < ? ORDER BY id",
                (entity, gen))]

    def purge(self, entity: str, gen: int) -> int:
        """Forget rows older than generation ``gen`` (after their deletes were committed).

        Returns:
            How many rows were forgotten.
        """
        with self._lock, self._db:
            return self._db.execute("DELETE FROM keys WHERE entity = ? AND gen < ?",
                                    (entity, gen)).rowcount

    def count(self, entity: str) -> int:
        """Rows known for ``entity``."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM keys WHERE entity = ?",
                                        (entity,)).fetchone()[0])

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
