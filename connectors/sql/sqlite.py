"""SQLite change tracking: a database-wide counter bumped by triggers.

Objects (all created by ``prepare_tracking``, all idempotent)::

    _syncbus_counter(value)                      one row, the last version handed out
    _syncbus_tombstones(version, entity, key, deleted_at)   + index (entity, version)
    <table>._sb_version INTEGER                  + index, back-filled at setup
    _syncbus_<table>_ai   AFTER INSERT   bump the counter, stamp the row
    _syncbus_<table>_au   AFTER UPDATE   same, WHEN the statement did not set _sb_version
    _syncbus_<table>_ad   AFTER DELETE   bump the counter, write a tombstone
    _syncbus_<table>_ak   AFTER UPDATE OF <primary key>   tombstone for the old key

The triggers stamp rows by primary key. The ``WHEN NEW._sb_version IS
OLD._sb_version`` guard means the triggers' own stamping UPDATE never fires the
update trigger again (and this holds even if a program turns ``recursive_triggers``
on). SQLite serializes writers, so version order is commit order and the cursor is
simply the highest version seen: ``{"after": N}``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from connectors.base import ChangePage, SchemaError
from connectors.sql.schema import INTERNAL_PREFIX, VERSION_COLUMN, TableInfo
from connectors.sql.tracking import TOMBSTONES, Tracker, dump_cursor, internal_name, merge_page

__all__ = ["SqliteTracker"]

COUNTER = f"{INTERNAL_PREFIX}counter"
#: Trigger kinds every tracked table has.
_TRIGGER_KINDS = ("ai", "au", "ad", "ak")


def _literal(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


class SqliteTracker(Tracker):
    """Change tracking for SQLite (see the module docstring)."""

    cursor_keys = ("after",)
    raw_rows = True

    # ------------------------------------------------------------------ names

    def _q(self, conn: sa.Connection, name: str) -> str:
        return str(conn.dialect.identifier_preparer.quote(name))

    def _prefix(self, conn: sa.Connection) -> str:
        """``"schema".`` or nothing: qualifies top-level statements (not trigger bodies,
        where SQLite resolves names in the trigger's own database)."""
        if self.schema is None:
            return ""
        return conn.dialect.identifier_preparer.quote_schema(self.schema) + "."

    def _master(self, conn: sa.Connection, kind: str, table: str | None = None) -> set[str]:
        sql = f"SELECT name FROM {self._prefix(conn)}sqlite_master WHERE type = ?"
        params: tuple[Any, ...] = (kind,)
        if table is not None:
            sql += " AND tbl_name = ?"
            params += (table,)
        return {r[0] for r in conn.exec_driver_sql(sql, params)}

    # ------------------------------------------------------------------ setup

    def prepare_common(self, conn: sa.Connection) -> list[str]:
        """Create ``_syncbus_counter`` and ``_syncbus_tombstones`` if missing."""
        p, lines = self._prefix(conn), []
        tables = self._master(conn, "table")
        if COUNTER not in tables:
            conn.exec_driver_sql(f"CREATE TABLE {p}{COUNTER} (value INTEGER NOT NULL)")
            lines.append(f"database: created table {COUNTER}")
        conn.exec_driver_sql(
            f"INSERT INTO {p}{COUNTER} (value) SELECT 0 "
            f"WHERE NOT EXISTS (SELECT 1 FROM {p}{COUNTER})"
        )
        if TOMBSTONES not in tables:
            conn.exec_driver_sql(
                f"CREATE TABLE {p}{TOMBSTONES} (version INTEGER NOT NULL, entity TEXT NOT NULL, "
                "key TEXT NOT NULL, deleted_at TEXT NOT NULL)"
            )
            lines.append(f"database: created table {TOMBSTONES}")
        index = f"{TOMBSTONES}_entity_version"
        if index not in self._master(conn, "index"):
            conn.exec_driver_sql(f"CREATE INDEX {p}{index} ON {TOMBSTONES} (entity, version)")
            lines.append(f"database: created index {index}")
        return lines

    def prepare_table(self, conn: sa.Connection, info: TableInfo) -> list[str]:
        """Add ``_sb_version`` (+ index), back-fill it and create the four triggers.

        Raises:
            SchemaError: the table has no primary key.
        """
        if not info.key:
            raise SchemaError(
                f"{self.connector}: table {info.name!r} has no primary key; "
                "change tracking needs one", entity=info.name,
            )
        p, t = self._prefix(conn), self._q(conn, info.name)
        lines: list[str] = []
        if VERSION_COLUMN not in info.table.c:
            conn.exec_driver_sql(f"ALTER TABLE {p}{t} ADD COLUMN {VERSION_COLUMN} INTEGER")
            lines.append(f"added column {VERSION_COLUMN}")
        index = internal_name("ver", info.name)
        if index not in self._master(conn, "index", info.name):
            conn.exec_driver_sql(
                f"CREATE INDEX {p}{self._q(conn, index)} ON {t} ({VERSION_COLUMN})"
            )
            lines.append(f"created index {index}")
        filled = self._backfill(conn, info)
        if filled:
            lines.append(f"back-filled {VERSION_COLUMN} of {filled} existing row(s)")
        existing = self._master(conn, "trigger", info.name)
        for name, ddl in self._trigger_ddl(conn, info):
            if name not in existing:
                conn.exec_driver_sql(ddl)
                lines.append(f"created trigger {name}")
        return [f"{info.name}: {line}" for line in lines] or [f"{info.name}: already prepared"]

    def _backfill(self, conn: sa.Connection, info: TableInfo) -> int:
        """Give every row without a version its own, in primary-key order."""
        p, t = self._prefix(conn), self._q(conn, info.name)
        pk = [self._q(conn, c) for c in info.key]
        match = " AND ".join(f"{t}.{c} = todo.{c}" for c in pk)
        conn.exec_driver_sql(
            f"WITH todo AS (SELECT {', '.join(pk)}, row_number() OVER (ORDER BY {', '.join(pk)}) "
            f"AS _sb_rn FROM {p}{t} WHERE {VERSION_COLUMN} IS NULL) "
            f"UPDATE {p}{t} SET {VERSION_COLUMN} = (SELECT value FROM {p}{COUNTER}) + todo._sb_rn "
            f"FROM todo WHERE {match}"
        )
        # sqlite3 reports no rowcount for a statement starting with WITH: ask SQLite.
        count = int(conn.exec_driver_sql("SELECT changes()").scalar_one())
        if count:
            conn.exec_driver_sql(
                f"UPDATE {p}{COUNTER} SET value = "
                f"max(value, (SELECT max({VERSION_COLUMN}) FROM {p}{t}))"
            )
        return count

    def _trigger_ddl(self, conn: sa.Connection, info: TableInfo) -> list[tuple[str, str]]:
        p, t, v = self._prefix(conn), self._q(conn, info.name), VERSION_COLUMN
        pk = [self._q(conn, c) for c in info.key]
        bump = f"UPDATE {COUNTER} SET value = value + 1;"
        stamp = (
            f"UPDATE {t} SET {v} = (SELECT value FROM {COUNTER}) "
            f"WHERE {' AND '.join(f'{c} = NEW.{c}' for c in pk)};"
        )
        key = ", ".join(f"{_literal(name)}, OLD.{c}" for name, c in zip(info.key, pk, strict=True))
        tomb = (
            f"INSERT INTO {TOMBSTONES} (version, entity, key, deleted_at) VALUES ("
            f"(SELECT value FROM {COUNTER}), {_literal(info.name)}, json_object({key}), "
            "strftime('%Y-%m-%d %H:%M:%f', 'now'));"
        )
        rekeyed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in pk)
        bodies = {
            "ai": f"AFTER INSERT ON {t} FOR EACH ROW BEGIN {bump} {stamp} END",
            "au": f"AFTER UPDATE ON {t} FOR EACH ROW WHEN NEW.{v} IS OLD.{v} "
                  f"BEGIN {bump} {stamp} END",
            "ad": f"AFTER DELETE ON {t} FOR EACH ROW BEGIN {bump} {tomb} END",
            "ak": f"AFTER UPDATE OF {', '.join(pk)} ON {t} FOR EACH ROW WHEN {rekeyed} "
                  f"BEGIN {bump} {tomb} END",
        }
        result = []
        for kind in _TRIGGER_KINDS:
            name = internal_name(kind, info.name)
            result.append((name, f"CREATE TRIGGER {p}{self._q(conn, name)} {bodies[kind]}"))
        return result

    def probe(self, conn: sa.Connection, table: sa.Table) -> bool:
        """True when the four triggers of ``table`` exist."""
        wanted = {internal_name(kind, table.name) for kind in _TRIGGER_KINDS}
        return wanted <= self._master(conn, "trigger", table.name)

    # ------------------------------------------------------------------ reading

    def has_changes(self, conn: sa.Connection, info: TableInfo, cursor: str | None) -> bool:
        """Highest row version and highest tombstone version vs the cursor (two index
        seeks)."""
        state = self.cursor_state(cursor)
        after = int(state["after"]) if state else 0
        ver = info.table.c[VERSION_COLUMN]
        tomb = self.tombstones(sa.Text())
        top_row = conn.scalar(sa.select(ver).where(ver.is_not(None)).order_by(ver.desc()).limit(1))
        top_tomb = conn.scalar(
            sa.select(tomb.c.version).where(tomb.c.entity == info.name)
            .order_by(tomb.c.version.desc()).limit(1)
        )
        return max(top_row or 0, top_tomb or 0) > after

    def read_page(
        self, conn: sa.Connection, info: TableInfo, cursor: str | None, page_size: int
    ) -> ChangePage:
        """Rows and tombstones with a version above the cursor, merged, ``page_size`` at
        most (two bounded index range scans)."""
        state = self.cursor_state(cursor)
        after = int(state["after"]) if state else 0
        ver = info.table.c[VERSION_COLUMN]
        tomb = self.tombstones(sa.Text())
        rows = conn.execute(
            self.select_rows(info, raw=self.raw_rows).where(ver > after).order_by(ver).limit(page_size + 1)
        ).all()
        tombs = conn.execute(
            sa.select(tomb.c.version, tomb.c.key)
            .where(tomb.c.entity == info.name, tomb.c.version > after)
            .order_by(tomb.c.version).limit(page_size + 1)
        ).all()
        records, more = merge_page(
            [self.upsert_record(info, r, decode=self.raw_rows) for r in rows],
            [self.delete_record(info, v, k, decode=True) for v, k in tombs],
            page_size,
        )
        last = int(records[-1].version) if records else after
        return ChangePage(records=records, next_cursor=dump_cursor({"after": last}), more=more)
