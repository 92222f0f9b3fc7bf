"""PostgreSQL change tracking: a sequence, transaction ids and snapshot windows.

Objects (all created by ``prepare_tracking``, all idempotent)::

    _syncbus_rowversion                  sequence: the database-wide version counter
    _syncbus_tombstones(version, entity, key jsonb, deleted_at, xid xid8)
                                         + indexes (entity, version) and (entity, xid)
    _syncbus_stamp()                     BEFORE INSERT OR UPDATE: NEW._sb_version := nextval,
                                         NEW._sb_xid := pg_current_xact_id()
    _syncbus_tombstone(pk columns...)    AFTER DELETE, and AFTER UPDATE OF <pk> when the key
                                         changed: a tombstone for the OLD key
    <table>._sb_version bigint, <table>._sb_xid xid8     + one index each, back-filled

The trigger functions are ``SECURITY DEFINER`` with a fixed ``search_path``, so every
program writing the table is tracked whatever its grants and settings.

Why snapshots: sequence values are taken when a row is written, not when its
transaction commits. T1 takes version 100, T2 takes 101 and commits first; a poller
that read 101 and remembered "after 101" would lose 100 for ever when T1 commits
(the problem SQL Server's ``MIN_ACTIVE_ROWVERSION()`` solves). So the cursor holds
snapshots instead::

    {"prev": <snapshot of the previous window or null>, "cur": <snapshot or null>,
     "after": <last version returned inside the current window>}

A window is the set of rows (and tombstones) whose ``_sb_xid`` is visible in ``cur``
and not visible in ``prev`` — exactly the transactions that committed between the
two snapshots. ``cur`` is taken by the first page of a window and kept until the
window is exhausted; inside it, pages go in ``_sb_version`` order from ``after``.
The next window starts with ``prev = cur``. A transaction still running when ``cur``
was taken is not visible in it, so it lands, whole, in a later window: nothing is
lost, whatever the commit order. A row re-written by a newer transaction leaves the
window and shows up in the next one with its new version. ``prev = null`` (first
poll) means "nothing seen yet": every committed row is new.

Cost: ``_sb_xid >= pg_snapshot_xmin(prev) AND _sb_xid < pg_snapshot_xmax(cur)`` is
a sargable range on the ``_sb_xid`` index; visibility is then checked per candidate.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import UserDefinedType

from connectors.base import ChangePage, SchemaError
from connectors.sql.schema import INTERNAL_PREFIX, VERSION_COLUMN, XID_COLUMN, TableInfo
from connectors.sql.tracking import TOMBSTONES, Tracker, dump_cursor, internal_name, merge_page

__all__ = ["PostgresTracker"]

SEQUENCE = f"{INTERNAL_PREFIX}rowversion"
STAMP_FUNCTION = f"{INTERNAL_PREFIX}stamp"
TOMBSTONE_FUNCTION = f"{INTERNAL_PREFIX}tombstone"
#: Trigger names (per table in PostgreSQL, so fixed).
STAMP_TRIGGER = f"{INTERNAL_PREFIX}stamp"
DELETE_TRIGGER = f"{INTERNAL_PREFIX}delete"
REKEY_TRIGGER = f"{INTERNAL_PREFIX}rekey"
_TRIGGERS = frozenset({STAMP_TRIGGER, DELETE_TRIGGER, REKEY_TRIGGER})
#: Advisory lock key serializing concurrent ``prepare_tracking`` runs.
_PREPARE_LOCK = "syncbus.prepare_tracking"


class PgSnapshot(UserDefinedType[str]):
    """The ``pg_snapshot`` type, for casting cursor strings in queries."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "pg_snapshot"


def _snap(value: str) -> sa.ColumnElement[Any]:
    return sa.cast(sa.literal(value, sa.Text()), PgSnapshot())


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def window(xid: sa.ColumnElement[Any], prev: str | None, cur: str) -> list[sa.ColumnElement[bool]]:
    """Conditions selecting what transactions committed between ``prev`` and ``cur``.

    Args:
        xid: The ``xid8`` column (``_sb_xid`` or the tombstone's ``xid``).
        prev: The previous window's snapshot; None = nothing seen yet.
        cur: This window's snapshot.
    """
    conds: list[sa.ColumnElement[bool]] = [
        xid < sa.func.pg_snapshot_xmax(_snap(cur)),
        sa.func.pg_visible_in_snapshot(xid, _snap(cur), type_=sa.Boolean),
    ]
    if prev is not None:
        conds += [
            xid >= sa.func.pg_snapshot_xmin(_snap(prev)),
            sa.not_(sa.func.pg_visible_in_snapshot(xid, _snap(prev), type_=sa.Boolean)),
        ]
    return conds


class PostgresTracker(Tracker):
    """Change tracking for PostgreSQL 13+ (see the module docstring)."""

    cursor_keys = ("prev", "cur", "after")

    def __init__(self, connector: str, schema: str | None) -> None:
        super().__init__(connector, schema)
        self._resolved: str | None = schema

    # ------------------------------------------------------------------ names

    def _schema(self, conn: sa.Connection) -> str:
        """The schema name to qualify with (``current_schema()`` when none was given)."""
        if self._resolved is None:
            self._resolved = str(conn.exec_driver_sql("SELECT current_schema()").scalar_one())
        return self._resolved

    def _qual(self, conn: sa.Connection, name: str) -> str:
        prep = conn.dialect.identifier_preparer
        return f"{prep.quote_schema(self._schema(conn))}.{prep.quote(name)}"

    def tombstone_table(self, conn: sa.Connection) -> sa.Table:
        """The tombstone table, qualified with the resolved schema."""
        return self.tombstones(sa.Text(), self._schema(conn))

    def _exists(self, conn: sa.Connection, name: str) -> bool:
        found = conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": self._qual(conn, name)})
        return found.scalar() is not None

    # ------------------------------------------------------------------ setup

    def prepare_common(self, conn: sa.Connection) -> list[str]:
        """Create the sequence, tombstone table, its indexes and the trigger functions."""
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": _PREPARE_LOCK})
        lines: list[str] = []
        seq, tomb = self._qual(conn, SEQUENCE), self._qual(conn, TOMBSTONES)
        if not self._exists(conn, SEQUENCE):
            conn.exec_driver_sql(f"CREATE SEQUENCE {seq}")
            lines.append(f"database: created sequence {SEQUENCE}")
        if not self._exists(conn, TOMBSTONES):
            conn.exec_driver_sql(
                f"CREATE TABLE {tomb} (version bigint NOT NULL, entity text NOT NULL, "
                "key jsonb NOT NULL, deleted_at timestamptz NOT NULL DEFAULT now(), "
                "xid xid8 NOT NULL)"
            )
            lines.append(f"database: created table {TOMBSTONES}")
        for suffix, cols in (("entity_version", "entity, version"), ("entity_xid", "entity, xid")):
            index = f"{TOMBSTONES}_{suffix}"
            if not self._exists(conn, index):
                conn.exec_driver_sql(f"CREATE INDEX {self._q(conn, index)} ON {tomb} ({cols})")
                lines.append(f"database: created index {index}")
        for name, body in self._functions(conn).items():
            current = conn.execute(
                sa.text(
                    "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE n.nspname = :s AND p.proname = :f"
                ),
                {"s": self._schema(conn), "f": name},
            ).scalar()
            if current == body:
                continue
            conn.exec_driver_sql(
                f"CREATE OR REPLACE FUNCTION {self._qual(conn, name)}() RETURNS trigger "
                "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp "
                f"AS $syncbus${body}$syncbus$"
            )
            lines.append(f"database: {'created' if current is None else 'updated'} function {name}")
        return lines

    def _q(self, conn: sa.Connection, name: str) -> str:
        return str(conn.dialect.identifier_preparer.quote(name))

    def _functions(self, conn: sa.Connection) -> dict[str, str]:
        nextval = f"nextval({_literal(self._qual(conn, SEQUENCE))}::regclass)"
        return {
            STAMP_FUNCTION: (
                "\nBEGIN\n"
                f"  NEW.{VERSION_COLUMN} := {nextval};\n"
                f"  NEW.{XID_COLUMN} := pg_current_xact_id();\n"
                "  RETURN NEW;\n"
                "END\n"
            ),
            TOMBSTONE_FUNCTION: (
                "\nDECLARE\n"
                "  old_row jsonb := to_jsonb(OLD);\n"
                "  k jsonb := '{}'::jsonb;\n"
                "  c text;\n"
                "BEGIN\n"
                "  FOREACH c IN ARRAY TG_ARGV LOOP\n"
                "    k := k || jsonb_build_object(c, old_row -> c);\n"
                "  END LOOP;\n"
                f"  INSERT INTO {self._qual(conn, TOMBSTONES)} "
                "(version, entity, key, deleted_at, xid)\n"
                f"  VALUES ({nextval}, TG_TABLE_NAME, k, now(), pg_current_xact_id());\n"
                "  RETURN NULL;\n"
                "END\n"
            ),
        }

    def prepare_table(self, conn: sa.Connection, info: TableInfo) -> list[str]:
        """Add ``_sb_version`` and ``_sb_xid`` (+ indexes), back-fill, create the triggers.

        Raises:
            SchemaError: the table has no primary key.
        """
        if not info.key:
            raise SchemaError(
                f"{self.connector}: table {info.name!r} has no primary key; "
                "change tracking needs one", entity=info.name,
            )
        t, lines = self._qual(conn, info.name), []
        for column, type_ in ((VERSION_COLUMN, "bigint"), (XID_COLUMN, "xid8")):
            if column not in info.table.c:
                conn.exec_driver_sql(f"ALTER TABLE {t} ADD COLUMN {column} {type_}")
                lines.append(f"added column {column}")
        filled = conn.exec_driver_sql(
            f"UPDATE {t} SET {VERSION_COLUMN} = nextval({_literal(self._qual(conn, SEQUENCE))}"
            f"::regclass), {XID_COLUMN} = pg_current_xact_id() "
            f"WHERE {VERSION_COLUMN} IS NULL OR {XID_COLUMN} IS NULL"
        ).rowcount
        if filled > 0:
            lines.append(f"back-filled {VERSION_COLUMN} of {filled} existing row(s)")
        for kind, column in (("ver", VERSION_COLUMN), ("xid", XID_COLUMN)):
            index = internal_name(kind, info.name)
            if not self._exists(conn, index):
                conn.exec_driver_sql(f"CREATE INDEX {self._q(conn, index)} ON {t} ({column})")
                lines.append(f"created index {index}")
        existing = self._triggers(conn, info.table)
        for name, ddl in self._trigger_ddl(conn, info).items():
            if name not in existing:
                conn.exec_driver_sql(ddl)
                lines.append(f"created trigger {name}")
        return [f"{info.name}: {line}" for line in lines] or [f"{info.name}: already prepared"]

    def _trigger_ddl(self, conn: sa.Connection, info: TableInfo) -> dict[str, str]:
        t = self._qual(conn, info.name)
        pk = [self._q(conn, c) for c in info.key]
        args = ", ".join(_literal(c) for c in info.key)
        tombstone = f"EXECUTE FUNCTION {self._qual(conn, TOMBSTONE_FUNCTION)}({args})"
        rekeyed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in pk)
        return {
            STAMP_TRIGGER: f"CREATE TRIGGER {STAMP_TRIGGER} BEFORE INSERT OR UPDATE ON {t} "
                           f"FOR EACH ROW EXECUTE FUNCTION {self._qual(conn, STAMP_FUNCTION)}()",
            DELETE_TRIGGER: f"CREATE TRIGGER {DELETE_TRIGGER} AFTER DELETE ON {t} "
                            f"FOR EACH ROW {tombstone}",
            REKEY_TRIGGER: f"CREATE TRIGGER {REKEY_TRIGGER} AFTER UPDATE OF {', '.join(pk)} "
                           f"ON {t} FOR EACH ROW WHEN ({rekeyed}) {tombstone}",
        }

    def _triggers(self, conn: sa.Connection, table: sa.Table) -> set[str]:
        rows = conn.execute(
            sa.text("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:t) "
                    "AND NOT tgisinternal"),
            {"t": self._qual(conn, table.name)},
        )
        return {r[0] for r in rows}

    def probe(self, conn: sa.Connection, table: sa.Table) -> bool:
        """True when ``_sb_xid`` and the three triggers exist."""
        return XID_COLUMN in table.c and self._triggers(conn, table) >= _TRIGGERS

    # ------------------------------------------------------------------ reading

    def _state(self, cursor: str | None) -> tuple[str | None, str | None, int]:
        state = self.cursor_state(cursor)
        if state is None:
            return None, None, 0
        return state["prev"], state["cur"], int(state["after"])

    def _current_snapshot(self, conn: sa.Connection) -> str:
        return str(conn.exec_driver_sql("SELECT pg_current_snapshot()::text").scalar_one())

    def has_changes(self, conn: sa.Connection, info: TableInfo, cursor: str | None) -> bool:
        """True mid-window; otherwise an indexed EXISTS over the next window."""
        prev, cur, _after = self._state(cursor)
        if cur is not None:
            return True
        cur = self._current_snapshot(conn)
        tomb = self.tombstone_table(conn)
        rows = sa.exists().where(*window(info.table.c[XID_COLUMN], prev, cur))
        tombs = sa.exists().where(tomb.c.entity == info.name, *window(tomb.c.xid, prev, cur))
        return bool(conn.scalar(sa.select(sa.or_(rows, tombs))))

    def read_page(
        self, conn: sa.Connection, info: TableInfo, cursor: str | None, page_size: int
    ) -> ChangePage:
        """The next ``page_size`` changes of the current window (opened if needed)."""
        prev, cur, after = self._state(cursor)
        if cur is None:
            cur, after = self._current_snapshot(conn), 0
        table, tomb = info.table, self.tombstone_table(conn)
        ver = table.c[VERSION_COLUMN]
        rows = conn.execute(
            self.select_rows(info, raw=self.raw_rows)
            .where(ver > after, *window(table.c[XID_COLUMN], prev, cur))
            .order_by(ver).limit(page_size + 1)
        ).all()
        tombs = conn.execute(
            sa.select(tomb.c.version, sa.cast(tomb.c.key, sa.Text))
            .where(tomb.c.entity == info.name, tomb.c.version > after,
                   *window(tomb.c.xid, prev, cur))
            .order_by(tomb.c.version).limit(page_size + 1)
        ).all()
        records, more = merge_page(
            [self.upsert_record(info, r, decode=self.raw_rows) for r in rows],
            [self.delete_record(info, v, k, decode=False) for v, k in tombs],
            page_size,
        )
        if more:
            state = {"prev": prev, "cur": cur, "after": int(records[-1].version)}
        else:  # window exhausted: the next poll opens a new one after ``cur``
            state = {"prev": cur, "cur": None, "after": 0}
        return ChangePage(records=records, next_cursor=dump_cursor(state), more=more)
