"""The emulator's data: rows, row versions, delete tombstones, optional SQLite file.

Rows live in memory (dicts keyed by GUID, with an index per alternate key); with a
``path`` every request's changes are written through to SQLite when the request
ends, so ``--store FILE`` keeps the organisation across restarts.

Features
    * One organisation-wide version counter, as Dataverse's row version: every write
      gives the row the next ``versionnumber`` (also its ETag ``W/"n"``).
    * Tombstones remember each delete's version (and the row's creation version), so
      change tracking reports deletes, including rows created and deleted between
      two polls.
    * ``atomic()`` savepoints: a failing change set or operation is rolled back in
      memory (and never reaches the file).
    * Alternate keys are unique (case-insensitive text, as SQL Server compares).

Configuration
    ``path``: SQLite file, or None for memory only. ``clock``: returns "now" (tests
    move it to expire tokens).

Limits
    * One lock serialises all reads and writes (the emulator is a single "server").
    * Tombstones are kept until ``purge_tombstones``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.dataverse.emulator.errors import CODE_DUPLICATE, ODataError
from connectors.dataverse.emulator.model import EntityDef, KeyDef, entity_from_json, entity_to_json
from connectors.dataverse.emulator.odata import format_datetime

__all__ = ["Store", "Table", "Tombstone"]

Clock = Callable[[], datetime]
Row = dict[str, Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entities (logical_name TEXT PRIMARY KEY, definition TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (entity TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
                                 PRIMARY KEY (entity, id));
CREATE TABLE IF NOT EXISTS tombstones (entity TEXT NOT NULL, id TEXT NOT NULL,
    version INTEGER NOT NULL, created_version INTEGER NOT NULL, deleted_at TEXT NOT NULL,
    PRIMARY KEY (entity, id));
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Tombstone:
    """A deleted row: the delete's version and the version that created the row."""

    version: int
    created_version: int
    deleted_at: str


class Table:
    """The rows of one entity, with alternate-key indexes.

    Args:
        entity: The table definition.
    """

    def __init__(self, entity: EntityDef) -> None:
        self.entity = entity
        self.rows: dict[str, Row] = {}
        self.tombstones: dict[str, Tombstone] = {}
        self.key_index: dict[str, dict[tuple[Any, ...], str]] = {k.name: {} for k in entity.keys}
        self._sorted: list[str] | None = None

    def sorted_ids(self) -> list[str]:
        """Row ids in ascending order (cached until the next insert or delete)."""
        if self._sorted is None:
            self._sorted = sorted(self.rows)
        return self._sorted

    def key_tuple(self, key: KeyDef, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """The index entry of ``values`` for ``key`` (None when a part is null)."""
        parts = []
        for name in key.attributes:
            value = values.get(name)
            if value is None:
                return None
            if isinstance(value, dict):  # lookup
                value = value.get("id")
            parts.append(value.casefold() if isinstance(value, str) else value)
        return tuple(parts)

    def find(self, key: KeyDef, values: dict[str, Any]) -> str | None:
        """The id of the row whose ``key`` columns equal ``values``, or None."""
        entry = self.key_tuple(key, values)
        return None if entry is None else self.key_index[key.name].get(entry)

    def _entries(self, row_id: str, row: Row) -> list[tuple[str, tuple[Any, ...]]]:
        """Index entries of ``row``, checked to be free (or already its own)."""
        entries = []
        for key in self.entity.keys:
            entry = self.key_tuple(key, row)
            if entry is None:
                continue
            holder = self.key_index[key.name].get(entry)
            if holder is not None and holder != row_id:
                raise _duplicate_key(self.entity, key, row)
            entries.append((key.name, entry))
        return entries

    def put(self, row_id: str, row: Row | None) -> None:
        """Replace (or remove, with None) a row, keeping the indexes right.

        Raises:
            ODataError: 412 when ``row`` takes an alternate key value another row holds
                (nothing is changed then).
        """
        entries = self._entries(row_id, row) if row is not None else []
        old = self.rows.get(row_id)
        if old is not None:
            for key in self.entity.keys:
                entry = self.key_tuple(key, old)
                if entry is not None and self.key_index[key.name].get(entry) == row_id:
                    del self.key_index[key.name][entry]
        if row is None:
            if old is not None:
                del self.rows[row_id]
                self._sorted = None
            return
        for name, entry in entries:
            self.key_index[name][entry] = row_id
        if old is None:
            self._sorted = None
        self.rows[row_id] = row


def _duplicate_key(entity: EntityDef, key: KeyDef, row: Row) -> ODataError:
    shown = ", ".join(f"{c}:{row.get(c)}" for c in key.attributes)
    return ODataError(412, CODE_DUPLICATE, (
        f"A record that has the attribute values {shown} already exists. The entity key "
        f"{key.name} requires that this set of attributes contains unique values. Select "
        "unique values and try again."))


class Store:
    """Every table of one emulated organisation.

    Args:
        entities: Table definitions to start with (kept if the file has them too).
        path: SQLite file to keep the data in, or None.
        clock: "Now" (UTC).
    """

    def __init__(self, entities: tuple[EntityDef, ...] | list[EntityDef], *,
                 path: str | Path | None = None, clock: Clock | None = None) -> None:
        self.lock = threading.RLock()
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.tables: dict[str, Table] = {}
        self.sets: dict[str, Table] = {}
        self.version = 0
        #: Delta tokens older than this version are expired.
        self.min_token_version = 0
        self.organization_id = str(uuid.uuid4())
        self._undo: list[tuple[Table, str, Row | None, Tombstone | None]] | None = None
        self._dirty: set[tuple[str, str]] = set()
        self._db: sqlite3.Connection | None = None
        for ent in entities:
            self._add_table(ent)
        if path is not None:
            self._open(Path(path))

    # -- tables ----------------------------------------------------------------------------

    def define(self, entity: EntityDef) -> Table:
        """Add a table, or replace a table's definition (its rows are kept).

        Returns:
            The table.
        """
        with self.lock:
            table = self._add_table(entity)
            if self._db is not None:
                with self._db:
                    self._db.execute("INSERT OR REPLACE INTO entities VALUES (?, ?)",
                                     (entity.logical_name, json.dumps(entity_to_json(entity))))
            return table

    def _add_table(self, entity: EntityDef) -> Table:
        old = self.tables.get(entity.logical_name)
        table = Table(entity)
        if old is not None:
            self.sets.pop(old.entity.entity_set, None)
            table.tombstones = old.tombstones
            for row_id, row in old.rows.items():
                table.put(row_id, row)
        self.tables[entity.logical_name] = table
        self.sets[entity.entity_set] = table
        return table

    def next_version(self) -> int:
        """Issue the next organisation-wide row version."""
        self.version += 1
        return self.version

    def now(self) -> str:
        """The clock as Dataverse formats date-times."""
        return format_datetime(self.clock())

    # -- writes ------------------------------------------------------------------------------

    def insert(self, table: Table, row_id: str, values: Row) -> Row:
        """Create a row with system columns set; key uniqueness is checked.

        Raises:
            ODataError: 412 when an alternate key value is taken.
        """
        self._remember(table, row_id)
        version, now = self.next_version(), self.now()
        row = {**values, table.entity.primary_id: row_id, "createdon": now, "modifiedon": now,
               "versionnumber": version}
        _compose(table.entity, row)
        table.put(row_id, row)
        table.tombstones.pop(row_id, None)
        self._dirty.add((table.entity.logical_name, row_id))
        return row

    def update(self, table: Table, row_id: str, changes: Row) -> Row:
        """Apply ``changes`` to a row and bump its version.

        Raises:
            ODataError: 412 when an alternate key value is taken.
        """
        self._remember(table, row_id)
        row = {**table.rows[row_id], **changes, "modifiedon": self.now(),
               "versionnumber": self.next_version()}
        _compose(table.entity, row)
        table.put(row_id, row)
        self._dirty.add((table.entity.logical_name, row_id))
        return row

    def delete(self, table: Table, row_id: str) -> None:
        """Delete a row and leave a tombstone."""
        self._remember(table, row_id)
        row = table.rows[row_id]
        table.put(row_id, None)
        table.tombstones[row_id] = Tombstone(self.next_version(), int(row["versionnumber"]),
                                             self.now())
        self._dirty.add((table.entity.logical_name, row_id))

    def purge_tombstones(self, before_version: int) -> int:
        """Forget tombstones of deletes older than ``before_version``.

        Returns:
            How many were removed.
        """
        removed = 0
        with self.lock:
            for table in self.tables.values():
                for row_id in [i for i, t in table.tombstones.items() if t.version < before_version]:
                    del table.tombstones[row_id]
                    self._dirty.add((table.entity.logical_name, row_id))
                    removed += 1
            self.flush()
        return removed

    # -- transactions ----------------------------------------------------------------------------

    @contextmanager
    def request(self) -> Iterator[None]:
        """Hold the lock for one request; write its changes to the file at the end."""
        with self.lock:
            try:
                yield
            finally:
                self.flush()

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """All writes inside succeed together or are undone (a savepoint)."""
        with self.lock:
            outer = self._undo
            self._undo = []
            try:
                yield
            except BaseException:
                for table, row_id, row, tomb in reversed(self._undo):
                    table.put(row_id, row)
                    if tomb is None:
                        table.tombstones.pop(row_id, None)
                    else:
                        table.tombstones[row_id] = tomb
                raise
            finally:
                done, self._undo = self._undo, outer
                if outer is not None:
                    outer.extend(done)

    def _remember(self, table: Table, row_id: str) -> None:
        if self._undo is not None:
            self._undo.append((table, row_id, table.rows.get(row_id),
                               table.tombstones.get(row_id)))

    # -- persistence -------------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(_SCHEMA)
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        if "organization_id" in meta:
            self.organization_id = meta["organization_id"]
            self.version = int(meta["version"])
            self.min_token_version = int(meta.get("min_token_version", "0"))
        for (definition,) in db.execute("SELECT definition FROM entities"):
            self._add_table(entity_from_json(json.loads(definition)))
        for entity, row_id, data in db.execute("SELECT entity, id, data FROM rows"):
            if entity in self.tables:
                self.tables[entity].put(row_id, json.loads(data))
        for entity, row_id, version, created, deleted_at in db.execute(
                "SELECT entity, id, version, created_version, deleted_at FROM tombstones"):
            if entity in self.tables:
                self.tables[entity].tombstones[row_id] = Tombstone(version, created, deleted_at)
        self._db = db
        with db:
            for table in self.tables.values():
                db.execute("INSERT OR REPLACE INTO entities VALUES (?, ?)",
                           (table.entity.logical_name, json.dumps(entity_to_json(table.entity))))
        self._save_meta()

    def flush(self) -> None:
        """Write the changed rows, tombstones and counters to the file (if any)."""
        if self._db is None or not self._dirty:
            self._dirty.clear()
            return
        db, dirty = self._db, self._dirty
        self._dirty = set()
        with db:
            for entity, row_id in dirty:
                table = self.tables[entity]
                row, tomb = table.rows.get(row_id), table.tombstones.get(row_id)
                if row is None:
                    db.execute("DELETE FROM rows WHERE entity = ? AND id = ?", (entity, row_id))
                else:
                    db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)",
                               (entity, row_id, json.dumps(row)))
                if tomb is None:
                    db.execute("DELETE FROM tombstones WHERE entity = ? AND id = ?",
                               (entity, row_id))
                else:
                    db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?, ?)",
                               (entity, row_id, tomb.version, tomb.created_version,
                                tomb.deleted_at))
            self._save_meta()

    def _save_meta(self) -> None:
        if self._db is None:
            return
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
            ("organization_id", self.organization_id), ("version", str(self.version)),
            ("min_token_version", str(self.min_token_version))])

    def expire_tokens(self) -> None:
        """Make every delta token issued so far expired (as after the retention period)."""
        with self.lock:
            self.version += 1  # tokens issued from now on carry this version or a later one
            self.min_token_version = self.version
            if self._db is not None:
                with self._db:
                    self._save_meta()

    def close(self) -> None:
        """Flush and close the file."""
        with self.lock:
            self.flush()
            if self._db is not None:
                self._db.close()
                self._db = None


def _compose(entity: EntityDef, row: Row) -> None:
    """Computed columns: contact's ``fullname`` from first and last name."""
    if entity.attribute("fullname") is not None and entity.attribute("lastname") is not None:
        parts = [row.get("firstname"), row.get("lastname")]
        row["fullname"] = " ".join(p for p in parts if p) or None
