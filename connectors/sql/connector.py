"""SQL databases (SQLite, PostgreSQL) as syncbus sources and targets.

Features
    * Change tracking kept by the database itself, so changes made by *any* program
      are seen (the role of Business Central's row-version extension):
      ``prepare_tracking`` adds a ``_sb_version`` row-version column maintained by
      triggers and a ``_syncbus_tombstones`` table filled by delete triggers.
      Existing rows are back-filled, so the first poll is the initial load.
    * ``read_changes``: upserts and deletes merged in version order, bounded pages,
      each page's cursor resumes right after it. ``has_changes``: index seeks only.
    * PostgreSQL cursors are snapshot windows, immune to out-of-order commits of
      concurrent transactions (see ``connectors/sql/postgres.py``).
    * ``upsert``: batched ``INSERT … ON CONFLICT (key) DO UPDATE`` by primary key or
      any unique constraint / unique index, one executemany per batch; bad rows are
      isolated with SAVEPOINTs and get the database's own error text.
    * ``fetch``: current rows by primary key or any unique key, one ``IN`` query per
      chunk of keys, in exactly the value form of ``read_changes``.
    * ``describe``: reflected tables with portable types, keys, unique keys and FKs.
    * ``create_tables``: tables and columns made from another system's metadata
      (``syncbus schema pull``; see ``connectors/sql/ddl.py``), never dropped or altered.
    * Errors from the one tree of ``connectors.base``; passwords never in messages.

Configuration
    ``url``: a SQLAlchemy URL. ``sqlite:///path/file.db`` or
    ``postgresql+psycopg://user:password@host:5432/db`` (plain ``postgresql://``
    is switched to psycopg 3). ``application_name`` / ``connect_timeout`` may be
    given in the URL query; defaults are ``syncbus:<name>`` and 10 s. A PostgreSQL
    server that stops answering on an open connection is noticed within
    ``MAX_RETRY_SECONDS`` (``tcp_user_timeout`` and TCP keepalives, also overridable
    in the URL), so a write never hangs on a dead peer for the kernel's minutes.

    ``schema``: PostgreSQL schema (default: the connection's ``current_schema()``);
    the ``_syncbus_*`` objects are created in it too. SQLite: leave None (``main``).
    Entities are the table names in it.

    ``busy_timeout``: SQLite only, seconds a writer waits for the lock before
    "database is locked" (raised as ``TransientError``). Default 5.

    SQLite connections run with ``journal_mode=WAL`` and ``foreign_keys=ON``.

Limits
    * Tracked tables need a primary key. PostgreSQL 13 or later (``xid8``,
      ``pg_current_snapshot``); SQLite with the JSON functions (3.38+, or JSON1).
    * ``modified_at`` of change records is always None.
    * An upsert by a unique key that is not the primary key inserts missing rows, so
      the primary key must then have a default (identity, serial, SQLite rowid).
    * A long-running transaction holds back ``pg_snapshot_xmin``: until it ends, each
      PostgreSQL poll range-scans every row version written since it began.
    * SQLite ``REPLACE`` / ``INSERT OR REPLACE`` deletes conflicting rows without
      firing delete triggers (unless ``recursive_triggers`` is on): a row removed
      that way through a *different* unique key leaves no tombstone.
    * PostgreSQL versions are unique and increasing per record, but pages are in
      commit-window order, not in global version order across windows.
    * Tombstones are kept until ``purge_tombstones`` removes them.
    * ``TRUNCATE`` is not tracked (no row triggers fire).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import URL

from connectors.base import (
    MAX_RETRY_SECONDS,
    Capabilities,
    ChangePage,
    ConfigError,
    EntityInfo,
    FetchedRecord,
    Outcome,
    SchemaError,
    Version,
    WriteRow,
)
from connectors.features import TableChange
from connectors.sql.ddl import TableMaker
from connectors.sql.errors import db_error_text, translate_errors
from connectors.sql.fetch import Fetcher
from connectors.sql.postgres import PostgresTracker
from connectors.sql.schema import VERSION_COLUMN, Catalog, TableInfo
from connectors.sql.sqlite import SqliteTracker
from connectors.sql.tracking import Tracker
from connectors.sql.writer import Writer

__all__ = ["SqlConnector"]

log = structlog.get_logger(__name__)

#: Seconds a SQLite writer waits for the database lock.
DEFAULT_BUSY_TIMEOUT = 5.0
#: Seconds to wait for a PostgreSQL connection.
DEFAULT_CONNECT_TIMEOUT = 10
#: libpq settings that turn a PostgreSQL server gone silent on an open connection into
#: an error within MAX_RETRY_SECONDS (a dead peer otherwise blocks a call for minutes).
DEAD_PEER_SETTINGS: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
    "tcp_user_timeout": int(MAX_RETRY_SECONDS * 1000),
}
#: Keys per round trip in ``snapshot``.
SNAPSHOT_PAGE = 1000
#: Execution option marking a write connection (SQLite: ``BEGIN IMMEDIATE``).
_WRITE = "syncbus_write"

CAPABILITIES = Capabilities(
    change_tracking=True, deletes_tracked=True, alternate_keys=True, max_batch=1000,
    tracking_setup=True, table_creation=True,
)


class SqlConnector:
    """A SQLite or PostgreSQL database, through SQLAlchemy Core.

    Args:
        name: The connection's name (used in messages and ``application_name``).
        url: SQLAlchemy URL (see the module docstring).
        schema: PostgreSQL schema / SQLite attached database; None = default.
        busy_timeout: SQLite only: seconds to wait for the write lock.

    Raises:
        ConfigError: the URL is malformed or names an unsupported database.
    """

    def __init__(
        self, name: str, url: str, *, schema: str | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        self.name = name
        self.schema = schema
        self._url = _parse_url(name, url)
        self._engine = _create_engine(name, self._url, busy_timeout)
        dialect = self._engine.dialect.name
        self._tracker: Tracker = (
            PostgresTracker(name, schema) if dialect == "postgresql" else SqliteTracker(name, schema)
        )
        self._catalog = Catalog(self._engine, schema, name, self._tracker.probe)
        self._writer = Writer(self._catalog, self._write_connection, dialect, name, self._url)
        self._fetcher = Fetcher(self._catalog, self._engine, self._tracker, self._errors, name)
        password = self._url.password
        secret = password if isinstance(password, str) and password else None
        self._tables = TableMaker(self._engine, self._write_connection, schema,
                                  lambda exc: db_error_text(exc, secret=secret))

    def __repr__(self) -> str:
        return f"<SqlConnector {self.name!r} {self._url.render_as_string(hide_password=True)}>"

    @property
    def capabilities(self) -> Capabilities:
        """Change tracking with deletes (set up by ``prepare_tracking``), alternate (unique)
        keys, batches up to 1000; creates tables from metadata (``create_tables``)."""
        return CAPABILITIES

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

    # ------------------------------------------------------------------ setup / metadata

    def prepare_tracking(self, entities: Sequence[str]) -> list[str]:
        """Install change tracking on ``entities``; safe to run again (idempotent).

        All tables are prepared in one transaction: all or nothing.

        Args:
            entities: Table names.

        Returns:
            Human-readable lines of what was done (``"customers: added column
            _sb_version"``, ``"customers: already prepared"``).

        Raises:
            SchemaError: a table does not exist or has no primary key.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: the database is locked / busy.
        """
        with self._errors(), self._write_connection() as conn, conn.begin():
            lines = self._tracker.prepare_common(conn)
            for entity in entities:
                lines += self._tracker.prepare_table(conn, self._catalog.reflect(conn, entity))
        self._catalog.invalidate()
        log.info("tracking_prepared", connector=self.name, entities=len(entities))
        return lines

    def describe(self, entities: Sequence[str] | None = None) -> list[EntityInfo]:
        """Reflect ``entities`` (all user tables when None) afresh.

        Args:
            entities: Table names, or None for every table.

        Returns:
            One ``EntityInfo`` per table: portable field types, key, unique keys
            (constraints and unique indexes), FK references, ``change_tracking``.

        Raises:
            SchemaError: a named table does not exist (the message lists what does).
            ConnectorUnavailable: the database cannot be reached.
        """
        with self._errors(), self._engine.connect() as conn:
            names = list(entities) if entities is not None else self._catalog.table_names(conn)
            infos = [self._catalog.refresh(conn, name) for name in names]
        return [info.describe() for info in infos]

    def pulled_entities(self, source: str) -> list[str]:
        """Entities earlier ``create_tables`` calls took from ``source``, by name.

        Raises:
            ConnectorUnavailable: the database cannot be reached.
        """
        with self._errors():
            return self._tables.pulled(source)

    def create_tables(self, source: str, entities: Sequence[EntityInfo], *,
                      dry_run: bool = False) -> list[TableChange]:
        """Create or extend one table per entity (``connectors/sql/ddl.py``).

        Args:
            source: The connection the entities come from (recorded in the database).
            entities: Their metadata.
            dry_run: Plan and report only; change nothing.

        Returns:
            The changes in order, then one failed change per table the database refused.

        Raises:
            ConnectorUnavailable: the database cannot be reached.
        """
        with self._errors():
            changes = self._tables.create(source, entities, dry_run=dry_run)
        self._catalog.invalidate()
        return changes

    # ------------------------------------------------------------------ change feed

    def has_changes(self, entity: str, cursor: str | None) -> bool:
        """Cheap check (GetMaxRowVersion) whether anything changed after ``cursor``.

        Args:
            entity: Table name.
            cursor: A ``next_cursor`` of an earlier page, or None (beginning).

        Returns:
            True when ``read_changes`` would return at least one record (on
            PostgreSQL also True while a window is half read).

        Raises:
            SchemaError: unknown table, not prepared, or a foreign cursor.
            ConnectorUnavailable: the database cannot be reached.
        """
        info = self._tracked(entity)
        with self._errors(entity), self._engine.connect() as conn, conn.begin():
            return self._tracker.has_changes(conn, info, cursor)

    def read_changes(self, entity: str, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        """Yield pages of changes after ``cursor``, oldest first.

        Every page is read in its own short transaction (no transaction stays open
        while the caller publishes). At least one page is yielded, possibly empty;
        its ``next_cursor`` must be stored too (on PostgreSQL it moves the window on).

        Args:
            entity: Table name.
            cursor: A ``next_cursor`` of an earlier page, or None (initial load).
            page_size: Records per page, at least 1.

        Returns:
            An iterator of ``ChangePage``; the last one has ``more=False``.

        Raises:
            ValueError: ``page_size`` < 1.
            SchemaError: unknown table, not prepared, or a foreign cursor.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: the database is busy.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        info = self._tracked(entity)
        self._tracker.cursor_state(cursor)  # a foreign cursor fails now, not at first page
        return self._pages(info, cursor, page_size)

    def _pages(self, info: TableInfo, cursor: str | None, page_size: int) -> Iterator[ChangePage]:
        while True:
            with self._errors(info.name), self._engine.connect() as conn, conn.begin():
                page = self._tracker.read_page(conn, info, cursor, page_size)
            yield page
            if not page.more:
                return
            cursor = page.next_cursor

    def snapshot(self, entity: str) -> Iterator[tuple[dict[str, Any], Version]]:
        """Yield (key, version) of every row, in key order, ``SNAPSHOT_PAGE`` per query.

        Pages are keyset-paginated, each in its own transaction, so the snapshot is
        not one consistent instant: rows changed meanwhile may show either version.

        Raises:
            SchemaError: unknown table or not prepared.
            ConnectorUnavailable: the database cannot be reached.
        """
        return self._snapshot(self._tracked(entity))

    def _snapshot(self, info: TableInfo) -> Iterator[tuple[dict[str, Any], Version]]:
        table, raw = info.table, self.dialect == "sqlite"
        pk = [table.c[k] for k in info.key]
        cols = [sa.type_coerce(c, sa.types.NullType()).label(c.name) if raw else c for c in pk]
        query = sa.select(*cols, table.c[VERSION_COLUMN]).order_by(*pk).limit(SNAPSHOT_PAGE)
        last: tuple[Any, ...] | None = None
        while True:
            page = query
            if last is not None:
                page = query.where(pk[0] > last[0] if len(pk) == 1 else sa.tuple_(*pk) > sa.tuple_(*last))
            with self._errors(info.name), self._engine.connect() as conn:
                rows = conn.execute(page).all()
            for row in rows:
                key = dict(zip(info.key, row[:-1], strict=True))
                if raw:
                    key = {k: info.decoders[k](v) for k, v in key.items()}
                yield key, int(row[-1] or 0)
            if len(rows) < SNAPSHOT_PAGE:
                return
            last = tuple(rows[-1][:-1])

    def fetch(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[FetchedRecord | None]:
        """Read the current rows with ``keys``: one ``IN`` query per chunk of keys.

        Each key is the primary key or a unique key (any column order), with values
        in the forms ``upsert`` accepts. ``FetchedRecord.key`` is the primary key,
        ``values`` are as ``read_changes`` gives them, ``version`` is ``_sb_version``
        on a prepared table (None otherwise) and ``modified_at`` is None.

        Returns:
            One entry per key, in order (duplicates allowed): the row, or None where
            none matches (also for a null key value or one that does not fit its column).

        Raises:
            SchemaError: unknown table, or a key that is neither the primary key nor a
                unique key (an unknown column included).
            ConnectorUnavailable: the database cannot be reached.
            TransientError: the database is busy.
        """
        return self._fetcher.fetch(entity, keys)

    def purge_tombstones(self, older_than: timedelta) -> int:
        """Delete tombstones older than ``older_than``; only safe beyond every detector's lag.

        Returns:
            How many tombstones were removed.

        Raises:
            ConnectorUnavailable: the database cannot be reached.
        """
        cutoff = datetime.now(UTC) - older_than
        with self._errors(), self._write_connection() as conn, conn.begin():
            tomb = self._tracker.tombstone_table(conn)
            if self.dialect == "sqlite":  # stored as text, UTC, "YYYY-MM-DD HH:MM:SS.SSS"
                bound: Any = cutoff.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                result = conn.execute(sa.delete(tomb).where(sa.type_coerce(tomb.c.deleted_at, sa.Text) < bound))
            else:
                result = conn.execute(sa.delete(tomb).where(tomb.c.deleted_at < cutoff))
        return max(result.rowcount, 0)

    # ------------------------------------------------------------------ writing

    def upsert(self, entity: str, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Insert or update ``rows`` by key, idempotently; one outcome per row, in order.

        ``WriteRow.key`` must be the primary key or a unique key (the conflict target);
        ``values`` hold the other columns (key columns may repeat there if equal).
        Values may be JSON-shaped (ISO strings, decimal strings, base64): they are
        coerced to the column types first. One bad row does not fail the others.

        Returns:
            ``APPLIED``, or ``PERMANENT`` with the database's error text (and its
            SQLSTATE on PostgreSQL) or the coercion problem.

        Raises:
            SchemaError: ``entity`` is not a table.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: lock, deadlock, serialization failure, database locked.
        """
        return self._writer.upsert(entity, rows)

    def delete(self, entity: str, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete rows by key (a missing row counts as applied); one outcome per key.

        Raises:
            SchemaError: ``entity`` is not a table.
            ConnectorUnavailable: the database cannot be reached.
            TransientError: lock, deadlock, serialization failure, database locked.
        """
        return self._writer.delete(entity, keys)

    def close(self) -> None:
        """Close every pooled connection (the connector can still be used afterwards)."""
        self._engine.dispose()

    # ------------------------------------------------------------------ internals

    def _errors(self, entity: str | None = None) -> AbstractContextManager[None]:
        return translate_errors(connector=self.name, url=self._url, entity=entity)

    def _write_connection(self) -> sa.Connection:
        return self._engine.connect().execution_options(**{_WRITE: True})

    def _tracked(self, entity: str) -> TableInfo:
        """The table's info, checked to be prepared (re-reflected once if it was not)."""
        with self._errors(entity):
            info = self._catalog.get(entity)
            if not info.tracked:
                info = self._catalog.reload(entity)
        if not info.tracked:
            raise SchemaError(
                f"{self.name}: table {entity!r} is not prepared for change tracking "
                "(run prepare_tracking / `syncbus setup`)", entity=entity,
            )
        return info


def _parse_url(name: str, url: str) -> URL:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"connection {name!r}: malformed database URL") from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"connection {name!r}: unsupported database {backend!r} (sqlite or postgresql)"
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _create_engine(name: str, url: URL, busy_timeout: float) -> sa.Engine:
    if url.get_backend_name() == "postgresql":
        args: dict[str, Any] = {}
        if "application_name" not in url.query:
            args["application_name"] = f"syncbus:{name}"[:63]
        if "connect_timeout" not in url.query:
            args["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        args.update({k: v for k, v in DEAD_PEER_SETTINGS.items() if k not in url.query})
        return sa.create_engine(url, pool_pre_ping=True, connect_args=args)
    engine = sa.create_engine(url)
    timeout_ms = max(int(busy_timeout * 1000), 0)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (below): the sqlite3 module's own transaction
        # handling skips it before SELECT and SAVEPOINT, which breaks both.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front: a deferred transaction upgrading from
        # reader to writer gets SQLITE_BUSY at once, without waiting busy_timeout.
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
